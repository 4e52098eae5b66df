"""Orbax checkpoints of the TrainState: the last ``k`` and the best on validation.

Layout under the workdir::

    checkpoints/<step>/        the latest ``keep`` checkpoints (orbax, StandardSave)
    checkpoints_best/<step>/   the best one on the validation metric
    best.json                  {"step", "metric", "value", "validation": {...}} of that one
    checkpoints_broken/<step>/ latest checkpoints that failed their check when resuming

Checkpoints hold the unreplicated ``TrainState`` (step, params, optimizer state, batch
statistics). Everything else a resumed run needs is a function of the config and the step
(the data stream and the dropout keys), so resuming is exact.

Integrity: once orbax has committed a checkpoint (its asynchronous save has finished and
the directory has its final name), process 0 writes the SHA-256 of each of its files to
``<step>/SHA256SUMS`` (``sdl_jax.integrity``); every restore checks them first. A
checkpoint whose files differ is *broken*: ``restore`` refuses it with ``CheckpointError``
before orbax reads a byte, and a resumed run (``resume_step``) falls back to the newest
intact latest checkpoint, with a WARNING naming the broken ones, which it moves to
``checkpoints_broken/`` (never deletes). A checkpoint without ``SHA256SUMS`` (written by
an older version, or by a run killed between orbax's commit and the manifest) is restored
with a WARNING that it could not be checked.

A checkpoint that cannot be read, or whose arrays do not match the model the config
builds, raises ``CheckpointError`` naming its directory. Nothing here ever deletes or
overwrites a checkpoint it could not read: orbax only prunes checkpoints it wrote.
"""

from __future__ import annotations

import json
import math
import os

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sdl_jax import integrity

BROKEN_DIR = "checkpoints_broken"


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored into the state this config builds."""


def _abstract(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def _check_matches(restored, target, where):
  """Raises CheckpointError unless ``restored`` has ``target``'s structure and shapes."""
  r_leaves, r_def = jax.tree_util.tree_flatten_with_path(restored)
  t_leaves, t_def = jax.tree_util.tree_flatten_with_path(target)
  if r_def != t_def:
    raise CheckpointError(
        f"checkpoint {where} does not hold the state this config builds (different tree "
        "structure: another model, optimizer or number of classes?). It was left untouched; "
        "use another --workdir, or move the checkpoint away to start afresh.")
  for (path, r), (_, t) in zip(r_leaves, t_leaves):
    if np.shape(r) != np.shape(t):
      raise CheckpointError(
          f"checkpoint {where}: {jax.tree_util.keystr(path)} has shape {np.shape(r)}, "
          f"the model this config builds expects {np.shape(t)}. It was left untouched; "
          "use another --workdir, or move the checkpoint away to start afresh.")


class Checkpoints:
  """The latest-k and best checkpoint managers of one workdir."""

  def __init__(self, workdir: str, keep: int, best_metric: str, higher_is_better: bool):
    # orbax needs absolute paths (a relative workdir such as ../runs/a failed at the
    # first save).
    self.workdir = epath.Path(os.path.abspath(workdir))
    self.best_metric = best_metric
    self.higher_is_better = higher_is_better
    self._latest = ocp.CheckpointManager(
        self.workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True))
    self._best = ocp.CheckpointManager(
        self.workdir / "checkpoints_best",
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    self._unsealed: list[int] = []  # latest steps saved whose manifest is not written yet
    self.best_info = self._read_best_info()

  # -- bookkeeping -------------------------------------------------------------------

  def _best_json(self):
    return self.workdir / "best.json"

  def _read_best_info(self):
    path = self._best_json()
    if not path.exists():
      return None
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{path} is unreadable ({e}); it was left untouched") from e

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return self._best.latest_step()

  def directory(self, which: str, step: int) -> str:
    root = "checkpoints" if which == "latest" else "checkpoints_best"
    return os.fspath(self.workdir / root / str(step))

  # -- integrity -----------------------------------------------------------------------

  def _seal(self, which: str, step: int) -> None:
    """Writes the manifest of a committed checkpoint (process 0; all files are there)."""
    where = self.directory(which, step)
    if jax.process_index() == 0 and os.path.isdir(where):
      try:
        integrity.write_manifest(where)
      except OSError as e:
        raise CheckpointError(f"writing {where}/{integrity.MANIFEST} failed: {e}; the "
                              "checkpoint itself is complete (it will be restored "
                              "unchecked)") from e

  def _problem(self, which: str, step: int) -> str | None:
    """Why the checkpoint does not match its manifest; ``None`` if it does, or if it has
    no manifest (after a WARNING)."""
    where = self.directory(which, step)
    try:
      checked = integrity.verify(where)
    except integrity.IntegrityError as e:
      return f"checkpoint {where} is broken: {e}"
    if not checked:
      logging.warning("checkpoint %s has no %s (written by an older version, or its run "
                      "stopped right after saving it): restoring it unchecked", where,
                      integrity.MANIFEST)
    return None

  def verify(self, which: str, step: int) -> None:
    """Checks the ``which`` checkpoint of ``step`` against its manifest (a WARNING if it
    has none).

    Raises:
      CheckpointError: one line naming the checkpoint and the file that differs.
    """
    problem = self._problem(which, step)
    if problem:
      raise CheckpointError(f"{problem}. It was left untouched; restore it from a copy or "
                            "move it away")

  def resume_step(self) -> int | None:
    """The newest latest checkpoint that passes ``verify``, ``None`` if there is none.

    Newer broken ones are moved to ``checkpoints_broken/`` (by process 0) with a WARNING
    naming each, so that the run can save those steps again.

    Raises:
      CheckpointError: there are latest checkpoints and every one of them is broken.
    """
    broken = []
    for step in sorted(self._latest.all_steps(), reverse=True):
      problem = self._problem("latest", step)
      if problem:
        broken.append((step, problem))
        continue
      for bad, why in broken:
        moved = self._quarantine(bad) if jax.process_index() == 0 else "(by process 0)"
        logging.warning("%s; moved to %s; resuming from the newest intact checkpoint, %s",
                        why, moved, self.directory("latest", step))
      if broken:
        self._latest.reload()
      return step
    if broken:
      raise CheckpointError("no intact checkpoint to resume from: " +
                            "; ".join(why for _, why in broken) +
                            ". They were left untouched; move them away to start afresh")
    return None

  def _quarantine(self, step: int) -> str:
    src = self.directory("latest", step)
    root = os.fspath(self.workdir / BROKEN_DIR)
    os.makedirs(root, exist_ok=True)
    dst, k = os.path.join(root, str(step)), 1
    while os.path.exists(dst):
      k += 1
      dst = os.path.join(root, f"{step}-{k}")
    os.rename(src, dst)
    return dst

  # -- saving --------------------------------------------------------------------------

  def _previous(self, step: int) -> str:
    done = [s for s in self._latest.all_steps() if s < step]
    return (f"the previous checkpoint {self.directory('latest', max(done))} is intact"
            if done else "there is no earlier checkpoint")

  def _failed(self, which: str, step: int, error: Exception) -> CheckpointError:
    """The error to raise for a failed save, after stopping orbax's threads."""
    for mgr in (self._latest, self._best):
      try:
        mgr.close()
      except Exception:  # pylint: disable=broad-except
        pass  # The same failure again, from a thread that was still running.
    return CheckpointError(
        f"saving checkpoint {self.directory(which, step)} failed: {type(error).__name__}: "
        f"{error}; {self._previous(step)}. Fix the cause (disk space?) and run the same "
        "command to resume")

  def _finish_latest(self) -> None:
    """Waits for the pending latest saves and writes their manifests."""
    if not self._unsealed:
      return
    try:
      self._latest.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed("latest", self._unsealed[-1], e) from e
    for step in self._unsealed:
      self._seal("latest", step)
    self._unsealed = []

  def save(self, step: int, state) -> None:
    """Saves ``state`` (host arrays) as the checkpoint of ``step`` (async; its manifest
    is written when the next save starts, or at ``wait``)."""
    if self._latest.latest_step() == step:
      return
    self._finish_latest()
    try:
      self._latest.save(step, args=ocp.args.StandardSave(state))
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed("latest", step, e) from e
    self._unsealed.append(step)

  def improves(self, value: float) -> bool:
    if value is None or not math.isfinite(value):
      return False
    if self.best_info is None:
      return True
    best = self.best_info["value"]
    return value > best if self.higher_is_better else value < best

  def save_best_if_improved(self, step: int, state, validation: dict) -> bool:
    """Saves ``state`` as the best checkpoint if ``validation[best_metric]`` improves."""
    value = validation[self.best_metric]
    if not self.improves(value):
      return False
    try:
      self._best.save(step, args=ocp.args.StandardSave(state), force=True)
      self._best.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed("best", step, e) from e
    self._seal("best", step)
    self.best_info = {"step": int(step), "metric": self.best_metric, "value": float(value),
                      "validation": validation}
    if jax.process_index() == 0:
      tmp = self._best_json().with_suffix(".json.tmp")
      tmp.write_text(json.dumps(self.best_info, indent=2))
      os.replace(tmp, self._best_json())
    return True

  # -- restoring -----------------------------------------------------------------------

  def restore(self, target, which: str = "latest", step: int | None = None,
              check: bool = True):
    """Restores the ``which`` ('latest' | 'best') checkpoint into ``target``'s structure,
    after checking it against its manifest (``verify``).

    Args:
      target: a freshly created state (concrete or abstract) of the same config.
      which: ``'latest'`` or ``'best'``.
      step: a specific step; default the newest of that kind.
      check: ``verify`` it first (``False`` only right after ``resume_step`` chose it).

    Returns:
      The restored state (host arrays), or ``None`` if there is no such checkpoint.

    Raises:
      CheckpointError: naming the checkpoint directory if it is broken, corrupt or
        incompatible.
    """
    mgr = {"latest": self._latest, "best": self._best}.get(which)
    if mgr is None:
      raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    step = mgr.latest_step() if step is None else step
    if step is None:
      return None
    where = self.directory(which, step)
    if check:
      self.verify(which, step)
    try:
      restored = mgr.restore(step, args=ocp.args.StandardRestore(_abstract(target)))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint {where} could not be restored: {type(e).__name__}: {e}. "
          "It is corrupt or was written by an incompatible config or version. It was left "
          "untouched; use another --workdir, or move it away to start afresh.") from e
    _check_matches(restored, target, where)
    return restored

  def wait(self) -> None:
    """Waits for every save to finish and writes the pending manifests."""
    self._finish_latest()
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()
