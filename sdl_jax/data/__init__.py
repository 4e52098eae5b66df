"""Data sets (TFDS builders, one module per on-disk format) and the tf.data pipeline.

Every builder yields examples with the same features:

* ``image``: the encoded image at its original size (grey stays one channel);
* ``label``: ``tfds.features.ClassLabel`` with the taxonomy's emotion names (dominant label);
* ``distribution``: float32 ``[C]``, summing to 1;
* ``votes``: float32 ``[V]`` raw vote counts, for sets that have votes;
* ``file_name``: the image's path relative to the data set's directory.

Splits are ``train``, ``validation`` and ``test``.

``BUILDERS`` maps the ``config.data.name`` of a config to the module that owns that
format; each such module defines ``make_builder(data_config, data_dir)`` returning an
(unprepared) ``tfds.core.DatasetBuilder``. ``get_builder`` prepares it.

The builders share, one concern per module: ``source_builder`` (the TFDS builder base
and its cache key), ``label_files`` (parsing label files), ``image_files`` (listing and
checking images; missing images), ``splits`` (seeded split, split files, assignment) and
``buildlog`` (what happened to every row, and the records a build leaves).
"""

from __future__ import annotations

import importlib
import os

from absl import logging

BUILDERS = {
    "synthetic": "sdl_jax.data.synthetic",
    "ferplus": "sdl_jax.data.ferplus",
    "emotion6": "sdl_jax.data.ldl",
    "flickr_ldl": "sdl_jax.data.ldl",
    "twitter_ldl": "sdl_jax.data.ldl",
    "folders": "sdl_jax.data.folders",
    "votes_csv": "sdl_jax.data.votes_csv",
}


def default_data_dir() -> str:
  """Where prepared data sets are cached: ``$SDL_JAX_DATA_DIR`` or ``~/.cache/sdl_jax``."""
  return os.environ.get("SDL_JAX_DATA_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "sdl_jax"))


def get_builder(data_config, data_dir: str | None = None):
  """Returns the prepared TFDS builder for ``data_config.name``.

  Args:
    data_config: the ``config.data`` ConfigDict (``name``, ``path`` and format options).
    data_dir: TFDS data directory for the prepared set; default ``data_config.cache_dir``
      if set, else ``default_data_dir()``.
  """
  name = data_config.name
  if name not in BUILDERS:
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(BUILDERS))}")
  module = importlib.import_module(BUILDERS[name])
  data_dir = data_dir or data_config.get("cache_dir") or default_data_dir()
  builder = module.make_builder(data_config, data_dir)
  manual_dir = data_config.get("path") or None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(download_config=download_config)
  except FileExistsError:
    # Another process (e.g. a second run started at the same time on a fresh cache)
    # finished preparing the same version first: TFDS cannot rename its own copy over
    # it. Use theirs; a fresh builder finds it complete and prepares nothing.
    logging.info("%s was prepared by another process meanwhile; using that copy", name)
    builder = module.make_builder(data_config, data_dir)
    builder.download_and_prepare(download_config=download_config)
  return builder
