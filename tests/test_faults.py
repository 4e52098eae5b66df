"""Faults injected into real command-line runs, each in a subprocess: SIGKILL while a
checkpoint is saved and while a data set is built, a full disk, a flipped block in the best
checkpoint, a truncated latest one, a workdir in use and a lock left by a killed process.

Faults are injected by ``_CHILD``: it replaces one function (``SDL_FAULT_AT``,
``module:attribute``) with one that SIGKILLs the process or raises ENOSPC when its
arguments mention ``SDL_FAULT_MATCH`` (or on its N-th call for ``#N``), then runs the
script it is given as ``__main__``. The product has no test hooks.
"""

import hashlib
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from sdl_jax import evaluate
from sdl_jax import integrity
from sdl_jax import workdir_lock

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import errno, importlib, os, runpy, signal, sys
at, match, how = (os.environ.get(f"SDL_FAULT{k}") for k in ("_AT", "_MATCH", ""))
if at:
  module, _, attr = at.partition(":")
  owner = importlib.import_module(module)
  *path, name = attr.split(".")
  for p in path:
    owner = getattr(owner, p)
  real, calls = getattr(owner, name), [0]
  def faulty(*args, **kwargs):
    calls[0] += 1
    hit = (calls[0] == int(match[1:])) if match.startswith("#") else match in repr(args)
    if hit and how == "kill":
      os.kill(os.getpid(), signal.SIGKILL)
    if hit and how == "enospc":
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), repr(args[0]))
    return real(*args, **kwargs)
  setattr(owner, name, faulty)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Where orbax writes a checkpoint's step metadata, the last file of a save; a fault there
# hits the save of step 6 after its arrays are written, before orbax commits it.
ORBAX_WRITE = "etils.epath.gpath:_GPath.write_text"
STEP6_METADATA = "checkpoints/6.orbax-checkpoint-tmp/_CHECKPOINT_METADATA"


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
  """A TFDS data directory and a JAX compilation cache shared by this module's runs."""
  root = tmp_path_factory.mktemp("fault_caches")
  return root / "tfds", root / "xla"


def _flags(tfds_dir):
  """run.py flags of the synthetic preset shrunk to seconds: 240 images of 16 px, a
  2-block CNN, 6 steps of batch 16, validation and checkpoints every 3 steps."""
  return [f"--config={REPO / 'configs' / 'sdl.py'}", "--config.data.num_examples=240",
          "--config.data.image_size=16", f"--config.data.cache_dir={tfds_dir}",
          "--config.image_size=16", "--config.resize_size=18",
          "--config.model_kwargs.widths=(8,16)", "--config.batch_size=16",
          "--config.num_train_steps=6", "--config.warmup_steps=1",
          "--config.eval_every_steps=3", "--config.checkpoint_every_steps=3",
          "--config.log_every_steps=3"]


def _run(script, args, caches, fault=None, timeout=300):
  """Runs ``script args`` in a child process, with ``fault = (how, at, match)``."""
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=str(caches[1]))
  for k in ("SDL_FAULT", "SDL_FAULT_AT", "SDL_FAULT_MATCH"):
    env.pop(k, None)
  if fault:
    env.update(SDL_FAULT=fault[0], SDL_FAULT_AT=fault[1], SDL_FAULT_MATCH=fault[2])
  return subprocess.run([sys.executable, "-c", _CHILD, str(script), *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _train(workdir, caches, fault=None):
  return _run(REPO / "run.py", _flags(caches[0]) + [f"--workdir={workdir}"], caches, fault)


def _state(workdir):
  """The latest checkpoint's parameters, batch statistics and optimizer state."""
  state, _ = evaluate.restore(evaluate.load_config(str(workdir)), str(workdir), "latest")
  return jax.tree_util.tree_map(np.asarray,
                                (state.params, state.batch_stats, state.opt_state))


def _assert_same_state(a, b):
  # Same program, same data, same keys on the CPU: equal to the last bit.
  jax.tree_util.tree_map(np.testing.assert_array_equal, _state(a), _state(b))


def _largest_file(checkpoint: Path) -> Path:
  """The largest file of array data (under a ``d/`` folder of orbax's OCDBT store)."""
  files = [f for f in checkpoint.rglob("*") if f.is_file() and f.parent.name == "d"]
  return max(files, key=lambda f: f.stat().st_size)


def _no_cascade(out: str):
  for noise in ("Event loop is closed", "cannot schedule new futures", "Exception ignored"):
    assert noise not in out, out[-4000:]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, caches):
  """A run of 6 steps that went straight through (checkpoints at 3 and 6)."""
  wd = tmp_path_factory.mktemp("straight") / "wd"
  p = _train(wd, caches)
  assert p.returncode == 0, p.stderr[-4000:]
  return wd


def _copy(straight, tmp_path) -> Path:
  wd = tmp_path / "wd"
  shutil.copytree(straight, wd)
  return wd


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_resumes_bit_identical(tmp_path, caches, straight):
  wd = tmp_path / "wd"
  p = _train(wd, caches, ("kill", ORBAX_WRITE, STEP6_METADATA))
  assert p.returncode == -signal.SIGKILL, p.stderr[-4000:]
  assert sorted(c.name for c in (wd / "checkpoints").iterdir()) == [
      "3", "6.orbax-checkpoint-tmp"]
  p = _train(wd, caches)
  assert p.returncode == 0, p.stderr[-4000:]
  assert "resuming from step 3" in p.stdout
  _assert_same_state(straight, wd)
  # Every checkpoint left is sealed with the digests of its files, and matches them.
  for kind in ("checkpoints", "checkpoints_best"):
    for step_dir in (wd / kind).iterdir():
      assert integrity.verify(str(step_dir)), step_dir


@pytest.mark.slow
def test_disk_full_during_a_save_is_a_clear_error_and_keeps_the_previous(tmp_path, caches):
  wd = tmp_path / "wd"
  p = _train(wd, caches, ("enospc", ORBAX_WRITE, STEP6_METADATA))
  assert p.returncode == 1
  last = p.stderr.strip().splitlines()[-1]
  # (orbax logs the failed write with its traceback above; the user's last line is ours)
  assert last.startswith("train: saving checkpoint") and "No space left on device" in last
  assert f"the previous checkpoint {wd / 'checkpoints' / '3'} is intact" in last
  _no_cascade(p.stderr)
  assert integrity.verify(str(wd / "checkpoints" / "3"))
  state, _ = evaluate.restore(evaluate.load_config(str(wd)), str(wd), "latest")
  assert int(state.step) == 3
  assert not (wd / "results.json").exists()


def _folders(root: Path, per_class=3):
  for c, emotion in enumerate(("amusement", "awe", "contentment", "excitement", "anger",
                               "disgust", "fear", "sadness")):
    (root / emotion).mkdir(parents=True)
    for i in range(per_class):
      pixels = np.random.default_rng(10 * c + i).integers(0, 256, (6, 5, 3), np.uint8)
      Image.fromarray(pixels).save(root / emotion / f"{emotion}_{i}.jpg")


_BUILD = """
import json, sys
import ml_collections
from sdl_jax import data
from sdl_jax.data import buildlog
cfg = ml_collections.ConfigDict({"name": "folders", "path": sys.argv[1]})
b = data.get_builder(cfg, sys.argv[2])
print(json.dumps(buildlog.build_summary(b)["splits"]))
"""


@pytest.mark.slow
def test_sigkill_during_a_data_set_build_then_the_rebuild_succeeds(tmp_path, caches):
  _folders(tmp_path / "FI")
  (tmp_path / "build.py").write_text(_BUILD)
  args = [tmp_path / "build.py", tmp_path / "FI", tmp_path / "cache"]
  # Killed at the 20th of 24 images: the first splits are written, the last is not.
  p = _run(args[0], args[1:], caches,
           ("kill", "sdl_jax.data.source_builder:_encode_or_error", "#20"))
  assert p.returncode == -signal.SIGKILL, p.stderr[-4000:]
  assert not list((tmp_path / "cache").rglob("dataset_info.json"))  # nothing finished
  p = _run(args[0], args[1:], caches)
  assert p.returncode == 0, p.stderr[-4000:]
  splits = json.loads(p.stdout.strip().splitlines()[-1])
  assert sum(s["written"] for s in splits.values()) == 24
  assert all(not s["skipped"] for s in splits.values())


@pytest.mark.slow
def test_flipped_block_in_the_best_checkpoint_is_refused_in_one_line(tmp_path, caches,
                                                                      straight):
  wd = _copy(straight, tmp_path)
  victim = _largest_file(wd / "checkpoints_best" / "6")
  data = bytearray(victim.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  victim.write_bytes(bytes(data))
  before = {n: (wd / n).read_bytes() for n in ("results.json", "report.md")}
  p = _run(REPO / "run.py", [f"--workdir={wd}", "--mode=evaluate"], caches)
  assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-4000:]
  refusals = [l for l in p.stderr.splitlines() if l.startswith("evaluate: ")]
  assert len(refusals) == 1 and refusals[0] == p.stderr.strip().splitlines()[-1]
  assert f"checkpoint {wd / 'checkpoints_best' / '6'} is broken" in refusals[0]
  assert str(victim) in refusals[0]
  assert "Traceback" not in p.stderr
  _no_cascade(p.stderr)
  assert {n: (wd / n).read_bytes() for n in before} == before
  # Prediction refuses it the same way.
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
  p = _run(REPO / "run.py", [f"--workdir={wd}", "--mode=predict",
                             f"--images={tmp_path / 'x.png'}"], caches)
  assert p.returncode == 1 and not p.stdout
  assert p.stderr.strip().splitlines()[-1].startswith(
      f"predict: checkpoint {wd / 'checkpoints_best' / '6'} is broken")
  assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_intact_one(tmp_path, caches,
                                                                  straight):
  wd = _copy(straight, tmp_path)
  victim = _largest_file(wd / "checkpoints" / "6")
  size = victim.stat().st_size // 2
  os.truncate(victim, size)
  p = _train(wd, caches)
  assert p.returncode == 0, p.stderr[-4000:]
  warnings = [l for l in p.stderr.splitlines() if l.startswith("W") and "is broken" in l]
  assert len(warnings) == 1, p.stderr[-4000:]
  assert f"checkpoint {wd / 'checkpoints' / '6'} is broken" in warnings[0]
  assert str(wd / "checkpoints" / "3") in warnings[0]
  assert "resuming from step 3" in p.stdout
  # Moved aside, not deleted: the broken file is still there to look at.
  kept = wd / "checkpoints_broken" / "6" / victim.relative_to(wd / "checkpoints" / "6")
  assert kept.stat().st_size == size
  _assert_same_state(straight, wd)


_HOLD = """
import sys, time
from sdl_jax import workdir_lock
workdir_lock.WorkdirLock(sys.argv[1], "training").acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_locked_workdir_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, caches,
                                                                        straight):
  wd = _copy(straight, tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(wd)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
    p = _train(wd, caches)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("train: ") and "Traceback" not in p.stderr
    assert f"workdir {wd} is in use by process {holder.pid}" in last, p.stderr[-4000:]
    p = _run(REPO / "run.py", [f"--workdir={wd}", "--mode=evaluate"], caches)
    assert p.returncode == 1 and f"in use by process {holder.pid}" in p.stderr
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The holder died holding the lock: the next run takes it over and says so.
  p = _train(wd, caches)
  assert p.returncode == 0, p.stderr[-4000:]
  taken = [l for l in p.stderr.splitlines() if "taking it over" in l]
  assert len(taken) == 1 and f"process {holder.pid}" in taken[0], p.stderr[-4000:]
  assert "no longer running" in taken[0]
  assert (wd / "workdir.lock").read_text() == ""  # released cleanly at the end


def test_manifest_is_sha256sum_format_and_catches_every_change(tmp_path):
  d = tmp_path / "ckpt"
  (d / "sub").mkdir(parents=True)
  (d / "a").write_bytes(b"alpha")
  (d / "sub" / "b").write_bytes(bytes(range(256)) * 100)
  assert not integrity.verify(str(d))  # no manifest: nothing checked
  integrity.write_manifest(str(d))
  want = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {name}\n"
                 for name, p in (("a", d / "a"), ("sub/b", d / "sub" / "b")))
  assert (d / integrity.MANIFEST).read_text() == want
  assert integrity.verify(str(d))
  os.truncate(d / "sub" / "b", 100)
  with pytest.raises(integrity.IntegrityError, match=r"sub/b \(100 bytes\) does not match"):
    integrity.verify(str(d))
  (d / "sub" / "b").unlink()
  with pytest.raises(integrity.IntegrityError, match=r"sub/b is missing"):
    integrity.verify(str(d))
  (d / integrity.MANIFEST).write_text("not a digest  a\n")
  with pytest.raises(integrity.IntegrityError, match=r"SHA256SUMS:1: not a"):
    integrity.verify(str(d))


def test_lock_refuses_a_second_holder_and_is_empty_once_released(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path), "training")
  with first:
    record = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["purpose"] == "training"
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=f"in use by process {os.getpid()} on .* \\(training, since"):
      workdir_lock.WorkdirLock(str(tmp_path), "evaluation").acquire()
  assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ""
  with workdir_lock.WorkdirLock(str(tmp_path), "evaluation"):  # free again
    pass
  assert workdir_lock.WorkdirLock(str(tmp_path), "x", active=False).acquire() is None


def test_resume_step_skips_broken_checkpoints_and_accepts_unsealed_ones(tmp_path, caplog):
  from sdl_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  state = {"w": np.arange(4, dtype=np.float32)}
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), keep=3, best_metric="kl",
                               higher_is_better=False)
  for step in (1, 2, 3):
    ckpts.save(step, {"w": state["w"] + step})
  ckpts.wait()
  ckpts.close()
  latest = tmp_path / "checkpoints"
  assert all(integrity.verify(str(latest / str(s))) for s in (1, 2, 3))
  (latest / "2" / integrity.MANIFEST).unlink()  # as an older version left it
  victim = _largest_file(latest / "3")
  victim.write_bytes(victim.read_bytes()[:-1])

  ckpts = ckpt_lib.Checkpoints(str(tmp_path), keep=3, best_metric="kl",
                               higher_is_better=False)
  with caplog.at_level("WARNING"):
    assert ckpts.resume_step() == 2
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any(f"checkpoint {latest / '3'} is broken" in w and "checkpoints_broken" in w
             for w in warnings), warnings
  assert any(f"{latest / '2'} has no SHA256SUMS" in w for w in warnings), warnings
  assert (tmp_path / "checkpoints_broken" / "3").is_dir() and not (latest / "3").exists()
  assert ckpts.latest_step() == 2
  got = ckpts.restore({"w": np.zeros(4, np.float32)}, "latest", 2)
  np.testing.assert_array_equal(got["w"], state["w"] + 2)
  ckpts.close()

  # Every one broken: an error naming each, and nothing moved.
  for s in (1, 2):
    integrity.write_manifest(str(latest / str(s)))
    f = _largest_file(latest / str(s))
    data = f.read_bytes()
    f.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), keep=3, best_metric="kl",
                               higher_is_better=False)
  with pytest.raises(ckpt_lib.CheckpointError, match="no intact checkpoint to resume from"):
    ckpts.resume_step()
  assert sorted(p.name for p in latest.iterdir()) == ["1", "2"]
  ckpts.close()
