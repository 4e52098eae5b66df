"""FER+ (Barsoum et al. 2016): FER2013 faces with 10 crowd votes each, official splits.

Source layout (as Microsoft's FERPlus code expects it)::

  data/FER2013Train/label.csv + fer0000000.png ...   -> split 'train'
  data/FER2013Valid/label.csv + *.png                 -> split 'validation'
  data/FER2013Test/label.csv  + *.png                 -> split 'test'

``label.csv`` is headerless, one row per image: ``name,"(x, y, w, h)",v1,...,v10``, the
10 vote counts for neutral, happiness, surprise, sadness, anger, disgust, fear, contempt,
unknown and NF (not a face).

``config.data.path`` may be that ``data`` directory, its parent, or a ``.tar.gz``/``.tar``
archive holding the three folders at any depth (``../shared/data/ferplus.tar.gz`` works
as it is). An archive is read into memory in one pass at build time (FER+ is about 90 MB
of PNGs) and never extracted to disk: one pass over the archive costs less than writing
and re-reading 35,710 small files.

Targets. First the outliers are removed as in the FERPlus reference code
(``_process_data``): every count ``< 1 + machine eps`` (a single vote) becomes 0. Then
``config.data.protocol`` selects:

* ``'majority'`` (the reference code's 'majority' mode, the usual test protocol): keep an
  image when one column has more than half of the remaining votes and that column is an
  emotion, not ``unknown``/``NF``. On the complete data set this keeps 25,045 / 3,191 /
  3,137 of 28,558 / 3,579 / 3,573 images. ``label`` is that emotion.
* ``'distribution'``: keep an image unless its top column after outlier removal (first
  on ties) is ``unknown``/``NF`` or none of its 8 emotion votes is left. On the complete
  data set this keeps 28,385 / 3,555 / 3,545 images. ``label`` is the dominant emotion.

In both, ``distribution`` is the 8 emotion votes after outlier removal, normalised (for
'majority' images its arg-max is the majority label), and ``votes`` are the 10 raw vote
columns as in the file. The image is the 48x48 grey PNG (one channel). ``file_name`` is
``FER2013Train/fer0000000.png`` etc. Rows left out by the protocol are skipped with reason
``no_majority``, ``majority_unknown_or_nf``, ``top_vote_unknown_or_nf`` or
``no_emotion_votes`` and appear in the build log.

Config fields (``config.data``): ``path``; ``protocol`` ('majority' | 'distribution',
default 'majority'); ``lenient`` (default False: a bad label row is an error naming file
and line; True: it is skipped and logged); ``allow_missing_images`` (default False: a
kept row whose image file is missing is an error; True: it is skipped and logged).
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from typing import Any

import numpy as np

from sdl_jax.data import buildlog, image_files, label_files, source_builder, splits
from sdl_jax.emotions import FERPLUS

SPLIT_DIRS = {"train": "FER2013Train", "validation": "FER2013Valid",
              "test": "FER2013Test"}
VOTE_COLUMNS = FERPLUS.names + ("unknown", "NF")
NUM_EMOTIONS = FERPLUS.num_classes  # 8; columns 8 and 9 are unknown and NF.
PROTOCOLS = ("majority", "distribution")

NO_MAJORITY = "no_majority"
MAJORITY_UNKNOWN = "majority_unknown_or_nf"
TOP_UNKNOWN = "top_vote_unknown_or_nf"
NO_EMOTION_VOTES = "no_emotion_votes"


def remove_outliers(votes) -> np.ndarray:
  """Zeroes single votes, as FERPlus's ``_process_data``: ``v < 1 + eps -> 0``.

  Args:
    votes: ``[N, 10]`` (or ``[10]``) vote counts.

  Returns:
    float64, same shape.
  """
  v = np.asarray(votes, dtype=np.float64)
  return np.where(v < 1.0 + np.finfo(np.float64).eps, 0.0, v)


def targets(votes, protocol: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
  """FER+ targets of each image under ``protocol``.

  Args:
    votes: ``[N, 10]`` raw vote counts (8 emotions, unknown, NF).
    protocol: ``'majority'`` or ``'distribution'`` (see the module docstring).

  Returns:
    ``(keep, label, distribution, reason)``: bool ``[N]``; int32 ``[N]`` (meaningful where
    kept); float32 ``[N, 8]``, the emotion votes after outlier removal normalised (zero
    rows where no emotion vote is left); and per image ``None`` or the reason it is left
    out.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown FER+ protocol {protocol!r}; expected one of {PROTOCOLS}")
  v = remove_outliers(votes)
  if v.ndim != 2 or v.shape[1] != len(VOTE_COLUMNS):
    raise ValueError(f"FER+ votes must be [N, 10], got shape {np.shape(votes)}")
  emotions = v[:, :NUM_EMOTIONS]
  emo_total = emotions.sum(axis=1)
  dist = np.divide(emotions, emo_total[:, None], out=np.zeros_like(emotions),
                   where=emo_total[:, None] > 0).astype(np.float32)
  top = np.argmax(v, axis=1)  # First index on ties, as np.argmax in the reference code.
  reasons: list[str | None] = []
  if protocol == "majority":
    majority = v.max(axis=1) > 0.5 * v.sum(axis=1)
    for m, t in zip(majority, top):
      reasons.append(None if m and t < NUM_EMOTIONS
                     else NO_MAJORITY if not m else MAJORITY_UNKNOWN)
    label = top
  else:
    for t, total in zip(top, emo_total):
      reasons.append(TOP_UNKNOWN if t >= NUM_EMOTIONS
                     else NO_EMOTION_VOTES if total <= 0 else None)
    label = np.argmax(emotions, axis=1)
  keep = np.array([r is None for r in reasons], dtype=bool)
  return keep, label.astype(np.int32), dist, reasons


def _find_data_root(base: str) -> str | None:
  for root in (os.path.join(base, "data"), base):
    if all(os.path.isfile(os.path.join(root, d, "label.csv"))
           for d in SPLIT_DIRS.values()):
      return root
  return None


def _expected_files(base: str) -> str:
  return ", ".join(os.path.join(base, "data", d, "label.csv")
                   for d in SPLIT_DIRS.values())


MAX_ARCHIVE_BYTES = 4 << 30


def read_archive(archive: str) -> dict[str, bytes]:
  """The FER+ files of a tar archive, in memory: ``{'FER2013Train/label.csv': ...}``.

  Keys are paths from the split folder on (the folders may sit at any depth, but all at
  the same one). Only regular files inside the three split folders are kept; links and
  other members are ignored, so nothing in the archive can point outside it.

  Raises:
    ValueError: the archive cannot be read, the folders sit under different parents, or
      the files exceed ``MAX_ARCHIVE_BYTES`` (extract it and give the directory then).
  """
  blobs: dict[str, bytes] = {}
  prefixes = set()
  total = 0
  try:
    with tarfile.open(archive) as tar:
      for member in tar:
        if not member.isfile():
          continue
        parts = posixpath.normpath(member.name).split("/")
        hit = [i for i, part in enumerate(parts[:-1]) if part in SPLIT_DIRS.values()]
        if not hit or ".." in parts:
          continue
        prefixes.add("/".join(parts[:hit[-1]]))
        total += member.size
        if total > MAX_ARCHIVE_BYTES:
          raise ValueError(f"{archive}: more than {MAX_ARCHIVE_BYTES >> 30} GiB of files; "
                           "extract it and set config.data.path to the directory")
        blobs["/".join(parts[hit[-1]:])] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f"cannot read FER+ archive {archive!r}: {e}") from None
  if len(prefixes) > 1:
    raise ValueError(f"{archive}: FER2013 folders under several parents {sorted(prefixes)}")
  return blobs


class _Files:
  """The FER+ files of a directory or an in-memory archive, addressed as 'folder/name'."""

  def __init__(self, path: str):
    self.path = path
    if os.path.isfile(path):
      self.blobs = read_archive(path)
      self.root = None
      missing = [f"{d}/label.csv" for d in SPLIT_DIRS.values()
                 if f"{d}/label.csv" not in self.blobs]
      if missing:
        raise FileNotFoundError(f"FER+ archive {path!r} lacks {', '.join(missing)}")
    else:
      self.blobs = None
      self.root = _find_data_root(path)
      if self.root is None:
        raise FileNotFoundError(f"FER+ source {path!r} lacks the label files; expected "
                                f"{_expected_files(path)} (or the same without 'data/')")

  def where(self, rel: str) -> str:
    """For messages and examples' paths: the file path, or 'archive:member'."""
    if self.blobs is None:
      return os.path.join(self.root, rel)
    return f"{self.path}:{rel}"

  def key(self, rel: str) -> str:
    """What ``Example.path`` holds: the file path, or the archive key."""
    return rel if self.blobs is not None else os.path.join(self.root, rel)

  def read(self, rel: str) -> bytes:
    if self.blobs is not None:
      return self.blobs[rel]
    with open(os.path.join(self.root, rel), "rb") as f:
      return f.read()

  def exists(self, rel: str) -> bool:
    if self.blobs is not None:
      return rel in self.blobs
    return os.path.isfile(os.path.join(self.root, rel))

  def listing(self, folder: str) -> tuple[list[str], list[str]]:
    """Image and other file names (relative to ``folder``) below ``folder``."""
    if self.blobs is None:
      return image_files.list_images(os.path.join(self.root, folder))
    names = sorted(k[len(folder) + 1:] for k in self.blobs if k.startswith(folder + "/"))
    is_image = [n.lower().endswith(image_files.IMAGE_EXTENSIONS) for n in names]
    return ([n for n, i in zip(names, is_image) if i],
            [n for n, i in zip(names, is_image) if not i])


def source_fingerprint(path: str) -> list[list[Any]]:
  """What the cache key sees of the source: the archive, or the three label files."""
  if os.path.isfile(path):
    return source_builder.stat_fingerprint([path])
  root = _find_data_root(path)
  if root is None:
    raise FileNotFoundError(
        f"FER+ source {path!r} lacks the label files; expected {_expected_files(path)} "
        "(or the same without 'data/'), or give the .tar.gz archive itself")
  return source_builder.stat_fingerprint(
      [os.path.join(root, d, "label.csv") for d in SPLIT_DIRS.values()])


class Ferplus(source_builder.SourceBuilder, skip_registration=True):
  """FER+ with official splits; the protocol is part of the config (module docstring)."""

  name = "ferplus"
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/microsoft/FERPlus"
  CITATION = ("@inproceedings{BarsoumICMI2016, title={Training Deep Networks for Facial "
              "Expression Recognition with Crowd-Sourced Label Distribution}, author="
              "{Barsoum, Emad and Zhang, Cha and Canton Ferrer, Cristian and Zhang, "
              "Zhengyou}, booktitle={ICMI}, year={2016}}")

  def _plan(self) -> source_builder.Plan:
    files = _Files(self._options["path"])
    protocol = self._options["protocol"]
    log = buildlog.BuildLog()
    examples: dict[str, list[source_builder.Example]] = {s: [] for s in buildlog.SPLITS}
    info: dict[str, Any] = {"source": files.root or files.path, "split_method": "official",
                            "images": {}}
    missing, num_kept = [], 0
    for split, folder in SPLIT_DIRS.items():
      label_rel = f"{folder}/label.csv"
      label_file = files.where(label_rel)
      rows = label_files.read_value_rows(
          label_file, label_files.read_lines(label_file, files.read(label_rel)), sep="csv",
          num_values=len(VOTE_COLUMNS), text_columns=1, lenient=self._options["lenient"],
          log=log, split=split,
          layout="name, face box, 10 vote counts " + "/".join(VOTE_COLUMNS))
      votes = (np.stack([r.values for r in rows]) if rows
               else np.zeros((0, len(VOTE_COLUMNS))))
      keep, labels, dists, reasons = targets(votes, protocol)
      for i, row in enumerate(rows):
        log.read(split)
        name = f"{folder}/{row.name}"
        if not keep[i]:
          log.skip(split, reasons[i], name,
                   f"votes {row.values.astype(int).tolist()} ({protocol} protocol)",
                   row.origin)
          continue
        num_kept += 1
        if not files.exists(name):
          log.skip(split, buildlog.NO_IMAGE, name, f"no image file {files.where(name)}",
                   row.origin)
          missing.append((name, row.origin, files.where(name)))
          continue
        examples[split].append(source_builder.Example(
            name, files.key(name), int(labels[i]), dists[i],
            row.values.astype(np.float32), row.origin))
      named = {r.name for r in rows} | {n.split("/", 1)[-1]
                                        for n in label_files.bad_row_names(log, split)}
      images, others = files.listing(folder)
      unlisted = [n for n in images if n not in named]
      others = [n for n in others if n != "label.csv"]
      for n in unlisted:
        log.note(buildlog.IMAGE_WITHOUT_ROW, f"{folder}/{n}",
                 "image file without a label row", split)
      for n in others:
        log.note(buildlog.NON_IMAGE_FILE, f"{folder}/{n}",
                 "ignored: not an image file by its extension", split)
      info["images"][split] = {"images_found": len(images),
                               "images_without_row": len(unlisted),
                               "non_image_files": len(others)}
    image_files.check_missing_images(missing, num_kept, self._options["allow_missing_images"])
    return source_builder.Plan(examples, log, info, files.blobs)


def make_builder(data_config, data_dir: str | None = None) -> Ferplus:
  """An unprepared FER+ builder for ``config.data`` (fields in the module docstring)."""
  path = source_builder.require_path(data_config)
  protocol = data_config.get("protocol", "majority") or "majority"
  if protocol not in PROTOCOLS:
    raise ValueError(
        f"config.data.protocol={protocol!r} is not a FER+ protocol; expected one of "
        f"{PROTOCOLS}")
  if os.path.isfile(path) and not tarfile.is_tarfile(path):
    raise ValueError(f"FER+ source {path!r} is a file but not a tar archive; give the "
                     ".tar.gz or the directory holding data/FER2013Train etc.")
  if data_dir is None:
    from sdl_jax.data import default_data_dir  # pylint: disable=g-import-not-at-top
    data_dir = default_data_dir()
  options = {"path": path, "protocol": protocol,
             "lenient": bool(data_config.get("lenient", False)),
             "allow_missing_images": splits.allow_missing_images(data_config),
             "fingerprint": source_fingerprint(path)}
  return Ferplus(options=options, taxonomy=FERPLUS, num_votes=len(VOTE_COLUMNS),
                 channels=1, prefix=protocol, data_dir=data_dir)
