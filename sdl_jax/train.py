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

Running the same command again resumes from the newest intact checkpoint ("resuming from
step N"; broken ones are moved aside with a warning, see ``sdl_jax.checkpoint``) and ends
with the same parameters as a run that went straight through: the data stream and the
dropout keys are functions of ``(seed, step)``. SIGTERM or Ctrl-C saves a checkpoint at
the next step boundary and returns cleanly. A run holds ``workdir.lock``
(``sdl_jax.workdir_lock``): a second one on the same workdir refuses to start.

``sdl_jax.evaluate.restore(config, workdir, which)`` gives the TrainState of a workdir for
evaluation and inference; ``sdl_jax.report.write_report`` writes ``report.md``. Around the
steps and the loop: ``train_state`` (the TrainState and its initial parameters),
``validation`` (config checks), ``run_io`` (the workdir's files, signals, logs) and
``baselines``.
"""

from __future__ import annotations

import functools
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from sdl_jax import baselines as baselines_lib
from sdl_jax import checkpoint as ckpt_lib
from sdl_jax import losses
from sdl_jax import metrics as metrics_lib
from sdl_jax import models
from sdl_jax import report
from sdl_jax import run_io
from sdl_jax import train_state
from sdl_jax import validation
from sdl_jax import workdir_lock

AXIS = "batch"


# ---------------------------------------------------------------------------------------
# Steps (run under pmap with axis name AXIS).


# What a rematerialised forward pass keeps for the backward pass (``config.remat``): the
# outputs of matrix products and convolutions; the BatchNorm, activation and pooling
# results between them are recomputed from those. (Saving nothing would recompute the
# whole forward pass inside the backward one and hold all of it at once again.) The
# library's CPU convolutions are custom calls the policy does not see: there the forward
# pass is recomputed whole and the peak does not drop (EfficientNet-Lite0, batch 32: XLA
# temporaries 1651 -> 1827 MiB); what would help is remat per block inside the models.
REMAT_POLICY = jax.checkpoint_policies.dots_saveable


def _forward(state: train_state.TrainState, remat: bool):
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


def train_step(state: train_state.TrainState, batch, *, lam: float, rng,
               remat: bool = False, grad_accum_steps: int = 1):
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


def eval_step(state: train_state.TrainState, batch, *, lam: float, flip: bool = False):
  """Masked metric sums of one per-device batch, ``psum``-med over ``AXIS``.

  ``flip``: the prediction is the mean distribution of each image and its mirror
  (``models.log_probs``); its log stands in for the logits in the loss and metrics.
  """
  logits = models.log_probs(state.apply_fn, train_state.model_variables(state),
                            batch["image"], flip)
  per_example = losses.per_example_loss(logits, batch["label"], batch["distribution"], lam)
  sums = metrics_lib.batch_sums(jax.nn.softmax(logits), batch["label"],
                                batch["distribution"], batch["mask"], loss=per_example)
  return jax.lax.psum(sums, AXIS)


@functools.partial(jax.pmap, axis_name="x")
def _pmean_x(x):
  return jax.lax.pmean(x, "x")


def sync_batch_stats(state: train_state.TrainState) -> train_state.TrainState:
  """Averages the per-device BatchNorm statistics of a replicated state."""
  if not state.batch_stats:
    return state
  return state.replace(batch_stats=_pmean_x(state.batch_stats))


def make_pmapped_steps(config):
  """``(p_train_step, p_eval_step)``: pmapped over AXIS, the train state donated."""
  rng = train_state.prng_key(config.seed)
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
  return metrics_lib.finalize(train_state.unreplicate(sums))



def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None, *,
                       stop_after_step: int | None = None) -> dict:
  """Trains, validates every ``eval_every_steps``, tests the best checkpoint at the end.

  Args:
    config: see ``configs/sdl.py``.
    workdir: see the module docstring; default ``run_io.default_workdir(config)``.
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
  run_io.quiet_library_logs()
  run_io.maybe_initialize_distributed(config)
  validation.validate_config(config)
  workdir = workdir or run_io.default_workdir(config)
  # One training run per workdir at a time (sdl_jax.workdir_lock), from the data's copy on.
  lock = workdir_lock.WorkdirLock(workdir, "training", active=jax.process_index() == 0)
  try:
    builder = run_io.load_data(config, workdir, lock)
    return _train(config, workdir, builder, t_start, stop_after_step)
  finally:
    lock.release()


def _train(config, workdir: str, builder, t_start: float, stop_after_step: int | None):
  """``train_and_evaluate`` once the data is ready and the workdir locked."""
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  num_classes = builder.info.features["label"].num_classes
  class_names = list(builder.info.features["label"].names)
  # Fails early, with a message naming the flag, if the batch does not divide.
  pipeline.per_process_batch(config.batch_size, jax.process_count(), jax.local_device_count())

  model = train_state.create_model(config, num_classes)
  ckpts = ckpt_lib.Checkpoints(workdir, config.keep_checkpoints, config.best_metric,
                               metrics_lib.HIGHER_IS_BETTER[config.best_metric])
  latest = ckpts.resume_step()  # the newest intact one; broken newer ones moved aside
  start_step = int(latest or 0)

  train_ds, steps_per_epoch = pipeline.train_dataset(builder, config, start_step=start_step)
  num_train_steps = int(config.num_train_steps or
                        math.ceil(float(config.num_epochs) * steps_per_epoch))
  eval_every = int(config.eval_every_steps)
  if config.get("eval_every_epochs"):
    eval_every = max(1, round(float(config.eval_every_epochs) * steps_per_epoch))
  lr_fn = train_state.create_learning_rate_fn(config, steps_per_epoch, num_train_steps)
  lr_at = jax.jit(lr_fn)  # for the logs: one compilation, not one per schedule operation
  state = train_state.create_train_state(train_state.prng_key(config.seed), config, model,
                                         config.image_size, lr_fn, pretrained=latest is None)
  if latest is None and config.get("head_init", "random") == "probe":
    state = train_state.head_from_probe(state, config, builder, model, workdir)
  if latest is not None:
    state = ckpts.restore(state, "latest", latest, check=False)  # resume_step checked it
    logging.info("resuming from step %d (checkpoint %s)", int(state.step),
                 ckpts.directory("latest", latest))
    print(f"resuming from step {int(state.step)} ({ckpts.directory('latest', latest)})",
          flush=True)
  run_io.save_config(workdir, config)
  run_io.write_json(os.path.join(workdir, "run.json"), {
      "model": config.model, "num_classes": num_classes, "class_names": class_names,
      "image_size": config.image_size, "steps_per_epoch": steps_per_epoch,
      "num_train_steps": num_train_steps, "data": builder.info.full_name})
  writer = run_io.MetricWriter(workdir, start_step)

  p_train_step, p_eval_step = make_pmapped_steps(config)
  val_ds, _, _ = pipeline.eval_dataset(builder, config, "validation")
  prefetch = int(config.get("prefetch_to_device", 2))
  state = train_state.replicate(state)
  train_iter = pipeline.prefetch_to_device(pipeline.as_numpy(train_ds), prefetch)

  logging.info("training %s on %s: %d steps (%d per epoch), global batch %d over %d "
               "device(s)", config.model, builder.info.full_name, num_train_steps,
               steps_per_epoch, config.batch_size, jax.device_count())
  step = start_step
  pending, last_log_step, last_log_time = [], step, time.time()
  input_wait = 0.0  # seconds the device was idle waiting for input, since the last log
  interrupted = None
  with run_io.StopRequest() as stop:
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
                     run_io.duration((num_train_steps - step) / rate))
        pending, last_log_step, last_log_time, input_wait = [], step, now, 0.0
      is_eval = step % eval_every == 0 or step == num_train_steps
      is_ckpt = step % config.checkpoint_every_steps == 0 or step == num_train_steps
      if is_eval or is_ckpt:
        state = sync_batch_stats(state)
        # One device-to-host copy for both checkpoints.
        host = train_state.unreplicate(state)
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
    ckpts.save(step, train_state.unreplicate(state))
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
  host_template = train_state.unreplicate(state)
  best_step = ckpts.best_step()
  if best_step is not None and best_step != step:
    best_state = train_state.replicate(ckpts.restore(host_template, "best"))
    best_test = evaluate(p_eval_step, best_state, test_ds, prefetch)
  else:
    best_step, best_test = step, last_test
  writer.write(step, "test", best_test)
  baselines = baselines_lib.compute_baselines(builder, "test")
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
  run_io.write_json(os.path.join(workdir, "results.json"), results)
  if jax.process_index() == 0:
    text = report.write_report(workdir, results)
    logging.info("results.json and report.md written to %s", workdir)
    print(text, flush=True)
  ckpts.close()
  writer.close()
  return results
