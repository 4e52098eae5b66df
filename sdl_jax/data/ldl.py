"""Emotion6, Flickr_LDL and Twitter_LDL: image emotion distributions with no official split.

Source layouts (as published):

* Emotion6 (Peng et al. 2015): ``ground_truth.txt``, tab-separated, header
  ``[image_filename] [valence] [arousal] [prob. anger] ... [prob. neutral]``, one row per
  image ``anger/1.jpg  v  a  p1 ... p7``; images in ``images/<category>/<n>.jpg``.
  ``distribution`` is the seven probabilities renormalised to sum 1 (they are rounded in
  the file); there are no votes, so no ``votes`` feature. Valence and arousal must be
  numbers but are not kept.
* Flickr_LDL / Twitter_LDL (Yang et al. 2017): ``ground_truth.txt``, whitespace-separated
  (real copies have CRLF line ends and trailing spaces), header
  ``images-name Amusement Awe Contentment Excitement Anger Disgust Fear Sadness``, one row
  of vote counts per image (11 annotators for Flickr_LDL, 8 for Twitter_LDL); images
  ``1.jpg``, ... in ``images/`` or next to the file. ``votes`` are the 8 counts,
  ``distribution = votes / sum(votes)``.

A header row is recognised by a non-number in a value column and its emotion columns are
matched to the taxonomy by name (any order, any case); without a header the publisher's
column order is assumed. ``label`` is the dominant emotion (arg-max, first on ties).
``file_name`` is the name as written in the label file.

Splits: the seeded 80/5/15 split stratified by dominant label of the paper's protocol
(``splits.stratified_split``), or an explicit ``split_file``; the split used is
``buildlog.split_assignment(builder)`` / ``splits.json``.

Config fields (``config.data``): ``path`` (the data set's directory, or its label file);
``label_file`` (default ``ground_truth.txt`` in ``path``); ``image_dir`` (default:
found, see ``image_files.find_image_root``); ``split_seed``, ``split_fractions``,
``split_file``, ``lenient``, ``allow_missing_images`` (see ``splits.split_options``): a
row whose image file does not exist stops the build with an error naming the label file,
the count and the first names, unless ``allow_missing_images`` (then such rows are skipped,
counted and logged at WARNING).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from sdl_jax.data import buildlog, image_files, label_files, source_builder, splits
from sdl_jax.emotions import EMOTION6, MIKELS8, Taxonomy


@dataclasses.dataclass(frozen=True)
class LdlFormat:
  """How one published LDL set lays out ``ground_truth.txt``.

  Attributes:
    taxonomy: the emotions, in the publisher's column order.
    extra_columns: numbers between the name and the emotion columns (Emotion6's
      valence and arousal).
    has_votes: whether the emotion columns are vote counts (kept as ``votes``).
    value_kind: words for messages.
  """
  taxonomy: Taxonomy
  extra_columns: int
  has_votes: bool
  value_kind: str


FORMATS = {
    "emotion6": LdlFormat(EMOTION6, 2, False, "valence, arousal, 7 probabilities"),
    "flickr_ldl": LdlFormat(MIKELS8, 0, True, "8 vote counts"),
    "twitter_ldl": LdlFormat(MIKELS8, 0, True, "8 vote counts"),
}


def read_ground_truth(label_file: str, fmt: LdlFormat, *, lenient: bool,
                      log: buildlog.BuildLog) -> list[tuple[label_files.Row, np.ndarray]]:
  """Reads and validates a ``ground_truth.txt``.

  Returns:
    per good row ``(row, values)`` with ``values`` float64 ``[C]``, the emotion columns in
    taxonomy order.

  Raises:
    LabelFileError: a bad header, or (unless ``lenient``) a bad row, naming file and line.
  """
  lines = label_files.read_lines(label_file)
  if not lines:
    raise label_files.LabelFileError(f"{label_file}: the label file is empty")
  c = fmt.taxonomy.num_classes
  first_no, first = lines[0]
  perm = np.arange(c)
  header = label_files.split_fields(first, "header")
  if label_files.is_header(header, 1):
    lines = lines[1:]
    if len(header) != 1 + fmt.extra_columns + c:
      raise label_files.LabelFileError(
          f"{label_file}:{first_no}: header has {len(header)} columns, expected "
          f"{1 + fmt.extra_columns + c} (name, {fmt.value_kind}): {header}")
    perm = label_files.column_order(header[1 + fmt.extra_columns:], fmt.taxonomy,
                               f"{label_file}:{first_no}")
  rows = label_files.read_value_rows(
      label_file, lines, sep="whitespace", num_values=fmt.extra_columns + c,
      counts=slice(fmt.extra_columns, None), lenient=lenient, log=log,
      layout=f"name, {fmt.value_kind}")
  return [(r, r.values[fmt.extra_columns:][perm]) for r in rows]


class _LdlBuilder(source_builder.SourceBuilder, skip_registration=True):
  """Shared by the three LDL sets; the subclass's ``name`` picks the ``FORMATS`` entry."""

  def _plan(self) -> source_builder.Plan:
    fmt = FORMATS[self.name]
    opts = self._options
    log = buildlog.BuildLog()
    label_file = opts["label_file"]
    read = read_ground_truth(label_file, fmt, lenient=opts["lenient"], log=log)
    names = [r.name for r, _ in read]
    root = image_files.find_image_root(opts["base"], names, label_file, opts["image_dir"])
    candidates = []
    for row, values in read:
      dist = (values / values.sum()).astype(np.float32)
      candidates.append(splits.Candidate(
          name=row.name, label=int(np.argmax(dist)), distribution=dist,
          votes=values.astype(np.float32) if fmt.has_votes else None,
          origin=row.origin, path=os.path.join(root, row.name)))
    examples, split_info = splits.assign_splits(
        candidates, log, seed=opts["split_seed"], fractions=opts["split_fractions"],
        split_file=opts["split_file"],
        allow_missing_images=opts["allow_missing_images"])
    info: dict[str, Any] = {"label_file": label_file, "image_root": root,
                            "split": split_info}
    info["images"] = image_files.note_unlisted_images(
        log, root, set(names) | label_files.bad_row_names(log, buildlog.UNASSIGNED),
        exclude_dirs=[os.fspath(self.data_dir_root)], exclude_files=[label_file])
    return source_builder.Plan(examples, log, info)


class Emotion6(_LdlBuilder, skip_registration=True):
  name = "emotion6"
  DESCRIPTION = "Emotion6 (Peng et al. 2015), built by sdl_jax.data.ldl.\n" + __doc__
  CITATION = ("@inproceedings{peng2015mixed, title={A mixed bag of emotions: Model, "
              "predict, and transfer emotion distributions}, author={Peng, Kuan-Chuan and "
              "Chen, Tsuhan and Sadovnik, Amir and Gallagher, Andrew C}, "
              "booktitle={CVPR}, year={2015}}")


_YANG2017 = ("@inproceedings{yang2017learning, title={Learning Visual Sentiment "
             "Distributions via Augmented Conditional Probability Neural Network}, "
             "author={Yang, Jufeng and Sun, Ming and Sun, Xiaoxiao}, booktitle={AAAI}, "
             "year={2017}}")


class FlickrLdl(_LdlBuilder, skip_registration=True):
  name = "flickr_ldl"
  DESCRIPTION = "Flickr_LDL (Yang et al. 2017), built by sdl_jax.data.ldl.\n" + __doc__
  CITATION = _YANG2017


class TwitterLdl(_LdlBuilder, skip_registration=True):
  name = "twitter_ldl"
  DESCRIPTION = "Twitter_LDL (Yang et al. 2017), built by sdl_jax.data.ldl.\n" + __doc__
  CITATION = _YANG2017


BUILDER_CLASSES = {cls.name: cls for cls in (Emotion6, FlickrLdl, TwitterLdl)}


def make_builder(data_config, data_dir: str | None = None) -> _LdlBuilder:
  """An unprepared builder for ``config.data.name`` in emotion6/flickr_ldl/twitter_ldl."""
  name = data_config.get("name")
  if name not in BUILDER_CLASSES:
    raise ValueError(f"sdl_jax.data.ldl builds {sorted(BUILDER_CLASSES)}, not {name!r}")
  path = source_builder.require_path(data_config)
  if os.path.isfile(path):
    base, label_file = os.path.dirname(path), path
  else:
    base = path
    label_file = os.path.join(base, data_config.get("label_file", None)
                              or "ground_truth.txt")
  if not os.path.isfile(label_file):
    raise FileNotFoundError(
        f"{name}: label file {label_file!r} not found; {name} expects ground_truth.txt "
        "next to its images (set config.data.label_file if yours is named otherwise)")
  if data_dir is None:
    from sdl_jax.data import default_data_dir  # pylint: disable=g-import-not-at-top
    data_dir = default_data_dir()
  image_dir = data_config.get("image_dir", None) or None
  options = {"path": path, "base": base, "label_file": label_file,
             "image_dir": image_dir,
             "fingerprint": source_builder.stat_fingerprint([label_file]),
             **splits.split_options(data_config)}
  fmt = FORMATS[name]
  return BUILDER_CLASSES[name](
      options=options, taxonomy=fmt.taxonomy,
      num_votes=fmt.taxonomy.num_classes if fmt.has_votes else None, channels=3,
      prefix=splits.split_prefix(options), data_dir=data_dir)
