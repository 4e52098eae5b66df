"""What a build did with every label row: the build log and the records it leaves.

Building keeps a ``BuildLog``: every label row read is attributed to a split (or to
``'unassigned'`` when it is dropped before a split is known) and ends up either written or
skipped with a reason; images without a label row, images re-encoded for TensorFlow, and
similar events are recorded as notes. The prepared data set's directory then holds, next
to the TFDS files:

* ``build_summary.json``: per split ``rows_read``, ``written`` and ``skipped`` by reason
  (``rows_read == written + sum(skipped)`` is checked), the notes' counts and the options;
* ``build_log.jsonl``: one JSON object per skipped row or note (name, reason, origin
  ``file:line``, detail);
* ``splits.json``: ``{"train": [file names], "validation": [...], "test": [...]}``, the
  file names written to each split (the split used; it is also a valid ``split_file``).

``build_summary``, ``build_log``, ``split_assignment`` read them from a prepared builder;
``copy_build_records`` copies them into a work directory (training does), and
``build_counts`` is what a report says about them.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any


SPLITS = ("train", "validation", "test")


UNASSIGNED = "unassigned"


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
