"""Your own data: image paths with vote counts (or probabilities), in a CSV or list file.

Two row formats, told apart by the first line (a comma makes it CSV):

* CSV ``path,v1,...,vC`` with a header row naming the emotions, e.g.
  ``path,amusement,awe,contentment,excitement,anger,disgust,fear,sadness`` (quotes allowed,
  so paths may hold commas or spaces);
* the authors' list-file format ``path v1 ... vC``, whitespace-separated, usually without
  a header (then ``config.data.taxonomy`` gives the emotions and their column order).

A header row is recognised by a non-number in a value column. Its names are matched to
``config.data.taxonomy`` by name (any order, any case); without a taxonomy in the config
the header's names are matched to a known taxonomy (same set of names), or else define a
new one in the header's order (no wheel or polarity: fine for votes).

``config.data.path`` is either one such file (split by ``split_file`` or the seeded
stratified split), or a directory holding ``train``, ``test`` and optionally
``validation``/``val`` files (``.csv``, ``.txt``, ``.tsv`` or ``.lst``), which are the
splits (without a validation file, validation is carved from train). Image paths are
relative to ``config.data.image_dir`` if set, else to the label file's directory;
absolute paths are allowed. ``votes`` are the C numbers as given, ``distribution =
votes / sum(votes)``, ``label`` the arg-max (first on ties), ``file_name`` the path as
written.

Config fields (``config.data``): ``path``; ``taxonomy`` (optional, see above);
``image_dir``; ``channels`` (3, or 1 for grey images); ``split_seed``,
``split_fractions``, ``split_file``, ``lenient``, ``allow_missing_images`` (see
``splits.split_options``; a row naming a missing image is an error unless the latter).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sdl_jax.data import buildlog, image_files, label_files, source_builder, splits
from sdl_jax.emotions import TAXONOMIES, Taxonomy, get_taxonomy

EXTENSIONS = (".csv", ".txt", ".tsv", ".lst")
_STEMS = {"train": ("train", "training"), "validation": ("validation", "val", "valid"),
          "test": ("test", "testing")}


def find_split_files(path: str) -> dict[str, str]:
  """``{split: file}`` in a directory; train and test are required."""
  entries = {e.lower(): e for e in os.listdir(path)
             if os.path.isfile(os.path.join(path, e))}
  found = {}
  for split, stems in _STEMS.items():
    for stem in stems:
      hits = [entries[stem + ext] for ext in EXTENSIONS if stem + ext in entries]
      if len(hits) > 1:
        raise ValueError(f"{path}: several {split} files {hits}; keep one")
      if hits:
        found[split] = os.path.join(path, hits[0])
        break
  if "train" not in found or "test" not in found:
    raise FileNotFoundError(
        f"{path!r} is a directory, so it must hold train and test label files "
        f"(train.csv / train.txt ..., test.csv / test.txt ..., optionally validation.*); "
        f"found {sorted(entries.values())[:10]}. Or point config.data.path at one file")
  return found


def read_header(path: str) -> tuple[str, list[str] | None, int]:
  """``(separator, emotion names from the header or None, header line number or 0)``."""
  lines = label_files.read_lines(path)
  if not lines:
    raise label_files.LabelFileError(f"{path}: the label file is empty")
  sep = label_files.sniff_separator(lines)
  line_no, text = lines[0]
  fields = label_files.split_fields(text, sep if sep == "csv" else "header")
  if label_files.is_header(fields, 1):
    return sep, fields[1:], line_no
  return sep, None, 0


def resolve_taxonomy(files: dict[Any, str], taxonomy_name: str | None) -> Taxonomy:
  """The taxonomy of the label files (see the module docstring)."""
  headers = {f: read_header(f)[1] for f in files.values()}
  named = [h for h in headers.values() if h is not None]
  if taxonomy_name:
    return get_taxonomy(taxonomy_name)
  if not named:
    raise label_files.LabelFileError(
        f"{next(iter(files.values()))}: no header row naming the emotions; set "
        f"config.data.taxonomy (one of {', '.join(sorted(TAXONOMIES))})")
  names = tuple(label_files.clean_emotion_name(n) for n in named[0])
  for h in named[1:]:
    if tuple(label_files.clean_emotion_name(n) for n in h) != names:
      raise label_files.LabelFileError(f"the label files' headers differ: {named[0]} vs {h}")
  for t in TAXONOMIES.values():
    if sorted(n.lower() for n in t.names) == sorted(names):
      return t
  if len(set(names)) != len(names) or not all(names):
    raise label_files.LabelFileError(f"header emotion names must be unique and non-empty: "
                                f"{named[0]}")
  return Taxonomy(name="custom", names=names)


class VotesCsv(source_builder.SourceBuilder, skip_registration=True):
  """Image paths with votes from CSV or list files (module docstring)."""

  name = "votes_csv"
  DESCRIPTION = __doc__

  def _plan(self) -> source_builder.Plan:
    opts = self._options
    log = buildlog.BuildLog()
    tax = self._taxonomy
    candidates, pre_assigned, seen = [], None, {}
    files = opts["files"]
    if "all" not in files:
      pre_assigned = {}
    roots = {}
    for split, label_file in files.items():
      sep, header, header_line = read_header(label_file)
      lines = label_files.read_lines(label_file)
      perm = np.arange(tax.num_classes)
      if header is not None:
        lines = lines[1:]
        perm = label_files.column_order(header, tax, f"{label_file}:{header_line}")
      rows = label_files.read_value_rows(
          label_file, lines, sep=sep, num_values=tax.num_classes, lenient=opts["lenient"],
          log=log, split=buildlog.UNASSIGNED if split == "all" else split,
          layout=f"path + {tax.num_classes} vote counts ({', '.join(tax.names)})")
      root = (os.path.join(os.path.dirname(label_file), opts["image_dir"])
              if opts["image_dir"] else os.path.dirname(label_file))
      roots[root] = roots.get(root, []) + [label_file]
      for row in rows:
        if row.name in seen:
          raise label_files.LabelFileError(
              f"{row.origin}: duplicate image {row.name!r} (also at {seen[row.name]})")
        seen[row.name] = row.origin
        votes = row.values[perm]
        dist = (votes / votes.sum()).astype(np.float32)
        candidates.append(splits.Candidate(
            row.name, int(np.argmax(dist)), dist, votes.astype(np.float32), row.origin,
            os.path.join(root, row.name)))
        if pre_assigned is not None:
          pre_assigned[row.name] = split
    examples, split_info = splits.assign_splits(
        candidates, log, seed=opts["split_seed"], fractions=opts["split_fractions"],
        split_file=opts["split_file"],
        allow_missing_images=opts["allow_missing_images"], pre_assigned=pre_assigned)
    info: dict[str, Any] = {"label_files": files, "split": split_info, "images": {}}
    named = set(seen) | label_files.bad_row_names(log, buildlog.UNASSIGNED)
    for split in buildlog.SPLITS:
      named |= label_files.bad_row_names(log, split)
    for root in roots:
      # Names are relative to the root; images elsewhere cannot be matched, so only
      # the image root's own tree is reported.
      info["images"][root] = image_files.note_unlisted_images(
          log, root, named, exclude_dirs=[os.fspath(self.data_dir_root)],
          exclude_files=list(files.values()))
    return source_builder.Plan(examples, log, info)


def make_builder(data_config, data_dir: str | None = None) -> VotesCsv:
  """An unprepared builder for votes files (fields in the module docstring)."""
  path = source_builder.require_path(data_config)
  files = find_split_files(path) if os.path.isdir(path) else {"all": path}
  split = splits.split_options(data_config)
  if "all" not in files and split["split_file"]:
    raise ValueError(f"{path} holds per-split files {sorted(files)}; "
                     "config.data.split_file cannot be used with them")
  taxonomy = resolve_taxonomy(files, data_config.get("taxonomy", None) or None)
  if data_dir is None:
    from sdl_jax.data import default_data_dir  # pylint: disable=g-import-not-at-top
    data_dir = default_data_dir()
  options = {"path": path, "files": files,
             "image_dir": data_config.get("image_dir", None) or None,
             "fingerprint": source_builder.stat_fingerprint(files.values()), **split}
  return VotesCsv(options=options, taxonomy=taxonomy, num_votes=taxonomy.num_classes,
                  channels=int(data_config.get("channels", None) or 3),
                  prefix=splits.split_prefix(options), data_dir=data_dir)
