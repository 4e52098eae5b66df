"""The train step's memory settings (``config.remat``, ``config.grad_accum_steps``) against
the plain step, their validation, and resident memory that does not grow over a run."""

import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import numpy as np
import pytest

from sdl_jax import train
from sdl_jax import train_state
from sdl_jax import validation

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import sdl as sdl_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _batch(n, size, classes=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, classes, n).astype(np.int32),
          "distribution": rng.dirichlet(np.ones(classes), n).astype(np.float32),
          "mask": np.ones(n, np.float32)}


def _one_step(config, model, batch, size):
  """(params, batch_stats, metric sums) after one pmapped library step from the same
  initial state (seed 1, constant rate 0.05)."""
  state = train_state.create_train_state(train_state.prng_key(1), config, model, size,
                                         lambda t: 0.05)
  p_train, _ = train.make_pmapped_steps(config)
  new_state, sums = p_train(train_state.replicate(state),
                            jax.tree_util.tree_map(lambda x: x[None], batch))
  got = train_state.unreplicate(new_state)
  return (jax.tree_util.tree_map(np.asarray, got.params),
          jax.tree_util.tree_map(np.asarray, got.batch_stats),
          {k: float(v[0]) for k, v in sums.items()})


def _assert_trees_close(a, b, rtol, atol):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol),
                         a, b)


def _bn_free_config():
  """A narrow VGG-16 (no BatchNorm), no dropout: its rows are independent, so a
  micro-batched gradient must equal the whole batch's."""
  c = sdl_config.get_config()
  c.model = "vgg16"
  c.model_kwargs = {"widths": (4, 4, 8, 8, 8), "fc_width": 16, "dropout_rate": 0.0}
  c.weight_decay = 0.01
  return c


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
def test_grad_accumulation_equals_one_step_on_the_whole_batch(k):
  c = _bn_free_config()
  model = train_state.create_model(c, 8)
  batch = _batch(8, 32)
  want_params, _, want_sums = _one_step(c, model, batch, 32)
  c.grad_accum_steps = k
  got_params, _, got_sums = _one_step(c, model, batch, 32)
  # One step moves the parameters by lr * (g + wd w): compare the moves, not only the
  # parameters (which barely change), so that a wrong gradient cannot hide in them.
  init = train_state.create_train_state(train_state.prng_key(1), c, model, 32,
                                        lambda t: 0.05).params
  move = lambda p: jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), p, init)
  assert max(np.abs(x).max() for x in jax.tree_util.tree_leaves(move(want_params))) > 1e-4
  _assert_trees_close(move(got_params), move(want_params), rtol=2e-4, atol=1e-7)
  assert set(got_sums) == set(want_sums) and "loss" in want_sums
  for name in want_sums:
    np.testing.assert_allclose(got_sums[name], want_sums[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)


@pytest.mark.slow
def test_grad_accumulation_with_batchnorm_differs_as_documented():
  """BatchNorm normalises each micro-batch by its own statistics: the same step is not
  expected; the running statistics are updated once per micro-batch."""
  c = sdl_config.get_config()
  c.model_kwargs.widths = (4, 8)
  c.model_kwargs.dropout_rate = 0.0
  model = train_state.create_model(c, 8)
  batch = _batch(8, 16)
  whole = _one_step(c, model, batch, 16)
  c.grad_accum_steps = 2
  split = _one_step(c, model, batch, 16)
  diff = max(np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(whole[0]),
                                                 jax.tree_util.tree_leaves(split[0])))
  assert diff > 1e-6
  # The running statistics: updated by each half in turn, as two plain forward passes do.
  fresh = train_state.create_train_state(train_state.prng_key(1), c, model, 16, lambda t: 0.05)
  stats, params = fresh.batch_stats, fresh.params
  for half in (slice(0, 4), slice(4, 8)):
    _, upd = model.apply({"params": params, "batch_stats": stats}, batch["image"][half],
                         train=True, mutable=["batch_stats"])
    stats = upd["batch_stats"]
  _assert_trees_close(split[1], jax.tree_util.tree_map(np.asarray, stats), rtol=1e-5,
                      atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_remat_gives_the_same_step(grad_accum):
  c = sdl_config.get_config()
  c.model_kwargs.widths = (4, 8)
  c.grad_accum_steps = grad_accum
  model = train_state.create_model(c, 8)
  batch = _batch(8, 16)
  want = _one_step(c, model, batch, 16)
  c.remat = True
  got = _one_step(c, model, batch, 16)
  _assert_trees_close(got[0], want[0], rtol=1e-5, atol=1e-6)
  _assert_trees_close(got[1], want[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[2]["loss"], want[2]["loss"], rtol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("remat", "yes", "config.remat must be True or False"),
    ("grad_accum_steps", 0, "config.grad_accum_steps must be an integer >= 1"),
    ("grad_accum_steps", 1.5, "config.grad_accum_steps must be an integer >= 1"),
    ("grad_accum_steps", 3, "config.grad_accum_steps=3 must divide config.batch_size=32"),
])
def test_step_settings_are_validated_naming_the_field(field, value, match):
  c = sdl_config.get_config()
  with c.ignore_type():
    c[field] = value
  with pytest.raises(ValueError, match=match):
    validation.validate_config(c)


def test_the_presets_default_to_the_plain_step():
  for preset in sdl_config.PRESETS:
    c = sdl_config.get_config(preset)
    assert (c.remat, c.grad_accum_steps) == (False, 1), preset
    validation.validate_step_config(c)


def test_a_per_device_batch_the_micro_batches_do_not_divide_is_a_clear_error():
  c = sdl_config.get_config()
  c.model_kwargs.widths = (4,)
  c.grad_accum_steps = 4
  model = train_state.create_model(c, 8)
  with pytest.raises(ValueError, match="config.grad_accum_steps=4 must divide the per-device "
                     "batch of 6 rows"):
    _one_step(c, model, _batch(6, 8), 8)


# A run of the synthetic preset, shortened, in a process of its own: the resident memory
# after each epoch (read from /proc/self/status when the loop logs, once an epoch).
_RUN = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from configs import sdl as sdl_config
from sdl_jax import run_io, train

def rss():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

c = sdl_config.get_config()
c.data.num_examples = 2500
c.data.cache_dir = sys.argv[2]
c.num_epochs = 3.0
spe = int(c.data.num_examples * c.data.split_fractions[0]) // c.batch_size
c.log_every_steps = spe
c.eval_every_steps = c.checkpoint_every_steps = 10 * spe
seen = []
write = run_io.MetricWriter.write
def logged(self, step, split, values):
  if split == "train":
    seen.append({"step": step, "rss": rss()})
  return write(self, step, split, values)
run_io.MetricWriter.write = logged
train.train_and_evaluate(c, sys.argv[3])
print(json.dumps({"steps_per_epoch": spe, "seen": seen}))
"""


@pytest.mark.slow
def test_resident_memory_does_not_grow_over_epochs(tmp_path):
  env = dict(os.environ, SDL_JAX_MALLOC="default")
  proc = subprocess.run([sys.executable, "-c", _RUN, str(REPO), str(tmp_path / "tfds"),
                         str(tmp_path / "work")], capture_output=True, text=True, env=env,
                        timeout=1200, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  spe = out["steps_per_epoch"]
  by_step = {s["step"]: s["rss"] for s in out["seen"]}
  assert sorted(by_step)[:3] == [spe, 2 * spe, 3 * spe], out
  first, third = by_step[spe], by_step[3 * spe]
  assert abs(third / first - 1) <= 0.05, (
      f"RSS after epoch 3 {third / 2**20:.0f} MiB vs epoch 1 {first / 2**20:.0f} MiB")
