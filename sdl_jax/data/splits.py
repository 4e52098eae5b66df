"""Train / validation / test splits: the seeded stratified split, split files, and the
assignment of good label rows to splits.

Options of the builders without an official split (``split_options``): ``split_seed``,
``split_fractions``, ``split_file``, ``lenient`` and ``allow_missing_images``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from sdl_jax.data.buildlog import (BuildLog, NOT_IN_SPLIT_FILE, NO_IMAGE, SPLITS,
                                   SPLIT_NAME_WITHOUT_ROW, UNASSIGNED)
from sdl_jax.data.image_files import check_missing_images
from sdl_jax.data.label_files import (LabelFileError, normalise_name, read_lines, sniff_separator,
                                      split_fields)
from sdl_jax.data.source_builder import Example, stat_fingerprint


DEFAULT_FRACTIONS = (0.8, 0.05, 0.15)


_SPLIT_ALIASES = {"train": "train", "training": "train",
                  "validation": "validation", "val": "validation", "valid": "validation",
                  "dev": "validation", "test": "test", "testing": "test"}


def config_fractions(data_config) -> tuple[float, float, float]:
  """``data_config.split_fractions`` (train, validation, test), checked."""
  fr = data_config.get("split_fractions", None) or DEFAULT_FRACTIONS
  fr = tuple(float(f) for f in fr)
  if len(fr) != 3 or min(fr) < 0 or fr[0] <= 0 or abs(sum(fr) - 1.0) > 1e-6:
    raise ValueError(
        f"config.data.split_fractions must be 3 numbers >= 0 (train > 0) summing to 1, "
        f"got {fr}")
  return fr


def _hash_key(seed: int, name: str) -> str:
  return hashlib.sha256(f"{seed}\0{name}".encode()).hexdigest()


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def stratified_split(names: Sequence[str], labels: Sequence[int], seed: int,
                     fractions: Sequence[float] = DEFAULT_FRACTIONS
                     ) -> dict[str, list[str]]:
  """A deterministic split of ``names`` into train/validation/test, stratified by label.

  Within each class the names are ordered by ``sha256(f'{seed}\\0{name}')`` (the same on
  every machine, independent of library versions and of input order); the ``k``-th of a
  class's ``n_c`` names gets the position key ``(k + 0.5) / n_c``. All names sorted by
  that key form one sequence in which every prefix holds each class in proportion
  (to within one name). Its first ``round(N * f_test)`` names are the test split, the next
  ``round(N * f_val)`` the validation split, the rest train. A split with a positive
  fraction gets at least one name when ``N >= 3``.

  Args:
    names: unique names, ``[N]``.
    labels: int class of each name (the dominant label), ``[N]``.
    seed: split seed.
    fractions: ``(train, validation, test)``, summing to 1.

  Returns:
    ``{'train': [...], 'validation': [...], 'test': [...]}``, each sorted.
  """
  if len(names) != len(labels):
    raise ValueError(f"{len(names)} names but {len(labels)} labels")
  if len(set(names)) != len(names):
    raise ValueError("names must be unique")
  by_class = collections.defaultdict(list)
  for name, label in zip(names, labels):
    by_class[int(label)].append(name)
  keyed = []
  for label, members in by_class.items():
    members.sort(key=lambda n: _hash_key(seed, n))
    for k, name in enumerate(members):
      keyed.append(((k + 0.5) / len(members), _hash_key(seed, name), name))
  keyed.sort()
  seq = [name for _, _, name in keyed]
  n = len(seq)
  _, f_val, f_test = fractions
  n_test = _round_half_up(n * f_test)
  n_val = _round_half_up(n * f_val)
  if n >= 3:
    n_test = max(n_test, 1 if f_test > 0 else 0)
    n_val = max(n_val, 1 if f_val > 0 else 0)
  return {"train": sorted(seq[n_test + n_val:]),
          "validation": sorted(seq[n_test:n_test + n_val]),
          "test": sorted(seq[:n_test])}


def canonical_split(name: str, where: str) -> str:
  try:
    return _SPLIT_ALIASES[name.strip().lower()]
  except KeyError:
    raise LabelFileError(
        f"{where}: unknown split {name!r}; expected train, validation (val) or test"
    ) from None


def _names_file(path: str) -> list[tuple[str, str]]:
  """Names listed one per line (first field, comma or whitespace separated)."""
  lines = read_lines(path)
  sep = sniff_separator(lines)
  return [(normalise_name(split_fields(t, sep)[0]), f"{path}:{i}") for i, t in lines]


def read_split_file(split_file) -> dict[str, list[tuple[str, str]]]:
  """Reads an explicit split: names per split, each with its origin ``file:line``.

  ``split_file`` is one of
  * a ``.json`` file ``{"train": [names], "validation": [names], "test": [names]}``
    (the format of ``splits.json``; ``val``/``valid`` are accepted for validation);
  * a text file of lines ``name split`` (commas, tabs or spaces between; names with
    spaces or commas need the JSON form);
  * a mapping ``{split: path}`` of list files, one name per line as the first field
    (extra columns, e.g. vote counts of an author's list file, are ignored).

  Raises:
    LabelFileError: unknown split names, malformed lines, a name listed twice.
  """
  out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
  if hasattr(split_file, "items"):
    for key, path in split_file.items():
      if not path:
        continue
      path = os.path.abspath(os.path.expanduser(str(path)))
      if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path!r} (for split {key!r}) does not exist")
      out[canonical_split(key, "config.data.split_file")].extend(_names_file(path))
  else:
    path = os.path.abspath(os.path.expanduser(str(split_file)))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.data.split_file {path!r} does not exist")
    if path.lower().endswith(".json"):
      try:
        with open(path, encoding="utf-8") as f:
          data = json.load(f)
      except json.JSONDecodeError as e:
        raise LabelFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(data, dict):
        raise LabelFileError(f"{path}: expected a JSON object {{split: [names]}}")
      for key, names in data.items():
        split = canonical_split(key, path)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
          raise LabelFileError(f"{path}: split {key!r} must be a list of file names")
        out[split].extend((normalise_name(n), f"{path}[{key}]") for n in names)
    else:
      for i, text in read_lines(path):
        fields = [f for f in re.split(r"[,\s]+", text) if f]
        if len(fields) != 2:
          raise LabelFileError(
              f"{path}:{i}: expected 'name split' (2 fields), got {len(fields)}: {text!r}")
        out[canonical_split(fields[1], f"{path}:{i}")].append(
            (normalise_name(fields[0]), f"{path}:{i}"))
  seen = {}
  for split, entries in out.items():
    for name, where in entries:
      if name in seen:
        raise LabelFileError(f"{where}: {name!r} is listed twice in the split file "
                             f"(also at {seen[name]})")
      seen[name] = where
  return out


@dataclasses.dataclass
class Candidate:
  """A good label row waiting for its split: name, dominant label and its targets."""
  name: str
  label: int
  distribution: np.ndarray
  votes: np.ndarray | None
  origin: str
  path: str  # absolute path of the image file


def _given_assignment(by_name: dict[str, Candidate], log: BuildLog, split_file,
                      pre_assigned: dict[str, str] | None
                      ) -> tuple[dict[str, str], dict[str, Any]]:
  """``({name: split}, {'method': ...})`` from ``pre_assigned`` or ``split_file``; empty
  (method ``'stratified'``) when neither is given. Listed names without a row are noted."""
  if pre_assigned is not None:
    return dict(pre_assigned), {"method": "official"}
  if split_file is None:
    return {}, {"method": "stratified"}
  assigned = {}
  for split, entries in read_split_file(split_file).items():
    for name, where in entries:
      if name in by_name:
        assigned[name] = split
      else:
        log.note(SPLIT_NAME_WITHOUT_ROW, name, f"listed at {where}")
  return assigned, {"method": "split_file",
                    "split_file": (dict(split_file) if hasattr(split_file, "items")
                                   else os.path.abspath(str(split_file)))}


def _carve_validation(assigned: dict[str, str], by_name: dict[str, Candidate], seed: int,
                      fractions: Sequence[float]) -> str:
  """Moves a seeded, stratified part of the train names of ``assigned`` to validation.

  For given splits without validation (e.g. 5-fold train/test files), in the proportion
  ``f_val / (f_train + f_val)``. Returns the sentence that says so in the build summary.
  """
  train = sorted(n for n, s in assigned.items() if s == "train" and n in by_name)
  f_train, f_val, _ = fractions
  f = f_val / (f_train + f_val)
  carve = stratified_split(train, [by_name[n].label for n in train], seed, (1 - f, f, 0.0))
  for n in carve["validation"]:
    assigned[n] = "validation"
  return f"carved from train (seed {seed}, fraction {f:.4f}); none was given"


def assign_splits(candidates: Sequence[Candidate], log: BuildLog, *, seed: int,
                  fractions: Sequence[float], split_file=None,
                  pre_assigned: dict[str, str] | None = None,
                  allow_missing_images: bool = False
                  ) -> tuple[dict[str, list[Example]], dict[str, Any]]:
  """Puts good rows into splits: by ``pre_assigned``, by ``split_file`` or seeded.

  Rows whose image file is missing stop the build (``MissingImagesError``, see
  ``check_missing_images``) unless ``allow_missing_images``; then they are skipped
  (``no_image``): in their split when the split is given, else under ``'unassigned'``
  before the seeded split is drawn (so the split never depends on which images happen to
  be readable beyond existence).

  Args:
    candidates: good rows.
    log: build log; every candidate is counted as read in exactly one split.
    seed, fractions: for ``stratified_split``.
    split_file: see ``read_split_file``; names it lists without a label row are noted.
    pre_assigned: ``{name: split}`` for data sets with official splits.
    With ``split_file`` or ``pre_assigned`` but no validation names, validation is
    carved from the train names by ``stratified_split`` with fraction
    ``f_val / (f_train + f_val)``.

  Returns:
    ``({split: [Example]}, info)`` where ``info`` says how the split was made.
  """
  by_name = {c.name: c for c in candidates}
  assigned, info = _given_assignment(by_name, log, split_file, pre_assigned)
  if info["method"] == "stratified":
    info.update(seed=seed, fractions=list(fractions))
  elif "validation" not in assigned.values():
    info["validation"] = _carve_validation(assigned, by_name, seed, fractions)

  examples: dict[str, list[Example]] = {s: [] for s in SPLITS}
  present, missing = [], []
  for c in sorted(candidates, key=lambda c: c.name):
    split = assigned.get(c.name)
    if split is None and info["method"] != "stratified":
      log.read(UNASSIGNED)
      log.skip(UNASSIGNED, NOT_IN_SPLIT_FILE, c.name, "not listed in any split",
               c.origin)
      continue
    if not os.path.isfile(c.path):
      where = split or UNASSIGNED
      log.read(where)
      log.skip(where, NO_IMAGE, c.name, f"no image file {c.path}", c.origin)
      missing.append((c.name, c.origin, c.path))
      continue
    present.append((c, split))
  file_order = {c.name: i for i, c in enumerate(candidates)}
  missing.sort(key=lambda m: file_order[m[0]])  # Name them as the label file does.
  check_missing_images(missing, len(candidates), allow_missing_images)
  if info["method"] == "stratified":
    chosen = stratified_split([c.name for c, _ in present],
                              [c.label for c, _ in present], seed, fractions)
    lookup = {n: s for s, names in chosen.items() for n in names}
    present = [(c, lookup[c.name]) for c, _ in present]
  for c, split in present:
    log.read(split)
    examples[split].append(Example(c.name, c.path, c.label, c.distribution, c.votes,
                                   c.origin))
  return examples, info


def allow_missing_images(data_config) -> bool:
  """``config.data.allow_missing_images`` (default False: a missing image is an error)."""
  return bool(data_config.get("allow_missing_images", False))


def split_options(data_config) -> dict[str, Any]:
  """Split and strictness options shared by the builders without official splits.

  Fields of ``config.data``: ``split_seed`` (int, default 0), ``split_fractions``
  (train, validation, test; default 0.8, 0.05, 0.15), ``split_file`` (optional: a path,
  a mapping ``{split: path}``, or the same as a string
  ``'train=folds/train_1.txt,test=folds/test_1.txt'``; see ``read_split_file``),
  ``lenient`` (default False), ``allow_missing_images`` (default False).
  Split files enter the cache key with their size and modification time.
  """
  split_file = data_config.get("split_file", None) or None
  if (isinstance(split_file, str) and "=" in split_file
      and not os.path.isfile(os.path.expanduser(split_file))):
    # Command-line form of the mapping: 'train=folds/train_1.txt,test=folds/test_1.txt'.
    pairs = [p.partition("=") for p in split_file.split(",") if p.strip()]
    split_file = {k.strip(): v.strip() for k, _, v in pairs}
  files: list[str] = []
  if split_file is not None:
    if hasattr(split_file, "items"):
      split_file = {canonical_split(str(k), "config.data.split_file"):
                    os.path.abspath(os.path.expanduser(str(v)))
                    for k, v in split_file.items() if v}
      files = list(split_file.values())
    else:
      split_file = os.path.abspath(os.path.expanduser(str(split_file)))
      files = [split_file]
    for f in files:
      if not os.path.isfile(f):
        raise FileNotFoundError(f"config.data.split_file: {f!r} does not exist")
  seed = data_config.get("split_seed", 0)
  if seed is None or int(seed) != seed:
    raise ValueError(f"config.data.split_seed must be an integer, got {seed!r}")
  return {"split_seed": int(seed), "split_fractions": list(config_fractions(data_config)),
          "split_file": split_file, "split_file_fingerprint": stat_fingerprint(files),
          "lenient": bool(data_config.get("lenient", False)),
          "allow_missing_images": allow_missing_images(data_config)}


def split_prefix(options: dict[str, Any]) -> str:
  """Readable part of a config name: ``seed<k>`` or ``splitfile``."""
  return "splitfile" if options.get("split_file") else f"seed{options['split_seed']}"
