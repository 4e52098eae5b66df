"""Single-label image sets laid out as one folder per emotion (FI, ArtPhoto, ...).

Source layouts::

  <path>/amusement/amusement_0001.jpg, <path>/anger/..., ...    (no split: seeded split)
  <path>/train/<emotion>/..., <path>/test/<emotion>/...,
        optionally <path>/val|validation|valid/<emotion>/...       (given splits)

Folder names are the taxonomy's emotion names (any case). Images may sit deeper inside an
emotion folder. Every image file counts as one label row; an image outside any emotion
folder (in an unknown folder, or loose in a split folder) has no usable label: an error
naming it, or with ``lenient`` skipped as ``bad_row`` and logged. Files that are not
images by their extension are noted and ignored.

There are no votes: ``distribution`` is made from the folder's label by
``sdl_jax.distributions.from_single_label`` with ``config.data.strategy``:

* ``implication``: a Gaussian in emotion distance ``d`` around the label,
  ``f(i) = exp(-d(i, mu)^2 / (2 sigma^2)) / sqrt(2 pi sigma) + eps / C``, normalised;
  ``d`` round Mikels' wheel, or along the class index (``config.data.distance``);
* ``exclusion``: uniform over the label's polarity, 0 elsewhere;
* ``combined`` (alias ``both``; the authors' released code): the implication weights
  inside the label's polarity, 0 on the other, normalised.

``label`` is the folder's emotion, ``file_name`` the path below ``path``
(``amusement/amusement_0001.jpg``).

Config fields (``config.data``): ``path``; ``taxonomy`` (default ``'mikels8'``);
``strategy`` (default ``'combined'``); ``distance``, ``sigma``, ``eps`` (defaults
``distributions.DEFAULT_DISTANCE``/``DEFAULT_SIGMA``/``DEFAULT_EPS``); ``channels`` (3, or 1
for grey sets);
``split_seed``, ``split_fractions``, ``split_file``, ``lenient`` (see
``splits.split_options``; a split file cannot be combined with given split folders).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from sdl_jax import distributions
from sdl_jax.data import buildlog, image_files, label_files, source_builder, splits
from sdl_jax.emotions import get_taxonomy

STRATEGY_ALIASES = {"implication": "implication", "exclusion": "exclusion",
                    "combined": "combined", "both": "combined"}
_SPLIT_DIRS = {"train": ("train", "training"),
               "validation": ("validation", "val", "valid"),
               "test": ("test", "testing")}


def split_dirs(path: str) -> dict[str, str] | None:
  """``{split: directory}`` when ``path`` has train and test folders, else ``None``."""
  entries = {e.lower(): e for e in os.listdir(path)
             if os.path.isdir(os.path.join(path, e))}
  found = {}
  for split, aliases in _SPLIT_DIRS.items():
    for alias in aliases:
      if alias in entries:
        found[split] = os.path.join(path, entries[alias])
        break
  if "train" in found and "test" in found:
    return found
  return None


def tree_fingerprint(path: str, exclude: str) -> str:
  """A hash of every file's relative name, size and mtime under ``path`` (cache key)."""
  h = hashlib.sha256()
  exclude = os.path.abspath(exclude)
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = sorted(d for d in dirnames
                         if os.path.abspath(os.path.join(dirpath, d)) != exclude)
    for fn in sorted(filenames):
      full = os.path.join(dirpath, fn)
      st = os.stat(full)
      h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


class Folders(source_builder.SourceBuilder, skip_registration=True):
  """One folder per emotion; distributions from the single label by a strategy."""

  name = "emotion_folders"
  DESCRIPTION = __doc__
  CITATION = ("@inproceedings{you2016building, title={Building a Large Scale Dataset for "
              "Image Emotion Recognition: The Fine Print and The Benchmark}, author={You, "
              "Quanzeng and Luo, Jiebo and Jin, Hailin and Yang, Jianchao}, "
              "booktitle={AAAI}, year={2016}}")

  def _scan(self, root: str, split: str | None, log: buildlog.BuildLog
            ) -> list[tuple[str, int, str]]:
    """``(name, label, path)`` of the images under ``root``; the rest is logged."""
    base = self._options["path"]
    images, others = image_files.list_images(root, [os.fspath(self.data_dir_root)])
    for other in others:
      log.note(buildlog.NON_IMAGE_FILE, os.path.relpath(os.path.join(root, other), base)
               .replace(os.sep, "/"), "ignored: not an image file by its extension",
               split)
    found = []
    for rel in images:
      path = os.path.join(root, rel)
      name = os.path.relpath(path, base).replace(os.sep, "/")
      folder = rel.split("/")[0] if "/" in rel else None
      try:
        label = self._taxonomy.index(folder) if folder is not None else None
      except ValueError:
        label = None
      if label is None:
        reason = (f"folder {folder!r} is not an emotion of taxonomy "
                  f"{self._taxonomy.name!r} ({', '.join(self._taxonomy.names)})"
                  if folder else "image outside any emotion folder")
        if not self._options["lenient"]:
          raise label_files.LabelFileError(
              f"{path}: {reason}; move or remove it, or set config.data.lenient=True to "
              "skip and log such images")
        where = split or buildlog.UNASSIGNED
        log.read(where)
        log.skip(where, buildlog.BAD_ROW, name, reason, path)
        continue
      found.append((name, label, path))
    return found

  def _plan(self) -> source_builder.Plan:
    opts = self._options
    log = buildlog.BuildLog()
    given = split_dirs(opts["path"])
    if given and opts["split_file"]:
      raise ValueError(f"{opts['path']} has split folders {sorted(given)}; "
                       "config.data.split_file cannot be used with them")
    found, pre_assigned = [], None
    if given:
      pre_assigned = {}
      for split, d in given.items():
        for item in self._scan(d, split, log):
          found.append(item)
          pre_assigned[item[0]] = split
      inside = tuple(os.path.relpath(d, opts["path"]).replace(os.sep, "/") + "/"
                     for d in given.values())
      images, _ = image_files.list_images(opts["path"], [os.fspath(self.data_dir_root)])
      for name in images:
        if not name.startswith(inside):
          log.note(buildlog.IMAGE_WITHOUT_ROW, name, "image outside the split folders")
    else:
      found = self._scan(opts["path"], None, log)
    if not found:
      raise FileNotFoundError(
          f"no image found in emotion folders under {opts['path']!r}; expected folders "
          f"named {', '.join(self._taxonomy.names)} (or train/ and test/ holding them)")
    labels = np.asarray([label for _, label, _ in found], dtype=np.int32)
    dists = distributions.from_single_label(
        labels, self._taxonomy, opts["strategy"], opts["sigma"], opts["eps"],
        opts.get("distance", distributions.DEFAULT_DISTANCE))
    candidates = [splits.Candidate(name, int(label), dist, None, path, path)
                  for (name, label, path), dist in zip(found, dists)]
    examples, split_info = splits.assign_splits(
        candidates, log, seed=opts["split_seed"], fractions=opts["split_fractions"],
        split_file=opts["split_file"], pre_assigned=pre_assigned)
    info: dict[str, Any] = {"split": split_info,
                            "split_folders": given or None,
                            "images": {"images_found": len(found)}}
    return source_builder.Plan(examples, log, info)


def make_builder(data_config, data_dir: str | None = None) -> Folders:
  """An unprepared builder for an emotion-folder set (fields in the module docstring)."""
  path = source_builder.require_path(data_config)
  if not os.path.isdir(path):
    raise NotADirectoryError(f"config.data.path {path!r} must be a directory of emotion "
                             "folders")
  taxonomy = get_taxonomy(data_config.get("taxonomy", None) or "mikels8")
  strategy = data_config.get("strategy", None) or "combined"
  if strategy not in STRATEGY_ALIASES:
    raise ValueError(f"config.data.strategy={strategy!r}; expected one of "
                     f"{sorted(STRATEGY_ALIASES)}")
  strategy = STRATEGY_ALIASES[strategy]
  sigma = data_config.get("sigma", None)
  sigma = float(distributions.DEFAULT_SIGMA if sigma is None else sigma)
  eps = data_config.get("eps", None)
  eps = float(distributions.DEFAULT_EPS if eps is None else eps)
  distance = data_config.get("distance", None) or distributions.DEFAULT_DISTANCE
  if distance not in distributions.DISTANCES:
    raise ValueError(f"config.data.distance={distance!r}; expected one of "
                     f"{distributions.DISTANCES}")
  # Fail now, not mid-build, if the taxonomy cannot support the strategy.
  distributions.from_single_label(np.zeros(1, np.int32), taxonomy, strategy, sigma, eps,
                                  distance)
  if data_dir is None:
    from sdl_jax.data import default_data_dir  # pylint: disable=g-import-not-at-top
    data_dir = default_data_dir()
  options = {"path": path, "strategy": strategy, "sigma": sigma, "eps": eps,
             "fingerprint": tree_fingerprint(path, os.fspath(data_dir)),
             **splits.split_options(data_config)}
  if distance != distributions.DEFAULT_DISTANCE:
    # Only then: the default's cache key stays that of sets built before the option.
    options["distance"] = distance
  return Folders(options=options, taxonomy=taxonomy, num_votes=None,
                 channels=int(data_config.get("channels", None) or 3),
                 prefix=f"{strategy}_{splits.split_prefix(options)}", data_dir=data_dir)
