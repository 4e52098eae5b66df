"""Tables against plain loops, and every figure is a valid PNG of a sensible size."""

import numpy as np
import pytest
from PIL import Image

from sdl_jax import figures
from sdl_jax import report
from sdl_jax.emotions import MIKELS8

NAMES = MIKELS8.names
C = len(NAMES)


def _random_case(n=120, seed=0):
  rng = np.random.default_rng(seed)
  dists = rng.dirichlet(np.full(C, 0.5), n)
  probs = rng.dirichlet(np.ones(C), n)
  labels = dists.argmax(1)
  return labels, probs, dists


def test_confusion_matrix_counts_pairs():
  labels, probs, _ = _random_case()
  preds = probs.argmax(1)
  ref = np.zeros((C, C), int)
  for t, p in zip(labels, preds):
    ref[t, p] += 1
  cm = report.confusion_matrix(labels, preds, C)
  np.testing.assert_array_equal(cm, ref)
  assert cm.sum() == len(labels)


def test_confusion_matrix_rejects_out_of_range_and_length_mismatch():
  with pytest.raises(ValueError, match="labels must lie in"):
    report.confusion_matrix([0, 8], [0, 1], C)
  with pytest.raises(ValueError, match="differ in length"):
    report.confusion_matrix([0, 1], [0], C)


def test_per_emotion_against_loops():
  labels, probs, dists = _random_case(seed=1)
  rows = report.per_emotion(labels, probs, dists, NAMES)
  preds = probs.argmax(1)
  assert [r["emotion"] for r in rows] == list(NAMES)
  for j, r in enumerate(rows):
    support = sum(1 for t in labels if t == j)
    predicted = sum(1 for p in preds if p == j)
    hits = sum(1 for t, p in zip(labels, preds) if t == j and p == j)
    assert r["support"] == support
    assert r["predicted"] == predicted
    assert r["precision"] == (pytest.approx(hits / predicted) if predicted else None)
    assert r["recall"] == (pytest.approx(hits / support) if support else None)
    assert r["mean_pred"] == pytest.approx(sum(p[j] for p in probs) / len(probs))
    assert r["mean_true"] == pytest.approx(sum(d[j] for d in dists) / len(dists))
  assert sum(r["support"] for r in rows) == len(labels)


def test_per_emotion_undefined_precision_is_none():
  # Every prediction is class 0: precision of the other classes is 0 / 0.
  dists = np.eye(C)[[0, 1, 2]]
  probs = np.tile(np.eye(C)[0] * 0.9 + 0.1 / C, (3, 1))
  rows = report.per_emotion([0, 1, 2], probs, dists, NAMES)
  assert rows[0]["precision"] == pytest.approx(1 / 3)
  assert rows[1]["precision"] is None and rows[1]["recall"] == 0.0
  assert rows[5]["recall"] is None  # no image of class 5


def test_markdown_table_formats_numbers_and_missing_values():
  text = report.markdown_table([{"a": 1, "b": 0.123456, "c": None},
                                {"a": "x", "b": float("nan"), "c": 2.0}],
                               ("a", "b", "c"), digits=3)
  lines = text.strip().splitlines()
  assert lines[0] == "| a | b | c |"
  assert lines[1] == "| --- | --- | --- |"
  assert lines[2] == "| 1 | 0.123 | - |"
  assert lines[3] == "| x | - | 2.000 |"


def test_measure_header_says_direction():
  assert report.measure_header("kl") == "KL (lower)"
  assert report.measure_header("cosine") == "Cosine (higher)"
  assert report.measure_header("accuracy") == "accuracy (higher)"


def _png_size(path):
  assert figures.is_png(str(path)), path
  with Image.open(path) as im:
    return im.size


def test_confusion_matrix_figure(tmp_path):
  labels, probs, _ = _random_case()
  cm = report.confusion_matrix(labels, probs.argmax(1), C)
  w, h = _png_size(figures.plot_confusion_matrix(cm, NAMES, str(tmp_path / "cm.png")))
  assert w > 300 and h > 300


def test_gallery_figure_any_image_sizes_and_grey(tmp_path):
  labels, probs, dists = _random_case(n=3)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            rng.integers(0, 256, (48, 20), dtype=np.uint8),          # grey
            rng.integers(0, 256, (10, 60, 1), dtype=np.uint8)]       # grey, channel axis
  path = figures.plot_gallery(images, dists, probs, NAMES, str(tmp_path / "g" / "gal.png"),
                              captions=["a", "b", "c"], title="t")
  w, h = _png_size(path)
  assert w > h  # three columns side by side
  with pytest.raises(ValueError, match="at least one image"):
    figures.plot_gallery([], dists[:0], probs[:0], NAMES, str(tmp_path / "empty.png"))


def test_prediction_curves_and_sweep_figures(tmp_path):
  _, probs, _ = _random_case(n=1)
  img = np.zeros((20, 30, 3), np.uint8)
  _png_size(figures.plot_prediction(img, probs[0], NAMES, str(tmp_path / "p.png"), "x"))
  rows = [{"step": s, "train/loss": 2 / (s + 1), "validation/loss": 2.2 / (s + 1),
           "validation/kl": 1 / (s + 1)} for s in range(1, 6)]
  _png_size(figures.plot_curves(rows, str(tmp_path / "c.png")))
  with pytest.raises(ValueError, match="no numeric metrics"):
    figures.plot_curves([{"step": 1}], str(tmp_path / "none.png"))
  points = [{"lam": l, "seed": s, "accuracy": 0.5 + 0.1 * l + 0.01 * s, "kl": 1 - 0.3 * l}
            for l in (0.0, 0.5, 1.0) for s in (0, 1)]
  _png_size(figures.plot_sweep(points, str(tmp_path / "s.png")))


def test_is_png_rejects_other_and_truncated_files(tmp_path):
  good = tmp_path / "good.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
  assert figures.is_png(str(good))
  jpg = tmp_path / "x.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpg, format="JPEG")
  assert not figures.is_png(str(jpg))
  cut = tmp_path / "cut.png"
  cut.write_bytes(good.read_bytes()[:40])
  assert not figures.is_png(str(cut))


def test_evaluation_markdown_has_all_rows_and_figures():
  labels, probs, dists = _random_case()
  m = {k: 0.5 for k in report.MEASURE_COLUMNS}
  results = {"split": "test", "count": len(labels), "model": m,
             "baselines": {"uniform": m, "train_mean": m}, "oracle": m,
             "per_emotion": report.per_emotion(labels, probs, dists, NAMES),
             "checkpoint": {"which": "best", "step": 3}, "command": "python run.py x",
             "training": {"model": "small_cnn", "lam": 0.8}}
  text = report.evaluation_markdown(results, {"Confusion matrix": "figures/cm.png"})
  for needle in ("test split (120 images)", "`python run.py x`", "best (step 3)",
                 "| model |", "baseline: uniform", "baseline: training mean",
                 "oracle (best possible)", "![Confusion matrix](figures/cm.png)",
                 "model small_cnn", "KL (lower)"):
    assert needle in text, needle
  for name in NAMES:
    assert f"| {name} |" in text


def _training_results(m):
  return {"name": "flickr_ldl", "model": "small_cnn", "data": "flickr_ldl/seed0-x/1.0.0",
          "lam": 0.8, "batch_size": 32, "num_train_steps": 60, "start_step": 0,
          "best_step": 40, "best_metric": "kl", "test": dict(m, count=315),
          "test_last": m, "baselines": {"uniform": m, "train_mean": m},
          "devices": 1, "processes": 1, "wall_time_s": 12.0}


def test_data_markdown_states_rows_read_used_and_skipped_by_reason():
  counts = {"rows_read": 50, "written": 41, "skipped": {"no_image": 7, "bad_row": 2},
            "lenient": True, "allow_missing_images": True}
  text = report.data_markdown(counts)
  assert text.startswith("Data: 50 label rows read, 41 used, 9 skipped "
                         "(bad_row 2, no_image 7) with `data.allow_missing_images=True` "
                         "and `data.lenient=True`")
  clean = report.data_markdown({"rows_read": 5, "written": 5, "skipped": {}})
  assert "5 used, 0 skipped;" in clean and "with" not in clean


def test_one_report_holds_training_evaluation_and_data(tmp_path):
  labels, probs, dists = _random_case()
  m = {k: 0.25 for k in report.MEASURE_COLUMNS}
  results = _training_results(m)
  written = 1680 + 105 + 315
  results["data_build"] = {"rows_read": 11150, "written": written,
                           "skipped": {"no_image": 11150 - written},
                           "allow_missing_images": True}
  text = report.write_report(str(tmp_path), results)
  assert (tmp_path / "report.md").read_text() == text
  assert text.startswith("# flickr_ldl: test split (315 images)")
  for needle in ("| model, best validation kl (step 40) |", "| model, last step (60) |",
                 "| uniform distribution |", "| training set's mean distribution |",
                 "KL (lower)", "## Data",
                 "11150 label rows read, 2100 used, 9050 skipped (no_image 9050) with "
                 "`data.allow_missing_images=True`"):
    assert needle in text, needle
  assert "Evaluation on" not in text
  # Evaluation: its section is added; the same data counts are stated once.
  results["evaluation"] = {
      "split": "test", "count": len(labels), "model": m, "baselines": {"uniform": m},
      "per_emotion": report.per_emotion(labels, probs, dists, NAMES),
      "checkpoint": {"which": "best", "step": 40}, "figures": {"Confusion matrix": "f/cm.png"},
      "data_build": results["data_build"]}
  text = report.write_report(str(tmp_path), results)
  assert "# flickr_ldl: test split" in text and "# Evaluation on the test split" in text
  assert "![Confusion matrix](f/cm.png)" in text and "Training run: model small_cnn" in text
  assert text.count("label rows read") == 1
  results["evaluation"]["data_build"] = dict(results["data_build"], rows_read=written,
                                             skipped={})
  assert report.report_markdown(results).count("label rows read") == 2
  # An evaluation of a workdir whose training did not finish: no training table.
  del results["test"]
  assert "model, last step" not in report.report_markdown(results)
