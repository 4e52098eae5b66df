"""Label rows without an image: a strict build stops naming them; an allowed one skips them
with a warning, and the training workdir and report.md say how many rows were used."""

import json
from pathlib import Path
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from sdl_jax import train
from sdl_jax.data import buildlog, image_files, ldl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import sdl as sdl_config  # pylint: disable=g-import-not-at-top,wrong-import-position

FLICKR_ARCHIVE = REPO.parent / "shared" / "data" / "flickr_ldl_2100.tar.gz"
HEADER = "images-name Amusement Awe Contentment Excitement Anger Disgust Fear Sadness"


def _flickr(root: Path, n: int, without_image=()) -> Path:
  """A Flickr_LDL layout of ``n`` rows (CRLF, trailing spaces); the rows numbered in
  ``without_image`` have no image file."""
  (root / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  lines = [HEADER]
  for i in range(1, n + 1):
    votes = np.zeros(8, int)
    votes[i % 8], votes[(i + 3) % 8] = 8, 3
    lines.append(f"{i}.jpg " + " ".join(map(str, votes)) + " ")
    if i not in without_image:
      Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(
          root / "images" / f"{i}.jpg")
  (root / "ground_truth.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
  return root


def _config(path, cache_dir, **data):
  c = sdl_config.get_config()
  c.data.name = "flickr_ldl"
  c.data.path = str(path)
  c.data.cache_dir = str(cache_dir)
  c.data.update(data)
  c.image_size, c.resize_size = 16, 18
  c.model_kwargs.widths = (8, 16)
  c.batch_size = 4
  c.num_train_steps = 2
  c.warmup_steps = 0
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
  c.cache = False
  return c


def test_a_failed_build_leaves_no_workdir(tmp_path):
  root = _flickr(tmp_path / "Flickr_LDL", 24, without_image={2, 5})
  workdir = tmp_path / "runs" / "w"
  with pytest.raises(image_files.MissingImagesError, match=r"2 of 24 label rows .*'2.jpg', "
                     r"'5.jpg'.*--config.data.allow_missing_images=True"):
    train.train_and_evaluate(_config(root, tmp_path / "c"), str(workdir))
  assert not workdir.exists()


@pytest.mark.slow
def test_allowed_missing_images_are_recorded_in_the_workdir_and_report(tmp_path):
  root = _flickr(tmp_path / "Flickr_LDL", 40, without_image=set(range(33, 41)))
  workdir = tmp_path / "w"
  results = train.train_and_evaluate(
      _config(root, tmp_path / "c", allow_missing_images=True), str(workdir))
  summary = json.loads((workdir / "build_summary.json").read_text())
  assert summary["rows_read"] == 40 and summary["written"] == 32
  assert summary["skipped"] == {"no_image": 8}
  log = [json.loads(l) for l in (workdir / "build_log.jsonl").read_text().splitlines()]
  assert sorted(e["name"] for e in log) == sorted(f"{i}.jpg" for i in range(33, 41))
  splits = json.loads((workdir / "splits.json").read_text())
  assert sum(len(v) for v in splits.values()) == 32
  assert results["data_build"]["skipped"] == {"no_image": 8}
  report = (workdir / "report.md").read_text()
  assert ("40 label rows read, 32 used, 8 skipped (no_image 8) with "
          "`data.allow_missing_images=True`") in report


@pytest.mark.slow
@pytest.mark.skipif(not FLICKR_ARCHIVE.exists(),
                    reason=f"the Flickr_LDL archive is not at {FLICKR_ARCHIVE} (../shared/data "
                    "relative to the repository root)")
def test_shared_flickr_ldl_needs_the_option_and_then_uses_its_2100_images(tmp_path):
  with tarfile.open(FLICKR_ARCHIVE) as tar:
    tar.extractall(tmp_path, filter="data")
  root = tmp_path / "Flickr_LDL"
  cfg = ml_collections.ConfigDict({"name": "flickr_ldl", "path": str(root)})
  with pytest.raises(image_files.MissingImagesError) as e:
    ldl.make_builder(cfg, str(tmp_path / "c")).download_and_prepare()
  msg = str(e.value)
  assert "9050 of 11150 label rows" in msg and "ground_truth.txt" in msg
  assert "'2101.jpg'" in msg and "allow_missing_images=True" in msg
  cfg.allow_missing_images = True
  b = ldl.make_builder(cfg, str(tmp_path / "c"))
  b.download_and_prepare()
  counts = buildlog.build_counts(b)
  assert counts["rows_read"] == 11150 and counts["written"] == 2100
  assert counts["skipped"] == {"no_image": 9050}
  assert sum(b.info.splits[s].num_examples for s in buildlog.SPLITS) == 2100
