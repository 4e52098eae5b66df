"""Label files: lines, fields, numbers, headers, column order and validated value rows.

Every reader names the file and line of what it cannot use (``LabelFileError``); with
``config.data.lenient`` a bad value row is skipped and logged instead (reason
``bad_row``, see ``sdl_jax.data.buildlog``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from typing import Sequence

from absl import logging
import numpy as np

from sdl_jax.data.buildlog import BAD_ROW, BuildLog, LOG_FILE, UNASSIGNED
from sdl_jax.emotions import Taxonomy


class LabelFileError(ValueError):
  """A label, list or split file that cannot be used; the message names file and line."""


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
                    num_values: int, lenient: bool, log: BuildLog,
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


def bad_row_names(log: BuildLog, split: str) -> set[str]:
  """Names of rows skipped as bad in ``split`` (they have a row, if a broken one)."""
  return {e["name"] for e in log.entries
          if e["reason"] == BAD_ROW and e["split"] == split}
