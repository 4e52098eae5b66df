"""Orbax checkpoints of the TrainState: the last ``k`` and the best on validation.

Layout under the workdir::

    checkpoints/<step>/        the latest ``keep`` checkpoints (orbax, StandardSave)
    checkpoints_best/<step>/   the best one on the validation metric
    best.json                  {"step", "metric", "value", "validation": {...}} of that one

Checkpoints hold the unreplicated ``TrainState`` (step, params, optimizer state, batch
statistics). Everything else a resumed run needs is a function of the config and the step
(the data stream and the dropout keys), so resuming is exact.

A checkpoint that cannot be read, or whose arrays do not match the model the config
builds, raises ``CheckpointError`` naming its directory. Nothing here ever deletes or
overwrites a checkpoint it could not read: orbax only prunes checkpoints it wrote.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


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

  # -- saving --------------------------------------------------------------------------

  def save(self, step: int, state) -> None:
    """Saves ``state`` (host arrays) as the checkpoint of ``step`` (async)."""
    if self._latest.latest_step() == step:
      return
    self._latest.save(step, args=ocp.args.StandardSave(state))

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
    self._best.save(step, args=ocp.args.StandardSave(state), force=True)
    self._best.wait_until_finished()
    self.best_info = {"step": int(step), "metric": self.best_metric, "value": float(value),
                      "validation": validation}
    if jax.process_index() == 0:
      tmp = self._best_json().with_suffix(".json.tmp")
      tmp.write_text(json.dumps(self.best_info, indent=2))
      os.replace(tmp, self._best_json())
    return True

  # -- restoring -----------------------------------------------------------------------

  def restore(self, target, which: str = "latest", step: int | None = None):
    """Restores the ``which`` ('latest' | 'best') checkpoint into ``target``'s structure.

    Args:
      target: a freshly created state (concrete or abstract) of the same config.
      which: ``'latest'`` or ``'best'``.
      step: a specific step; default the newest of that kind.

    Returns:
      The restored state (host arrays), or ``None`` if there is no such checkpoint.

    Raises:
      CheckpointError: naming the checkpoint directory if it is corrupt or incompatible.
    """
    mgr = {"latest": self._latest, "best": self._best}.get(which)
    if mgr is None:
      raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    step = mgr.latest_step() if step is None else step
    if step is None:
      return None
    where = self.directory(which, step)
    try:
      restored = mgr.restore(step, args=ocp.args.StandardRestore(_abstract(target)))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint {where} could not be restored: {type(e).__name__}: {e}\n"
          "It is corrupt or was written by an incompatible config or version. It was left "
          "untouched; use another --workdir, or move it away to start afresh.") from e
    _check_matches(restored, target, where)
    return restored

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()
