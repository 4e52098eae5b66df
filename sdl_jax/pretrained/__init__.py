"""Trained models shipped inside the package: predict without training or downloading.

    from sdl_jax.predict import Predictor
    predictor = Predictor.from_pretrained("ferplus")      # faces: 8 FER+ emotions
    predictor = Predictor.from_pretrained("flickr_ldl")   # photos: Mikels' 8 emotions

or ``python run.py --mode=predict --pretrained=ferplus --images=faces/``. Each model is
two files in this folder:

* ``NAME.msgpack``: the variables, ``{'params': ..., 'batch_stats': ...}``, in
  ``flax.serialization``'s msgpack format (plain arrays in a msgpack map: reading it runs
  no code, unlike a pickle). Parameters are stored as float16 to keep the package small
  and widened to float32 on load; BatchNorm statistics stay float32 (variances can be
  smaller than float16 resolves well).
* ``NAME.json``: what is needed to use it: the training config (model, image and resize
  sizes, test-time mirroring, ...), the emotion names in output order, the SHA-256 of
  the msgpack file (checked on every load), where it came from (command, commit, data,
  split) and its test measures, computed on the stored float16 weights.

The model cards, with data, licence, intended use and limits, are ``docs/models/NAME.md``.
``python -m sdl_jax.pretrained.export`` writes both files from a training work directory.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from sdl_jax.integrity import sha256_file

HERE = os.path.dirname(os.path.abspath(__file__))
FORMAT = "sdl_jax.pretrained/1"


def reference_image(size: int = 96):
  """A fixed uint8 ``[size, size, 3]`` image (colour ramps and a ring) made from arithmetic
  alone, so it is the same on every machine; each model's record holds its prediction."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  y, x = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
  r = np.hypot(x - 0.5, y - 0.45)
  ring = np.exp(-((r - 0.3) / 0.06) ** 2)
  image = np.stack([0.8 * x + 0.2 * ring, 0.6 * y + 0.4 * ring, 1.0 - 0.7 * x * y], axis=-1)
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def available() -> tuple[str, ...]:
  """Names of the shipped models (those with both files in this folder), sorted."""
  names = {f[:-len(".json")] for f in os.listdir(HERE) if f.endswith(".json")}
  return tuple(sorted(n for n in names if os.path.exists(_path(n, ".msgpack"))))


def _path(name: str, ext: str, directory: str | None = None) -> str:
  return os.path.join(directory or HERE, name + ext)


def read_meta(name: str, directory: str | None = None) -> dict[str, Any]:
  """The metadata ``NAME.json`` of a model (see the module docstring).

  Raises:
    ValueError: ``name`` is not a shipped model (the message lists those that are).
  """
  path = _path(name, ".json", directory)
  if not isinstance(name, str) or not name or os.sep in name or not os.path.exists(path):
    known = ", ".join(available()) or "none"
    raise ValueError(f"no pretrained model named {name!r} (available: {known})")
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
  return meta


def load(name: str, directory: str | None = None):
  """The shipped model ``name`` as a ``sdl_jax.evaluate.Trained`` (float32 variables).

  Args:
    name: one of ``available()``.
    directory: where the two files are (default: this package folder).

  Raises:
    ValueError: unknown name, or the msgpack file's SHA-256 differs from the one recorded
      at export (a damaged or replaced file), or its arrays do not fit the model.
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sdl_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sdl_jax import train_state  # pylint: disable=g-import-not-at-top
  meta = read_meta(name, directory)
  path = _path(name, ".msgpack", directory)
  digest = sha256_file(path)
  if digest != meta["sha256"]:
    raise ValueError(f"{path} is damaged: its SHA-256 is {digest[:16]}..., the model's "
                     f"record ({name}.json) says {meta['sha256'][:16]}...; reinstall sdl-jax")
  with open(path, "rb") as f:
    stored = flax.serialization.msgpack_restore(f.read())
  variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), stored)
  config = ml_collections.ConfigDict(meta["config"])
  names = tuple(meta["names"])
  model = train_state.create_model(config, len(names))
  expected = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), np.float32))
  got = jax.tree_util.tree_map(lambda a: a.shape, variables)
  want = jax.tree_util.tree_map(lambda a: tuple(a.shape), dict(expected))
  if got != want:
    raise ValueError(f"{path}: the stored arrays do not fit model {config.model!r} "
                     f"with {len(names)} classes")
  return evaluate.Trained(config=config, model=model, variables=variables, names=names,
                          step=int(meta["source"]["step"]), which="pretrained")
