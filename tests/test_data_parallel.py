"""Data parallelism in this process, over ``jax.local_device_count()`` devices.

CI runs these tests twice: in the plain pass (one CPU device) and again with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (``-m multidevice``). The
expectations follow the device count: each device's share of the batch, the replicated
state's leading axis, BatchNorm statistics averaged over the devices; the results of the
train and eval steps must equal one device's on the whole batch. (``test_distributed``
covers 1, 2 and 4 devices and two processes in subprocesses.)
"""

import os
import re
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdl_jax import checkpoint as ckpt_lib
from sdl_jax import losses
from sdl_jax import metrics as metrics_lib
from sdl_jax import optim
from sdl_jax import train
from sdl_jax import train_state

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import sdl as sdl_config  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.multidevice

GLOBAL_BATCH, CLASSES, SIZE, LR = 8, 5, 8, 0.1


class ConvHead(nn.Module):
  """Conv-ReLU-mean-Dense: no BatchNorm, no dropout, so that nothing in it depends on how
  the batch is split."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


def _config():
  c = sdl_config.get_config()
  c.lam, c.momentum, c.weight_decay = 0.8, 0.9, 0.01
  c.head_lr_mult = c.bias_lr_mult = 1.0
  return c


def _state(config):
  model = ConvHead(CLASSES)
  params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  tx = optim.create_optimizer(config, optax.constant_schedule(LR), params, "head")
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                       batch_stats={})


def _batch(seed, padded_rows=0):
  rng = np.random.default_rng(seed)
  mask = np.r_[np.ones(GLOBAL_BATCH - padded_rows), np.zeros(padded_rows)].astype(np.float32)
  label = rng.integers(0, CLASSES, GLOBAL_BATCH).astype(np.int32)
  dist = rng.dirichlet(np.ones(CLASSES), GLOBAL_BATCH).astype(np.float32)
  label[mask == 0], dist[mask == 0] = -1, 0.0  # as the input pipeline pads
  return {"image": rng.normal(size=(GLOBAL_BATCH, SIZE, SIZE, 3)).astype(np.float32),
          "label": label, "distribution": dist, "mask": mask}


def _split(batch):
  """The global batch as pmap takes it: ``[devices, rows per device, ...]``."""
  n = jax.local_device_count()
  return {k: v.reshape((n, -1) + v.shape[1:]) for k, v in batch.items()}


def _forced_device_count():
  m = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                os.environ.get("XLA_FLAGS", ""))
  return int(m.group(1)) if m else None


def test_forced_device_count_is_in_effect():
  """The multi-device pass really runs on several devices (and the plain pass on one)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the device count is forced on the CPU backend only")
  assert jax.local_device_count() == (_forced_device_count() or 1)


def test_train_step_over_local_devices_equals_one_device_sgd():
  """Two pmapped train steps over the local devices give the parameters, momentum and
  metric sums of plain autodiff + the same optimizer on the whole batch on one device."""
  config = _config()
  n = jax.local_device_count()
  state = _state(config)
  p_train, _ = train.make_pmapped_steps(config)
  replicated = train_state.replicate(state)
  params, opt_state = state.params, state.opt_state
  for step in range(2):
    batch = _batch(step)
    local = _split(batch)
    assert local["image"].shape[:2] == (n, GLOBAL_BATCH // n)
    replicated, sums = p_train(replicated, local)

    def loss(p, batch=batch):
      logits = state.apply_fn({"params": p}, batch["image"])
      return losses.sdl_loss_reference(logits, batch["label"], batch["distribution"], 0.8)

    want_loss, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = state.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # Every device holds the global sums: GLOBAL_BATCH rows and their summed loss.
    np.testing.assert_array_equal(sums["count"], np.full(n, GLOBAL_BATCH, np.float32))
    np.testing.assert_allclose(sums["loss"], np.full(n, GLOBAL_BATCH * want_loss), rtol=1e-5)
  for leaf in jax.tree_util.tree_leaves(replicated.params):
    assert leaf.shape[0] == n  # one copy per device
  got = train_state.unreplicate(replicated)
  assert int(got.step) == 2
  check = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  jax.tree_util.tree_map(check, got.params, params)
  jax.tree_util.tree_map(check, got.opt_state, opt_state)
  moved = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b, rtol=2e-5, atol=2e-6),
                                 got.params, state.params)
  assert all(jax.tree_util.tree_leaves(moved))  # the comparison is not of the initial state


def test_eval_step_sums_over_local_devices_equal_the_whole_batch():
  """Masked eval sums, psum-med over the devices (the last device's last rows padded),
  finalised: the measures of the real rows computed on one device."""
  config = _config()
  state = _state(config)
  batch = _batch(7, padded_rows=3)
  _, p_eval = train.make_pmapped_steps(config)
  sums = p_eval(train_state.replicate(state), _split(batch))
  for k, v in sums.items():  # every device holds the global sums
    np.testing.assert_array_equal(v, np.full(jax.local_device_count(), v[0]), err_msg=k)
  got = metrics_lib.finalize(jax.tree_util.tree_map(lambda x: x[0], sums))
  real = {k: v[:GLOBAL_BATCH - 3] for k, v in batch.items()}
  logits = state.apply_fn({"params": state.params}, real["image"])
  want = metrics_lib.finalize(metrics_lib.batch_sums(
      jax.nn.softmax(logits), real["label"], real["distribution"],
      loss=losses.per_example_loss(logits, real["label"], real["distribution"], 0.8)))
  assert got["count"] == want["count"] == GLOBAL_BATCH - 3
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


def test_batch_stats_averaged_then_checkpointed_and_restored(tmp_path):
  """``sync_batch_stats`` averages per-device BatchNorm statistics (device i holds i: the
  mean is (n - 1) / 2); the host copy goes through an orbax checkpoint and back onto every
  device unchanged."""
  n = jax.local_device_count()
  state = _state(_config())
  replicated = train_state.replicate(state)
  # A pmapped identity leaves row i on device i.
  per_device = jax.pmap(lambda x: x)(np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, 1))
  replicated = replicated.replace(batch_stats={"bn": {"mean": per_device}})
  synced = train.sync_batch_stats(replicated)
  np.testing.assert_allclose(synced.batch_stats["bn"]["mean"],
                             np.full((n, 3), (n - 1) / 2, np.float32))
  host = train_state.unreplicate(synced)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), keep=1, best_metric="kl",
                               higher_is_better=False)
  ckpts.save(4, host)
  ckpts.wait()
  template = jax.tree_util.tree_map(np.zeros_like, host)
  restored = train_state.replicate(ckpts.restore(template, "latest"))
  ckpts.close()
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(synced)):
    assert a.shape == b.shape and a.shape[0] == n
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
