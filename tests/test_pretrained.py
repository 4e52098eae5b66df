"""The models shipped in sdl_jax/pretrained: records, integrity, stable predictions, and
their test measures reproduced from the shared data."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sdl_jax import pretrained
from sdl_jax.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("ferplus", "flickr_ldl")
FLICKR_ARCHIVE = REPO.parent / "shared" / "data" / "flickr_ldl_2100.tar.gz"


def test_the_promised_models_are_shipped_small_and_complete():
  assert set(SHIPPED) <= set(pretrained.available())
  for name in SHIPPED:
    meta = pretrained.read_meta(name)
    size = os.path.getsize(os.path.join(pretrained.HERE, name + ".msgpack"))
    assert size == meta["bytes"] and size < 10 * 2**20
    assert len(meta["names"]) == 8
    assert meta["test"]["count"] > 0
    for key in ("command", "commit", "data", "step"):
      assert meta["source"][key], (name, key)


@pytest.mark.parametrize("name", SHIPPED)
def test_reference_prediction_is_unchanged(name):
  """The stored prediction for the fixed reference image, made at export: any change of
  weights, preprocessing or model code that moves it fails here."""
  meta = pretrained.read_meta(name)
  predictor = Predictor.from_pretrained(name)
  assert predictor.names == tuple(meta["names"])
  probs = predictor.predict_arrays([pretrained.reference_image()])[0]
  np.testing.assert_allclose(probs, meta["reference"]["distribution"], atol=2e-5)
  assert abs(float(probs.sum()) - 1.0) < 1e-5


def test_reference_image_is_fixed():
  image = pretrained.reference_image()
  assert image.shape == (96, 96, 3) and image.dtype == np.uint8
  # Hand-computed corners: (x, y) = (0, 0) and (1, 1), ring weight ~0 there.
  np.testing.assert_array_equal(image[0, 0], [0, 0, 255])
  np.testing.assert_array_equal(image[-1, -1], [204, 153, 77])


def test_damaged_weights_are_refused(tmp_path):
  for ext in (".json", ".msgpack"):
    shutil.copy(os.path.join(pretrained.HERE, "ferplus" + ext), tmp_path)
  path = tmp_path / "ferplus.msgpack"
  blob = bytearray(path.read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  path.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match="damaged"):
    pretrained.load("ferplus", str(tmp_path))


def test_unknown_name_lists_the_shipped_models():
  with pytest.raises(ValueError, match="ferplus") as e:
    Predictor.from_pretrained("no_such_model")
  assert "no_such_model" in str(e.value)
  with pytest.raises(ValueError):
    pretrained.read_meta("../ferplus")


def test_model_cards_state_the_recorded_measures():
  for name in SHIPPED:
    card = (REPO / "docs" / "models" / f"{name}.md").read_text()
    test = pretrained.read_meta(name)["test"]
    for key in ("accuracy", "kl"):
      assert f"{test[key]:.4f}" in card, (name, key)


def _measures_of(name, builder):
  from sdl_jax import evaluate  # pylint: disable=g-import-not-at-top
  shipped = pretrained.load(name)
  pred = evaluate.predict_split(shipped, builder, "test")
  return evaluate.model_measures(pred["probs"], pred["label"], pred["distribution"]), len(
      pred["probs"])


def _assert_reproduces(name, measured, count):
  recorded = pretrained.read_meta(name)["test"]
  assert count == recorded["count"]
  for key in ("accuracy", "kl", "chebyshev", "clark", "canberra", "cosine", "intersection"):
    assert abs(measured[key] - recorded[key]) <= 1e-3 * max(1.0, abs(recorded[key])), key


@pytest.mark.slow
def test_ferplus_model_reproduces_its_test_measures(real_ferplus):
  measured, count = _measures_of("ferplus", real_ferplus["majority"])
  _assert_reproduces("ferplus", measured, count)


@pytest.mark.slow
@pytest.mark.skipif(not FLICKR_ARCHIVE.exists(),
                    reason=f"the Flickr_LDL archive is not at {FLICKR_ARCHIVE}")
def test_flickr_ldl_model_reproduces_its_test_measures(tmp_path):
  from sdl_jax import data  # pylint: disable=g-import-not-at-top
  with tarfile.open(FLICKR_ARCHIVE) as tar:
    tar.extractall(tmp_path, filter="data")
  config = pretrained.load("flickr_ldl").config
  with config.unlocked():
    config.data.path = str(tmp_path / "Flickr_LDL")
  builder = data.get_builder(config.data, str(tmp_path / "cache"))
  measured, count = _measures_of("flickr_ldl", builder)
  _assert_reproduces("flickr_ldl", measured, count)


@pytest.mark.slow
def test_predict_command_with_a_shipped_model(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  faces = tmp_path / "faces"
  faces.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(faces / f"{i}.png")
  (faces / "broken.png").write_bytes(b"not an image")
  proc = subprocess.run(
      [sys.executable, str(REPO / "run.py"), "--mode=predict", "--pretrained=ferplus",
       f"--images={faces}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert proc.returncode == 1, proc.stderr[-2000:]  # one image failed, named below
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [os.path.basename(r["file"]) for r in rows] == ["0.png", "1.png", "2.png",
                                                         "broken.png"]
  names = pretrained.read_meta("ferplus")["names"]
  for r in rows[:3]:
    assert list(r["distribution"]) == names
    assert abs(sum(r["distribution"].values()) - 1.0) < 1e-4
  assert "error" in rows[3]
  assert "3 image(s) predicted, 1 failed" in proc.stderr


def test_predict_refuses_an_unknown_model_in_one_line(tmp_path, capsys):
  from sdl_jax import predict  # pylint: disable=g-import-not-at-top
  assert predict.main(None, [str(tmp_path)], pretrained="no_such_model") == 1
  captured = capsys.readouterr()
  assert not captured.out
  assert captured.err.strip().splitlines() == [
      "predict: no pretrained model named 'no_such_model' (available: ferplus, flickr_ldl)"]
