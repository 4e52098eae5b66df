"""FER+ builder: the FERPlus reference protocols, the publisher's layout, the archive."""

import io
import os
import sys
import tarfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from sdl_jax.data import buildlog, ferplus, get_builder, image_files, label_files
from sdl_jax.emotions import FERPLUS

tfds = pytest.importorskip("tensorflow_datasets")

ARCHIVE = Path(__file__).resolve().parents[2] / "shared/data/ferplus.tar.gz"
needs_archive = pytest.mark.skipif(
    not ARCHIVE.exists(), reason=f"the FER+ archive is not at {ARCHIVE} (../shared/data "
    "next to the repository)")


# --------------------------------------------------------------------------------------
# Plain reference: the FERPlus code (ferplus.py, FERPlusReader) transcribed as loops.


def reference_majority(raw):
  """``_process_data(emotion_raw, 'majority')`` + ``load_folders``' check: label or None."""
  emotion_raw = [float(x) for x in raw]
  size = len(emotion_raw)
  emotion_unknown = [0.0] * size
  emotion_unknown[-2] = 1.0
  for i in range(size):  # Remove emotions with a single vote (outlier removal).
    if emotion_raw[i] < 1.0 + sys.float_info.epsilon:
      emotion_raw[i] = 0.0
  sum_list = sum(emotion_raw)
  emotion = [0.0] * size
  maxval = max(emotion_raw)
  if maxval > 0.5 * sum_list:
    emotion[int(np.argmax(emotion_raw))] = maxval
  else:
    emotion = emotion_unknown  # Forced to unknown.
  idx = int(np.argmax(emotion))
  return idx if idx < 8 else None  # Not unknown or non-face.


def reference_distribution(raw):
  """The 'distribution' protocol: ``(label, distribution)`` or ``None``."""
  v = [0.0 if float(x) < 1.0 + sys.float_info.epsilon else float(x) for x in raw]
  top = max(range(10), key=lambda i: (v[i], -i))  # First index on ties.
  total = sum(v[:8])
  if top >= 8 or total == 0:
    return None
  dist = [x / total for x in v[:8]]
  return max(range(8), key=lambda i: (dist[i], -i)), dist


EDGE_VOTES = [
    [8, 1, 0, 0, 0, 0, 0, 1, 0, 0],   # clear majority: neutral
    [4, 0, 0, 1, 3, 2, 0, 0, 0, 0],   # no majority after outlier removal (4 of 9)
    [0, 0, 0, 0, 0, 0, 0, 0, 9, 1],   # majority unknown
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 9],   # majority not-a-face
    [0, 4, 0, 0, 0, 0, 0, 0, 4, 2],   # tie emotion/unknown: first index wins
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],   # only single votes: nothing left
    [0, 0, 0, 0, 0, 0, 0, 7, 2, 1],   # contempt
    [5, 5, 0, 0, 0, 0, 0, 0, 0, 0],   # exact half: no majority
    [0, 0, 2, 0, 0, 0, 0, 0, 1, 3],   # top is NF (3 of 5 after removal), emotions left
]


def _random_votes(rng, n):
  """Vote rows like FER+'s: ~10 annotators spread over few columns."""
  out = []
  for _ in range(n):
    v = np.zeros(10, dtype=int)
    for _ in range(int(rng.integers(9, 12))):
      v[rng.choice(10, p=[.25, .2, .12, .1, .1, .03, .05, .03, .07, .05])] += 1
    out.append(v.tolist())
  return out


def test_targets_match_the_reference_code():
  rng = np.random.default_rng(0)
  votes = np.array(EDGE_VOTES + _random_votes(rng, 400))
  keep, label, dist, reasons = ferplus.targets(votes, "majority")
  for i, raw in enumerate(votes):
    want = reference_majority(raw)
    assert keep[i] == (want is not None), raw
    if want is not None:
      assert label[i] == want and reasons[i] is None
      assert int(np.argmax(dist[i])) == want
  keep, label, dist, reasons = ferplus.targets(votes, "distribution")
  for i, raw in enumerate(votes):
    want = reference_distribution(raw)
    assert keep[i] == (want is not None), raw
    if want is not None:
      assert label[i] == want[0]
      np.testing.assert_allclose(dist[i], want[1], rtol=1e-6)
  # The edge rows, by name.
  assert ferplus.targets(np.array(EDGE_VOTES), "majority")[3] == [
      None, "no_majority", "majority_unknown_or_nf", "majority_unknown_or_nf",
      "no_majority", "no_majority", None, "no_majority", "majority_unknown_or_nf"]
  assert ferplus.targets(np.array(EDGE_VOTES), "distribution")[3] == [
      None, None, "top_vote_unknown_or_nf", "top_vote_unknown_or_nf", None,
      "no_emotion_votes", None, None, "top_vote_unknown_or_nf"]
  with pytest.raises(ValueError, match="protocol"):
    ferplus.targets(votes, "probability")


# --------------------------------------------------------------------------------------
# A small copy in the publisher's layout.


def _png(path, seed):
  arr = np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8)
  Image.fromarray(arr, "L").save(path, format="PNG")


def _write_ferplus(root, n_per_split=16):
  """data/FER2013*/label.csv (headerless, LF, quoted face box) and 48x48 grey PNGs."""
  rng = np.random.default_rng(1)
  rows = {}
  k = 0
  for split, folder in ferplus.SPLIT_DIRS.items():
    d = os.path.join(root, "data", folder)
    os.makedirs(d)
    votes = (EDGE_VOTES if split == "train" else []) + _random_votes(rng, n_per_split)
    lines = []
    for v in votes:
      name = f"fer{k:07d}.png"
      _png(os.path.join(d, name), k)
      lines.append(f'{name},"(0, 0, 48, 48)",' + ",".join(map(str, v)))
      rows[f"{folder}/{name}"] = (split, v)
      k += 1
    with open(os.path.join(d, "label.csv"), "w", newline="") as f:
      f.write("\n".join(lines) + "\n")
  with open(os.path.join(root, "data", "fer2013new.csv"), "w") as f:
    f.write("Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,"
            "contempt,unknown,NF\n")
  return rows


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(name="ferplus", **kw))


def _examples(builder, split):
  return {ex["file_name"].decode(): ex
          for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def test_small_ferplus_layout_both_protocols(tmp_path):
  root = str(tmp_path / "FERPlus")
  rows = _write_ferplus(root)
  # Bad images: a truncated PNG and a missing one, both of rows every protocol keeps;
  # an image without a row.
  kept = [n for n, (s, v) in rows.items()
          if reference_majority(v) is not None and reference_distribution(v) is not None]
  truncated = next(n for n in kept if n.startswith("FER2013Train/"))
  missing = next(n for n in kept if n.startswith("FER2013Valid/"))
  p = os.path.join(root, "data", truncated)
  data = open(p, "rb").read()
  open(p, "wb").write(data[:len(data) // 3])
  os.remove(os.path.join(root, "data", missing))
  _png(os.path.join(root, "data", "FER2013Test", "fer9999999.png"), 0)
  with pytest.raises(image_files.MissingImagesError,
                     match=rf"1 of \d+ label rows of .*FER2013Valid.label.csv name no "
                     rf"image file \(first: '{missing}'.*allow_missing_images=True"):
    ferplus.make_builder(_cfg(path=root), str(tmp_path / "c")).download_and_prepare()
  for protocol in ferplus.PROTOCOLS:
    b = ferplus.make_builder(_cfg(path=root, protocol=protocol, allow_missing_images=True),
                             str(tmp_path / "c"))
    b.download_and_prepare()
    s = buildlog.build_summary(b)
    assert s["complete"] and s["notes"] == {"image_without_row": 1}
    for split in buildlog.SPLITS:
      c = s["splits"][split]
      mine = {n: v for n, (sp, v) in rows.items() if sp == split}
      if protocol == "majority":
        want = {n: reference_majority(v) for n, v in mine.items()}
      else:
        want = {n: (r[0] if r else None) for n, v in mine.items()
                for r in [reference_distribution(v)]}
      bad = {truncated, missing} & set(mine)
      written = {n for n, lab in want.items() if lab is not None} - bad
      assert c["rows_read"] == len(mine)
      assert c["written"] == len(written) == b.info.splits[split].num_examples
      assert c["rows_read"] == c["written"] + sum(c["skipped"].values())
      left_out = sum(lab is None for lab in want.values())
      assert sum(v for k, v in c["skipped"].items()
                 if k not in ("unreadable_image", "no_image")) == left_out
      exs = _examples(b, split)
      assert set(exs) == written
      for name, ex in exs.items():
        raw = mine[name]
        assert ex["image"].shape == (48, 48, 1) and ex["image"].dtype == np.uint8
        np.testing.assert_array_equal(ex["votes"], raw)
        assert ex["label"] == want[name]
        v = [0 if x <= 1 else x for x in raw[:8]]
        np.testing.assert_allclose(ex["distribution"], np.array(v) / sum(v), rtol=1e-6)
      assert sorted(exs) == buildlog.split_assignment(b)[split]
    assert s["splits"]["train"]["skipped"].get("unreadable_image") == 1
    assert s["splits"]["validation"]["skipped"].get("no_image") == 1
    log = buildlog.build_log(b)
    entry = next(e for e in log if e["name"] == truncated)
    assert entry["reason"] == "unreadable_image" and entry["origin"].endswith(
        f"label.csv:{1 + int(truncated[-11:-4])}")
  assert b.info.features["label"].names == list(FERPLUS.names)


def test_ferplus_from_a_tar_archive(tmp_path):
  src = tmp_path / "src"
  rows = _write_ferplus(str(src), n_per_split=8)
  _png(src / "data" / "FER2013Test" / "fer7777777.png", 0)  # image without a row
  archive = tmp_path / "ferplus.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(src, arcname="FERPlus-master")  # Folders one level deeper than data/.
  cache = tmp_path / "cache"
  b = get_builder(_cfg(path=str(archive), protocol="distribution", cache_dir=str(cache)))
  m = get_builder(_cfg(path=str(archive), protocol="majority", cache_dir=str(cache)))
  assert os.fspath(b.data_path) != os.fspath(m.data_path)
  assert sorted(os.listdir(cache)) == ["downloads", "ferplus"]  # Nothing extracted.
  for builder, reference in ((b, reference_distribution), (m, reference_majority)):
    s = buildlog.build_summary(builder)
    assert s["written"] == sum(reference(v) is not None for _, v in rows.values())
    assert s["notes"] == {"image_without_row": 1}
  ex = _examples(m, "train")
  name = next(iter(ex))
  with Image.open(src / "data" / name) as im:
    np.testing.assert_array_equal(ex[name]["image"][..., 0], np.asarray(im))
  # Entries name the archive member.
  e = next(e for e in buildlog.build_log(m) if e["reason"] == "image_without_row")
  assert e["name"] == "FER2013Test/fer7777777.png"
  assert next(e for e in buildlog.build_log(m) if e["reason"] == "no_majority")[
      "origin"].startswith(f"{archive}:FER2013Train/label.csv:")


def test_ferplus_bad_label_rows(tmp_path):
  root = str(tmp_path / "F")
  _write_ferplus(root, n_per_split=6)
  label = os.path.join(root, "data", "FER2013Valid", "label.csv")
  with open(label, "a") as f:
    f.write('fer8888888.png,"(0, 0, 48, 48)",1,2,3\n')
    f.write('fer8888889.png,"(0, 0, 48, 48)",0,0,0,0,0,0,0,0,0,0\n')
  with pytest.raises(label_files.LabelFileError,
                     match=r"FER2013Valid/label.csv:7: expected 12 columns"):
    ferplus.make_builder(_cfg(path=root), str(tmp_path / "c")).download_and_prepare()
  b = ferplus.make_builder(_cfg(path=root, lenient=True), str(tmp_path / "c"))
  b.download_and_prepare()
  c = buildlog.build_summary(b)["splits"]["validation"]
  assert c["rows_read"] == 8 and c["skipped"]["bad_row"] == 2
  with open(label, "a") as f:
    f.write('fer0000017.png,"(0, 0, 48, 48)",9,0,0,0,0,0,0,0,0,1\n')  # a duplicate
  with pytest.raises(label_files.LabelFileError, match="duplicate image name 'fer0000017.png'"):
    ferplus.make_builder(_cfg(path=root, lenient=True), str(tmp_path / "d")
                         ).download_and_prepare()


def test_ferplus_clear_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty/data/FER2013Train/label.csv"):
    ferplus.make_builder(_cfg(path=str(tmp_path / "empty")), str(tmp_path))
  (tmp_path / "x.tar.gz").write_bytes(b"not a tar")
  with pytest.raises(ValueError, match="not a tar archive"):
    ferplus.make_builder(_cfg(path=str(tmp_path / "x.tar.gz")), str(tmp_path))
  root = str(tmp_path / "F")
  _write_ferplus(root, n_per_split=2)
  with pytest.raises(ValueError, match="protocol='probability' is not a FER\\+ protocol"):
    ferplus.make_builder(_cfg(path=root, protocol="probability"), str(tmp_path))
  # The data directory itself (without the 'data/' parent) works too.
  b = ferplus.make_builder(_cfg(path=os.path.join(root, "data")), str(tmp_path / "c"))
  assert b.name == "ferplus"


# --------------------------------------------------------------------------------------
# The real archive.


@pytest.fixture(scope="session")
def real_files():
  """The three label.csv files and one PNG, read from the archive with plain tarfile."""
  if not ARCHIVE.exists():
    pytest.skip(f"the FER+ archive is not at {ARCHIVE}")
  wanted = {f"{d}/label.csv" for d in ferplus.SPLIT_DIRS.values()}
  wanted.add("FER2013Train/fer0000000.png")
  out = {}
  with tarfile.open(ARCHIVE, "r:gz") as tar:
    for member in tar:
      key = "/".join(member.name.split("/")[-2:])
      if key in wanted:
        out[key] = tar.extractfile(member).read()
  assert set(out) == wanted
  return out


def _label_votes(files):
  """Votes of each split, parsed from the label.csv files with plain string operations."""
  out = {}
  for split, folder in ferplus.SPLIT_DIRS.items():
    text = files[f"{folder}/label.csv"].decode()
    rows = [line.rsplit('"', 1)[1].strip(",").split(",")
            for line in text.splitlines() if line]
    out[split] = np.array(rows, dtype=float)
  return out


@pytest.mark.slow
@needs_archive
def test_real_label_files_give_the_published_counts(real_files):
  votes = _label_votes(real_files)
  assert {s: len(v) for s, v in votes.items()} == {
      "train": 28558, "validation": 3579, "test": 3573}
  majority = {s: int(ferplus.targets(v, "majority")[0].sum()) for s, v in votes.items()}
  assert majority == {"train": 25045, "validation": 3191, "test": 3137}
  assert majority == {s: sum(reference_majority(r) is not None for r in v)
                      for s, v in votes.items()}
  distribution = {s: int(ferplus.targets(v, "distribution")[0].sum())
                  for s, v in votes.items()}
  assert distribution == {s: sum(reference_distribution(r) is not None for r in v)
                          for s, v in votes.items()}
  assert distribution == {"train": 28385, "validation": 3555, "test": 3545}


def _find(builder, split, names):
  """The examples named ``names`` (filtered inside TensorFlow, images left encoded)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  wanted = tf.constant(sorted(names))
  ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["file_name"], wanted)))
  found = {}
  for ex in tfds.as_numpy(ds):
    ex["image"] = np.asarray(Image.open(io.BytesIO(ex["image"])))[..., None]
    found[ex["file_name"].decode()] = ex
  return found


@pytest.mark.slow
@needs_archive
def test_real_ferplus_builds_with_the_published_split_counts(real_ferplus):
  sizes = {p: {s: b.info.splits[s].num_examples for s in buildlog.SPLITS}
           for p, b in real_ferplus.items()}
  assert sizes == {"majority": {"train": 25045, "validation": 3191, "test": 3137},
                   "distribution": {"train": 28385, "validation": 3555, "test": 3545}}
  for protocol, b in real_ferplus.items():
    s = buildlog.build_summary(b)
    assert s["rows_read"] == 28558 + 3579 + 3573
    assert s["rows_read"] == s["written"] + sum(s["skipped"].values())
    assert "unreadable_image" not in s["skipped"] and "no_image" not in s["skipped"]
    assert s["notes"] == {}
    assert b.info.features["image"].shape == (None, None, 1)


@pytest.mark.slow
@needs_archive
def test_real_ferplus_spot_checks(real_ferplus, real_files):
  # label.csv line 1: fer0000000.png,"(0, 0, 48, 48)",4,0,0,1,3,2,0,0,0,0
  # line 2:           fer0000001.png,"(0, 0, 48, 48)",6,0,1,1,0,0,0,0,2,0
  names = {"FER2013Train/fer0000000.png", "FER2013Train/fer0000001.png"}
  dist = _find(real_ferplus["distribution"], "train", names)
  maj = _find(real_ferplus["majority"], "train", names)
  a, b = dist["FER2013Train/fer0000000.png"], dist["FER2013Train/fer0000001.png"]
  np.testing.assert_array_equal(a["votes"], [4, 0, 0, 1, 3, 2, 0, 0, 0, 0])
  np.testing.assert_allclose(a["distribution"], np.array([4, 0, 0, 0, 3, 2, 0, 0]) / 9,
                             rtol=1e-6)
  assert a["label"] == 0
  np.testing.assert_array_equal(b["votes"], [6, 0, 1, 1, 0, 0, 0, 0, 2, 0])
  # 4 of 9 votes is no majority: left out of 'majority', and logged.
  assert set(maj) == {"FER2013Train/fer0000001.png"}
  m = maj["FER2013Train/fer0000001.png"]
  assert m["label"] == 0 and m["distribution"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
  entry = next(e for e in buildlog.build_log(real_ferplus["majority"])
               if e["name"] == "FER2013Train/fer0000000.png")
  assert entry["reason"] == "no_majority" and entry["origin"].endswith("label.csv:1")
  # The image is the archive's 48x48 grey PNG.
  want = np.asarray(Image.open(io.BytesIO(real_files["FER2013Train/fer0000000.png"])))
  assert want.shape == (48, 48) and a["image"].shape == (48, 48, 1)
  np.testing.assert_array_equal(a["image"][..., 0], want)
