"""TFDS builders for Emotion6, Flickr_LDL, Twitter_LDL, emotion folders and votes files.

Each data set is written by the test in its publisher's layout (CRLF, trailing spaces,
tabs), with bad rows and bad images, and the build summaries are checked count by count.
"""

import io
import json
import math
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from sdl_jax import distributions
from sdl_jax.data import buildlog, folders, image_files, label_files, ldl, splits, votes_csv
from sdl_jax.emotions import EMOTION6, MIKELS8

tfds = pytest.importorskip("tensorflow_datasets")

# --------------------------------------------------------------------------------------
# Helpers.


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


def _image(path, seed=0, size=(7, 5), mode="RGB", fmt="JPEG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(arr).convert(mode).save(path, format=fmt)


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _prepare(builder):
  builder.download_and_prepare()
  return builder


def _examples(builder, split):
  ds = builder.as_dataset(split=split)
  return {ex["file_name"].decode(): ex for ex in tfds.as_numpy(ds)}


def _check_invariant(summary):
  """rows read = written + skipped, per split and in total."""
  for split, c in summary["splits"].items():
    assert c["rows_read"] == c["written"] + sum(c["skipped"].values()), split
  assert summary["rows_read"] == summary["written"] + sum(summary["skipped"].values())


def _write(path, text, newline="\n"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    f.write(text.replace("\n", newline))


# --------------------------------------------------------------------------------------
# Label-file reading.


def test_read_lines_handles_crlf_bom_and_trailing_spaces(tmp_path):
  p = tmp_path / "f.txt"
  p.write_bytes(b"\xef\xbb\xbfa 1 2  \r\n\r\nb\t3\t4\t\r\nc 5 6")
  assert label_files.read_lines(str(p)) == [(1, "a 1 2"), (3, "b\t3\t4"), (4, "c 5 6")]


def test_read_lines_rejects_non_utf8_naming_the_line(tmp_path):
  p = tmp_path / "f.txt"
  p.write_bytes(b"a 1\nb 2\n\xff 3\n")
  with pytest.raises(label_files.LabelFileError, match=r"f.txt:3: not UTF-8"):
    label_files.read_lines(str(p))


@pytest.mark.parametrize("fields,reason", [
    (["1", "x"], "'x' is not a finite number"),
    (["1", "nan"], "'nan' is not a finite number"),
    (["1", "-2"], "negative count -2"),
    (["0", "0"], "zero total"),
])
def test_check_values_gives_the_reason(fields, reason):
  assert reason in label_files.check_values(fields)


def test_check_values_parses_good_rows():
  np.testing.assert_array_equal(label_files.check_values(["1", "2.5", "0"]), [1, 2.5, 0])
  # Only the count columns must be non-negative with a positive total.
  np.testing.assert_array_equal(label_files.check_values(["-1.5", "3"], counts=slice(1, None)),
                                [-1.5, 3])


def _rows(tmp_path, text, lenient):
  p = tmp_path / "gt.txt"
  _write(str(p), text)
  log = buildlog.BuildLog()
  rows = label_files.read_value_rows(str(p), label_files.read_lines(str(p)), sep="whitespace",
                                num_values=3, lenient=lenient, log=log)
  return str(p), rows, log


BAD_ROWS = "a.jpg 1 2 3\nb.jpg 1 2\nc.jpg 1 x 3\nd.jpg 1 -1 3\ne.jpg 0 0 0\nf.jpg 1 1 1 1\n"


@pytest.mark.parametrize("line,what", [
    (2, "expected 4 columns"), (3, "'x' is not a finite number"), (4, "negative count"),
    (5, "zero total"), (6, "expected 4 columns")])
def test_bad_rows_are_errors_naming_file_and_line(tmp_path, line, what):
  good = "a.jpg 1 2 3\n"
  bad = BAD_ROWS.splitlines()[line - 1]
  with pytest.raises(label_files.LabelFileError, match=rf"gt.txt:2: {what}.*lenient"):
    _rows(tmp_path, good + bad + "\n", lenient=False)


def test_lenient_skips_and_logs_bad_rows(tmp_path):
  path, rows, log = _rows(tmp_path, BAD_ROWS, lenient=True)
  assert [r.name for r in rows] == ["a.jpg"]
  assert rows[0].origin == f"{path}:1"
  counts = log.split_counts(buildlog.UNASSIGNED)
  assert counts["rows_read"] == 5 and counts["skipped"] == {"bad_row": 5}
  assert [e["origin"] for e in log.entries] == [f"{path}:{i}" for i in range(2, 7)]
  assert {e["name"] for e in log.entries} == {"b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"}


@pytest.mark.parametrize("lenient", [False, True])
def test_duplicate_names_are_always_an_error(tmp_path, lenient):
  with pytest.raises(label_files.LabelFileError, match=r"gt.txt:3: duplicate image name 'a.jpg'"
                     r" \(also on line 1\)"):
    _rows(tmp_path, "a.jpg 1 2 3\nb.jpg 1 1 1\n./a.jpg 3 2 1\n", lenient)


def test_column_order_maps_header_names_to_the_taxonomy():
  header = ["Awe", "[prob. amusement]", "Contentment", "excitement", "Anger", "Disgust",
            "Fear", "Sadness"]
  perm = label_files.column_order(header, MIKELS8, "f:1")
  values = np.arange(8.0)  # File order: awe=0, amusement=1, ...
  np.testing.assert_array_equal(values[perm], [1, 0, 2, 3, 4, 5, 6, 7])
  with pytest.raises(label_files.LabelFileError, match="f:1: header emotions"):
    label_files.column_order(header[:-1] + ["joy"], MIKELS8, "f:1")


def test_build_log_bookkeeping_check_can_fail():
  log = buildlog.BuildLog()
  log.read("train", 3)
  log.write("train")
  log.skip("train", "no_image", "a.jpg")
  with pytest.raises(RuntimeError, match="bookkeeping error in split 'train'"):
    log.check("train")
  log.skip("train", "unreadable_image", "b.jpg")
  log.check("train")
  assert log.summary()["splits"]["train"]["skipped"] == {"no_image": 1,
                                                         "unreadable_image": 1}


# --------------------------------------------------------------------------------------
# Images.


def test_encode_image_keeps_jpeg_and_png_bytes(tmp_path):
  for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
    p = str(tmp_path / f"a.{ext}")
    _image(p, fmt=fmt)
    data, reencoded = image_files.encode_image(p, 3)
    assert not reencoded and data == open(p, "rb").read()


def test_encode_image_reencodes_what_tensorflow_cannot_read_as_is(tmp_path):
  for mode, fmt, ext in (("RGB", "GIF", "gif"), ("CMYK", "JPEG", "jpg"),
                         ("RGB", "BMP", "bmp")):
    p = str(tmp_path / f"a_{mode}.{ext}")
    _image(p, mode=mode, fmt=fmt, size=(9, 4))
    data, reencoded = image_files.encode_image(p, 3)
    assert reencoded
    with Image.open(io.BytesIO(data)) as im:
      assert im.format == "PNG" and im.size == (9, 4) and im.mode == "RGB"


def test_encode_image_rejects_broken_files(tmp_path):
  p = str(tmp_path / "t.jpg")
  _image(p, size=(40, 40))
  _truncate(p)
  with pytest.raises(image_files.ImageError, match="truncated|broken|OSError"):
    image_files.encode_image(p, 3)
  (tmp_path / "e.jpg").write_bytes(b"")
  with pytest.raises(image_files.ImageError, match="empty file"):
    image_files.encode_image(str(tmp_path / "e.jpg"), 3)
  (tmp_path / "x.png").write_bytes(b"not an image at all")
  with pytest.raises(image_files.ImageError, match="UnidentifiedImageError"):
    image_files.encode_image(str(tmp_path / "x.png"), 3)
  with pytest.raises(image_files.ImageError, match="cannot read"):
    image_files.encode_image(str(tmp_path / "missing.png"), 3)


# --------------------------------------------------------------------------------------
# Splits.


def _split_names(n_per_class):
  names, labels = [], []
  for c, n in enumerate(n_per_class):
    for i in range(n):
      names.append(f"c{c}/{i}.jpg")
      labels.append(c)
  return names, labels


def test_stratified_split_counts_proportions_and_determinism():
  names, labels = _split_names([40, 25, 13, 7, 3, 2, 1, 9])
  n = len(names)
  split = splits.stratified_split(names, labels, seed=3)
  # Disjoint and complete.
  assert sorted(sum(split.values(), [])) == sorted(names)
  assert len(split["test"]) == math.floor(n * 0.15 + 0.5)
  assert len(split["validation"]) == math.floor(n * 0.05 + 0.5)
  # Stratified: each class's share of test and validation is within one name of its
  # proportional share.
  label_of = dict(zip(names, labels))
  for part in ("test", "validation"):
    k = len(split[part])
    for c in set(labels):
      n_c = labels.count(c)
      got = sum(label_of[x] == c for x in split[part])
      assert abs(got - n_c * k / n) <= 1, (part, c, got, n_c * k / n)
  # Deterministic and independent of input order; the seed matters.
  order = np.random.default_rng(0).permutation(n)
  again = splits.stratified_split([names[i] for i in order], [labels[i] for i in order], 3)
  assert again == split
  assert splits.stratified_split(names, labels, seed=4) != split


def test_stratified_split_keeps_small_splits_non_empty():
  split = splits.stratified_split(["a", "b", "c", "d"], [0, 0, 1, 1], seed=0)
  assert [len(split[s]) for s in buildlog.SPLITS] == [2, 1, 1]


def test_read_split_file_formats(tmp_path):
  j = tmp_path / "s.json"
  j.write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["d"]}))
  t = tmp_path / "s.txt"
  _write(str(t), "a train\nb,train\nc\tvalid\nd test\n", "\r\n")
  want = {"train": ["a", "b"], "validation": ["c"], "test": ["d"]}
  for f in (j, t):
    got = splits.read_split_file(str(f))
    assert {s: [n for n, _ in v] for s, v in got.items()} == want
  tr, te = tmp_path / "train_1.txt", tmp_path / "test_1.txt"
  _write(str(tr), "a 1 2 3\nb 3 2 1\n")
  _write(str(te), "d 1 1 1\n")
  got = splits.read_split_file({"train": str(tr), "test": str(te)})
  assert {s: [n for n, _ in v] for s, v in got.items()} == {
      "train": ["a", "b"], "validation": [], "test": ["d"]}
  _write(str(t), "a train\na test\n")
  with pytest.raises(label_files.LabelFileError, match="s.txt:2: 'a' is listed twice"):
    splits.read_split_file(str(t))
  _write(str(t), "a train\nb holdout\n")
  with pytest.raises(label_files.LabelFileError, match="s.txt:2: unknown split 'holdout'"):
    splits.read_split_file(str(t))


# --------------------------------------------------------------------------------------
# Flickr_LDL / Twitter_LDL.

LDL_HEADER = "images-name Amusement Awe Contentment Excitement Anger Disgust Fear Sadness "


def _ldl_votes(i):
  """11 votes with a clear dominant emotion i % 8 (so classes are balanced)."""
  v = np.zeros(8, dtype=int)
  v[i % 8] = 6
  v[(i + 3) % 8] += 3
  v[(i + 5) % 8] += 2
  return v


def _flickr(root, n=48, header=True, extra_rows="", newline="\r\n"):
  """Flickr_LDL layout: images/1.jpg ... and a CRLF ground_truth.txt, trailing spaces."""
  lines = [LDL_HEADER] if header else []
  for i in range(1, n + 1):
    lines.append(f"{i}.jpg " + " ".join(str(x) for x in _ldl_votes(i)) + " ")
    _image(os.path.join(root, "images", f"{i}.jpg"), seed=i)
  _write(os.path.join(root, "ground_truth.txt"), "\n".join(lines) + "\n" + extra_rows,
         newline)
  return root


def test_flickr_ldl_build_with_bad_images_and_missing_rows(tmp_path):
  root = _flickr(str(tmp_path / "Flickr_LDL"))
  _truncate(os.path.join(root, "images", "5.jpg"))               # unreadable
  os.remove(os.path.join(root, "images", "7.jpg"))               # row without image
  _image(os.path.join(root, "images", "999.jpg"))                # image without row
  _image(os.path.join(root, "images", "gray.jpg"), mode="L")     # image without row
  _write(os.path.join(root, "images", "notes.txt"), "hello")     # not an image
  b = _prepare(ldl.make_builder(_cfg(name="flickr_ldl", path=root,
                                     allow_missing_images=True), str(tmp_path / "c")))
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert s["complete"] and s["rows_read"] == 48 and s["written"] == 46
  assert s["skipped"] == {"no_image": 1, "unreadable_image": 1}
  assert s["notes"] == {"image_without_row": 2, "non_image_file": 1}
  assert s["splits"]["unassigned"]["skipped"] == {"no_image": 1}
  # The split drawn over the 47 rows with an image file: 7 test, 2 validation.
  sizes = {k: s["splits"][k]["rows_read"] for k in buildlog.SPLITS}
  assert sizes == {"train": 38, "validation": 2, "test": 7}
  log = buildlog.build_log(b)
  unreadable = [e for e in log if e["reason"] == "unreadable_image"]
  assert [e["name"] for e in unreadable] == ["5.jpg"]
  assert unreadable[0]["origin"].endswith("ground_truth.txt:6")
  assert {e["name"] for e in log if e["reason"] == "image_without_row"} == {
      "999.jpg", "gray.jpg"}
  # The split used, and what was written, agree; every example is right.
  assignment = buildlog.split_assignment(b)
  assert sum(len(v) for v in assignment.values()) == 46
  for split in buildlog.SPLITS:
    exs = _examples(b, split)
    assert sorted(exs) == assignment[split]
    assert b.info.splits[split].num_examples == len(exs)
    for name, ex in exs.items():
      votes = _ldl_votes(int(name.split(".")[0])).astype(np.float32)
      np.testing.assert_array_equal(ex["votes"], votes)
      np.testing.assert_allclose(ex["distribution"], votes / votes.sum(), rtol=1e-6)
      assert ex["label"] == int(name.split(".")[0]) % 8
      assert ex["image"].shape == (5, 7, 3) and ex["image"].dtype == np.uint8
  assert b.info.features["label"].names == list(MIKELS8.names)


@pytest.mark.parametrize("bad,what", [
    ("x.jpg 1 2 3", "expected 9 columns"),
    ("x.jpg 1 2 3 4 5 6 7 z", "'z' is not a finite number"),
    ("x.jpg 1 2 3 4 5 6 7 -8", "negative count -8"),
    ("x.jpg 0 0 0 0 0 0 0 0", "zero total"),
])
def test_flickr_ldl_bad_row_is_an_error_naming_file_and_line(tmp_path, bad, what):
  root = _flickr(str(tmp_path / "F"), n=16, extra_rows=bad + " \r\n")
  builder = ldl.make_builder(_cfg(name="flickr_ldl", path=root), str(tmp_path / "c"))
  # Line 18: the header, 16 good rows, then the bad one.
  with pytest.raises(label_files.LabelFileError, match=rf"F/ground_truth.txt:18: {what}"):
    builder.download_and_prepare()


def test_flickr_ldl_lenient_skips_bad_rows_and_counts_them(tmp_path):
  extra = ("x1.jpg 1 2 3\nx2.jpg 1 2 3 4 5 6 7 z\nx3.jpg 1 2 3 4 5 6 7 -8\n"
           "x4.jpg 0 0 0 0 0 0 0 0\n")
  root = _flickr(str(tmp_path / "F"), n=24, extra_rows=extra)
  for i in range(1, 5):
    _image(os.path.join(root, "images", f"x{i}.jpg"))  # their images exist
  b = _prepare(ldl.make_builder(_cfg(name="flickr_ldl", path=root, lenient=True),
                                str(tmp_path / "c")))
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert s["rows_read"] == 28 and s["written"] == 24 and s["skipped"] == {"bad_row": 4}
  # Images of bad rows have a (broken) row: not reported as images without one.
  assert "image_without_row" not in s["notes"]
  bad = [e for e in buildlog.build_log(b) if e["reason"] == "bad_row"]
  assert [e["origin"].rsplit(":", 1)[1] for e in bad] == ["26", "27", "28", "29"]


def test_missing_images_stop_a_strict_build_naming_file_count_and_option(tmp_path):
  root = _flickr(str(tmp_path / "F"), n=30)
  for i in (3, 11, 12, 29):
    os.remove(os.path.join(root, "images", f"{i}.jpg"))
  cache = tmp_path / "c"
  b = ldl.make_builder(_cfg(name="flickr_ldl", path=root), str(cache))
  with pytest.raises(image_files.MissingImagesError) as e:
    b.download_and_prepare()
  msg = str(e.value)
  assert os.path.join(root, "ground_truth.txt") in msg
  assert "4 of 30 label rows" in msg
  assert "first: '3.jpg', '11.jpg', '12.jpg', '29.jpg'" in msg
  assert "--config.data.allow_missing_images=True" in msg
  assert not b.is_prepared()


def test_allowed_missing_images_are_skipped_with_a_warning_and_counted(tmp_path, caplog):
  root = _flickr(str(tmp_path / "F"), n=30)
  for i in (3, 11, 12, 29):
    os.remove(os.path.join(root, "images", f"{i}.jpg"))
  with caplog.at_level("WARNING"):
    b = _prepare(ldl.make_builder(_cfg(name="flickr_ldl", path=root,
                                       allow_missing_images=True), str(tmp_path / "c")))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("4 of 30 label rows" in w and "allow_missing_images=True" in w
             for w in warnings), warnings
  assert any("30 label rows read, 26 written, 4 skipped {'no_image': 4}" in w
             for w in warnings), warnings
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert s["splits"]["unassigned"]["skipped"] == {"no_image": 4}
  assert s["options"]["allow_missing_images"] is True
  assert buildlog.build_counts(b) == {
      "rows_read": 30, "written": 26, "skipped": {"no_image": 4}, "notes": {},
      "written_per_split": {k: s["splits"][k]["written"] for k in buildlog.SPLITS},
      "lenient": False, "allow_missing_images": True}
  assert sorted(e["name"] for e in buildlog.build_log(b)) == [
      "11.jpg", "12.jpg", "29.jpg", "3.jpg"]


def test_lenient_skips_reach_a_warning_with_their_count(tmp_path, caplog):
  root = _flickr(str(tmp_path / "F"), n=20, extra_rows="bad 1 2\r\nworse x 1 1 1 1 1 1 1\r\n")
  with caplog.at_level("WARNING"):
    b = _prepare(ldl.make_builder(_cfg(name="flickr_ldl", path=root, lenient=True),
                                  str(tmp_path / "c")))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("2 bad label rows skipped (config.data.lenient=True)" in w
             for w in warnings), warnings
  assert any("22 label rows read, 20 written, 2 skipped {'bad_row': 2}" in w
             for w in warnings), warnings
  assert buildlog.build_summary(b)["splits"]["unassigned"]["skipped"] == {"bad_row": 2}


def test_twitter_ldl_headerless_lf_file(tmp_path):
  root = _flickr(str(tmp_path / "Twitter_LDL"), n=20, header=False, newline="\n")
  b = _prepare(ldl.make_builder(_cfg(name="twitter_ldl", path=root, split_seed=1),
                                str(tmp_path / "c")))
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert b.name == "twitter_ldl" and s["written"] == 20 and s["skipped"] == {}
  assert s["split"] == {"method": "stratified", "seed": 1, "fractions": [0.8, 0.05, 0.15]}


def test_ldl_split_file_with_missing_names_and_carved_validation(tmp_path):
  root = _flickr(str(tmp_path / "F"), n=30)
  tr, te = tmp_path / "train_1.txt", tmp_path / "test_1.txt"
  # Fold files as lists: name and votes; 29.jpg and 30.jpg are in neither, and
  # ghost.jpg has no label row.
  _write(str(tr), "".join(f"{i}.jpg 1 2 3\n" for i in range(1, 23)))
  _write(str(te), "".join(f"{i}.jpg\n" for i in range(23, 29)) + "ghost.jpg\n")
  # The mapping, as on a command line: --config.data.split_file=train=...,test=...
  cfg = _cfg(name="flickr_ldl", path=root, split_file=f"train={tr},test={te}")
  b = _prepare(ldl.make_builder(cfg, str(tmp_path / "c")))
  assert b.options["split_file"] == {"train": str(tr), "test": str(te)}
  with pytest.raises(label_files.LabelFileError, match="unknown split 'tset'"):
    ldl.make_builder(_cfg(name="flickr_ldl", path=root, split_file=f"tset={te}"), "c")
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert s["skipped"] == {"not_in_split_file": 2}
  assert s["notes"] == {"split_file_name_without_row": 1}
  a = buildlog.split_assignment(b)
  assert a["test"] == sorted(f"{i}.jpg" for i in range(23, 29))
  assert len(a["validation"]) == 1 and len(a["train"]) == 21  # 22 * 0.05/0.85 -> 1
  assert set(a["train"]) | set(a["validation"]) == {f"{i}.jpg" for i in range(1, 23)}
  assert "carved" in s["split"]["validation"]
  # The written split file reproduces the split exactly.
  split_json = tmp_path / "splits.json"
  split_json.write_text(json.dumps(a))
  b2 = _prepare(ldl.make_builder(_cfg(name="flickr_ldl", path=root,
                                      split_file=str(split_json)), str(tmp_path / "c")))
  assert buildlog.split_assignment(b2) == a


def test_configs_never_share_a_cache_and_same_config_reuses_it(tmp_path):
  root = _flickr(str(tmp_path / "F"), n=20)
  other = _flickr(str(tmp_path / "G"), n=20)
  cache = str(tmp_path / "c")
  base = dict(name="flickr_ldl", path=root)
  b = _prepare(ldl.make_builder(_cfg(**base), cache))
  variants = [dict(base, split_seed=1), dict(base, lenient=True), dict(base, path=other),
              dict(base, split_fractions=(0.7, 0.1, 0.2)), dict(base, name="twitter_ldl")]
  dirs = {os.fspath(b.data_path)}
  for v in variants:
    dirs.add(os.fspath(ldl.make_builder(_cfg(**v), cache).data_path))
  assert len(dirs) == len(variants) + 1
  # Same config: same directory, already prepared (no rebuild).
  again = ldl.make_builder(_cfg(**base), cache)
  assert os.fspath(again.data_path) == os.fspath(b.data_path)
  assert again.is_prepared()
  # An edited label file is a different source.
  with open(os.path.join(root, "ground_truth.txt"), "a") as f:
    f.write("\r\n")
  assert os.fspath(ldl.make_builder(_cfg(**base), cache).data_path) not in dirs


def test_ldl_clear_errors_for_missing_sources(tmp_path):
  with pytest.raises(ValueError, match="config.data.path is not set"):
    ldl.make_builder(_cfg(name="flickr_ldl", path=""), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ldl.make_builder(_cfg(name="flickr_ldl", path=str(tmp_path / "nope")), str(tmp_path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty/ground_truth.txt' not found"):
    ldl.make_builder(_cfg(name="flickr_ldl", path=str(tmp_path / "empty")), str(tmp_path))
  root = _flickr(str(tmp_path / "F"), n=4)
  for f in os.listdir(os.path.join(root, "images")):
    os.remove(os.path.join(root, "images", f))
  b = ldl.make_builder(_cfg(name="flickr_ldl", path=root), str(tmp_path / "c"))
  with pytest.raises(FileNotFoundError, match="none of the images named in"):
    b.download_and_prepare()


# --------------------------------------------------------------------------------------
# Emotion6.

E6_HEADER = "\t".join(
    ["[image_filename]", "[valence]", "[arousal]"]
    + [f"[prob. {e}]" for e in ("anger", "disgust", "fear", "joy", "sadness", "surprise",
                                "neutral")])


def _e6_probs(c, i):
  p = np.full(7, 0.05)
  p[c] = 0.5
  p[(c + i) % 7] += 0.1 * i
  return np.round(p / p.sum(), 4)  # Rounded, as in the file: sums are not exactly 1.


def test_emotion6_tab_separated_with_bracketed_header(tmp_path):
  root = str(tmp_path / "Emotion6")
  cats = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
  lines, want = [E6_HEADER], {}
  for c, cat in enumerate(cats):
    for i in range(1, 5):
      name = f"{cat}/{i}.jpg"
      p = _e6_probs(c, i)
      lines.append("\t".join([name, "5.2", "4.1"] + [f"{x:.4f}" for x in p]))
      _image(os.path.join(root, "images", cat, f"{i}.jpg"), seed=c * 10 + i)
      want[name] = (p, c)
  _image(os.path.join(root, "images", "joy", "99.jpg"))  # image without a row
  # Bad rows: neutral missing; arousal not a number.
  lines.append("\t".join(["fear/50.jpg", "5.2", "4.1"] + ["0.2"] * 6))
  lines.append("\t".join(["fear/51.jpg", "5.2", "n/a"] + ["0.1"] * 7))
  _truncate(os.path.join(root, "images", "sadness", "2.jpg"))
  del want["sadness/2.jpg"]
  _write(os.path.join(root, "ground_truth.txt"), "\n".join(lines) + "\n", "\r\n")
  with pytest.raises(label_files.LabelFileError, match=r"ground_truth.txt:26: expected 10 "
                     r"columns \(name, valence, arousal, 7 probabilities\), got 9"):
    ldl.make_builder(_cfg(name="emotion6", path=root), str(tmp_path / "c")
                     ).download_and_prepare()
  b = _prepare(ldl.make_builder(_cfg(name="emotion6", path=root, lenient=True),
                                str(tmp_path / "c")))
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert s["rows_read"] == 26 and s["written"] == 23
  assert s["skipped"] == {"bad_row": 2, "unreadable_image": 1}
  assert s["notes"] == {"image_without_row": 1}
  assert "votes" not in b.info.features
  assert b.info.features["label"].names == list(EMOTION6.names)
  got = {}
  for split in buildlog.SPLITS:
    got.update(_examples(b, split))
  assert sorted(got) == sorted(want)
  for name, ex in got.items():
    p, c = want[name]
    np.testing.assert_allclose(ex["distribution"], p / p.sum(), rtol=1e-6)
    assert abs(float(ex["distribution"].sum()) - 1) < 1e-6 and ex["label"] == c


# --------------------------------------------------------------------------------------
# Emotion folders (FI-style).


def _reference_combined(label, sigma, eps):
  """Plain loops: Gaussian on Mikels' wheel inside the label's polarity, normalised."""
  w = []
  for j in range(8):
    d = abs(MIKELS8.wheel[j] - MIKELS8.wheel[label])
    d = min(d, 8 - d)
    g = math.exp(-d * d / (2 * sigma * sigma)) / math.sqrt(2 * math.pi * sigma) + eps / 8
    w.append(g if MIKELS8.polarity[j] == MIKELS8.polarity[label] else 0.0)
  return np.array(w) / sum(w)


def _fi(root, per_class=4, case=str.lower):
  for c, emo in enumerate(MIKELS8.names):
    for i in range(per_class):
      _image(os.path.join(root, case(emo), f"{emo}_{i:04d}.jpg"), seed=c * 100 + i)
  return root


def test_folders_fi_layout_with_combined_strategy(tmp_path):
  root = _fi(str(tmp_path / "FI"), case=str.capitalize)
  _truncate(os.path.join(root, "Fear", "fear_0001.jpg"))
  _image(os.path.join(root, "Awe", "more", "awe_bmp.bmp"), fmt="BMP")  # nested, BMP
  _write(os.path.join(root, "Thumbs.db"), "x")
  cfg = _cfg(name="folders", path=root, strategy="both", sigma=1.5, eps=0.2)
  b = _prepare(folders.make_builder(cfg, str(tmp_path / "c")))
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert s["rows_read"] == 33 and s["written"] == 32
  assert s["skipped"] == {"unreadable_image": 1}
  assert s["notes"] == {"non_image_file": 1, "reencoded": 1}
  names = set()
  for split in buildlog.SPLITS:
    for name, ex in _examples(b, split).items():
      names.add(name)
      assert ex["image"].shape == (5, 7, 3)
      label = MIKELS8.index(name.split("/")[0])
      assert ex["label"] == label and "votes" not in ex
      np.testing.assert_allclose(ex["distribution"], _reference_combined(label, 1.5, 0.2),
                                 rtol=1e-5)
  assert "Awe/more/awe_bmp.bmp" in names and "Fear/fear_0001.jpg" not in names


def test_folders_strategies_and_given_split_folders(tmp_path):
  root = str(tmp_path / "Art")
  _fi(os.path.join(root, "train"), per_class=3)
  _fi(os.path.join(root, "test"), per_class=1)
  _image(os.path.join(root, "loose.jpg"))
  b = _prepare(folders.make_builder(_cfg(name="folders", path=root, strategy="exclusion"),
                                    str(tmp_path / "c")))
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert s["split"]["method"] == "official" and "carved" in s["split"]["validation"]
  assert s["notes"] == {"image_without_row": 1}
  a = buildlog.split_assignment(b)
  assert len(a["test"]) == 8 and all(n.startswith("test/") for n in a["test"])
  assert len(a["validation"]) == 1 and len(a["train"]) == 23
  ex = next(iter(_examples(b, "test").values()))
  pos = ex["label"] < 4
  np.testing.assert_allclose(ex["distribution"], [0.25] * 4 + [0] * 4 if pos
                             else [0] * 4 + [0.25] * 4)


def test_folders_distance_option_reaches_the_targets(tmp_path):
  root = _fi(str(tmp_path / "FI"), per_class=1)
  cfg = _cfg(name="folders", path=root, distance="index", sigma=0.45, eps=0.0)
  by_index = folders.make_builder(cfg, str(tmp_path / "c"))
  by_wheel = folders.make_builder(_cfg(name="folders", path=root, sigma=0.45, eps=0.0),
                                  str(tmp_path / "c"))
  assert by_index.builder_config.name != by_wheel.builder_config.name
  b = _prepare(by_index)
  for split in buildlog.SPLITS:
    for ex in _examples(b, split).values():
      want = distributions.combined(np.array([ex["label"]]), MIKELS8, 0.45, 0.0, "index")[0]
      np.testing.assert_allclose(ex["distribution"], want, rtol=1e-6)
  with pytest.raises(ValueError, match="config.data.distance"):
    folders.make_builder(_cfg(name="folders", path=root, distance="circle"), str(tmp_path))


def test_folders_unknown_folder_strict_and_lenient(tmp_path):
  root = _fi(str(tmp_path / "FI"), per_class=3)
  _image(os.path.join(root, "joy", "j.jpg"))
  with pytest.raises(label_files.LabelFileError, match=r"joy/j.jpg: folder 'joy' is not an "
                     r"emotion of taxonomy 'mikels8'"):
    folders.make_builder(_cfg(name="folders", path=root), str(tmp_path / "c")
                         ).download_and_prepare()
  b = _prepare(folders.make_builder(_cfg(name="folders", path=root, lenient=True,
                                         strategy="implication"), str(tmp_path / "c")))
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert s["skipped"] == {"bad_row": 1} and s["written"] == 24
  with pytest.raises(ValueError, match="strategy"):
    folders.make_builder(_cfg(name="folders", path=root, strategy="gauss"), str(tmp_path))
  with pytest.raises(ValueError, match="sigma must be > 0"):
    folders.make_builder(_cfg(name="folders", path=root, sigma=0.0), str(tmp_path))


# --------------------------------------------------------------------------------------
# Votes files.


def test_votes_csv_header_in_any_order_and_quoted_paths(tmp_path):
  root = str(tmp_path / "mine")
  order = ["sadness", "awe", "amusement", "contentment", "excitement", "anger", "disgust",
           "fear"]
  rows, want = [], {}
  for i in range(20):
    name = f"pics/img {i}, v2.png" if i == 0 else f"pics/{i}.png"
    _image(os.path.join(root, name), seed=i, fmt="PNG", mode="L" if i % 2 else "RGB")
    v = _ldl_votes(i)  # In taxonomy order; written in the header's order.
    rows.append(f'"{name}",' + ",".join(str(v[MIKELS8.index(e)]) for e in order))
    want[name] = v
  rows.append("pics/neg.png,1,2,3,4,-5,6,7,8")
  rows.append("pics/gone.png,1,2,3,4,5,6,7,8")  # no such image
  _write(os.path.join(root, "votes.csv"), "path," + ",".join(order) + "\n"
         + "\n".join(rows) + "\n")
  with pytest.raises(label_files.LabelFileError, match=r"votes.csv:22: negative count -5"):
    votes_csv.make_builder(_cfg(name="votes_csv", path=os.path.join(root, "votes.csv")),
                           str(tmp_path / "c")).download_and_prepare()
  with pytest.raises(image_files.MissingImagesError, match=r"1 of 21 label rows of .*votes.csv "
                     r"name no image file \(first: 'pics/gone.png'"):
    votes_csv.make_builder(_cfg(name="votes_csv", lenient=True,
                                path=os.path.join(root, "votes.csv")),
                           str(tmp_path / "c")).download_and_prepare()
  b = _prepare(votes_csv.make_builder(_cfg(name="votes_csv", lenient=True,
                                           allow_missing_images=True,
                                           path=os.path.join(root, "votes.csv")),
                                      str(tmp_path / "c")))
  assert b.taxonomy is MIKELS8
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert s["rows_read"] == 22 and s["written"] == 20
  assert s["splits"]["unassigned"]["skipped"] == {"bad_row": 1, "no_image": 1}
  for split in buildlog.SPLITS:
    for name, ex in _examples(b, split).items():
      np.testing.assert_array_equal(ex["votes"], want[name])
      assert ex["label"] == int(np.argmax(want[name]))
      assert ex["image"].shape == (5, 7, 3)  # Grey PNGs decode to 3 channels here.


def test_votes_list_files_per_split_with_taxonomy_and_grey(tmp_path):
  root = str(tmp_path / "lists")
  want = {}
  for split, n in (("train", 12), ("val", 2), ("test", 3)):
    lines = []
    for i in range(n):
      name = f"{split}/{i}.jpg"
      _image(os.path.join(root, "img", name), seed=i, mode="L")
      v = np.arange(7) + i
      lines.append(f"{name} " + " ".join(map(str, v)))
      want[name] = v
    _write(os.path.join(root, f"{split}.txt"), "\n".join(lines) + "\n")
  with pytest.raises(label_files.LabelFileError, match="no header row.*config.data.taxonomy"):
    votes_csv.make_builder(_cfg(name="votes_csv", path=root), str(tmp_path / "c"))
  cfg = _cfg(name="votes_csv", path=root, taxonomy="emotion6", image_dir="img",
             channels=1)
  b = _prepare(votes_csv.make_builder(cfg, str(tmp_path / "c")))
  s = buildlog.build_summary(b)
  _check_invariant(s)
  assert {k: s["splits"][k]["written"] for k in buildlog.SPLITS} == {
      "train": 12, "validation": 2, "test": 3}
  ex = _examples(b, "validation")["val/1.jpg"]
  assert ex["image"].shape == (5, 7, 1)
  v = want["val/1.jpg"]
  np.testing.assert_allclose(ex["distribution"], v / v.sum(), rtol=1e-6)
  assert ex["label"] == 6  # neutral has the most votes
  # A name in two split files is a duplicate.
  with open(os.path.join(root, "test.txt"), "a") as f:
    f.write("train/0.jpg 1 1 1 1 1 1 1\n")
  with pytest.raises(label_files.LabelFileError, match=r"test.txt:4: duplicate image "
                     r"'train/0.jpg' \(also at .*train.txt:1\)"):
    votes_csv.make_builder(cfg, str(tmp_path / "c")).download_and_prepare()


def test_votes_csv_custom_taxonomy_from_header(tmp_path):
  root = str(tmp_path / "c3")
  lines = ["file,calm,tense,happy"]
  for i in range(12):
    _image(os.path.join(root, f"{i}.jpg"), seed=i)
    lines.append(f"{i}.jpg,{i % 3},{(i + 1) % 3},1")
  _write(os.path.join(root, "labels.csv"), "\n".join(lines) + "\n")
  b = _prepare(votes_csv.make_builder(
      _cfg(name="votes_csv", path=os.path.join(root, "labels.csv")), str(tmp_path / "c")))
  assert b.info.features["label"].names == ["calm", "tense", "happy"]
  assert buildlog.build_summary(b)["written"] == 12


def test_copy_build_records(tmp_path):
  root = _flickr(str(tmp_path / "F"), n=12)
  b = _prepare(ldl.make_builder(_cfg(name="flickr_ldl", path=root), str(tmp_path / "c")))
  paths = buildlog.copy_build_records(b, str(tmp_path / "work"))
  assert sorted(os.path.basename(p) for p in paths) == [
      "build_log.jsonl", "build_summary.json", "splits.json"]
  assert json.loads(open(paths[0]).read()) == buildlog.build_summary(b)
  from sdl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  drawn = synthetic.make_builder(_cfg(num_examples=40, seed=0, image_size=8),
                                 str(tmp_path / "c2"))
  assert not buildlog.has_build_records(drawn) and buildlog.build_counts(drawn) is None
  assert buildlog.copy_build_records(drawn, str(tmp_path / "work2")) == []
  with pytest.raises(FileNotFoundError, match="prepare the builder first"):
    buildlog.build_summary(ldl.make_builder(_cfg(name="flickr_ldl", path=root,
                                               split_seed=9), str(tmp_path / "c")))


def test_get_builder_uses_a_copy_another_process_prepared_meanwhile(tmp_path, monkeypatch):
  """Two runs started together on a fresh cache: TFDS's rename of the second one's copy
  fails with FileExistsError; get_builder then uses the first one's."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sdl_jax import data  # pylint: disable=g-import-not-at-top
  from sdl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({"name": "synthetic", "num_examples": 40, "seed": 0,
                                   "image_size": 8, "path": None, "cache_dir": None})
  real = synthetic.make_builder
  calls = []

  def racing_make_builder(data_config, data_dir):
    builder = real(data_config, data_dir)
    if not calls:  # The first builder loses the race: the other process prepares first.
      def lose(**kwargs):
        real(data_config, data_dir).download_and_prepare(**kwargs)
        raise FileExistsError("Cannot rename ...: destination already exists")
      builder.download_and_prepare = lose
    calls.append(builder)
    return builder

  monkeypatch.setattr(synthetic, "make_builder", racing_make_builder)
  builder = data.get_builder(cfg, str(tmp_path))
  assert len(calls) == 2
  assert sum(s.num_examples for s in builder.info.splits.values()) == 40  # all prepared
  with pytest.raises(FileExistsError):  # One retry only: a lasting clash is an error.
    monkeypatch.setattr(synthetic, "make_builder", lambda c, d: _raising_builder())
    data.get_builder(cfg, str(tmp_path / "other"))


def _raising_builder():
  class Builder:
    def download_and_prepare(self, **kwargs):
      raise FileExistsError("always")
  return Builder()
