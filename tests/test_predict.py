"""``--mode=predict``: files and folders in, JSON lines out; bad files get error lines."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from sdl_jax import predict
from sdl_jax import figures

from workdir_fixture import trained_workdir  # noqa: F401  (fixture)


def _save(path, array, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)
  return str(path)


# --------------------------------------------------------------------------------------
# Finding and reading images (no model needed).


def test_collect_images_files_folders_and_missing(tmp_path):
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  a = _save(tmp_path / "a.jpg", img)
  _save(tmp_path / "photos" / "b.png", img)
  _save(tmp_path / "photos" / "deep" / "c.PNG", img)
  (tmp_path / "photos" / "readme.txt").write_text("not an image")
  _save(tmp_path / "photos" / ".hidden" / "d.png", img)
  (tmp_path / "empty").mkdir()
  notes = tmp_path / "notes.txt"
  notes.write_text("x")
  got = predict.collect_images([a, str(tmp_path / "photos"), str(tmp_path / "missing.jpg"),
                                str(tmp_path / "empty"), str(notes)])
  files = [f for f, _ in got]
  assert files == [a, str(tmp_path / "photos" / "b.png"),
                   str(tmp_path / "photos" / "deep" / "c.PNG"),
                   str(tmp_path / "missing.jpg"), str(tmp_path / "empty"), str(notes)]
  errors = dict(got)
  assert errors[a] is None and errors[str(notes)] is None  # named files are always tried
  assert errors[str(tmp_path / "missing.jpg")] == "no such file or folder"
  assert "no image files" in errors[str(tmp_path / "empty")]


def test_encode_array_shapes_and_errors():
  rng = np.random.default_rng(0)
  for shape in ((5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)):
    data = predict.encode_array(rng.integers(0, 256, shape, dtype=np.uint8))
    with Image.open(io.BytesIO(data)) as im:
      assert im.size == (7, 5)
  with pytest.raises(ValueError, match="uint8"):
    predict.encode_array(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="shape"):
    predict.encode_array(np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(ValueError, match="empty side"):
    predict.encode_array(np.zeros((0, 4, 3), np.uint8))


def test_model_inputs_grey_rgba_and_any_size(tmp_path):
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (30, 50), dtype=np.uint8)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (30, 50, 1), dtype=np.uint8)], -1)
  enc = [predict.encode_array(a) for a in (rgb, np.stack([grey] * 3, -1), grey, rgba)]
  x = predict.model_inputs(enc, model="small_cnn", image_size=16, resize_size=18)
  assert x.shape == (4, 16, 16, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(x[1], x[2])   # grey = grey replicated to RGB
  np.testing.assert_array_equal(x[0], x[3])   # alpha is dropped, as in training
  # small_cnn normalises pixels to [-1, 1].
  assert -1.0 <= x.min() and x.max() <= 1.0
  # The pipeline's evaluation transform, step by step on the RGB image.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ref = tf.image.resize(tf.cast(rgb, tf.float32), [18, 18], method="bilinear",
                        antialias=True).numpy()[1:17, 1:17]
  np.testing.assert_allclose(x[0], (ref - 127.5) / 127.5, atol=1e-5)


def test_read_image_file_rejects_non_images(tmp_path):
  from sdl_jax.data import image_files  # pylint: disable=g-import-not-at-top
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"definitely not a jpeg")
  with pytest.raises(image_files.ImageError):
    predict.read_image_file(str(bad))
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  with pytest.raises(image_files.ImageError, match="empty"):
    predict.read_image_file(str(empty))


# --------------------------------------------------------------------------------------
# With a trained workdir.


@pytest.fixture(scope="module")
def predictor(trained_workdir):  # noqa: F811
  return predict.Predictor.from_workdir(str(trained_workdir))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  """Good images of several kinds, a folder, and broken files."""
  d = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(2)
  files = {
      "rgb_jpg": _save(d / "a.jpg", rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)),
      "grey": _save(d / "folder" / "grey.png", rng.integers(0, 256, (9, 12), dtype=np.uint8)),
      "rgba": _save(d / "folder" / "sub" / "rgba.png",
                    rng.integers(0, 256, (70, 30, 4), dtype=np.uint8)),
      "webp": _save(d / "folder" / "w.webp", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8),
                    fmt="WEBP"),
  }
  (d / "bad.jpg").write_bytes(b"not an image at all")
  good = (d / "a.jpg").read_bytes()
  (d / "truncated.jpg").write_bytes(good[:len(good) // 2])
  return d, files


@pytest.mark.slow
def test_predictions_match_evaluation_of_the_same_images(predictor, trained_workdir,  # noqa: F811
                                                         tmp_path):
  """Files cut from the test split get the probabilities evaluation computes for them:
  prediction preprocesses exactly as the evaluation pipeline does."""
  from sdl_jax import data  # pylint: disable=g-import-not-at-top
  from sdl_jax import evaluate  # pylint: disable=g-import-not-at-top
  trained = evaluate.load_trained(str(trained_workdir))
  builder = data.get_builder(trained.config.data)
  expected = evaluate.predict_split(trained, builder, "test")["probs"]
  encoded = evaluate._read_split(builder, "test", ("image",))["image"]  # pylint: disable=protected-access
  paths = []
  for i, e in enumerate(encoded[:10]):
    paths.append(str(tmp_path / f"{i:02d}.png"))
    with open(paths[-1], "wb") as f:
      f.write(e)
  rows = predictor.predict(paths)
  got = np.asarray([[r["distribution"][n] for n in predictor.names] for r in rows])
  np.testing.assert_allclose(got, expected[:10], atol=2e-6)
  # A folder gives the same, in sorted order.
  rows_dir = predictor.predict(str(tmp_path))
  assert [r["file"] for r in rows_dir] == sorted(paths)
  # So do in-memory arrays (decoded pixels).
  arrays = [np.asarray(Image.open(io.BytesIO(e)).convert("RGB")) for e in encoded[:3]]
  np.testing.assert_allclose(predictor.predict_arrays(arrays), expected[:3], atol=2e-6)


@pytest.mark.slow
def test_predict_rows_and_errors(predictor, image_dir):
  d, files = image_dir
  rows = predictor.predict([files["rgb_jpg"], str(d / "folder"), str(d / "bad.jpg"),
                            str(d / "truncated.jpg"), str(d / "missing.png")])
  by_file = {r["file"]: r for r in rows}
  assert [r["file"] for r in rows] == [
      files["rgb_jpg"], files["grey"], files["rgba"], files["webp"],
      str(d / "bad.jpg"), str(d / "truncated.jpg"), str(d / "missing.png")]
  for key in ("rgb_jpg", "grey", "rgba", "webp"):
    r = by_file[files[key]]
    probs = np.asarray(list(r["distribution"].values()))
    assert list(r["distribution"]) == list(predictor.names)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5) and (probs >= 0).all()
    assert r["dominant"] == predictor.names[int(np.argmax(probs))]
    assert r["probability"] == pytest.approx(probs.max())
  assert "not a readable image" in by_file[str(d / "bad.jpg")]["error"]
  assert by_file[str(d / "truncated.jpg")]["error"]
  assert by_file[str(d / "missing.png")]["error"] == "no such file or folder"


@pytest.mark.slow
def test_main_writes_json_lines_plots_and_exit_status(trained_workdir, image_dir,  # noqa: F811
                                                      tmp_path, capsys):
  d, files = image_dir
  out = tmp_path / "pred.jsonl"
  plots = tmp_path / "plots"
  rc = predict.main(str(trained_workdir), [files["rgb_jpg"], str(d / "folder"),
                                           str(d / "bad.jpg")],
                    out=str(out), plot_dir=str(plots))
  assert rc == 1
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(lines) == 5
  assert sum("error" in l for l in lines) == 1
  assert lines[-1]["file"] == str(d / "bad.jpg")
  err = capsys.readouterr().err
  assert str(d / "bad.jpg") in err and "4 image(s) predicted, 1 failed" in err
  pngs = sorted(os.listdir(plots))
  assert pngs == ["a.png", "grey.png", "rgba.png", "w.png"]
  assert all(figures.is_png(str(plots / p)) for p in pngs)
  # Only good images: exit status 0; JSON lines on stdout.
  rc = predict.main(str(trained_workdir), [files["grey"]])
  assert rc == 0
  stdout = capsys.readouterr().out.strip().splitlines()
  assert len(stdout) == 1 and json.loads(stdout[0])["file"] == files["grey"]


def test_main_without_images_is_a_usage_error(tmp_path):
  with pytest.raises(ValueError, match="--images is empty"):
    predict.main(str(tmp_path), [])


def test_from_workdir_names_a_directory_that_is_not_a_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a training work directory"):
    predict.Predictor.from_workdir(str(tmp_path))


@pytest.mark.slow
def test_run_py_predict_command_line(trained_workdir, image_dir):  # noqa: F811
  """The real command: stdout is JSON lines only, the exit status is 1 when a file failed."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from workdir_fixture import REPO  # pylint: disable=g-import-not-at-top
  d, files = image_dir
  proc = subprocess.run(
      [sys.executable, str(REPO / "run.py"), f"--workdir={trained_workdir}", "--mode=predict",
       f"--images={files['rgb_jpg']},{d / 'folder'},{d / 'bad.jpg'}"],
      capture_output=True, text=True, timeout=600, cwd=str(REPO))
  assert proc.returncode == 1, proc.stderr[-2000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [r["file"] for r in rows] == [files["rgb_jpg"], files["grey"], files["rgba"],
                                       files["webp"], str(d / "bad.jpg")]
  assert "error" in rows[-1] and all("dominant" in r for r in rows[:-1])
  assert f"{d / 'bad.jpg'}: not a readable image" in proc.stderr
