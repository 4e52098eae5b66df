"""The lambda sweep: sibling workdirs, resume, mean/std over seeds, sweep.json/md/png."""

import json
import shutil

import numpy as np
import pytest

from sdl_jax import aggregate
from sdl_jax import figures
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
    self.configs = []

  def __call__(self, config, workdir):
    import os  # pylint: disable=g-import-not-at-top
    self.calls.append((float(config.lam), int(config.seed), workdir))
    self.configs.append(config)
    os.makedirs(workdir, exist_ok=True)
    measures = _fake_measures(config.lam, config.seed)
    if config.get("probe"):
      measures = {m: v + 0.5 + 0.03 * config.data.split_seed for m, v in measures.items()}
    results = {"test": dict(measures, count=10), "best_step": 7, "lam": float(config.lam)}
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json())
    return results


def _config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({"name": "fake", "lam": 0.8, "seed": 0, "probe": False,
                                    "data": {"name": "synthetic", "split_seed": 0}})


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
  assert figures.is_png(str(tmp_path / "sweep.png"))
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
  """Two lambdas: the shared tiny run is reused as the finished lam=0.8 run (skipped),
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
  assert figures.is_png(str(tmp_path / "sweep.png"))
  assert (tmp_path / "sweep.md").exists()


def _fake_baselines(split_seed, measures):
  """Baselines of a split: the same for every run of that split."""
  return {"train_mean": {m: 0.2 + 0.1 * split_seed for m in measures},
          "uniform": {m: 0.05 * split_seed**2 for m in measures}}


def _write_run(root, name, method, lam, split_seed, seed, test):
  """A finished run directory as training or the probe leaves it."""
  run = root / name
  run.mkdir(parents=True)
  results = {"lam": lam, "test": dict(test, count=5), "best_step": None,
             "baselines": _fake_baselines(split_seed, test)}
  if method == "probe":
    results["method"] = "probe"
  (run / "results.json").write_text(json.dumps(results))
  (run / "config.json").write_text(json.dumps(
      {"seed": seed, "probe": method == "probe", "data": {"split_seed": split_seed}}))


def test_aggregation_of_finished_run_dirs_against_numpy(tmp_path):
  """Hand-made results.json files: mean and sample sd per method x lambda over split
  seeds, extra measures included; unfinished directories ignored."""
  rng = np.random.default_rng(0)
  measures = sweep.SUMMARY_MEASURES + aggregate.metrics_lib.EXTRA_MEASURES
  table = {}
  for method in ("finetune", "probe"):
    for lam in (0.0, 0.8):
      for split_seed in (0, 1, 2):
        test = {m: float(rng.random()) for m in measures}
        table[(method, lam, split_seed)] = test
        _write_run(tmp_path, sweep.run_name(lam, 0, split_seed, method), method, lam,
                   split_seed, 0, test)
  (tmp_path / "probe_lam=1_split=0_seed=0").mkdir()  # unfinished: no results.json
  points = aggregate.collect_points(str(tmp_path), measures)
  assert len(points) == 12
  out = aggregate.write_summary(str(tmp_path), points, preset="fake", measures=measures)
  rows = {(r["method"], r["lam"]): r for r in out["summary"]}
  assert [(r["method"], r["lam"]) for r in out["summary"]] == [
      ("finetune", 0.0), ("finetune", 0.8), ("probe", 0.0), ("probe", 0.8)]
  for (method, lam), row in rows.items():
    assert row["n"] == 3 and row["split_seeds"] == [0, 1, 2]
    for m in measures:
      values = np.array([table[(method, lam, s)][m] for s in (0, 1, 2)])
      assert row[f"{m}_mean"] == pytest.approx(values.mean())
      assert row[f"{m}_std"] == pytest.approx(values.std(ddof=1))
  # Baselines: one value per split seed, whichever runs hold it.
  base = {r["method"]: r for r in out["baselines"]}
  for key, label in aggregate.BASELINES.items():
    values = np.array([_fake_baselines(s, measures)[key]["kl"] for s in (0, 1, 2)])
    assert base[label]["n"] == 3
    assert base[label]["kl_mean"] == pytest.approx(values.mean())
    assert base[label]["kl_std"] == pytest.approx(values.std(ddof=1))
  md = (tmp_path / "sweep.md").read_text()
  b = base["baseline: training-set mean"]
  assert f"| baseline: training-set mean | - | 3 | {b['accuracy_mean']:.4f} +/- " in md
  r = rows[("probe", 0.8)]
  assert f"| probe | 0.8 | 3 | {r['accuracy_mean']:.4f} +/- {r['accuracy_std']:.4f} |" in md
  assert "Jensen-Shannon (lower)" in md and "Fidelity (higher)" in md
  assert figures.is_png(str(tmp_path / "sweep.png"))


def test_older_runs_without_extra_measures_summarise_as_missing(tmp_path):
  _write_run(tmp_path, "lam=0_seed=0", "finetune", 0.0, 0, 0,
             {m: 0.5 for m in MEASURES})
  measures = MEASURES + ("fidelity",)
  out = aggregate.write_summary(str(tmp_path), aggregate.collect_points(str(tmp_path), measures),
                            measures=measures)
  assert out["summary"][0]["fidelity_mean"] is None
  assert out["summary"][0]["kl_mean"] == 0.5


def test_sweep_over_methods_and_split_seeds(tmp_path):
  fake = FakeTrain()
  config = _config()
  out = sweep.run_sweep(config, str(tmp_path), [0.0, 0.8], [0], train_fn=fake,
                        split_seeds=[0, 1, 2], methods=["probe", "finetune"])
  assert len(fake.calls) == 12
  by_dir = {w: c for (_, _, w), c in zip(fake.calls, fake.configs)}
  probe_cfg = by_dir[str(tmp_path / "probe_lam=0.8_split=2_seed=0")]
  assert probe_cfg.probe and probe_cfg.data.split_seed == 2 and probe_cfg.lam == 0.8
  # Probe runs of one split share the cached features, whatever their lambda.
  assert probe_cfg.probe_feature_dir == str(tmp_path / "probe_features" / "split=2")
  assert by_dir[str(tmp_path / "probe_lam=0_split=2_seed=0")].probe_feature_dir == \
      probe_cfg.probe_feature_dir
  ft_cfg = by_dir[str(tmp_path / "lam=0_split=1_seed=0")]
  assert not ft_cfg.probe and ft_cfg.data.split_seed == 1
  assert config.data.split_seed == 0 and not config.probe
  rows = {(r["method"], r["lam"]): r for r in out["summary"]}
  values = [_fake_measures(0.8, 0)["kl"] + 0.5 + 0.03 * s for s in (0, 1, 2)]
  assert rows[("probe", 0.8)]["kl_mean"] == pytest.approx(np.mean(values))
  assert rows[("probe", 0.8)]["kl_std"] == pytest.approx(np.std(values, ddof=1))
  assert out["methods"] == ["probe", "finetune"] and out["split_seeds"] == [0, 1, 2]
  # Everything finished: the same sweep only re-summarises, to the same numbers.
  again = FakeTrain()
  out2 = sweep.run_sweep(config, str(tmp_path), [0.0, 0.8], [0], train_fn=again,
                         split_seeds=[0, 1, 2], methods=["probe", "finetune"])
  assert again.calls == [] and out2["summary"] == out["summary"]
  # And collecting the directories gives the same table.
  assert aggregate.summarize(aggregate.collect_points(str(tmp_path))) == [
      {k: v for k, v in r.items()} for r in out["summary"]]


def test_bad_methods_and_split_seeds():
  with pytest.raises(ValueError, match="'linear' is not a method"):
    sweep.parse_methods("probe,linear")
  with pytest.raises(ValueError, match="must not repeat"):
    sweep.parse_methods("probe,probe")
  with pytest.raises(ValueError, match="--split_seeds .* must not repeat"):
    sweep.check_grid([0.8], [0], [1, 1])
  assert sweep.run_name(0.8, 0, 2, "probe") == "probe_lam=0.8_split=2_seed=0"
  assert sweep.run_name(0, 1, None, "finetune") == "lam=0_seed=1"


def _cli(args, tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from workdir_fixture import REPO  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, SDL_JAX_DATA_DIR=str(tmp_path / "tfds"))
  proc = subprocess.run([sys.executable, "-m", "sdl_jax.sweep"] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_cli_probe_sweep_on_tiny_config_resumes_and_resummarises(tmp_path):
  """The command line: two lambdas x two split seeds of the probe on a tiny synthetic
  set; the same command again trains nothing; --summarize_only rebuilds the table."""
  work = tmp_path / "sweep"
  args = ["--config=configs/sdl.py", "--config.data.num_examples=200",
          "--config.data.image_size=16", "--config.image_size=16",
          "--config.resize_size=18", "--config.model_kwargs.widths=(8,16)",
          "--config.batch_size=16", "--config.probe_steps=100",
          "--config.probe_weight_decays=(0.001,0.1)", "--lams=0,0.8",
          "--split_seeds=0,1", "--methods=probe", "--extra_measures", f"--workdir={work}"]
  out = _cli(args, tmp_path)
  assert out.count("sweep: training probe_lam=") == 4
  first = json.loads((work / "sweep.json").read_text())
  assert [(r["method"], r["lam"], r["n"]) for r in first["summary"]] == [
      ("probe", 0.0, 2), ("probe", 0.8, 2)]
  assert sorted(p.name for p in (work / "probe_features").iterdir()) == [
      "split=0", "split=1"]
  for r in first["runs"]:
    results = json.loads((work / r["run"] / "results.json").read_text())
    assert results["method"] == "probe" and results["lam"] == r["lam"]
    assert r["kl"] == pytest.approx(results["test"]["kl"])
    assert r["fidelity"] == pytest.approx(results["test"]["fidelity"])
  out = _cli(args, tmp_path)
  assert "sweep: training" not in out and out.count("finished before, skipped") == 4
  assert json.loads((work / "sweep.json").read_text())["summary"] == first["summary"]
  (work / "sweep.md").unlink()
  _cli(["--summarize_only", "--extra_measures", f"--workdir={work}"], tmp_path)
  assert json.loads((work / "sweep.json").read_text())["summary"] == first["summary"]
  assert "| probe | 0.8 | 2 |" in (work / "sweep.md").read_text()
