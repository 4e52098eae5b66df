r"""Emotion distributions for new images, from a trained work directory or a shipped model.

From the command line (the config comes from the workdir, or the shipped model's record)::

    python run.py --workdir=W --mode=predict --images=a.jpg,photos/ [--predict_out=p.jsonl]
        [--plot_dir=figs/]
    python run.py --pretrained=ferplus --mode=predict --images=faces/

writes one JSON line per image, in the order given (a folder's images sorted by path)::

    {"file": "photos/cat.jpg", "distribution": {"amusement": 0.31, ...},
     "dominant": "amusement", "probability": 0.31}

A path that is missing, or a file that is not a readable image, gets an error line
``{"file": ..., "error": "..."}`` instead; the other images are still predicted, and the
exit status is 1 when any failed. A folder contributes the files under it (recursively)
whose extension is an image extension (``sdl_jax.data.image_files.IMAGE_EXTENSIONS``); a
file named explicitly is always tried, whatever its extension.

From Python::

    predictor = Predictor.from_workdir(W)     # or Predictor.from_pretrained("ferplus")
    for row in predictor.predict(["a.jpg", "photos/"]):
      print(row["file"], row["dominant"])
    probs = predictor.predict_arrays([uint8_image_hw3, ...])   # float32 [N, C]

Preprocessing is exactly the evaluation path of the training pipeline
(``sdl_jax.data.pipeline``): the file is read as the data set builders read it
(``image_files.encode_image``: fully decoded and checked; what TensorFlow cannot decode
exactly, such as 16-bit images or photos with an EXIF orientation, is decoded by
``image_files.decode_image`` and re-encoded losslessly as PNG), decoded to three channels
(grey replicated, alpha dropped),
squash-resized to ``config.resize_size``, centre-cropped to ``config.image_size`` and
normalised with the backbone's mean and std. Images of any size are accepted.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from sdl_jax.data import image_files

DEFAULT_BATCH = 64


# --------------------------------------------------------------------------------------
# Finding and reading images.


def collect_images(paths: Iterable[str | os.PathLike]) -> list[tuple[str, str | None]]:
  """Expands files and folders into ``(file, error or None)``, in the order given.

  A folder gives its image files (by extension, recursively, sorted; hidden entries
  skipped). A file is taken as it is. A missing path, or a folder without images, gives
  one entry with an error message.
  """
  out = []
  for p in paths:
    p = os.fspath(p)
    if not p:
      continue
    if os.path.isdir(p):
      images, _ = image_files.list_images(p)
      if not images:
        out.append((p, "folder has no image files "
                    f"({', '.join(image_files.IMAGE_EXTENSIONS)})"))
      out.extend((os.path.join(p, *name.split("/")), None) for name in images)
    elif os.path.exists(p):
      out.append((p, None))
    else:
      out.append((p, "no such file or folder"))
  return out


def read_image_file(path: str) -> bytes:
  """Encoded bytes of ``path`` that the pipeline's decoder reads (see module docstring).

  Raises:
    image_files.ImageError: the file is unreadable, empty, truncated or not an image.
  """
  data, _ = image_files.encode_image(path, channels=3)
  return data


def encode_array(image) -> bytes:
  """A uint8 image array ``[H, W]``, ``[H, W, 1|3|4]`` as lossless PNG bytes.

  Raises:
    ValueError: for another shape or a dtype other than uint8.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ValueError(f"image arrays must be uint8 (pixels 0..255), got {a.dtype}")
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
    raise ValueError(f"image arrays must be [H, W] or [H, W, 1|3|4], got shape {a.shape}")
  if a.shape[0] < 1 or a.shape[1] < 1:
    raise ValueError(f"image array has an empty side: shape {a.shape}")
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def model_inputs(encoded: Sequence[bytes], *, model: str, image_size: int,
                 resize_size: int) -> np.ndarray:
  """Encoded images -> the model's input, float32 ``[N, image_size, image_size, 3]``.

  Decoding, resize, centre crop and normalisation are the training pipeline's own
  evaluation functions (``pipeline.decode``, ``pipeline.eval_transform``,
  ``models.preprocess``), so a prediction sees exactly what evaluation sees.
  """
  from sdl_jax import models  # pylint: disable=g-import-not-at-top
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if not encoded:
    return np.zeros((0, image_size, image_size, 3), np.float32)
  tf = pipeline._tf()  # pylint: disable=protected-access  (TF with GPUs hidden)
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(encoded), tf.string))
  ds = ds.map(lambda e: pipeline.eval_transform(pipeline.decode(e), image_size=image_size,
                                                resize_size=resize_size),
              num_parallel_calls=tf.data.AUTOTUNE)
  pixels = np.concatenate(list(ds.batch(256).as_numpy_iterator()))
  return np.asarray(models.preprocess(model, pixels), np.float32)


def _describe(error: Exception) -> str:
  """A short reason for an error line (PIL's messages name an in-memory buffer)."""
  msg = str(error)
  if msg.startswith("UnidentifiedImageError"):
    return "not a readable image (unknown format or not an image file)"
  return msg


# --------------------------------------------------------------------------------------
# The predictor.


class Predictor:
  """A trained model with its preprocessing and emotion names.

  Attributes:
    names: the C emotion names, in the model's output order.
  """

  def __init__(self, model, variables, *, model_name: str, names: Sequence[str],
               image_size: int, resize_size: int, batch_size: int = DEFAULT_BATCH,
               flip: bool = False):
    """
    Args:
      model: the flax module (``sdl_jax.models.get_model``).
      variables: its variables (``{'params': ..., 'batch_stats': ...}``).
      model_name: the ``sdl_jax.models`` registry name (for the normalisation).
      names: the emotion names.
      image_size, resize_size: as in the training config.
      batch_size: images per forward pass; the last batch is padded to it so the
        function is compiled once.
      flip: average each image's distribution with its mirror's (``config.eval_flip``).
    """
    import jax  # pylint: disable=g-import-not-at-top
    from sdl_jax import models  # pylint: disable=g-import-not-at-top
    self.model = model
    self.variables = variables
    self.model_name = model_name
    self.names = tuple(names)
    self.image_size = int(image_size)
    self.resize_size = int(resize_size)
    self.batch_size = int(batch_size)
    self.flip = bool(flip)

    @jax.jit
    def probs_fn(variables, x):
      return jax.numpy.exp(models.log_probs(model.apply, variables, x, self.flip))

    self._probs_fn = probs_fn

  @classmethod
  def from_workdir(cls, workdir: str, which: str = "best", batch_size: int = DEFAULT_BATCH
                   ) -> "Predictor":
    """The model of a training work directory (its saved config and checkpoint).

    Args:
      workdir: a directory written by ``train.train_and_evaluate``.
      which: ``'best'`` (on validation; falls back to ``'latest'`` if there is none) or
        ``'latest'``.
    """
    from sdl_jax import evaluate  # pylint: disable=g-import-not-at-top
    return cls.from_trained(evaluate.load_trained(workdir, which=which), batch_size)

  @classmethod
  def from_pretrained(cls, name: str, batch_size: int = DEFAULT_BATCH) -> "Predictor":
    """A model shipped with the package (``sdl_jax.pretrained.available()``: ``'ferplus'``
    for faces, ``'flickr_ldl'`` for photos), with the preprocessing it was trained with.
    Nothing is downloaded; the weights' SHA-256 is checked.

    Raises:
      ValueError: an unknown name (the message lists the shipped ones) or a damaged file.
    """
    from sdl_jax import pretrained  # pylint: disable=g-import-not-at-top
    return cls.from_trained(pretrained.load(name), batch_size)

  @classmethod
  def from_trained(cls, trained, batch_size: int = DEFAULT_BATCH) -> "Predictor":
    """From a ``sdl_jax.evaluate.Trained`` (its config gives the preprocessing)."""
    config = trained.config
    return cls(trained.model, trained.variables, model_name=config.model,
               names=trained.names, image_size=config.image_size,
               resize_size=config.resize_size, batch_size=batch_size,
               flip=bool(config.get("eval_flip", False)))

  def predict_inputs(self, x) -> np.ndarray:
    """Model inputs float32 ``[N, S, S, 3]`` -> distributions float32 ``[N, C]``."""
    x = np.asarray(x, np.float32)
    n, b = x.shape[0], self.batch_size
    out = []
    for start in range(0, n, b):
      chunk = x[start:start + b]
      pad = b - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
      out.append(np.asarray(self._probs_fn(self.variables, chunk))[:b - pad])
    if not out:
      return np.zeros((0, len(self.names)), np.float32)
    return np.concatenate(out)

  def predict_encoded(self, encoded: Sequence[bytes]) -> np.ndarray:
    """Encoded image files (bytes TensorFlow decodes) -> float32 ``[N, C]``."""
    return self.predict_inputs(model_inputs(
        encoded, model=self.model_name, image_size=self.image_size,
        resize_size=self.resize_size))

  def predict_arrays(self, images: Sequence[Any]) -> np.ndarray:
    """uint8 image arrays (``[H, W]`` or ``[H, W, 1|3|4]``, any sizes) -> float32 ``[N, C]``."""
    return self.predict_encoded([encode_array(a) for a in images])

  def row(self, file: str, probs) -> dict[str, Any]:
    """The JSON-line record of one prediction."""
    probs = np.asarray(probs, np.float64)
    top = int(np.argmax(probs))
    return {"file": file,
            "distribution": {n: float(p) for n, p in zip(self.names, probs)},
            "dominant": self.names[top], "probability": float(probs[top])}

  def predict(self, images, chunk: int = 512) -> list[dict[str, Any]]:
    """Predicts files and folders; never raises for a bad image.

    Args:
      images: a path, or a sequence of paths (files or folders), or of uint8 arrays
        (these are named ``<array i>`` in the output).
      chunk: images read into memory at a time.

    Returns:
      one dict per image, in order: ``{'file', 'distribution': {name: p}, 'dominant',
      'probability'}``, or ``{'file', 'error'}`` for a missing or unreadable file.
    """
    if isinstance(images, (str, os.PathLike)):
      images = [images]
    entries: list[tuple[str, Any, str | None]] = []  # (name, path or array, error)
    paths = []
    for i, item in enumerate(images):
      if isinstance(item, (str, os.PathLike)):
        paths.append(item)
      else:
        if paths:
          entries.extend((f, f, e) for f, e in collect_images(paths))
          paths = []
        entries.append((f"<array {i}>", np.asarray(item), None))
    entries.extend((f, f, e) for f, e in collect_images(paths))

    results: list[dict[str, Any]] = []
    for start in range(0, len(entries), chunk):
      part = entries[start:start + chunk]
      rows: list[dict[str, Any] | None] = []
      good, where = [], []
      for name, src, error in part:
        if error is None:
          try:
            data = encode_array(src) if isinstance(src, np.ndarray) else read_image_file(src)
          except (image_files.ImageError, ValueError) as e:
            error = _describe(e)
          else:
            where.append(len(rows))
            good.append(data)
        rows.append(None if error is None else {"file": name, "error": error})
      probs = self.predict_encoded(good)
      for k, p in zip(where, probs):
        rows[k] = self.row(part[k][0], p)
      results.extend(rows)
    return results


# --------------------------------------------------------------------------------------
# Command line.


def _plot_name(file: str, used: set[str]) -> str:
  stem = os.path.splitext(os.path.basename(file))[0] or "image"
  name, k = f"{stem}.png", 1
  while name in used:
    k += 1
    name = f"{stem}_{k}.png"
  used.add(name)
  return name


def main(workdir: str | None, images: Sequence[str], out: str | None = None,
         plot_dir: str | None = None, which: str = "best",
         batch_size: int = DEFAULT_BATCH, pretrained: str | None = None) -> int:
  """``--mode=predict``: writes JSON lines (to ``out``, default stdout); returns the exit
  status: 0 if every image was predicted, 1 if any failed or the model cannot be used
  (a broken checkpoint, an unknown or damaged shipped model: one line says why).

  The model is ``workdir``'s ``which`` checkpoint, or the shipped model ``pretrained``
  (exactly one of the two)."""
  if not images:
    raise ValueError("--images is empty: give image files and/or folders, comma-separated")
  if bool(workdir) == bool(pretrained):
    raise ValueError("give either --workdir (a trained work directory) or --pretrained "
                     "(a shipped model), not both or neither")
  from sdl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sdl_jax import evaluate  # pylint: disable=g-import-not-at-top
  try:
    if pretrained:
      predictor = Predictor.from_pretrained(pretrained, batch_size=batch_size)
    else:
      predictor = Predictor.from_workdir(workdir, which=which, batch_size=batch_size)
  except (checkpoint.CheckpointError, ValueError) as e:  # one line, no predictions
    return evaluate.refuse("predict", e)
  rows = predictor.predict(list(images))
  stream = open(out, "w", encoding="utf-8") if out else sys.stdout
  try:
    for r in rows:
      stream.write(json.dumps(r) + "\n")
    stream.flush()
  finally:
    if out:
      stream.close()
  failed = [r for r in rows if "error" in r]
  if plot_dir:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from sdl_jax import figures  # pylint: disable=g-import-not-at-top
    os.makedirs(plot_dir, exist_ok=True)
    used: set[str] = set()
    for r in rows:
      if "error" in r:
        continue
      with Image.open(r["file"]) as im:
        shown = np.asarray(im.convert("RGB"))
      figures.plot_prediction(
          shown, [r["distribution"][n] for n in predictor.names], predictor.names,
          os.path.join(plot_dir, _plot_name(r["file"], used)),
          title=f"{r['file']}: {r['dominant']} ({r['probability']:.2f})")
  for r in failed:
    print(f"predict: {r['file']}: {r['error']}", file=sys.stderr)
  print(f"predict: {len(rows) - len(failed)} image(s) predicted, {len(failed)} failed",
        file=sys.stderr)
  return 1 if failed else 0
