r"""Training and evaluation: data-parallel over local devices and hosts, resumable.

``train_and_evaluate(config, workdir)`` trains the joint classification + distribution
model of ``config`` (see ``configs/sdl.py``) and evaluates it exactly over whole splits.

Data parallelism: ``train_step`` and ``eval_step`` are ``jax.pmap``-ed over the local
devices with axis name ``'batch'``; the global batch ``config.batch_size`` is split over
all devices of all processes (a clear error if it does not divide); gradients are
``pmean``-ed, metric sums ``psum``-med. BatchNorm statistics are per device while
training and averaged (``sync_batch_stats``) before every evaluation and checkpoint.
With ``config.distributed`` each process calls ``jax.distributed.initialize()`` and reads
its own shard of the data.

The loop never syncs with the host per step: metric sums stay on device and are fetched
every ``log_every_steps``; the state is donated to ``train_step``; batches are prefetched
onto the devices. The progress line reports how much of the time the device sat idle
waiting for input ("input-bound", ``input_wait_fraction`` in metrics.jsonl).

The workdir (written by process 0; checkpoints by all processes through orbax)::

    config.json            the config as saved at the start of the latest run
    run.json               facts the config does not hold: classes, steps, image size
    metrics.jsonl          one JSON object per line: {"step", "split", metric: value, ...}
                           ("train" every log_every_steps, "validation" every
                           eval_every_steps, "test" at the end)
    tensorboard/           TensorBoard event files (tf.summary)
    checkpoints/<step>/    the latest config.keep_checkpoints checkpoints (orbax)
    checkpoints_best/<step>/, best.json   the best on config.best_metric (validation)
    results.json, report.md   final test metrics of the best checkpoint (and of the last
                           step) next to the baselines, and the data's row counts
    build_summary.json, build_log.jsonl, splits.json   the data build's records: label
                           rows read, written and skipped by reason; each skipped row;
                           the split used (copied from the prepared data set; none for
                           the built-in synthetic set)

Running the same command again resumes from the latest checkpoint ("resuming from step
N") and ends with the same parameters as a run that went straight through: the data
stream and the dropout keys are functions of ``(seed, step)``. SIGTERM or Ctrl-C saves a
checkpoint at the next step boundary and returns cleanly.

``sdl_jax.evaluate.restore(config, workdir, which)`` gives the TrainState of a workdir for
evaluation and inference; ``sdl_jax.report.write_report`` writes ``report.md``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import flax
from flax import jax_utils
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdl_jax import checkpoint as ckpt_lib
from sdl_jax import losses
from sdl_jax import metrics as metrics_lib
from sdl_jax import models
from sdl_jax import optim
from sdl_jax import report

AXIS = "batch"


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` plus BatchNorm statistics (``{}`` if none)."""
  batch_stats: Any = None


# ---------------------------------------------------------------------------------------
# Model, schedule, optimizer, state.


def prng_key(seed: int):
  """The run's PRNG key: ``jax.random.key(seed, impl='rbg')``.

  XLA's RngBitGenerator instead of the default threefry: XLA:CPU measured ~15 CPU-seconds
  to compile the threefry bits of the small CNN's initialiser, ~2 s with rbg. Streams are
  deterministic for a seed on a given backend (which is all resuming needs).
  """
  return jax.random.key(int(seed), impl="rbg")


def create_model(config, num_classes: int):
  """The flax module ``config.model`` with a ``num_classes``-way head."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.dtype)
  if dtype is None:
    raise ValueError(f"config.dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
  kwargs = config.get("model_kwargs") or {}
  if isinstance(kwargs, ml_collections.ConfigDict):
    kwargs = kwargs.to_dict()
  return models.get_model(config.model, num_classes, dtype=dtype, **kwargs)


def create_learning_rate_fn(config, steps_per_epoch: int, num_train_steps: int):
  """``step -> learning rate`` (see ``sdl_jax.optim``)."""
  return optim.create_learning_rate_fn(config, steps_per_epoch, num_train_steps)


def initialized(key, image_size: int, model):
  """``model.init`` on a ``[1, S, S, 3]`` input; returns (params, batch_stats)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      {"params": key, "dropout": key}, x)
  variables = flax.core.unfreeze(variables)
  return variables["params"], variables.get("batch_stats", {})


def create_train_state(rng, config, model, image_size: int, learning_rate_fn,
                       pretrained: bool = True) -> TrainState:
  """A fresh TrainState; with ``config.pretrained`` (and ``pretrained=True``) the body is
  initialised from those weights and only the head keeps its random initialisation."""
  params, batch_stats = initialized(rng, image_size, model)
  head = models.get_spec(config.model).head
  if pretrained and config.get("pretrained"):
    # Lazy: the pretrained path needs torch; the default config must not.
    from sdl_jax import weights  # pylint: disable=g-import-not-at-top
    kwargs = config.get("model_kwargs") or {}
    if isinstance(kwargs, ml_collections.ConfigDict):
      kwargs = kwargs.to_dict()
    variables = weights.init_from_pretrained(
        {"params": params, "batch_stats": batch_stats},
        weights.load_pretrained(config.pretrained, arch=config.model, model_kwargs=kwargs),
        head=head)
    logging.info("initialised %s from %s (head %r left random)", config.model,
                 config.pretrained, head)
    variables = flax.core.unfreeze(variables)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
  tx = optim.create_optimizer(config, learning_rate_fn, params, head)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           batch_stats=batch_stats)


# ---------------------------------------------------------------------------------------
# Steps (run under pmap with axis name AXIS).


def _variables(state, params=None):
  v = {"params": state.params if params is None else params}
  if state.batch_stats:
    v["batch_stats"] = state.batch_stats
  return v


# What a rematerialised forward pass keeps for the backward pass (``config.remat``): the
# outputs of matrix products and convolutions; the BatchNorm, activation and pooling
# results between them are recomputed from those. (Saving nothing would recompute the
# whole forward pass inside the backward one and hold all of it at once again.) The
# library's CPU convolutions are custom calls the policy does not see: there the forward
# pass is recomputed whole and the peak does not drop (EfficientNet-Lite0, batch 32: XLA
# temporaries 1651 -> 1827 MiB); what would help is remat per block inside the models.
REMAT_POLICY = jax.checkpoint_policies.dots_saveable


def _forward(state: TrainState, remat: bool):
  """``(params, batch_stats, images, key) -> (logits, new batch_stats)``: the model in train
  mode, under ``jax.checkpoint(policy=REMAT_POLICY)`` when ``remat``."""

  def forward(params, batch_stats, images, key):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits, updates = state.apply_fn(variables, images, train=True, rngs={"dropout": key},
                                     mutable=["batch_stats"])
    return logits, updates.get("batch_stats", batch_stats)

  return jax.checkpoint(forward, policy=REMAT_POLICY) if remat else forward


def _grads(forward, params, batch_stats, batch, key, lam):
  """Gradient of ``sdl_loss`` (the batch mean) w.r.t. ``params`` on one batch, with the
  logits ``[b, C]`` and the batch statistics after it."""

  def loss_fn(p):
    logits, new_stats = forward(p, batch_stats, batch["image"], key)
    return losses.sdl_loss(logits, batch["label"], batch["distribution"], lam), (
        logits, new_stats)

  (_, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, logits, new_stats


def _accumulated_grads(forward, params, batch_stats, batch, key, lam, steps: int):
  """Mean of the gradients of ``steps`` equal micro-batches of ``batch``, one after the
  other in a ``lax.scan`` (one micro-batch's activations live at a time).

  Each micro-batch's loss is a mean over its ``b / steps`` rows, so the mean of their
  gradients is the gradient of the mean loss over all ``b`` rows: exactly one step on the
  whole batch for a model whose forward pass treats rows independently. BatchNorm in
  train mode does not: it normalises each micro-batch by its own statistics, and the
  running statistics are updated once per micro-batch. Dropout draws with
  ``fold_in(key, i)`` for micro-batch ``i``.
  """
  b = batch["image"].shape[0]
  if b % steps:
    raise ValueError(f"config.grad_accum_steps={steps} must divide the per-device batch "
                     f"of {b} rows (config.batch_size over the devices)")
  micro = jax.tree_util.tree_map(lambda x: x.reshape((steps, b // steps) + x.shape[1:]),
                                 batch)

  def body(carry, xs):
    grad_sum, stats = carry
    i, mb = xs
    grads, logits, stats = _grads(forward, params, stats, mb, jax.random.fold_in(key, i),
                                  lam)
    return (jax.tree_util.tree_map(jnp.add, grad_sum, grads), stats), logits

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  (grad_sum, stats), logits = jax.lax.scan(body, (zeros, batch_stats),
                                           (jnp.arange(steps), micro))
  grads = jax.tree_util.tree_map(lambda g: g / steps, grad_sum)
  return grads, logits.reshape((b,) + logits.shape[2:]), stats


def train_step(state: TrainState, batch, *, lam: float, rng, remat: bool = False,
               grad_accum_steps: int = 1):
  """One SGD step on a per-device batch; gradients ``pmean``-ed over ``AXIS``.

  Args:
    state: the (per-device) TrainState.
    batch: ``image`` float ``[b, S, S, 3]``, ``label`` int32 ``[b]``, ``distribution``
      float32 ``[b, C]``, ``mask`` float32 ``[b]`` (all ones while training).
    lam: the joint loss's mixing weight.
    rng: base PRNG key; the dropout key is ``fold_in(fold_in(rng, step), device)``.
    remat: recompute the forward pass's elementwise results in the backward pass
      (``REMAT_POLICY``): less memory, more compute.
    grad_accum_steps: split the batch into this many micro-batches and average their
      gradients before the one update (``_accumulated_grads``; BatchNorm caveat there).

  Returns:
    (new state, metric sums over the global batch, as ``metrics.batch_sums``).
  """
  key = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))
  forward = _forward(state, remat)
  if grad_accum_steps == 1:
    grads, logits, stats = _grads(forward, state.params, state.batch_stats, batch, key, lam)
  else:
    grads, logits, stats = _accumulated_grads(forward, state.params, state.batch_stats,
                                              batch, key, lam, grad_accum_steps)
  grads = jax.lax.pmean(grads, AXIS)
  new_state = state.apply_gradients(grads=grads)
  if state.batch_stats:
    new_state = new_state.replace(batch_stats=stats)
  per_example = losses.per_example_loss(logits, batch["label"], batch["distribution"], lam)
  sums = metrics_lib.batch_sums(jax.nn.softmax(logits), batch["label"],
                                batch["distribution"], batch["mask"], loss=per_example)
  return new_state, jax.lax.psum(sums, AXIS)


def eval_step(state: TrainState, batch, *, lam: float, flip: bool = False):
  """Masked metric sums of one per-device batch, ``psum``-med over ``AXIS``.

  ``flip``: the prediction is the mean distribution of each image and its mirror
  (``models.log_probs``); its log stands in for the logits in the loss and metrics.
  """
  logits = models.log_probs(state.apply_fn, _variables(state), batch["image"], flip)
  per_example = losses.per_example_loss(logits, batch["label"], batch["distribution"], lam)
  sums = metrics_lib.batch_sums(jax.nn.softmax(logits), batch["label"],
                                batch["distribution"], batch["mask"], loss=per_example)
  return jax.lax.psum(sums, AXIS)


@functools.partial(jax.pmap, axis_name="x")
def _pmean_x(x):
  return jax.lax.pmean(x, "x")


def sync_batch_stats(state: TrainState) -> TrainState:
  """Averages the per-device BatchNorm statistics of a replicated state."""
  if not state.batch_stats:
    return state
  return state.replace(batch_stats=_pmean_x(state.batch_stats))


def make_pmapped_steps(config):
  """``(p_train_step, p_eval_step)``: pmapped over AXIS, the train state donated."""
  rng = prng_key(config.seed)
  p_train = jax.pmap(functools.partial(
      train_step, lam=float(config.lam), rng=rng, remat=bool(config.get("remat", False)),
      grad_accum_steps=int(config.get("grad_accum_steps", 1))),
                     axis_name=AXIS, donate_argnums=(0,))
  p_eval = jax.pmap(functools.partial(eval_step, lam=float(config.lam),
                                      flip=bool(config.get("eval_flip", False))),
                    axis_name=AXIS)
  return p_train, p_eval


def evaluate(p_eval_step, state, dataset, prefetch: int = 2) -> dict:
  """Exact metrics of a replicated ``state`` over one padded pass of ``dataset``."""
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  sums = None
  for batch in pipeline.prefetch_to_device(pipeline.as_numpy(dataset), prefetch):
    sums = metrics_lib.merge(sums, p_eval_step(state, batch))
  return metrics_lib.finalize(unreplicate(sums))


# ---------------------------------------------------------------------------------------
# Baselines.


_jit_batch_sums = jax.jit(metrics_lib.batch_sums)


def baseline_metrics(probs, labels, distributions) -> dict:
  """Metrics of fixed predictions ``probs`` ``[N, C]`` (or ``[C]``) against a split."""
  distributions = np.asarray(distributions, np.float32)
  probs = np.broadcast_to(np.asarray(probs, np.float32), distributions.shape)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    # One jitted program, not one compilation per operation of batch_sums.
    sums = _jit_batch_sums(probs, np.asarray(labels, np.int32), distributions)
    return metrics_lib.finalize(sums)


def compute_baselines(builder, split: str = "test") -> dict:
  """``uniform``, ``train_mean`` and, where the set has an ``oracle`` feature, ``oracle``."""
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  has_oracle = "oracle" in builder.info.features
  keys = ("label", "distribution") + (("oracle",) if has_oracle else ())
  target = pipeline.read_targets(builder, split, keys)
  train = pipeline.read_targets(builder, "train", ("distribution",))
  c = target["distribution"].shape[1]
  out = {
      "uniform": baseline_metrics(np.full((c,), 1.0 / c), target["label"],
                                  target["distribution"]),
      "train_mean": baseline_metrics(train["distribution"].mean(0), target["label"],
                                     target["distribution"]),
  }
  if has_oracle:
    out["oracle"] = baseline_metrics(target["oracle"], target["label"],
                                     target["distribution"])
  return out


# ---------------------------------------------------------------------------------------
# The workdir.


class _MetricWriter:
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


class _StopRequest:
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


def validate_config(config) -> None:
  """Clear errors for settings that would otherwise fail deep inside JAX or TFDS."""
  if config.data.name != "synthetic" and not config.data.get("path"):
    raise ValueError(
        f"data set {config.data.name!r} (preset {config.get('name')!r}) reads its files "
        "from disk: pass --config.data.path=/path/to/the/data/set/folder")
  if config.best_metric not in metrics_lib.HIGHER_IS_BETTER:
    raise ValueError(f"config.best_metric must be one of "
                     f"{', '.join(metrics_lib.HIGHER_IS_BETTER)}, got {config.best_metric!r}")
  if not 0.0 <= float(config.lam) <= 1.0:
    raise ValueError(f"config.lam must be in [0, 1], got {config.lam}")
  for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    if int(config[name]) <= 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]}")
  if config.get("head_init", "random") not in ("random", "probe"):
    raise ValueError(f"config.head_init must be 'random' or 'probe', got {config.head_init!r}")
  if config.get("eval_every_epochs") is not None and float(config.eval_every_epochs) <= 0:
    raise ValueError(f"config.eval_every_epochs must be positive, got {config.eval_every_epochs}")
  validate_step_config(config)
  models.get_spec(config.model)
  if config.model != "small_cnn" and not config.get("pretrained"):
    logging.warning(
        "training %s from scratch: the paper fine-tunes ImageNet weights; pass "
        "--config.pretrained=/path/to/weights (see sdl_jax/weights.py)", config.model)


def validate_step_config(config) -> None:
  """Clear errors for the train step's memory settings, ``remat`` and ``grad_accum_steps``."""
  remat = config.get("remat", False)
  if not isinstance(remat, bool):
    raise ValueError(f"config.remat must be True or False, got {remat!r}")
  k = config.get("grad_accum_steps", 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"config.grad_accum_steps must be an integer >= 1, got {k!r}")
  if int(config.batch_size) % k:
    raise ValueError(f"config.grad_accum_steps={k} must divide config.batch_size="
                     f"{config.batch_size} (each device's share too)")


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


def _maybe_initialize_distributed(config):
  if not config.get("distributed"):
    return
  kwargs = {k: config.get(k) for k in ("coordinator_address", "num_processes", "process_id")
            if config.get(k) is not None}
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def _write_json(path, obj):
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(obj, f, indent=2, default=str)


def _save_config(workdir: str, config) -> None:
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
      logging.warning("config differs from the one saved in %s in: %s", path,
                      ", ".join(changed))
  _write_json(path, new)


def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def replicate(tree, devices=None):
  """Copies every leaf onto each of ``devices`` (default: the local devices), stacked on a
  new leading axis, as ``jax.pmap`` expects.

  The stacking happens on the host (numpy): stacking device arrays would compile one small
  XLA program per leaf shape.
  """
  return jax_utils.replicate(jax.device_get(tree), devices=devices)


def unreplicate(tree):
  """A host (numpy) copy of the first replica of each leaf of a replicated (pmap) tree.

  Reads one device's shard rather than indexing ``x[0]`` on the device (which would gather
  across devices and compile a slice per leaf shape). Unlike ``flax.jax_utils.unreplicate``
  it also drops the leading axis of a tree replicated over one device of a multi-device
  host.
  """

  def one(x):
    if isinstance(x, jax.Array) and x.ndim >= 1 and x.addressable_shards:
      return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
    return np.asarray(x)[0]

  return jax.tree_util.tree_map(one, tree)


def _load_data(config, workdir: str):
  """Prepares the data set, then creates ``workdir`` and copies the build's records into
  it (process 0). The data comes first so that a failed build leaves no empty workdir."""
  from sdl_jax import data  # pylint: disable=g-import-not-at-top
  from sdl_jax.data import buildlog  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  builder = data.get_builder(config.data)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    buildlog.copy_build_records(builder, workdir)
  return builder


def head_from_probe(state: TrainState, config, builder, model, workdir: str) -> TrainState:
  """``state`` with its head replaced by the linear probe's on the frozen body's features
  (``sdl_jax.probe.probe_initialised_head``; features cached in
  ``config.probe_feature_dir``, default ``workdir/features``):
  linear probing then fine-tuning, which keeps a random head's large early gradients
  from distorting the pretrained features."""
  from sdl_jax import probe  # pylint: disable=g-import-not-at-top
  head = models.get_spec(config.model).head
  params = flax.core.unfreeze(state.params)
  fitted = probe.probe_initialised_head(config, builder, model, _variables(state),
                                        config.get("probe_feature_dir")
                                        or os.path.join(workdir, "features"))
  for name, value in fitted.items():
    if params[head][name].shape != value.shape:
      raise ValueError(f"probe head {name} has shape {value.shape}, the model's "
                       f"{params[head][name].shape}")
    params[head][name] = jnp.asarray(value, params[head][name].dtype)
  return state.replace(params=params)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None, *,
                       stop_after_step: int | None = None) -> dict:
  """Trains, validates every ``eval_every_steps``, tests the best checkpoint at the end.

  Args:
    config: see ``configs/sdl.py``.
    workdir: see the module docstring; default ``default_workdir(config)``.
    stop_after_step: behave as if SIGTERM arrived once this step is done (checkpoint and
      return); for time-boxed jobs and for testing preemption deterministically.

  Returns:
    The results dict also written to ``workdir/results.json`` (with ``interrupted: True``
    and no test metrics if a signal stopped the run).
  """
  if config.get("probe"):  # frozen backbone + linear head on cached features instead
    from sdl_jax import probe  # pylint: disable=g-import-not-at-top
    return probe.probe_and_evaluate(config, workdir)
  t_start = time.time()
  quiet_library_logs()
  _maybe_initialize_distributed(config)
  validate_config(config)
  workdir = workdir or default_workdir(config)
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  builder = _load_data(config, workdir)
  num_classes = builder.info.features["label"].num_classes
  class_names = list(builder.info.features["label"].names)
  # Fails early, with a message naming the flag, if the batch does not divide.
  pipeline.per_process_batch(config.batch_size, jax.process_count(), jax.local_device_count())

  model = create_model(config, num_classes)
  ckpts = ckpt_lib.Checkpoints(workdir, config.keep_checkpoints, config.best_metric,
                               metrics_lib.HIGHER_IS_BETTER[config.best_metric])
  latest = ckpts.latest_step()
  start_step = int(latest or 0)

  train_ds, steps_per_epoch = pipeline.train_dataset(builder, config, start_step=start_step)
  num_train_steps = int(config.num_train_steps or
                        math.ceil(float(config.num_epochs) * steps_per_epoch))
  eval_every = int(config.eval_every_steps)
  if config.get("eval_every_epochs"):
    eval_every = max(1, round(float(config.eval_every_epochs) * steps_per_epoch))
  lr_fn = create_learning_rate_fn(config, steps_per_epoch, num_train_steps)
  lr_at = jax.jit(lr_fn)  # for the logs: one compilation, not one per schedule operation
  state = create_train_state(prng_key(config.seed), config, model,
                             config.image_size, lr_fn, pretrained=latest is None)
  if latest is None and config.get("head_init", "random") == "probe":
    state = head_from_probe(state, config, builder, model, workdir)
  if latest is not None:
    state = ckpts.restore(state, "latest")
    logging.info("resuming from step %d (checkpoint %s)", int(state.step),
                 ckpts.directory("latest", latest))
    print(f"resuming from step {int(state.step)} ({ckpts.directory('latest', latest)})",
          flush=True)
  _save_config(workdir, config)
  _write_json(os.path.join(workdir, "run.json"), {
      "model": config.model, "num_classes": num_classes, "class_names": class_names,
      "image_size": config.image_size, "steps_per_epoch": steps_per_epoch,
      "num_train_steps": num_train_steps, "data": builder.info.full_name})
  writer = _MetricWriter(workdir, start_step)

  p_train_step, p_eval_step = make_pmapped_steps(config)
  val_ds, _, _ = pipeline.eval_dataset(builder, config, "validation")
  prefetch = int(config.get("prefetch_to_device", 2))
  state = replicate(state)
  train_iter = pipeline.prefetch_to_device(pipeline.as_numpy(train_ds), prefetch)

  logging.info("training %s on %s: %d steps (%d per epoch), global batch %d over %d "
               "device(s)", config.model, builder.info.full_name, num_train_steps,
               steps_per_epoch, config.batch_size, jax.device_count())
  step = start_step
  pending, last_log_step, last_log_time = [], step, time.time()
  input_wait = 0.0  # seconds the device was idle waiting for input, since the last log
  interrupted = None
  with _StopRequest() as stop:
    while step < num_train_steps:
      if stop_after_step is not None and step >= stop_after_step:
        stop.signal = stop.signal or "stop_after_step"
      if stop.signal:
        interrupted = stop.signal
        break
      # Time the device sits idle for want of input: waiting for a batch while the steps
      # already dispatched are all done (waiting while the device is busy is free).
      t_wait = time.perf_counter()
      device_idle = state.step.is_ready()
      batch = next(train_iter)
      if device_idle:
        input_wait += time.perf_counter() - t_wait
      state, sums = p_train_step(state, batch)
      pending.append(sums)
      step += 1
      if step % config.log_every_steps == 0 or step == num_train_steps:
        host = jax.device_get(pending)
        total = {k: sum(float(h[k][0]) for h in host) for k in host[0]}
        values = metrics_lib.finalize(total)
        now = time.time()
        rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
        values.update(steps_per_second=rate, learning_rate=float(lr_at(step - 1)),
                      input_wait_fraction=input_wait / max(now - last_log_time, 1e-9))
        writer.write(step, "train", values)
        logging.info("step %d/%d  loss %.4f  acc %.3f  kl %.4f  |  %.2f steps/s  "
                     "(input-bound %.0f%%)  |  ETA %s", step, num_train_steps, values["loss"],
                     values["accuracy"], values["kl"], rate,
                     100 * values["input_wait_fraction"],
                     _duration((num_train_steps - step) / rate))
        pending, last_log_step, last_log_time, input_wait = [], step, now, 0.0
      is_eval = step % eval_every == 0 or step == num_train_steps
      is_ckpt = step % config.checkpoint_every_steps == 0 or step == num_train_steps
      if is_eval or is_ckpt:
        state = sync_batch_stats(state)
        host = unreplicate(state)  # One device-to-host copy for both checkpoints.
      if is_eval:
        val = evaluate(p_eval_step, state, val_ds, prefetch)
        writer.write(step, "validation", val)
        improved = ckpts.save_best_if_improved(step, host, val)
        extra = ("" if config.best_metric in ("accuracy", "kl") else
                 f"  {config.best_metric} {val[config.best_metric]:.4f}")
        logging.info("validation at step %d: acc %.4f  kl %.4f%s%s", step, val["accuracy"],
                     val["kl"], extra,
                     f"  (best {config.best_metric} so far)" if improved else "")
      if is_ckpt:
        ckpts.save(step, host)
  if interrupted:
    state = sync_batch_stats(state)
    ckpts.save(step, unreplicate(state))
    ckpts.wait()
    ckpts.close()
    writer.close()
    msg = (f"{interrupted}: stopped at step {step} of {num_train_steps}; checkpoint saved "
           f"in {ckpts.directory('latest', step)}. Run the same command to resume.")
    logging.warning(msg)
    print(msg, flush=True)
    return {"interrupted": True, "signal": interrupted, "step": step}

  ckpts.wait()
  # Test: the best checkpoint on validation, and the last step for comparison.
  test_ds, _, _ = pipeline.eval_dataset(builder, config, "test")
  last_test = evaluate(p_eval_step, state, test_ds, prefetch)
  host_template = unreplicate(state)
  best_step = ckpts.best_step()
  if best_step is not None and best_step != step:
    best_state = replicate(ckpts.restore(host_template, "best"))
    best_test = evaluate(p_eval_step, best_state, test_ds, prefetch)
  else:
    best_step, best_test = step, last_test
  writer.write(step, "test", best_test)
  baselines = compute_baselines(builder, "test")
  from sdl_jax.data import buildlog  # pylint: disable=g-import-not-at-top
  results = {
      "name": config.get("name"), "model": config.model, "data": builder.info.full_name,
      "data_build": buildlog.build_counts(builder),
      "lam": float(config.lam), "batch_size": int(config.batch_size),
      "num_train_steps": num_train_steps, "steps_per_epoch": steps_per_epoch,
      "start_step": start_step, "best_step": int(best_step),
      "best_metric": config.best_metric,
      "validation_best": (ckpts.best_info or {}).get("validation"),
      "test": best_test, "test_last": last_test, "baselines": baselines,
      "devices": jax.device_count(), "processes": jax.process_count(),
      "wall_time_s": time.time() - t_start,
  }
  _write_json(os.path.join(workdir, "results.json"), results)
  if jax.process_index() == 0:
    text = report.write_report(workdir, results)
    logging.info("results.json and report.md written to %s", workdir)
    print(text, flush=True)
  ckpts.close()
  writer.close()
  return results
