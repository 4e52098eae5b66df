"""A training run's shell: its workdir (the data build's records, config.json, the metric
log), the signals that stop it, its console log, and the start of a multi-host run.

Files are written by process 0 only.
"""

from __future__ import annotations

import json
import os
import signal
import threading

from absl import logging
import jax


class MetricWriter:
  """metrics.jsonl + TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    self.path = os.path.join(workdir, "metrics.jsonl")
    # A resumed run re-does the steps after its checkpoint, and tests again at the end:
    # drop the old lines of those.
    if os.path.exists(self.path):
      rows = []
      with open(self.path) as f:
        for line in f:
          try:
            rows.append(json.loads(line))
          except ValueError:
            pass  # Blank, or half a line from a process killed while writing it.
      kept = [json.dumps(r) + "\n" for r in rows
              if r.get("step", 0) <= resume_step and r.get("split") != "test"]
      with open(self.path, "w") as f:
        f.writelines(kept)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
    self._tf = tf
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    # tf.summary.scalar needs the tensorboard package; tf.summary.write with the scalars
    # plugin's metadata writes the same event records without it.
    self._scalar_meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

  def write(self, step: int, split: str, values: dict):
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
    with self._tb.as_default():
      for k, v in values.items():
        if isinstance(v, (int, float)) and k != "count":
          self._tf.summary.write(f"{split}/{k}", self._tf.constant(float(v), self._tf.float32),
                                 step=int(step), metadata=self._scalar_meta)
    self._tb.flush()

  def close(self):
    if self.active:
      self._tb.close()


class StopRequest:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and returns at the next step.
  A second Ctrl-C interrupts at once."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint at the next step boundary",
                    self.signal)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False


def default_workdir(config) -> str:
  """``./workdirs/<config.name>``."""
  return os.path.join("workdirs", config.get("name", "run"))


def quiet_library_logs() -> None:
  """Drops orbax's and TFDS's INFO chatter (one line per file it touches) from the absl
  log, keeping their warnings and errors, so the console shows the training progress."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  class _Filter(std_logging.Filter):

    def filter(self, record):
      noisy = any(f"{os.sep}{lib}{os.sep}" in record.pathname
                  for lib in ("orbax", "tensorflow_datasets"))
      return not (noisy and record.levelno < std_logging.WARNING)

  handler = logging.get_absl_handler()
  if not any(type(f).__name__ == "_Filter" for f in handler.filters):
    handler.addFilter(_Filter())


def maybe_initialize_distributed(config):
  """With ``config.distributed``: ``jax.distributed.initialize`` (once), with the config's
  ``coordinator_address``, ``num_processes`` and ``process_id`` where they are set."""
  if not config.get("distributed"):
    return
  kwargs = {k: config.get(k) for k in ("coordinator_address", "num_processes", "process_id")
            if config.get(k) is not None}
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def write_json(path, obj):
  """Writes ``obj`` to ``path`` as indented JSON (``str`` of what JSON cannot hold), from
  process 0 only, atomically: a temporary file renamed over ``path``, so a process killed
  meanwhile leaves the old file whole."""
  if jax.process_index() == 0:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def save_config(workdir: str, config) -> None:
  """Writes ``workdir/config.json``, warning which keys differ from the one saved there
  before (a resumed run with other settings)."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
      logging.warning("config differs from the one saved in %s in: %s", path,
                      ", ".join(changed))
  write_json(path, new)


def duration(seconds: float) -> str:
  """``seconds`` as ``1h02m03s`` or ``2m03s`` (the ETA of the progress line)."""
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def load_data(config, workdir: str, lock=None):
  """Prepares the data set, then creates ``workdir``, takes ``lock`` (a
  ``workdir_lock.WorkdirLock``, if given) and copies the build's records into it
  (process 0). The data comes first so that a failed build leaves no empty workdir."""
  from sdl_jax import data  # pylint: disable=g-import-not-at-top
  from sdl_jax.data import buildlog  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  builder = data.get_builder(config.data)
  os.makedirs(workdir, exist_ok=True)
  if lock is not None:
    lock.acquire()
  if jax.process_index() == 0:
    buildlog.copy_build_records(builder, workdir)
  return builder

