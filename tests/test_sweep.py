"""The lambda sweep: sibling workdirs, resume, mean/std over seeds, sweep.json/md/png."""

import json
import shutil

import numpy as np
import pytest

from sdl_jax import report
from sdl_jax import sweep

from workdir_fixture import (TINY_LAM, TINY_SEED, data_dir, tiny_config,  # noqa: F401
                             trained_workdir)

MEASURES = sweep.SUMMARY_MEASURES


def _fake_measures(lam, seed):
  """Deterministic, distinct test measures for a run."""
  return {m: 0.1 * (i + 1) + lam + 0.01 * seed for i, m in enumerate(MEASURES)}


class FakeTrain:
  """Stands in for ``train.train_and_evaluate``: records calls, writes results.json."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    import os  # pylint: disable=g-import-not-at-top
    self.calls.append((float(config.lam), int(config.seed), workdir))
    os.makedirs(workdir, exist_ok=True)
    results = {"test": dict(_fake_measures(config.lam, config.seed), count=10),
               "best_step": 7}
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    return results


def _config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({"name": "fake", "lam": 0.8, "seed": 0,
                                    "data": {"name": "synthetic"}})


def test_sweep_trains_each_pair_once_and_summarises(tmp_path):
  fake = FakeTrain()
  config = _config()
  out = sweep.run_sweep(config, str(tmp_path), [0.0, 0.5, 1.0], [0, 1, 2], train_fn=fake,
                        command="python -m sdl_jax.sweep ...")
  assert sorted((l, s) for l, s, _ in fake.calls) == sorted(
      (l, s) for l in (0.0, 0.5, 1.0) for s in (0, 1, 2))
  assert {w for _, _, w in fake.calls} == {
      str(tmp_path / f"lam={l:g}_seed={s}") for l in (0.0, 0.5, 1.0) for s in (0, 1, 2)}
  assert config.lam == 0.8 and config.seed == 0  # the caller's config is not changed
  # Mean and sample std over seeds, against numpy.
  for row in out["summary"]:
    for m in MEASURES:
      values = [_fake_measures(row["lam"], s)[m] for s in (0, 1, 2)]
      assert row[f"{m}_mean"] == pytest.approx(np.mean(values))
      assert row[f"{m}_std"] == pytest.approx(np.std(values, ddof=1))
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2]
  assert [r["lam"] for r in out["summary"]] == [0.0, 0.5, 1.0]
  on_disk = json.loads((tmp_path / "sweep.json").read_text())
  assert on_disk == json.loads(json.dumps(out))
  assert report.is_png(str(tmp_path / "sweep.png"))
  md = (tmp_path / "sweep.md").read_text()
  assert "`python -m sdl_jax.sweep ...`" in md
  assert "lam=0.5_seed=2" in md and "![accuracy and KL against lambda](sweep.png)" in md
  mean = out["summary"][1]["kl_mean"]
  std = out["summary"][1]["kl_std"]
  assert f"{mean:.4f} +/- {std:.4f}" in md


def test_sweep_skips_finished_runs_and_resumes_the_rest(tmp_path):
  first = FakeTrain()
  sweep.run_sweep(_config(), str(tmp_path), [0.0, 1.0], [0], train_fn=first)
  assert len(first.calls) == 2
  # An unfinished run: a directory without results (as after an interruption).
  (tmp_path / "lam=0.5_seed=0" / "checkpoints").mkdir(parents=True)
  second = FakeTrain()
  out = sweep.run_sweep(_config(), str(tmp_path), [0.0, 0.5, 1.0], [0], train_fn=second)
  assert [(l, s) for l, s, _ in second.calls] == [(0.5, 0)]
  assert [r["run"] for r in out["runs"]] == ["lam=0_seed=0", "lam=0.5_seed=0",
                                             "lam=1_seed=0"]


def test_single_seed_has_zero_spread(tmp_path):
  out = sweep.run_sweep(_config(), str(tmp_path), [0.3], [5], train_fn=FakeTrain())
  assert out["summary"][0]["accuracy_std"] == 0.0
  assert out["runs"][0]["seed"] == 5


def test_interrupted_run_stops_the_sweep(tmp_path):
  def interrupted(config, workdir):
    del config, workdir
    return {"interrupted": True, "signal": "SIGTERM", "step": 3}
  with pytest.raises(KeyboardInterrupt, match="interrupted"):
    sweep.run_sweep(_config(), str(tmp_path), [0.0], [0], train_fn=interrupted)


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"--lams: 'x' is not a number"):
    sweep.parse_floats("0,x", "--lams")
  with pytest.raises(ValueError, match="--seeds is empty"):
    sweep.parse_ints(" , ", "--seeds")
  with pytest.raises(ValueError, match="is not an integer"):
    sweep.parse_ints("0,1.5", "--seeds")
  assert sweep.parse_floats("0, 0.5,1", "--lams") == [0.0, 0.5, 1.0]
  assert sweep.run_name(0.8, 1) == "lam=0.8_seed=1"
  assert sweep.run_name(1, 0) == "lam=1_seed=0"
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    sweep.run_sweep(_config(), "unused", [1.5], [0], train_fn=FakeTrain())
  with pytest.raises(ValueError, match="must not repeat"):
    sweep.run_sweep(_config(), "unused", [0.5, 0.50], [0], train_fn=FakeTrain())


@pytest.mark.slow
def test_real_sweep_on_tiny_config(trained_workdir, tmp_path_factory, tmp_path):  # noqa: F811
  """Two lambdas: the session's tiny run is reused as the finished lam=0.8 run (skipped),
  lam=0 is trained for real."""
  shutil.copytree(trained_workdir, tmp_path / sweep.run_name(TINY_LAM, TINY_SEED))
  config = tiny_config(data_dir(tmp_path_factory))
  out = sweep.run_sweep(config, str(tmp_path), [0.0, TINY_LAM], [TINY_SEED])
  trained = json.loads((tmp_path / "lam=0_seed=0" / "results.json").read_text())
  assert trained["lam"] == 0.0
  reused = json.loads((tmp_path / "lam=0.8_seed=0" / "results.json").read_text())
  by_run = {r["run"]: r for r in out["runs"]}
  for name, results in (("lam=0_seed=0", trained), ("lam=0.8_seed=0", reused)):
    for m in MEASURES:
      assert by_run[name][m] == pytest.approx(results["test"][m])
  assert report.is_png(str(tmp_path / "sweep.png"))
  assert (tmp_path / "sweep.md").exists()
