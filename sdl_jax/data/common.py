"""Shared machinery of the data set builders: label files, images, build records, splits.

Every builder of this package reads a user-given source (a directory or an archive; nothing
is downloaded) and writes a prepared TFDS data set with the common features (see
``sdl_jax.data``): ``image`` (the encoded file at its original size), ``label``
(``ClassLabel`` with the taxonomy's names), ``distribution`` (float32 ``[C]``), ``votes``
(float32 ``[V]``, where the set has votes) and ``file_name``.

Bad input is never dropped silently. Building keeps a ``BuildLog``: every label row read is
attributed to a split (or to ``'unassigned'`` when it is dropped before a split is known)
and ends up either written or skipped with a reason; images without a label row, images
re-encoded for TensorFlow, and similar events are recorded as notes. The prepared data
set's directory then holds, next to the TFDS files:

* ``build_summary.json``: per split ``rows_read``, ``written`` and ``skipped`` by reason
  (``rows_read == written + sum(skipped)`` is checked), the notes' counts and the options;
* ``build_log.jsonl``: one JSON object per skipped row or note (name, reason, origin
  ``file:line``, detail);
* ``splits.json``: ``{"train": [file names], "validation": [...], "test": [...]}``, the
  file names written to each split (the split used; it is also a valid ``split_file``).

``build_summary``, ``build_log``, ``split_assignment`` read them from a prepared builder;
``copy_build_records`` copies them into a work directory.

Cache keys: a builder's TFDS config name is ``<readable prefix>-<hash>``, where the hash
covers the builder version, the resolved source path, the size and modification time of
its label files (or archive), and every option that changes the output. Two different
configurations thus never share a prepared directory ``data_dir/<name>/<config>/<version>``,
and an edited label file leads to a fresh build. Edits to image files alone are not seen.
"""

from __future__ import annotations

import abc
import collections
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
from typing import Any, Iterable, Iterator, Sequence

from absl import logging
import numpy as np

from sdl_jax.emotions import Taxonomy

SPLITS = ("train", "validation", "test")
UNASSIGNED = "unassigned"
DEFAULT_FRACTIONS = (0.8, 0.05, 0.15)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

SUMMARY_FILE = "build_summary.json"
LOG_FILE = "build_log.jsonl"
SPLITS_FILE = "splits.json"

# Skip reasons shared by the builders (each builder may add its own).
BAD_ROW = "bad_row"
NO_IMAGE = "no_image"
UNREADABLE_IMAGE = "unreadable_image"
NOT_IN_SPLIT_FILE = "not_in_split_file"
# Note kinds (events that are not label rows).
IMAGE_WITHOUT_ROW = "image_without_row"
SPLIT_NAME_WITHOUT_ROW = "split_file_name_without_row"
REENCODED = "reencoded"
NON_IMAGE_FILE = "non_image_file"

_SPLIT_ALIASES = {"train": "train", "training": "train",
                  "validation": "validation", "val": "validation", "valid": "validation",
                  "dev": "validation", "test": "test", "testing": "test"}


class LabelFileError(ValueError):
  """A label, list or split file that cannot be used; the message names file and line."""


class ImageError(ValueError):
  """An image file that cannot be decoded; the message says why."""


class MissingImagesError(LabelFileError):
  """Label rows name image files that do not exist (and missing images are not allowed)."""


ALLOW_MISSING_OPTION = "config.data.allow_missing_images"


def hide_gpus_from_tf() -> None:
  """Keeps TensorFlow (used here only for data) off any GPU, which belongs to JAX."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # Already initialised; nothing to do then.
    pass


# --------------------------------------------------------------------------------------
# Configuration helpers.


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


def config_fractions(data_config) -> tuple[float, float, float]:
  """``data_config.split_fractions`` (train, validation, test), checked."""
  fr = data_config.get("split_fractions", None) or DEFAULT_FRACTIONS
  fr = tuple(float(f) for f in fr)
  if len(fr) != 3 or min(fr) < 0 or fr[0] <= 0 or abs(sum(fr) - 1.0) > 1e-6:
    raise ValueError(
        f"config.data.split_fractions must be 3 numbers >= 0 (train > 0) summing to 1, "
        f"got {fr}")
  return fr


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


# --------------------------------------------------------------------------------------
# Label files.


def normalise_name(name: str) -> str:
  """An image name as a '/'-separated relative path, without leading ``./``."""
  name = name.strip().replace("\\", "/")
  while name.startswith("./"):
    name = name[2:]
  return name


def read_lines(path: str, raw: bytes | None = None) -> list[tuple[int, str]]:
  """Non-blank lines of a text file as ``(line number, stripped text)``.

  Line ends may be LF, CRLF or CR; a UTF-8 byte-order mark and trailing spaces or tabs
  are removed. Line numbers count every line, blank ones included, from 1.

  Args:
    path: the file (read unless ``raw`` is given; always used in messages).
    raw: the file's bytes, when they come from elsewhere (an archive member).
  """
  if raw is None:
    with open(path, "rb") as f:
      raw = f.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise LabelFileError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
  out = []
  for i, line in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
    line = line.strip()
    if line:
      out.append((i, line))
  return out


def split_fields(line: str, sep: str) -> list[str]:
  """Splits one line: ``sep`` is ``'csv'`` (commas, quotes allowed) or ``'whitespace'``.

  Header lines of whitespace files may hold names with spaces (Emotion6's
  ``[prob. anger]``): when a line contains a tab it is split on tabs only.
  """
  if sep == "csv":
    return [f.strip() for f in next(csv.reader([line]))]
  if sep == "whitespace":
    return line.split()
  if sep == "header":
    if "\t" in line:
      return [f.strip() for f in line.split("\t") if f.strip()]
    return line.split()
  raise ValueError(f"unknown separator {sep!r}")


def sniff_separator(lines: Sequence[tuple[int, str]]) -> str:
  """``'csv'`` if the first line has a comma, else ``'whitespace'``."""
  return "csv" if lines and "," in lines[0][1] else "whitespace"


def parse_number(text: str) -> float | None:
  """A finite float, or ``None`` for anything else (words, ``nan``, ``inf``, empty)."""
  try:
    x = float(text)
  except ValueError:
    return None
  return x if math.isfinite(x) else None


def is_header(fields: Sequence[str], first_value_column: int) -> bool:
  """A row is a header when one of its value columns is not a number."""
  return any(parse_number(f) is None for f in fields[first_value_column:])


def clean_emotion_name(field: str) -> str:
  """``'[prob. anger]'`` -> ``'anger'``; ``'Amusement'`` -> ``'amusement'``."""
  name = field.strip().strip("[]").strip().lower()
  name = re.sub(r"^(prob\.?|p\.?)\s*", "", name)
  return name.strip()


def column_order(header_names: Sequence[str], taxonomy: Taxonomy, where: str) -> np.ndarray:
  """Indices ``perm`` with ``values[perm]`` in taxonomy order, from header emotion names.

  Raises:
    LabelFileError: naming ``where`` (``file:line``) when the header's names are not
      exactly the taxonomy's emotions (in any order, any case).
  """
  cleaned = [clean_emotion_name(h) for h in header_names]
  wanted = [n.lower() for n in taxonomy.names]
  if sorted(cleaned) != sorted(wanted) or len(set(cleaned)) != len(cleaned):
    raise LabelFileError(
        f"{where}: header emotions {list(header_names)} do not match taxonomy "
        f"{taxonomy.name!r} ({', '.join(taxonomy.names)})")
  return np.asarray([cleaned.index(w) for w in wanted], dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Row:
  """One good label row: the image name and its numbers in file order (float64 ``[K]``)."""
  name: str
  values: np.ndarray
  origin: str  # 'file:line'


def check_values(fields: Sequence[str], *, counts: slice | None = None
                 ) -> np.ndarray | str:
  """Parses the number fields of a row; returns float64 ``[K]`` or the reason it is bad.

  Args:
    fields: the row's number fields.
    counts: which of them are votes/probabilities (default all): they must be ``>= 0``
      with a positive total.
  """
  values = np.empty(len(fields), dtype=np.float64)
  for j, f in enumerate(fields):
    x = parse_number(f)
    if x is None:
      return f"{f!r} is not a finite number"
    values[j] = x
  c = values[counts if counts is not None else slice(None)]
  if (c < 0).any():
    j = int(np.flatnonzero(c < 0)[0])
    return f"negative count {c[j]:g}"
  if not c.sum() > 0:
    return "zero total (no votes)"
  return values


def read_value_rows(path: str, lines: Sequence[tuple[int, str]], *, sep: str,
                    num_values: int, lenient: bool, log: "BuildLog",
                    counts: slice | None = None, split: str = UNASSIGNED,
                    text_columns: int = 0, layout: str = "") -> list[Row]:
  """Validates data rows ``name [text...] v1 ... vK``; bad rows raise, or are logged.

  A bad row is one with the wrong number of columns, a field that is not a finite
  number, a negative count or a zero total. Duplicate names are always an error.

  Args:
    path: the file, for messages.
    lines: its data lines (header removed) as from ``read_lines``.
    sep: ``'csv'`` or ``'whitespace'``.
    num_values: numbers per row.
    lenient: skip bad rows (counted as read and skipped under ``split``, reason
      ``bad_row``) instead of raising ``LabelFileError``.
    log: the build log.
    counts: see ``check_values``.
    split: where skipped rows are counted.
    text_columns: columns between the name and the numbers, kept unparsed (FER+'s face
      box).
    layout: the expected row layout for messages, e.g. ``'name + 8 vote counts'``.

  Returns:
    the good rows, in file order.
  """
  rows, seen = [], {}
  ncols = 1 + text_columns + num_values
  layout = layout or f"name + {num_values} numbers"
  for line_no, line in lines:
    fields = split_fields(line, sep)
    where = f"{path}:{line_no}"
    name = normalise_name(fields[0]) if fields else ""
    if len(fields) != ncols:
      result = f"expected {ncols} columns ({layout}), got {len(fields)}"
    else:
      result = check_values(fields[1 + text_columns:], counts=counts)
    if isinstance(result, str):
      if not lenient:
        raise LabelFileError(f"{where}: {result} in row {line!r}; fix the row, or set "
                             "config.data.lenient=True to skip and log such rows")
      log.read(split)
      log.skip(split, BAD_ROW, name, result, where)
      continue
    if name in seen:
      raise LabelFileError(f"{where}: duplicate image name {name!r} (also on line "
                           f"{seen[name]}); every image must have exactly one row")
    seen[name] = line_no
    rows.append(Row(name, result, where))
  bad = len(lines) - len(rows)
  if bad:
    logging.warning("%s: %d bad label rows skipped (config.data.lenient=True); they are "
                    "listed in %s", path, bad, LOG_FILE)
  return rows


def check_missing_images(missing: Sequence[tuple[str, str, str]], num_rows: int,
                         allow: bool) -> None:
  """Stops the build, or warns, when label rows name image files that do not exist.

  Args:
    missing: ``(name, origin 'file:line', path looked for)`` of each such row, in order.
    num_rows: the good label rows looked at (for the message's "k of n").
    allow: ``config.data.allow_missing_images``: warn (the rows are skipped as
      ``no_image`` and logged) instead of raising.

  Raises:
    MissingImagesError: naming the label files, the count and the first names.
  """
  if not missing:
    return
  files = sorted({origin.rsplit(":", 1)[0] for _, origin, _ in missing})
  first = ", ".join(repr(name) for name, _, _ in missing[:5])
  what = (f"{len(missing)} of {num_rows} label rows of {', '.join(files)} name no image "
          f"file (first: {first}; looked for {missing[0][2]})")
  if not allow:
    raise MissingImagesError(
        f"{what}. Add the images (or set config.data.image_dir to their folder), or pass "
        f"--{ALLOW_MISSING_OPTION}=True to skip those rows: they are then counted in "
        f"{SUMMARY_FILE}, listed in {LOG_FILE} and reported in report.md")
  logging.warning("%s: skipped (%s=True); they are listed in %s", what,
                  ALLOW_MISSING_OPTION, LOG_FILE)


def bad_row_names(log: "BuildLog", split: str) -> set[str]:
  """Names of rows skipped as bad in ``split`` (they have a row, if a broken one)."""
  return {e["name"] for e in log.entries
          if e["reason"] == BAD_ROW and e["split"] == split}


# --------------------------------------------------------------------------------------
# Images.


def list_images(root: str, exclude_dirs: Iterable[str] = ()) -> tuple[list[str], list[str]]:
  """Image files under ``root`` (by extension) and other files, as sorted relative names."""
  exclude = {os.path.abspath(d) for d in exclude_dirs}
  images, others = [], []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if os.path.abspath(os.path.join(dirpath, d)) not in exclude
                         and not d.startswith("."))
    rel = os.path.relpath(dirpath, root)
    for fn in filenames:
      name = fn if rel == "." else f"{rel.replace(os.sep, '/')}/{fn}"
      if fn.lower().endswith(IMAGE_EXTENSIONS):
        images.append(name)
      elif not fn.startswith("."):
        others.append(name)
  return sorted(images), sorted(others)


# PIL modes TensorFlow's decoders handle as they are; anything else is re-encoded as PNG.
_KEEP = {"JPEG": {"L", "RGB"}, "PNG": {"L", "LA", "RGB", "RGBA", "P"}}


def encode_image_bytes(data: bytes, channels: int) -> tuple[bytes, bool]:
  """Fully decodes an encoded image; returns bytes for ``tfds.features.Image``.

  JPEG and PNG files in modes TensorFlow decodes are kept byte for byte; other files
  (GIF, BMP, TIFF, WebP, CMYK JPEG, 16-bit or 1-bit images, ...) are re-encoded as PNG in
  ``'L'`` (``channels == 1``) or ``'RGB'`` mode, at their original size.

  Returns:
    ``(encoded bytes, re-encoded?)``.

  Raises:
    ImageError: the data is truncated, empty or not an image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not data:
    raise ImageError("empty file")
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt, mode = im.format, im.mode
      im.load()  # Full decode: raises on truncated or corrupt data.
      if im.width < 1 or im.height < 1:
        raise ImageError(f"image has size {im.size}")
      if mode in _KEEP.get(fmt, ()):
        return data, False
      target = "L" if channels == 1 else "RGB"
      out = io.BytesIO()
      im.convert(target).save(out, format="PNG")
      return out.getvalue(), True
  except ImageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
    raise ImageError(f"{type(e).__name__}: {e}") from None


def encode_image(path: str, channels: int) -> tuple[bytes, bool]:
  """``encode_image_bytes`` of a file; ``ImageError`` also when it cannot be read."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ImageError(f"cannot read file: {e.strerror or e}") from None
  return encode_image_bytes(data, channels)


# --------------------------------------------------------------------------------------
# Build log and records.


class BuildLog:
  """Counts and logs what happens to every label row and image during a build."""

  def __init__(self):
    self.entries: list[dict[str, Any]] = []
    self._read = collections.Counter()
    self._written = collections.Counter()
    self._skipped = collections.defaultdict(collections.Counter)
    self._notes = collections.defaultdict(collections.Counter)
    self.finished: list[str] = []

  def read(self, split: str, n: int = 1) -> None:
    """Attributes ``n`` label rows to ``split``."""
    self._read[split] += n

  def skip(self, split: str, reason: str, name: str, detail: str = "",
           origin: str = "") -> None:
    self._skipped[split][reason] += 1
    self.entries.append({"split": split, "event": "skipped", "reason": reason,
                         "name": name, "origin": origin, "detail": detail})

  def write(self, split: str) -> None:
    self._written[split] += 1

  def note(self, kind: str, name: str, detail: str = "", split: str | None = None) -> None:
    """An event that is not a label row (an image without a row, a re-encoded image)."""
    self._notes[split or "all"][kind] += 1
    self.entries.append({"split": split, "event": "note", "reason": kind, "name": name,
                         "origin": "", "detail": detail})

  def split_counts(self, split: str) -> dict[str, Any]:
    skipped = dict(sorted(self._skipped[split].items()))
    return {"rows_read": self._read[split], "written": self._written[split],
            "skipped": skipped, "skipped_total": sum(skipped.values()),
            "notes": dict(sorted(self._notes[split].items()))}

  def check(self, split: str) -> None:
    """Every row attributed to ``split`` was written or skipped: raises otherwise."""
    c = self.split_counts(split)
    if c["rows_read"] != c["written"] + c["skipped_total"]:
      raise RuntimeError(f"build bookkeeping error in split {split!r}: {c}")

  def summary(self) -> dict[str, Any]:
    splits = [s for s in (UNASSIGNED,) + SPLITS if self._read[s] or s in SPLITS]
    per_split = {s: self.split_counts(s) for s in splits}
    total_skipped = collections.Counter()
    for s in splits:
      total_skipped.update(self._skipped[s])
    notes = collections.Counter()
    for counter in self._notes.values():
      notes.update(counter)
    return {
        "complete": all(s in self.finished for s in SPLITS),
        "rows_read": sum(self._read[s] for s in splits),
        "written": sum(self._written[s] for s in splits),
        "skipped": dict(sorted(total_skipped.items())),
        "notes": dict(sorted(notes.items())),
        "splits": per_split,
    }


def _read_record(builder, filename: str) -> str:
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(builder.data_path) / filename
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist: prepare the builder first (sdl_jax.data.get_builder), "
        "and use a builder of this package")
  return path.read_text()


def build_summary(builder) -> dict[str, Any]:
  """The prepared builder's ``build_summary.json`` as a dict (see module docstring)."""
  return json.loads(_read_record(builder, SUMMARY_FILE))


def build_log(builder) -> list[dict[str, Any]]:
  """The prepared builder's build log: one dict per skipped row or note."""
  return [json.loads(line) for line in _read_record(builder, LOG_FILE).splitlines() if line]


def split_assignment(builder) -> dict[str, list[str]]:
  """File names written to each split, ``{'train': [...], 'validation': [...], ...}``."""
  return json.loads(_read_record(builder, SPLITS_FILE))


def has_build_records(builder) -> bool:
  """Whether ``builder`` writes build records (this package's ``SourceBuilder`` does; the
  built-in synthetic set, whose rows are drawn rather than read, does not)."""
  return bool(getattr(builder, "WRITES_BUILD_RECORDS", False))


def build_counts(builder) -> dict[str, Any] | None:
  """What a report says about the data: label rows read, used (written) and skipped by
  reason, with the options that allow skipping; ``None`` for a builder without records.
  """
  if not has_build_records(builder):
    return None
  s = build_summary(builder)
  options = s.get("options", {})
  return {"rows_read": s["rows_read"], "written": s["written"],
          "skipped": dict(s["skipped"]), "notes": dict(s.get("notes", {})),
          "written_per_split": {k: s["splits"][k]["written"] for k in SPLITS
                                if k in s["splits"]},
          "lenient": bool(options.get("lenient", False)),
          "allow_missing_images": bool(options.get("allow_missing_images", False))}


def copy_build_records(builder, workdir: str) -> list[str]:
  """Copies ``build_summary.json``, ``build_log.jsonl`` and ``splits.json`` to ``workdir``.

  Returns the paths written (``workdir`` may be any path ``etils.epath`` can write); none
  for a builder without records (``has_build_records``).
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  if not has_build_records(builder):
    return []
  out_dir = epath.Path(workdir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for filename in (SUMMARY_FILE, LOG_FILE, SPLITS_FILE):
    dst = out_dir / filename
    dst.write_text(_read_record(builder, filename))
    written.append(os.fspath(dst))
  return written


# --------------------------------------------------------------------------------------
# Splits.


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


@dataclasses.dataclass(frozen=True)
class Example:
  """One example to write (its image is checked when it is written)."""
  name: str
  path: str
  label: int
  distribution: np.ndarray
  votes: np.ndarray | None
  origin: str


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
  assigned: dict[str, str] = {}
  info: dict[str, Any] = {}
  if pre_assigned is not None:
    assigned = dict(pre_assigned)
    info["method"] = "official"
  elif split_file is not None:
    listed = read_split_file(split_file)
    info["method"] = "split_file"
    info["split_file"] = (dict(split_file) if hasattr(split_file, "items")
                          else os.path.abspath(str(split_file)))
    for split, entries in listed.items():
      for name, where in entries:
        if name in by_name:
          assigned[name] = split
        else:
          log.note(SPLIT_NAME_WITHOUT_ROW, name, f"listed at {where}")
  else:
    info["method"] = "stratified"
    info["seed"] = seed
    info["fractions"] = list(fractions)
  if info["method"] != "stratified" and "validation" not in assigned.values():
    # Given splits without validation (e.g. 5-fold train/test files): carve it from
    # train, stratified and seeded, in the proportion f_val / (f_train + f_val).
    train = sorted(n for n, s in assigned.items() if s == "train" and n in by_name)
    f_train, f_val, _ = fractions
    f = f_val / (f_train + f_val)
    carve = stratified_split(train, [by_name[n].label for n in train], seed,
                             (1 - f, f, 0.0))
    for n in carve["validation"]:
      assigned[n] = "validation"
    info["validation"] = (f"carved from train (seed {seed}, fraction {f:.4f}); "
                          "none was given")

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


# --------------------------------------------------------------------------------------
# The builder base class.


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

  VERSION = _tfds().core.Version("1.0.0")
  WRITES_BUILD_RECORDS = True
  RELEASE_NOTES = {"1.0.0": "First release."}
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


def note_unlisted_images(log: BuildLog, image_root: str, row_names: Iterable[str],
                         split: str | None = None, exclude_dirs: Iterable[str] = (),
                         exclude_files: Iterable[str] = ()) -> dict[str, int]:
  """Notes images under ``image_root`` that no label row names, and non-image files.

  ``exclude_files`` (absolute paths: the label files themselves) are not reported.
  """
  images, others = list_images(image_root, exclude_dirs)
  skip = {os.path.abspath(f) for f in exclude_files}
  others = [n for n in others if os.path.abspath(os.path.join(image_root, n)) not in skip]
  wanted = set(row_names)
  unlisted = [n for n in images if n not in wanted]
  for name in unlisted:
    log.note(IMAGE_WITHOUT_ROW, name, "image file without a label row", split)
  for name in others:
    log.note(NON_IMAGE_FILE, name, "ignored: not an image file by its extension", split)
  return {"images_found": len(images), "images_without_row": len(unlisted),
          "non_image_files": len(others)}


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


def find_image_root(base: str, names: Sequence[str], label_file: str,
                    image_dir: str | None = None) -> str:
  """The directory the label file's image names are relative to.

  ``image_dir`` (absolute, or relative to ``base``) if given; else the first of
  ``base/images``, ``base/image``, ``base/Images``, ``base/imgs``, ``base`` holding one of
  the first 20 named images.
  """
  if image_dir:
    root = os.path.join(base, os.path.expanduser(str(image_dir)))
    if not os.path.isdir(root):
      raise FileNotFoundError(f"config.data.image_dir {root!r} is not a directory")
    return root
  candidates = [os.path.join(base, d) for d in ("images", "image", "Images", "imgs")]
  candidates.append(base)
  probe = list(names[:20])
  if not probe:
    return base
  for c in candidates:
    if os.path.isdir(c) and any(os.path.isfile(os.path.join(c, n)) for n in probe):
      return c
  raise FileNotFoundError(
      f"none of the images named in {label_file} (e.g. {probe[:3]}) exists in any of "
      f"{candidates}; set config.data.image_dir to the folder the names are relative to")
