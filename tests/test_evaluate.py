"""``--mode=evaluate`` on a tiny trained workdir: measures, baselines, tables, figures."""

import json
import shutil

import jax
import numpy as np
import pytest

from sdl_jax import evaluate
from sdl_jax import metrics as metrics_lib
from sdl_jax import figures

from workdir_fixture import TINY_STEPS, trained_workdir  # noqa: F401  (fixture)


def _np_kl(l, p):
  out = []
  for li, pi in zip(np.asarray(l, np.float64), np.asarray(p, np.float64)):
    out.append(sum(a * np.log(a / max(b, np.finfo(np.float32).tiny))
                   for a, b in zip(li, pi) if a > 0))
  return np.array(out)


def test_rank_by_kl_against_loop():
  rng = np.random.default_rng(0)
  l = rng.dirichlet(np.ones(8), 30).astype(np.float32)
  p = rng.dirichlet(np.ones(8), 30).astype(np.float32)
  kl, best, worst = evaluate.rank_by_kl(p, l, 4)
  ref = _np_kl(l, p)
  np.testing.assert_allclose(kl, ref, rtol=1e-4, atol=1e-5)
  assert list(best) == list(np.argsort(ref)[:4])
  assert list(worst) == list(np.argsort(-ref)[:4])
  # Fewer images than asked for: all of them.
  _, best, worst = evaluate.rank_by_kl(p[:2], l[:2], 6)
  assert sorted(best) == [0, 1] and sorted(worst) == [0, 1]


def test_load_config_names_missing_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a training work directory"):
    evaluate.load_config(str(tmp_path))


@pytest.fixture(scope="module")
def evaluated(trained_workdir, tmp_path_factory):  # noqa: F811
  """A copy of the tiny workdir after ``evaluate.main``."""
  workdir = tmp_path_factory.mktemp("evaluated") / "w"
  shutil.copytree(trained_workdir, workdir)
  with open(workdir / "results.json") as f:
    before = json.load(f)
  assert evaluate.main(None, str(workdir)) == 0
  with open(workdir / "results.json") as f:
    after = json.load(f)
  return workdir, before, after


@pytest.mark.slow
@pytest.mark.multidevice
def test_model_measures_match_training_test_numbers(evaluated):
  _, before, after = evaluated
  ev = after["evaluation"]
  # Training ran data-parallel over this process's devices (2 in CI's second pass).
  assert (before["devices"], before["processes"]) == (jax.device_count(), 1)
  # Training tested the same (best) checkpoint through train.eval_step; evaluate predicts
  # per image and averages: the two must agree.
  assert ev["checkpoint"] == {"which": "best", "step": before["best_step"]}
  for k in ("accuracy",) + metrics_lib.LDL_MEASURES:
    assert ev["model"][k] == pytest.approx(before["test"][k], rel=1e-4, abs=1e-5), k
  assert ev["count"] == before["test"]["count"]
  # The training run's own results are kept.
  for k, v in before.items():
    assert after[k] == v


@pytest.mark.slow
def test_baselines_against_plain_reference(evaluated, trained_workdir):  # noqa: F811
  from sdl_jax import data  # pylint: disable=g-import-not-at-top
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _, _, after = evaluated
  ev = after["evaluation"]
  config = evaluate.load_config(str(trained_workdir))
  builder = data.get_builder(config.data)
  test = pipeline.read_targets(builder, "test")
  train = pipeline.read_targets(builder, "train", ("distribution",))
  l = test["distribution"].astype(np.float64)
  c = l.shape[1]
  uniform = np.full(c, 1 / c)
  mean = train["distribution"].astype(np.float64).mean(0)
  for name, pred in (("uniform", uniform), ("train_mean", mean)):
    got = ev["baselines"][name]
    p = np.tile(pred, (len(l), 1))
    assert got["kl"] == pytest.approx(_np_kl(l, p).mean(), rel=1e-4)
    assert got["accuracy"] == pytest.approx(np.mean(test["label"] == np.argmax(pred)))
    assert got["intersection"] == pytest.approx(np.minimum(l, p).sum(1).mean(), rel=1e-5)
  # The synthetic set knows its generating distribution: the oracle row is there and
  # fits the votes better than the constant baselines.
  assert ev["oracle"]["kl"] < ev["baselines"]["uniform"]["kl"]


@pytest.mark.slow
def test_tables_are_consistent(evaluated):
  _, _, after = evaluated
  ev = after["evaluation"]
  cm = np.asarray(ev["confusion_matrix"])
  n = ev["count"]
  assert cm.shape == (8, 8) and cm.sum() == n
  assert np.trace(cm) / n == pytest.approx(ev["model"]["accuracy"], abs=1e-6)
  rows = ev["per_emotion"]
  assert [r["emotion"] for r in rows] == ev["names"]
  assert [r["support"] for r in rows] == list(cm.sum(1))
  assert [r["predicted"] for r in rows] == list(cm.sum(0))
  assert sum(r["mean_pred"] for r in rows) == pytest.approx(1.0, abs=1e-5)
  assert sum(r["mean_true"] for r in rows) == pytest.approx(1.0, abs=1e-5)
  best = [r["kl"] for r in ev["best_by_kl"]]
  worst = [r["kl"] for r in ev["worst_by_kl"]]
  assert best == sorted(best) and worst == sorted(worst, reverse=True)
  assert len(best) == len(worst) == 6
  assert best[0] <= worst[-1]
  assert all(r["file"].endswith(".png") for r in ev["best_by_kl"])


@pytest.mark.slow
def test_report_and_figures_written(evaluated):
  workdir, before, after = evaluated
  ev = after["evaluation"]
  assert set(ev["figures"]) == {"Confusion matrix", "Best by KL", "Worst by KL"}
  text = (workdir / "report.md").read_text()
  for title, rel in ev["figures"].items():
    path = workdir / rel
    assert figures.is_png(str(path)), path
    assert f"![{title}]({rel})" in text
  assert "baseline: uniform" in text and "baseline: training mean" in text
  assert f"{ev['model']['accuracy']:.4f}" in text
  # The checkpoint evaluated: the training run's best on validation, by its step.
  assert f"Checkpoint: best (step {before['best_step']}).\n" in text
  for name in ev["names"]:
    assert f"| {name} |" in text


@pytest.mark.slow
@pytest.mark.multidevice
def test_latest_checkpoint_and_validation_split(trained_workdir, tmp_path):  # noqa: F811
  workdir = tmp_path / "w"
  shutil.copytree(trained_workdir, workdir)
  ev = evaluate.evaluate_workdir(str(workdir), split="validation", which="latest",
                                 num_gallery=2)
  assert ev["checkpoint"] == {"which": "latest", "step": TINY_STEPS}
  assert ev["split"] == "validation" and ev["count"] == 12  # 5% of 240
  assert len(ev["best_by_kl"]) == 2


@pytest.mark.slow
def test_tensorboard_events_hold_loss_learning_rate_and_metrics(trained_workdir):  # noqa: F811
  """What ``tensorboard --logdir W`` shows (the README's promise)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in (trained_workdir / "tensorboard").iterdir():
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        scalars.setdefault(v.tag, []).append(
            (event.step, float(tf.make_ndarray(v.tensor))))
  for tag in ("train/loss", "train/learning_rate", "train/accuracy", "validation/kl",
              "validation/accuracy", "test/kl"):
    assert tag in scalars, (tag, sorted(scalars))
  steps = [s for s, _ in scalars["train/loss"]]
  assert steps == sorted(steps) and steps[-1] == TINY_STEPS
  # The rate logged at step s is the schedule's at s - 1 (the step just taken).
  from sdl_jax import train_state  # pylint: disable=g-import-not-at-top
  run = json.loads((trained_workdir / "run.json").read_text())
  lr_fn = train_state.create_learning_rate_fn(evaluate.load_config(str(trained_workdir)),
                                              run["steps_per_epoch"], run["num_train_steps"])
  logged = scalars["train/learning_rate"]
  assert [s for s, _ in logged] == steps
  for s, v in logged:
    assert v == pytest.approx(float(lr_fn(s - 1)), rel=1e-6), s


def test_config_for_workdir_takes_eval_flip_from_the_given_config(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  saved = {"model": "small_cnn", "data": {"name": "synthetic", "path": None}}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  # A workdir trained before the setting existed: off.
  assert not evaluate.config_for_workdir(str(tmp_path)).get("eval_flip", False)
  given = ml_collections.ConfigDict(dict(saved, eval_flip=True, model="vgg16"))
  got = evaluate.config_for_workdir(str(tmp_path), given)
  assert got.eval_flip is True and got.model == "small_cnn"  # the model stays the saved one
  given.eval_flip = False
  assert evaluate.config_for_workdir(str(tmp_path), given).eval_flip is False


@pytest.mark.slow
def test_mirrored_evaluation_agrees_between_training_and_evaluate(trained_workdir, tmp_path):  # noqa: F811,E501
  """``eval_flip``: train.eval_step (validation/test during training) and evaluate's
  per-image predictions give the same measures, and they differ from unmirrored ones."""
  from sdl_jax import data, train, train_state  # pylint: disable=g-import-not-at-top
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = evaluate.load_config(str(trained_workdir))
  config.eval_flip = True
  trained = evaluate.load_trained(str(trained_workdir), config=config)
  builder = data.get_builder(config.data)
  pred = evaluate.predict_split(trained, builder, "test")
  by_image = evaluate.model_measures(pred["probs"], pred["label"], pred["distribution"])

  state = train_state.replicate(evaluate.restore(config, str(trained_workdir))[0])
  _, p_eval = train.make_pmapped_steps(config)
  ds, _, _ = pipeline.eval_dataset(builder, config, "test")
  by_step = train.evaluate(p_eval, state, ds)
  for k in ("accuracy",) + metrics_lib.LDL_MEASURES:
    assert by_image[k] == pytest.approx(by_step[k], rel=1e-4, abs=1e-5), k

  workdir = tmp_path / "w"
  shutil.copytree(trained_workdir, workdir)
  ev = evaluate.evaluate_workdir(str(workdir), config=config, num_gallery=1)
  assert ev["eval_flip"] is True
  assert ev["model"]["kl"] == pytest.approx(by_image["kl"], rel=1e-5)
  assert "mirror image" in (workdir / "report.md").read_text()

  config.eval_flip = False
  plain = evaluate.predict_split(evaluate.load_trained(str(trained_workdir), config=config),
                                 builder, "test")
  assert not np.allclose(plain["probs"], pred["probs"], atol=1e-4)
