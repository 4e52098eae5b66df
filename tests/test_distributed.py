"""Data parallelism: 1 vs 4 CPU devices, and 2 processes with jax.distributed on localhost.

Each case runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count``.
The step-equivalence tests use a model without BatchNorm or dropout (registered by the
worker): per-device BatchNorm statistics and per-device dropout keys legitimately depend
on how the global batch is split, everything else must not. Tolerance: float32 sums in
another order, ``rtol=2e-5, atol=2e-6`` on every parameter after 3 steps.
"""

import os
from pathlib import Path
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RTOL, ATOL = 2e-5, 2e-6
STEPS, GLOBAL_BATCH = 3, 16

WORKER = r'''
import sys
mode, out = sys.argv[1], sys.argv[2]
import jax
if mode == "dist":
  pid, port = int(sys.argv[3]), sys.argv[4]
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
from typing import Any
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
sys.path.insert(0, sys.argv[-1])
from configs import sdl as sdl_config
from sdl_jax import models, train, train_state


class TinyNet(nn.Module):
  """Conv-ReLU-pool-Dense: no BatchNorm, no dropout."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), dtype=self.dtype)(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x.mean((1, 2)))


models.MODEL_SPECS["tiny_test"] = models.ModelSpec("__main__:TinyNet", 12, (127.5,) * 3,
                                                   (127.5,) * 3)
c = sdl_config.get_config()
c.model = "tiny_test"
c.model_kwargs = ml_collections.ConfigDict()
c.schedule, c.learning_rate, c.weight_decay = "constant", 0.1, 0.01
c.batch_size = GLOBAL_BATCH = %(batch)d
model = train_state.create_model(c, 8)
lr_fn = train_state.create_learning_rate_fn(c, 10, 100)
state0 = train_state.create_train_state(train_state.prng_key(0), c, model, 12, lr_fn)
rng = np.random.default_rng(0)
batches = [{"image": rng.normal(size=(GLOBAL_BATCH, 12, 12, 3)).astype(np.float32),
            "label": rng.integers(0, 8, GLOBAL_BATCH).astype(np.int32),
            "distribution": rng.dirichlet(np.ones(8), GLOBAL_BATCH).astype(np.float32),
            "mask": np.ones(GLOBAL_BATCH, np.float32)} for _ in range(%(steps)d)]


def flat_params(state):
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def run(rows, devices):
  """Trains on rows of each global batch, split over ``devices``; returns flat params."""
  p_train, _ = train.make_pmapped_steps(c)
  state = train_state.replicate(state0, devices=devices)
  n = len(devices)
  for b in batches:
    local = {k: v[rows].reshape((n, -1) + v.shape[1:]) for k, v in b.items()}
    state, sums = p_train(state, local)
  assert float(sums["count"][0]) == GLOBAL_BATCH  # psum covers the global batch
  return flat_params(train_state.unreplicate(state))


everything = np.arange(GLOBAL_BATCH)
if mode == "local":
  result = {f"init{k}": v for k, v in flat_params(state0).items()}
  for n in (1, 2, 4):
    for k, v in run(everything, jax.local_devices()[:n]).items():
      result[f"{n}{k}"] = v
  np.savez(out, **result)
else:
  half = GLOBAL_BATCH // 2
  rows = everything[pid * half:(pid + 1) * half]  # each process feeds its own shard
  params = run(rows, jax.local_devices())
  np.savez(out, **{f"dist{k}": v for k, v in params.items()})
  jax.distributed.shutdown()
''' % {"batch": GLOBAL_BATCH, "steps": STEPS}


# Subprocesses share a persistent XLA compilation cache (unless the caller set one): the
# same programs are compiled by several workers, and again in the resume round.
_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or tempfile.mkdtemp(prefix="sdl_jax_xla_")


def _env(devices):
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def _split(npz, prefix):
  return {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("dp") / "local.npz"
  r = subprocess.run([sys.executable, "-c", WORKER, "local", str(out), str(REPO)],
                     env=_env(4), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  npz = np.load(out)
  return {n: _split(npz, str(n)) for n in (1, 2, 4, "init")}


def _assert_same(a, b):
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=ATOL, err_msg=k)


@pytest.mark.slow
def test_pmap_over_4_devices_matches_1_device(local_runs):
  _assert_same(local_runs[4], local_runs[1])
  _assert_same(local_runs[2], local_runs[1])
  # And training moved every parameter away from its initial value by more than the
  # comparison tolerates (so it is not between untouched copies of the initial state).
  init = local_runs["init"]
  assert init.keys() == local_runs[1].keys()
  for k, v in local_runs[1].items():
    assert not np.allclose(v, init[k], rtol=RTOL, atol=ATOL), k


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed_match_one_process(local_runs, tmp_path):
  port = str(_free_port())
  outs = [tmp_path / f"p{i}.npz" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, "dist", str(outs[i]), str(i), port,
                             str(REPO)], env=_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    try:
      _, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-4000:]
  p0, p1 = (_split(np.load(o), "dist") for o in outs)
  _assert_same(p0, p1)
  # Per-device batch 4 on 2 x 2 devices vs the whole global batch of 16 on one device.
  _assert_same(p0, local_runs[1])


E2E_WORKER = r'''
import sys
pid, port, workdir, cache, steps, repo = sys.argv[1:7]
sys.path.insert(0, repo)
from configs import sdl as sdl_config
from sdl_jax import train
c = sdl_config.get_config()
c.distributed = True
c.coordinator_address, c.num_processes, c.process_id = f"127.0.0.1:{port}", 2, int(pid)
c.data.num_examples, c.data.image_size, c.data.cache_dir = 300, 16, cache
c.image_size, c.resize_size = 16, 18
c.model_kwargs.widths, c.model_kwargs.stem_stride = (8, 16), 1
c.batch_size, c.num_train_steps, c.warmup_steps = 8, int(steps), 2
c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 3, 3
r = train.train_and_evaluate(c, workdir)
print("RESULT", r["test"]["count"], repr(r["test"]["kl"]), r["start_step"])
'''


# jaxlib's Gloo key exchange gives a peer a fixed 30 s to reach a process's first
# collective; on a loaded 2-core machine one worker can be that late (seen once in a full
# suite, never alone). Such a pair is run once more; any other failure fails the test.
GLOO_TIMEOUT = "Gloo context initialization failed: DEADLINE_EXCEEDED"


def _run_pair(script_args, timeout=600, retries=1):
  try:
    return _run_pair_once(script_args, timeout)
  except AssertionError as e:
    if retries > 0 and GLOO_TIMEOUT in str(e):
      print(f"retrying the pair after a Gloo key-exchange timeout: {str(e)[-300:]}")
      return _run_pair(script_args, timeout, retries - 1)
    raise


def _run_pair_once(script_args, timeout):
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", E2E_WORKER, str(i), port, *script_args],
                            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    if p.returncode != 0:
      for q in procs:  # the peer must not go on writing the workdir of a retry
        q.kill()
        q.wait()
    assert p.returncode == 0, out[-4000:]
    outs.append(out)
  return outs


@pytest.mark.slow
def test_two_processes_train_evaluate_checkpoint_and_resume(tmp_path):
  """train_and_evaluate on 2 processes x 2 devices: exact evaluation over the whole test
  split on both, one shared workdir written by process 0, orbax checkpoints from both, and
  a resume."""
  import ml_collections
  from sdl_jax import data
  cache, wd = tmp_path / "tfds", tmp_path / "wd"
  # Build the data set once here: two processes must not build it at the same time.
  data.get_builder(ml_collections.ConfigDict(
      {"name": "synthetic", "num_examples": 300, "seed": 0, "image_size": 16, "path": None}),
      data_dir=str(cache))
  first = _run_pair([str(wd), str(cache), "3", str(REPO)])
  second = _run_pair([str(wd), str(cache), "6", str(REPO)])
  for outs, start in ((first, 0), (second, 3)):
    results = [l for o in outs for l in o.splitlines() if l.startswith("RESULT")]
    assert len(results) == 2 and results[0] == results[1], results  # same metrics on both
    count, _, start_step = results[0].split()[1:]
    assert int(count) == 45 and int(start_step) == start  # the whole test split, once
  assert all("resuming from step 3" in o for o in second)
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["3", "6"]
  assert (wd / "results.json").is_file() and (wd / "report.md").is_file()
