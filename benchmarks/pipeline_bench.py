"""The input pipeline's images/s against the train step's consumption.

For a preset of ``configs/sdl.py``, a small stand-in data set in that preset's published
format is written to a temporary directory and prepared by the real TFDS builder; then
``sdl_jax.data.pipeline.train_dataset`` (the training stream: decode, resize, random crop,
flip, normalise, batch to ``[devices, B/devices, ...]``, AUTOTUNE parallelism, prefetch)
is iterated as numpy batches, as the training loop does, and timed after a warm-up.

* ``paper`` (and the other VGG-16 presets): Flickr_LDL layout, ``--pipeline_images``
  JPEGs of ``--jpeg_size`` (500x375 by default, the typical Flickr size) with smooth
  random content and noise (quality 90), 11 votes each;
* ``ferplus``: FER+ layout, 48x48 grey PNGs: the first ``--pipeline_images`` faces of
  the real archive (``../shared/data/ferplus.tar.gz`` beside the repository) when it is
  there, else synthetic ones; they are used for their pixels only.

The consumer is the JAX train step of the preset's model, image size and batch: taken
from the ``train`` section when it measured that configuration, else measured here
(JAX only).
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ferplus.tar.gz"
_MIKELS_HEADER = "images-name Amusement Awe Contentment Excitement Anger Disgust Fear Sadness"
_FER_DIRS = ("FER2013Train", "FER2013Valid", "FER2013Test")


def _smooth_image(rng, h, w, channels):
  """Low-frequency colour fields plus noise: compresses like a photo, not like noise."""
  small = rng.uniform(0, 255, size=(max(2, h // 32), max(2, w // 32), channels))
  img = Image.fromarray(small.astype(np.uint8).squeeze()).resize((w, h), Image.BICUBIC)
  arr = np.asarray(img, np.float32).reshape(h, w, channels)
  arr += rng.normal(0, 12, size=arr.shape)
  return np.clip(arr, 0, 255).astype(np.uint8)


def write_flickr_like(root: str, n: int, size=(500, 375), seed: int = 0) -> str:
  """``n`` JPEGs ``images/1.jpg ...`` and a Flickr_LDL ``ground_truth.txt`` (11 votes)."""
  rng = np.random.default_rng(seed)
  w, h = size
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  rows = [_MIKELS_HEADER]
  for i in range(1, n + 1):
    Image.fromarray(_smooth_image(rng, h, w, 3)).save(
        os.path.join(root, "images", f"{i}.jpg"), quality=90)
    votes = rng.multinomial(11, rng.dirichlet(np.ones(8)))
    rows.append(f"{i}.jpg " + " ".join(str(v) for v in votes))
  with open(os.path.join(root, "ground_truth.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(rows) + "\n")
  return root


def _archive_faces(archive: str, n: int):
  """The first ``n`` (png bytes, label.csv row) pairs of the archive's test folder."""
  pngs, rows = {}, None
  with tarfile.open(archive, "r:gz") as tar:
    for member in tar:
      parts = member.name.split("/")
      if len(parts) != 3 or parts[1] != "FER2013Test" or not member.isfile():
        if pngs and parts[1:2] != ["FER2013Test"]:
          break  # The folder's files are contiguous in the archive.
        continue
      if parts[2].endswith(".png") and len(pngs) < n:
        pngs[parts[2]] = tar.extractfile(member).read()
      elif parts[2] == "label.csv":
        rows = {line.split(",", 1)[0]: line
                for line in tar.extractfile(member).read().decode().splitlines() if line}
        break
  if not rows:
    raise ValueError(f"{archive}: no data/FER2013Test/label.csv after its images")
  return [(png, rows[name].split(",", 1)[1]) for name, png in pngs.items() if name in rows]


def write_ferplus_like(root: str, n: int, archive: str | None, seed: int = 0) -> str:
  """A FER+ layout (``data/FER2013{Train,Valid,Test}/label.csv`` + PNGs) with ``n``
  training faces (real ones from ``archive`` if given) and 8 in each other split."""
  rng = np.random.default_rng(seed)
  if archive:
    faces = _archive_faces(archive, n + 16)
  else:
    faces = []
    for _ in range(n + 16):
      buf = io.BytesIO()
      Image.fromarray(_smooth_image(rng, 48, 48, 1)[..., 0]).save(buf, format="PNG")
      votes = rng.multinomial(10, [0.5, 0.2, 0.1, 0.1, 0.05, 0.02, 0.02, 0.01, 0, 0])
      faces.append((buf.getvalue(), '"(0, 0, 48, 48)",' + ",".join(map(str, votes))))
  if len(faces) < 24:
    raise ValueError(f"need at least 24 faces, got {len(faces)}")
  parts = {_FER_DIRS[0]: faces[:-16], _FER_DIRS[1]: faces[-16:-8], _FER_DIRS[2]: faces[-8:]}
  for folder, items in parts.items():
    d = os.path.join(root, "data", folder)
    os.makedirs(d, exist_ok=True)
    lines = []
    for i, (png, rest) in enumerate(items):
      name = f"fer{i:07d}.png"
      with open(os.path.join(d, name), "wb") as f:
        f.write(png)
      lines.append(f"{name},{rest}")
    with open(os.path.join(d, "label.csv"), "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  return root


def time_pipeline(dataset, batches: int, warmup: int) -> dict:
  """Iterates ``dataset`` as numpy: ``warmup`` batches, then ``batches`` timed ones."""
  it = dataset.as_numpy_iterator()
  for _ in range(warmup):
    batch = next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - t0
  return {"seconds": seconds, "batches": batches,
          "shapes": {k: list(v.shape) for k, v in batch.items()}}


def consumer_rate(model, model_kwargs, size, batch, num_classes, args, log) -> dict:
  """Median images/s of the JAX train step alone (compile and one warm-up excluded)."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import jax_train  # pylint: disable=g-import-not-at-top
  from benchmarks.train_bench import synthetic_batch  # pylint: disable=g-import-not-at-top
  images, labels, dists = synthetic_batch(batch, size, num_classes)
  config = jax_train.bench_config(model, batch=batch, dtype=args.dtype,
                                  model_kwargs=model_kwargs)
  jt = jax_train.JaxTrainer(config, images, labels, dists)
  jt.compile()
  t0 = time.perf_counter()
  jt.step()
  jt.sync()
  first = time.perf_counter() - t0
  steps = max(1, min(20, math.ceil(args.min_repeat_s / first)))
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(steps):
      jt.step()
    jt.sync()
    times.append((time.perf_counter() - t0) / steps)
  del jt
  jax.clear_caches()
  log(f"  consumer {model} {size}px batch {batch}: {batch / np.median(times):.1f} img/s")
  return {"images_per_s": float(batch / np.median(times)), "measured": "here, JAX only"}


_CONSUMERS = {}


def _arch(kwargs) -> str:
  """Model kwargs that change the amount of work (dropout's rate does not), as a key."""
  return json.dumps({k: v for k, v in kwargs.items() if k != "dropout_rate"},
                    sort_keys=True, default=list)


def bench_preset(preset: str, args, tmp: str, train_results, log) -> dict:
  """Pipeline images/s for ``preset`` against its train step (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import jax_train  # pylint: disable=g-import-not-at-top
  from sdl_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  config = jax_train.load_config(preset)
  if args.pipeline_batch:
    config.batch_size = args.pipeline_batch
  if args.pipeline_image_size:
    scale = config.resize_size / config.image_size
    config.image_size = args.pipeline_image_size
    config.resize_size = int(round(args.pipeline_image_size * scale))
  src = os.path.join(tmp, preset)
  t0 = time.perf_counter()
  if config.data.name == "ferplus":
    archive = args.ferplus_archive or (str(_ARCHIVE) if _ARCHIVE.exists() else "")
    write_ferplus_like(src, args.pipeline_images, archive or None)
    what = ("FER+ faces from " + os.path.basename(archive)) if archive else "synthetic PNGs"
    what += ", 48x48 grey PNG"
  else:
    w, h = (int(v) for v in args.jpeg_size.split("x"))
    config.data.name = "flickr_ldl"  # All JPEG presets share the decode + augment work.
    write_flickr_like(src, args.pipeline_images, (w, h))
    what = f"synthetic {w}x{h} JPEG (q90)"
  config.data.path = src
  config.data.cache_dir = os.path.join(tmp, "tfds")
  builder = data_lib.get_builder(config.data)
  build_s = time.perf_counter() - t0
  ds, steps_per_epoch = pipeline.train_dataset(builder, config)
  timing = time_pipeline(ds, args.pipeline_batches, warmup=max(3, steps_per_epoch))
  b = config.batch_size
  out = {"preset": preset, "data": what, "images": args.pipeline_images,
         "image_size": config.image_size, "resize_size": config.resize_size,
         "crop": config.crop, "batch": b, "local_devices": jax.local_device_count(),
         "build_s": build_s, "steps_per_epoch": steps_per_epoch, **timing,
         "images_per_s": b * timing["batches"] / timing["seconds"]}
  log(f"  {out['images_per_s']:.0f} img/s ({what}, {config.image_size}px, batch {b})")

  model = args.pipeline_consumer or config.model
  kwargs = dict(args.model_kwargs if args.pipeline_consumer else config.model_kwargs)
  cons = {"what": f"{model} {config.image_size}px b{b}" + (
      f" {kwargs.get('widths')}" if kwargs.get("widths") else "")}
  match = [r for r in train_results if "error" not in r and r["model"] == model and
           r["image_size"] == config.image_size and r["batch"] == b and
           r["dtype"] == args.dtype and _arch(r["model_kwargs"]) == _arch(kwargs)]
  if match:
    cons.update(images_per_s=match[0]["jax"]["images_per_s"]["median"],
                measured="train section")
  else:
    key = (model, _arch(kwargs), config.image_size, b, args.dtype)
    if key not in _CONSUMERS:  # Presets of one run may share a consumer.
      _CONSUMERS[key] = consumer_rate(model, kwargs, config.image_size, b, 8, args, log)
    cons.update(_CONSUMERS[key])
  out["consumer"] = cons
  out["ratio"] = out["images_per_s"] / cons["images_per_s"]
  return out
