"""The TFDS builder base of every on-disk format, and its cache key.

Every builder of this package reads a user-given source (a directory or an archive; nothing
is downloaded) and writes a prepared TFDS data set with the common features (see
``sdl_jax.data``): ``image`` (the encoded file at its original size), ``label``
(``ClassLabel`` with the taxonomy's names), ``distribution`` (float32 ``[C]``), ``votes``
(float32 ``[V]``, where the set has votes) and ``file_name``. A subclass's ``_plan()`` reads
and validates the label files into a ``Plan``; the base class checks and writes each
example's image and the build records (``sdl_jax.data.buildlog``).

Cache keys: a builder's TFDS config name is ``<readable prefix>-<hash>``, where the hash
covers the builder version, the resolved source path, the size and modification time of
its label files (or archive), and every option that changes the output. Two different
configurations thus never share a prepared directory ``data_dir/<name>/<config>/<version>``,
and an edited label file leads to a fresh build. Edits to image files alone are not seen.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterable, Iterator, Sequence

from absl import logging
import numpy as np

from sdl_jax.data.buildlog import (BuildLog, LOG_FILE, REENCODED, SPLITS, SPLITS_FILE,
                                   SUMMARY_FILE, UNASSIGNED, UNREADABLE_IMAGE)
from sdl_jax.data.image_files import (ImageError, encode_image, encode_image_bytes,
                                      hide_gpus_from_tf)
from sdl_jax.emotions import Taxonomy


def require_path(data_config) -> str:
  """The absolute source path ``data_config.path``, which must exist."""
  path = data_config.get("path") if hasattr(data_config, "get") else None
  if not path:
    raise ValueError(
        f"config.data.path is not set: data set {data_config.get('name')!r} is built from "
        "files you provide (nothing is downloaded); set it to the data set's directory")
  path = os.path.abspath(os.path.expanduser(str(path)))
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"config.data.path {path!r} does not exist (data set {data_config.get('name')!r}); "
        "nothing is downloaded, point it at your copy of the data set")
  return path


def stat_fingerprint(paths: Iterable[str]) -> list[list[Any]]:
  """``[path, size, mtime_ns]`` of each file: part of the cache key, so edits rebuild."""
  out = []
  for p in paths:
    st = os.stat(p)
    out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
  return out


def config_name(prefix: str, options: dict[str, Any]) -> str:
  """``<prefix>-<10 hex digits>``: a TFDS config name unique to ``options``."""
  digest = hashlib.sha256(
      json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:10]
  prefix = re.sub(r"[^a-z0-9_]+", "_", prefix.lower()).strip("_") or "cfg"
  return f"{prefix}-{digest}"


def common_features(taxonomy: Taxonomy, num_votes: int | None, channels: int):
  """The features every builder writes (``votes`` only when ``num_votes``)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = {
      "image": tfds.features.Image(shape=(None, None, channels)),
      "label": tfds.features.ClassLabel(names=list(taxonomy.names)),
      "distribution": tfds.features.Tensor(shape=(taxonomy.num_classes,),
                                           dtype=np.float32),
      "file_name": tfds.features.Text(),
  }
  if num_votes:
    features["votes"] = tfds.features.Tensor(shape=(num_votes,), dtype=np.float32)
  return tfds.features.FeaturesDict(features)


@dataclasses.dataclass(frozen=True)
class Example:
  """One example to write (its image is checked when it is written)."""
  name: str
  path: str
  label: int
  distribution: np.ndarray
  votes: np.ndarray | None
  origin: str


def _encode_or_error(path: str, channels: int, blobs: dict[str, bytes] | None):
  try:
    if blobs is None:
      return encode_image(path, channels)
    return encode_image_bytes(blobs[path], channels)
  except ImageError as e:
    return e


def _encode_all(examples: Sequence[Example], channels: int,
                blobs: dict[str, bytes] | None = None, chunk: int = 256
                ) -> Iterator[tuple[Example, Any]]:
  """``(example, (bytes, re-encoded?) or ImageError)`` in order.

  Files are read and decoded by a few threads, a bounded chunk at a time: reading many
  small files is mostly waiting, and PIL decodes without holding the GIL. With ``blobs``
  the example paths are keys of that dict of file contents (an archive read in memory).
  """
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  workers = min(8, 2 * (os.cpu_count() or 1))
  with futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for start in range(0, len(examples), chunk):
      part = examples[start:start + chunk]
      results = pool.map(_encode_or_error, [e.path for e in part],
                         [channels] * len(part), [blobs] * len(part))
      yield from zip(part, results)


@dataclasses.dataclass
class Plan:
  """What a build will write: examples per split, the log so far, and facts to record.

  ``blobs``, when set, holds the image files' contents by the examples' ``path``.
  """
  examples: dict[str, list[Example]]
  log: BuildLog
  info: dict[str, Any]
  blobs: dict[str, bytes] | None = None


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


class SourceBuilder(_tfds().core.GeneratorBasedBuilder, skip_registration=True):
  """A ``GeneratorBasedBuilder`` reading one data set format from a local source.

  Subclasses set ``name``, ``VERSION``, ``DESCRIPTION`` and implement ``_plan()``; they
  are constructed with the options that define the variant (``options['path']`` is the
  source). The builder is not registered with TFDS (``skip_registration``): it is made
  through this package's ``make_builder`` functions, never by ``tfds.builder(name)``,
  and so its name cannot collide with TFDS's own data sets.

  The TFDS config is a custom ``BuilderConfig`` named by ``config_name(prefix,
  options)``, so each variant has its own directory ``data_dir/<name>/<config>/<version>``.
  The source is always ``options['path']``; a ``manual_dir`` given to
  ``download_and_prepare`` is not used (``get_builder`` passes the same path).
  """

  VERSION = _tfds().core.Version("1.1.0")
  WRITES_BUILD_RECORDS = True
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "16-bit images scaled to the nearest 8-bit level (were clipped), "
                            "EXIF orientation applied, palettes and alpha as TensorFlow "
                            "decodes them."}
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""

  def __init__(self, *, options: dict[str, Any], taxonomy: Taxonomy,
               num_votes: int | None, channels: int, prefix: str, data_dir: str | None):
    if channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {channels}")
    self._options = dict(options)
    self._taxonomy = taxonomy
    self._num_votes = num_votes
    self._channels = channels
    self._plan_result: Plan | None = None
    key = dict(options, builder=self.name, version=str(self.VERSION),
               taxonomy=list(taxonomy.names), channels=channels)
    tfds = _tfds()
    config = tfds.core.BuilderConfig(
        name=config_name(prefix, key),
        description=json.dumps(options, sort_keys=True, default=str))
    super().__init__(data_dir=data_dir, config=config)

  @property
  def options(self) -> dict[str, Any]:
    return dict(self._options)

  @property
  def taxonomy(self) -> Taxonomy:
    return self._taxonomy

  def _info(self):
    tfds = _tfds()
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=common_features(self._taxonomy, self._num_votes, self._channels),
        supervised_keys=("image", "label"),
        homepage=self.HOMEPAGE or None,
        citation=self.CITATION or None,
    )

  @abc.abstractmethod
  def _plan(self) -> Plan:
    """Reads and validates the label files; returns the examples per split."""

  def _split_generators(self, dl_manager):
    del dl_manager  # The source is self._options['path']; nothing is downloaded.
    hide_gpus_from_tf()
    plan = self._plan()
    for split in SPLITS:
      if not plan.examples[split]:
        raise ValueError(
            f"{self.name}: split {split!r} would be empty; "
            f"rows so far: {json.dumps(plan.log.summary()['splits'])}. "
            "Check config.data.path, the split file or split_fractions")
    plan.log.check(UNASSIGNED)
    self._plan_result = plan
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Checks each planned example's image; yields ``(file name, features)``.

    After the last example the split's counts are checked, logged and written to the
    build records (so the records are complete once the last split is written).
    """
    plan = self._plan_result
    log = plan.log
    written_names = plan.info.setdefault("written_names", {s: [] for s in SPLITS})
    for ex, encoded in _encode_all(plan.examples[split], self._channels, plan.blobs):
      if isinstance(encoded, ImageError):
        log.skip(split, UNREADABLE_IMAGE, ex.name, str(encoded), ex.origin)
        continue
      data, reencoded = encoded
      if reencoded:
        log.note(REENCODED, ex.name, "re-encoded as PNG for TensorFlow", split)
      features = {"image": data, "label": int(ex.label),
                  "distribution": np.asarray(ex.distribution, np.float32),
                  "file_name": ex.name}
      if self._num_votes:
        features["votes"] = np.asarray(ex.votes, np.float32)
      log.write(split)
      written_names[split].append(ex.name)
      yield ex.name, features
    log.finished.append(split)
    log.check(split)
    counts = log.split_counts(split)
    logging.info("%s/%s split %s: %s", self.name, self.builder_config.name, split,
                 json.dumps(counts))
    if counts["skipped_total"]:
      logging.warning("%s split %s: %d of %d rows skipped (%s); see %s", self.name, split,
                      counts["skipped_total"], counts["rows_read"], counts["skipped"],
                      LOG_FILE)
    self._write_records(plan)
    if all(s in log.finished for s in SPLITS):
      plan.blobs = None  # Archive contents are not needed once every split is written.
    if not counts["written"]:
      raise ValueError(f"{self.name}: no example of split {split!r} could be written: "
                       f"{json.dumps(counts)}")

  def _write_records(self, plan: Plan) -> None:
    """Writes summary, log and split into the (temporary) prepared directory."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    out = epath.Path(self.data_path)
    summary = plan.log.summary()
    summary.update({
        "builder": self.name, "config": self.builder_config.name,
        "version": str(self.VERSION), "options": self._options,
        "classes": list(self._taxonomy.names),
        **{k: v for k, v in plan.info.items() if k != "written_names"}})
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / LOG_FILE).write_text(
        "".join(json.dumps(e, default=str) + "\n" for e in plan.log.entries))
    names = plan.info.get("written_names", {})
    (out / SPLITS_FILE).write_text(
        json.dumps({s: sorted(names.get(s, [])) for s in SPLITS}, indent=0) + "\n")
    if summary["complete"]:
      # Skipped rows (missing images, bad rows of a lenient build, rows a protocol leaves
      # out) change what the model sees: they are a warning, with the count.
      log_fn = logging.warning if summary["skipped"] else logging.info
      log_fn("%s/%s built: %d label rows read, %d written, %d skipped %s, notes %s; "
             "see %s", self.name, self.builder_config.name, summary["rows_read"],
             summary["written"], sum(summary["skipped"].values()), summary["skipped"],
             summary["notes"], SUMMARY_FILE)
