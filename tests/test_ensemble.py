"""The ensemble of work directories: mean distribution, measures, refusals, command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sdl_jax import ensemble
from sdl_jax import evaluate
from sdl_jax import metrics
from workdir_fixture import REPO, data_dir, tiny_config, trained_workdir  # noqa: F401


def test_mean_distribution_against_numpy():
  rng = np.random.default_rng(0)
  members = [rng.dirichlet(np.ones(5), size=7) for _ in range(3)]
  want = (members[0] + members[1] + members[2]) / 3
  got = ensemble.mean_distribution(members)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)


def test_mean_distribution_refuses_mismatched_shapes():
  with pytest.raises(ValueError, match="differently shaped"):
    ensemble.mean_distribution([np.full((2, 3), 1 / 3), np.full((3, 3), 1 / 3)])
  with pytest.raises(ValueError, match="at least one"):
    ensemble.mean_distribution([])


@pytest.fixture(scope="module")
def second_workdir(tmp_path_factory):
  """The tiny run again with another seed: same data split, other weights."""
  from sdl_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("tiny_seed1")
  c = tiny_config(data_dir(tmp_path_factory))
  c.seed = 1
  train.train_and_evaluate(c, str(workdir))
  return workdir


@pytest.mark.slow
def test_ensemble_scores_the_mean_of_its_members(trained_workdir, second_workdir):  # noqa: F811
  from sdl_jax import data  # pylint: disable=g-import-not-at-top
  result = ensemble.evaluate_ensemble([str(trained_workdir), str(second_workdir)])
  preds = []
  for w in (trained_workdir, second_workdir):
    trained = evaluate.load_trained(str(w))
    preds.append(evaluate.predict_split(trained, data.get_builder(trained.config.data)))
  assert not np.allclose(preds[0]["probs"], preds[1]["probs"])  # two different models
  mean = (preds[0]["probs"].astype(np.float64) + preds[1]["probs"]) / 2
  dist = preds[0]["distribution"].astype(np.float64)
  # KL(l || p) with the metric's convention 0 log 0 = 0, written out in numpy.
  safe = np.where(dist > 0, dist, 1.0)
  kl = np.where(dist > 0, dist * np.log(safe / np.maximum(mean, 1e-12)), 0.0).sum(1)
  assert result["count"] == len(dist)
  np.testing.assert_allclose(result["ensemble"]["kl"], kl.mean(), rtol=1e-4)
  acc = np.mean(mean.argmax(1) == preds[0]["label"])
  np.testing.assert_allclose(result["ensemble"]["accuracy"], acc)
  for member, pred in zip(result["members"], preds):
    np.testing.assert_allclose(
        member["model"]["kl"],
        np.mean(metrics.ldl_measures(pred["distribution"], pred["probs"])["kl"]), rtol=1e-5)


@pytest.mark.slow
def test_ensemble_of_one_model_twice_is_that_model(trained_workdir, tmp_path):  # noqa: F811
  copy = tmp_path / "copy"
  shutil.copytree(trained_workdir, copy)
  result = ensemble.evaluate_ensemble([str(trained_workdir), str(copy)])
  for k, v in result["members"][0]["model"].items():
    np.testing.assert_allclose(result["ensemble"][k], v, rtol=1e-5, err_msg=k)


@pytest.mark.slow
def test_ensemble_refuses_members_of_other_data(trained_workdir, tmp_path):  # noqa: F811
  other = tmp_path / "other"
  shutil.copytree(trained_workdir, other)
  config_path = other / "config.json"
  config = json.loads(config_path.read_text())
  config["data"]["split_seed"] = 7
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match="other data settings"):
    ensemble.evaluate_ensemble([str(trained_workdir), str(other)])
  with pytest.raises(ValueError, match="at least two"):
    ensemble.evaluate_ensemble([str(trained_workdir)])
  done = _cli(f"--workdirs={trained_workdir},{other}", cwd=tmp_path)
  assert done.returncode == 1 and "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines()[-1].startswith(f"ensemble: {other} was trained on "
                                                         "other data settings")


def _cli(*args, cwd):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "sdl_jax.ensemble", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line(trained_workdir, second_workdir, tmp_path):  # noqa: F811
  out = tmp_path / "out"
  done = _cli(f"--workdirs={trained_workdir},{second_workdir}", f"--out={out}", cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  assert "| ensemble of 2 |" in done.stdout
  written = json.loads((out / "ensemble.json").read_text())
  assert [m["workdir"] for m in written["members"]] == [str(trained_workdir),
                                                        str(second_workdir)]
  bad = _cli(f"--workdirs={trained_workdir},{tmp_path / 'nowhere'}", cwd=tmp_path)
  assert bad.returncode != 0
  assert "not a directory" in bad.stderr and "nowhere" in bad.stderr
