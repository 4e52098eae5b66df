"""Training: the Caffe SGD and schedules against references, the pmapped step against plain
autodiff, learning on a reduced synthetic set, resume, SIGTERM, bad checkpoints."""

import json
import math
import os
import re
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sdl_jax import checkpoint as ckpt_lib
from sdl_jax import evaluate
from sdl_jax import losses
from sdl_jax import optim
from sdl_jax import train
from sdl_jax import train_state

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import sdl as sdl_config  # pylint: disable=g-import-not-at-top,wrong-import-position


# ----------------------------------------------------------------------------------------
# Optimizer and schedules against plain references.


def _sched_config(**kw):
  c = ml_collections.ConfigDict({"learning_rate": 0.1, "warmup_steps": 0, "schedule": "step",
                                 "step_size_epochs": 2.0, "gamma": 0.5})
  c.update(kw)
  return c


def test_schedules_match_their_formulas():
  step = train_state.create_learning_rate_fn(_sched_config(), steps_per_epoch=5,
                                             num_train_steps=50)
  for t in (0, 9, 10, 19, 20, 35):
    assert math.isclose(float(step(t)), 0.1 * 0.5 ** (t // 10), rel_tol=1e-6)
  cos = train_state.create_learning_rate_fn(
      _sched_config(schedule="cosine", warmup_steps=10), steps_per_epoch=5, num_train_steps=50)
  for t in (0, 5, 10, 30, 50):
    want = 0.1 * t / 10 if t < 10 else 0.1 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 40))
    assert math.isclose(float(cos(t)), want, rel_tol=1e-5, abs_tol=1e-9)
  # Caffe's stepsize in iterations, when set, rather than epochs.
  by_steps = train_state.create_learning_rate_fn(_sched_config(step_size_steps=7), 5, 50)
  for t in (0, 6, 7, 13, 14, 35):
    assert math.isclose(float(by_steps(t)), 0.1 * 0.5 ** (t // 7), rel_tol=1e-6)
  with pytest.raises(ValueError, match="config.step_size_steps"):
    train_state.create_learning_rate_fn(_sched_config(step_size_steps=0), 5, 50)
  const = train_state.create_learning_rate_fn(_sched_config(schedule="constant"), 5, 50)
  assert float(const(0)) == float(const(49)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="config.schedule"):
    train_state.create_learning_rate_fn(_sched_config(schedule="poly"), 5, 50)


def test_param_labels_of_small_cnn():
  model = train_state.create_model(sdl_config.get_config(), 8)
  params, batch_stats = train_state.initialized(train_state.prng_key(0), 16, model)
  assert batch_stats  # small_cnn has BatchNorm
  labels = flax.traverse_util.flatten_dict(optim.param_labels(params, "head"), sep="/")
  assert labels["head/kernel"] == "head_weight" and labels["head/bias"] == "head_bias"
  assert labels["conv0_0/kernel"] == "body_weight"
  assert labels["bn0_0/scale"] == labels["bn0_0/bias"] == "body_bias"


@pytest.mark.parametrize("bias_decay_mult", [None, 0.0, 1.0])
def test_optimizer_is_caffe_sgd(bias_decay_mult):
  """v = mom v + lr_t m (g + wd w), w -= v, with per-group m and decay, in NumPy."""
  c = ml_collections.ConfigDict({"momentum": 0.9, "weight_decay": 0.01, "head_lr_mult": 10.0,
                                 "bias_lr_mult": 2.0})
  if bias_decay_mult is not None:  # absent: biases are not decayed
    c.bias_decay_mult = bias_decay_mult
  bias_wd = 0.01 * (bias_decay_mult or 0.0)
  lr = lambda t: 0.1 * 0.5 ** (t // 2)  # a step schedule: the rate changes mid-way
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
            "head": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=(2,))}}
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  tx = optim.create_optimizer(c, lambda t: 0.1 * 0.5 ** (t // 2), params, head="head")
  state = tx.init(params)
  mult = {("conv", "kernel"): (1, 0.01), ("conv", "bias"): (2, bias_wd),
          ("head", "kernel"): (10, 0.01), ("head", "bias"): (20, bias_wd)}
  w = {k: np.asarray(params[k[0]][k[1]], np.float64) for k in mult}
  v = {k: np.zeros_like(w[k]) for k in mult}
  p = params
  for t in range(5):
    grads = {a: {b: jnp.asarray(rng.normal(size=np.shape(p[a][b])), jnp.float32) for b in p[a]}
             for a in p}
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    for (a, b), (m, wd) in mult.items():
      g = np.asarray(grads[a][b], np.float64)
      v[(a, b)] = 0.9 * v[(a, b)] + lr(t) * m * (g + wd * w[(a, b)])
      w[(a, b)] = w[(a, b)] - v[(a, b)]
  for (a, b) in mult:
    np.testing.assert_allclose(np.asarray(p[a][b]), w[(a, b)], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# The pmapped train step against plain autodiff.


@pytest.mark.slow
def test_train_step_matches_plain_autodiff_and_sgd():
  c = sdl_config.get_config()
  c.model_kwargs.widths = (4, 8)
  c.model_kwargs.dropout_rate = 0.0
  c.weight_decay = 0.01
  model = train_state.create_model(c, 8)
  lr_fn = lambda t: 0.05
  state = train_state.create_train_state(train_state.prng_key(1), c, model, 16, lr_fn)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(6, 16, 16, 3)).astype(np.float32),
           "label": rng.integers(0, 8, 6).astype(np.int32),
           "distribution": rng.dirichlet(np.ones(8), 6).astype(np.float32),
           "mask": np.ones(6, np.float32)}

  def loss(params):
    out, upd = model.apply({"params": params, "batch_stats": state.batch_stats},
                           batch["image"], train=True, mutable=["batch_stats"])
    return losses.sdl_loss_reference(out, batch["label"], batch["distribution"], 0.8), upd

  (ref_loss, upd), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)
  want = jax.tree_util.tree_map(
      lambda w, gw, lab: w - 0.05 * (gw + (0.01 * w if lab.endswith("weight") else 0)),
      state.params, g, optim.param_labels(state.params, "head"))

  p_train, _ = train.make_pmapped_steps(c)
  new_state, sums = p_train(train_state.replicate(state),
                            jax.tree_util.tree_map(lambda x: x[None], batch))
  got = train_state.unreplicate(new_state)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                         got.params, want)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         got.batch_stats, upd["batch_stats"])
  assert int(got.step) == 1
  np.testing.assert_allclose(float(sums["loss"][0]) / 6, float(ref_loss), rtol=1e-5)
  assert float(sums["count"][0]) == 6


@pytest.mark.slow
def test_pretrained_body_is_loaded_and_the_head_is_new(tmp_path):
  c = sdl_config.get_config()
  c.model_kwargs.widths = (4, 8)
  # "Pretrained" weights: the same body trained elsewhere, with a 5-way head.
  other = train_state.create_model(c, 5)
  p5, bs5 = train_state.initialized(train_state.prng_key(7), 16, other)
  path = tmp_path / "pretrained.msgpack"
  path.write_bytes(flax.serialization.msgpack_serialize(
      {"params": jax.device_get(p5), "batch_stats": jax.device_get(bs5)}))
  c.pretrained = str(path)
  model = train_state.create_model(c, 8)
  state = train_state.create_train_state(train_state.prng_key(0), c, model, 16, lambda t: 0.1)
  fresh, _ = train_state.initialized(train_state.prng_key(0), 16, model)
  np.testing.assert_array_equal(state.params["conv0_0"]["kernel"], p5["conv0_0"]["kernel"])
  np.testing.assert_array_equal(state.batch_stats["bn1_1"]["mean"], bs5["bn1_1"]["mean"])
  assert state.params["head"]["kernel"].shape == (8, 8)
  np.testing.assert_array_equal(state.params["head"]["kernel"], fresh["head"]["kernel"])


@pytest.mark.slow
def test_bfloat16_train_step_runs_and_keeps_float32_params():
  c = sdl_config.get_config()
  c.model_kwargs.widths = (4, 8)
  c.dtype = "bfloat16"
  model = train_state.create_model(c, 8)
  state = train_state.create_train_state(train_state.prng_key(1), c, model, 16, lambda t: 0.05)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(1, 4, 16, 16, 3)).astype(np.float32),
           "label": rng.integers(0, 8, (1, 4)).astype(np.int32),
           "distribution": rng.dirichlet(np.ones(8), (1, 4)).astype(np.float32),
           "mask": np.ones((1, 4), np.float32)}
  p_train, p_eval = train.make_pmapped_steps(c)
  new, sums = p_train(train_state.replicate(state), batch)
  assert np.isfinite(float(sums["loss"][0]))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new.params))
  ev = p_eval(new, batch)
  assert float(ev["count"][0]) == 4 and np.isfinite(float(ev["kl"][0]))


# ----------------------------------------------------------------------------------------
# Whole runs (real pipeline, real checkpoints).


def _tiny_config(cache_dir, **kw):
  """The default config shrunk: 300 images of 16 px, a 2-block CNN, a few steps."""
  c = sdl_config.get_config()
  c.data.num_examples = 300
  c.data.image_size = 16
  c.data.cache_dir = str(cache_dir)
  c.image_size, c.resize_size = 16, 18
  c.model_kwargs.widths = (8, 16)
  c.model_kwargs.stem_stride = 1
  c.batch_size = 8
  c.num_train_steps = 6
  c.warmup_steps = 2
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _params(workdir, config, which="latest"):
  state, _ = evaluate.restore(config, str(workdir), which)
  return jax.tree_util.tree_map(np.asarray, (state.params, state.batch_stats, state.opt_state))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir):
  """A tiny run of 6 steps straight through: (config, workdir, results)."""
  c = _tiny_config(cache_dir)
  wd = tmp_path_factory.mktemp("straight")
  return c, wd, train.train_and_evaluate(c, str(wd))


@pytest.mark.slow
def test_resume_gives_the_same_parameters_as_a_straight_run(tmp_path, straight_run, capsys):
  c, straight_wd, straight = straight_run
  assert straight["num_train_steps"] == 6 and "interrupted" not in straight

  # Stop after step 4 (not a checkpoint step), as a SIGTERM would.
  out = train.train_and_evaluate(c, str(tmp_path / "resumed"), stop_after_step=4)
  assert out["interrupted"] and out["step"] == 4
  assert (tmp_path / "resumed" / "checkpoints" / "4").is_dir()
  assert "Run the same command to resume" in capsys.readouterr().out
  again = train.train_and_evaluate(c, str(tmp_path / "resumed"))
  assert "resuming from step 4" in capsys.readouterr().out
  assert again["start_step"] == 4

  a = _params(straight_wd, c)
  b = _params(tmp_path / "resumed", c)
  # Same program, same data, same keys on the CPU: equal to the last bit. On a GPU, XLA
  # may add in another order from one run to the next (atomic reductions, convolution
  # algorithms chosen by autotuning): equal to float32 rounding, grown over 6 steps.
  if jax.default_backend() == "cpu":
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    np.testing.assert_equal(straight["test_last"], again["test_last"])
  else:
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    jax.tree_util.tree_map(close, (a, straight["test_last"]), (b, again["test_last"]))

  # The workdir holds what the docstring promises.
  wd = tmp_path / "resumed"
  for name in ("config.json", "run.json", "metrics.jsonl", "results.json", "report.md",
               "best.json"):
    assert (wd / name).is_file(), name
  assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
  lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  train_steps = [l["step"] for l in lines if l["split"] == "train"]
  assert train_steps == [2, 4, 6]  # the resumed run did not duplicate step 4's line
  assert [l["step"] for l in lines if l["split"] == "test"] == [6]
  assert "uniform distribution" in (wd / "report.md").read_text()


@pytest.mark.slow
def test_corrupt_or_incompatible_checkpoint_is_a_clear_error(tmp_path, straight_run):
  c, straight_wd, _ = straight_run
  wd = tmp_path / "wd"
  shutil.copytree(straight_wd, wd)
  ckpt = wd / "checkpoints" / "6"
  assert ckpt.is_dir()
  longer = _tiny_config(c.data.cache_dir, num_train_steps=9)

  # Incompatible: another model width.
  wider = _tiny_config(c.data.cache_dir, num_train_steps=9)
  wider.model_kwargs.widths = (8, 32)
  with pytest.raises(ckpt_lib.CheckpointError, match=re.escape(str(ckpt))):
    train.train_and_evaluate(wider, str(wd))

  # Corrupt: every file of both checkpoints overwritten with garbage (one broken
  # checkpoint alone is skipped for the intact one: test_faults.py).
  files = [f for f in (wd / "checkpoints").rglob("*") if f.is_file()]
  for f in files:
    f.write_bytes(b"not a checkpoint")
  with pytest.raises(ckpt_lib.CheckpointError, match=re.escape(str(ckpt))):
    train.train_and_evaluate(longer, str(wd))
  # Never deleted nor overwritten.
  assert all(f.read_bytes() == b"not a checkpoint" for f in files)
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["3", "6"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache_dir):
  wd = tmp_path / "wd"
  args = [sys.executable, str(REPO / "run.py"), f"--config={REPO / 'configs' / 'sdl.py'}",
          f"--workdir={wd}", "--config.data.num_examples=300", "--config.data.image_size=16",
          f"--config.data.cache_dir={cache_dir}", "--config.image_size=16",
          "--config.resize_size=18", "--config.model_kwargs.widths=(8,16)",
          "--config.model_kwargs.stem_stride=1", "--config.batch_size=8",
          "--config.num_train_steps=100000", "--config.log_every_steps=1",
          "--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000"]
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir / "xla"))
  proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)
  metrics_file = wd / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics_file.exists() and metrics_file.read_text().count("\n") >= 2:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert "SIGTERM: stopped at step" in out
  steps = [int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and steps[0] >= 2
  assert not (wd / "results.json").exists()


@pytest.mark.slow
def test_default_config_learns_on_a_reduced_synthetic_set(tmp_path, cache_dir):
  """The default config (model, optimizer, pipeline) on 1500 images for 150 steps."""
  c = sdl_config.get_config()
  c.data.num_examples = 1500
  c.data.cache_dir = str(cache_dir)
  c.num_train_steps = 150
  c.warmup_steps = 30
  c.eval_every_steps = 75
  c.checkpoint_every_steps = 75
  r = train.train_and_evaluate(c, str(tmp_path / "wd"))
  base = r["baselines"]
  assert r["test"]["count"] == 225
  # Clearly better than the training set's mean distribution, on KL and accuracy ...
  assert r["test"]["kl"] < 0.7 * base["train_mean"]["kl"], (r["test"], base)
  assert r["test"]["accuracy"] > base["train_mean"]["accuracy"] + 0.2
  # ... and, as it must be, not better than the oracle on KL beyond noise.
  assert r["test"]["kl"] > base["oracle"]["kl"] - 0.05


def test_checkpoints_accept_a_relative_workdir_with_dotdot(tmp_path, monkeypatch):
  """orbax wants absolute paths; a workdir like ../runs/a (as typed on a command line)
  once failed at the first save."""
  from sdl_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  (tmp_path / "here").mkdir()
  monkeypatch.chdir(tmp_path / "here")
  state = {"w": np.arange(3, dtype=np.float32), "step": np.int32(7)}
  ckpts = ckpt_lib.Checkpoints("../runs/a", keep=1, best_metric="kl", higher_is_better=False)
  ckpts.save(7, state)
  assert ckpts.save_best_if_improved(7, state, {"kl": 0.5})
  ckpts.wait()
  for which in ("latest", "best"):
    got = ckpts.restore(jax.tree_util.tree_map(np.zeros_like, state), which=which)
    np.testing.assert_array_equal(got["w"], state["w"])
  ckpts.close()
  assert (tmp_path / "runs" / "a" / "checkpoints" / "7").is_dir()
