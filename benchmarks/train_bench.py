"""The train-step benchmark: interleaved JAX / PyTorch timing of one model's training step
(see ``benchmarks.run``), the matmul peak that model FLOPs utilisation is measured against,
and the synthetic batch the benchmarks and tools train on."""

from __future__ import annotations

import math
import time

import numpy as np

from benchmarks import torch_process  # first: it records the environment
from sdl_jax import perf


def _stats(values) -> dict:
  v = np.asarray(values, np.float64)
  return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()),
          "all": [float(x) for x in v]}


def model_image_size(name: str, args) -> int:
  if name == "small_cnn":
    from sdl_jax import models  # pylint: disable=g-import-not-at-top
    return args.small_cnn_size or models.get_spec(name).input_size
  return args.image_size


def synthetic_batch(batch: int, size: int, num_classes: int, seed: int = 0):
  """Normalised-looking images, labels and distributions (float32 / int32 numpy)."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  distributions = rng.dirichlet(np.ones(num_classes), batch).astype(np.float32)
  labels = distributions.argmax(1).astype(np.int32)
  return images, labels, distributions


def _torch_trainer(name: str, args, torch_device, config, images, labels, dists,
                   compile_mode: str = ""):
  """PyTorch's twin of the step, its first step taken: a ``TorchProcess`` (the default
  ``--torch_process=separate``) or a ``TorchTrainer`` in this process; eager, or under
  ``torch.compile(mode=compile_mode)``. Returns it and the facts recorded under
  ``torch`` / ``torch_compile`` (parameters, first step, memory)."""
  from benchmarks import torch_train  # pylint: disable=g-import-not-at-top
  torch_args = (name, args.num_classes, images, labels, dists)
  torch_kwargs = dict(
      model_kwargs=args.model_kwargs, lr=float(config.learning_rate),
      weight_decay=float(config.weight_decay), lam=float(config.lam),
      channels_last=args.torch_layout == "channels_last",
      bf16=(args.torch_dtype or args.dtype) == "bfloat16", device=torch_device,
      compile_mode=compile_mode)
  if args.torch_process == "separate":
    tt = torch_process.TorchProcess(*torch_args, threads=args.torch_threads
                                    or perf.cpu_count(), malloc=args.torch_malloc,
                                    **torch_kwargs)
    info = {"params": tt.num_params(), "malloc_keep": tt.info["freed_memory_kept"]}
    if info["malloc_keep"] != (args.torch_malloc == "keep"):
      raise RuntimeError(f"PyTorch's process was asked for --torch_malloc="
                         f"{args.torch_malloc} but kept freed memory: "
                         f"{info['malloc_keep']}")
    try:
      first = tt.first_step()
    except RuntimeError:
      tt.close()
      raise
    info["first_step_s"] = first["seconds"]
    info["rss_growth_first_step"] = first["rss_growth"]
    if torch_device == "cuda":
      info["device_peak_bytes"] = tt.peak_bytes()
  else:
    tt = torch_train.TorchTrainer(*torch_args, **torch_kwargs)
    info = {"params": tt.num_params()}
    info["first_step_s"], info["rss_growth_first_step"] = perf.timed_step(tt.step, tt.sync)
    if torch_device == "cuda":
      import torch  # pylint: disable=g-import-not-at-top
      info["device_peak_bytes"] = torch.cuda.max_memory_allocated()
  return tt, info


def _torch_compile_trainer(name: str, args, torch_device, config, batch, log):
  """PyTorch's step under ``torch.compile(mode=args.torch_compile_mode)``, compiled and
  stepped once: ``(trainer, figures)``, or ``(None, {'skipped': why})`` where it does not
  compile here (no C compiler, an unsupported operation): the eager figures stand alone
  then, and the report says why."""
  try:
    tc, info = _torch_trainer(name, args, torch_device, config, *batch,
                              compile_mode=args.torch_compile_mode)
  except Exception as e:  # pylint: disable=broad-except
    lines = [l for l in str(e).splitlines() if l.strip()]
    why = f"torch.compile failed: {type(e).__name__}: {lines[-1] if lines else ''}"[:400]
    log(f"  torch_compile skipped: {why}")
    return None, {"skipped": why}
  info["compile_mode"] = args.torch_compile_mode
  log(f"  torch_compile: first step (compiling) {info['first_step_s']:.2f} s")
  return tc, info


def _jax_trainer(name: str, args, images, labels, dists, log):
  """The JAX trainer of ``name``, compiled and stepped once; returns ``(trainer, config,
  its figures)``: compile time, parameters, XLA's memory, step GFLOP, first step."""
  from benchmarks import jax_train  # pylint: disable=g-import-not-at-top
  config = jax_train.bench_config(name, batch=args.batch, dtype=args.dtype,
                                  model_kwargs=args.model_kwargs)
  jt = jax_train.JaxTrainer(config, images, labels, dists, step=args.step,
                            parallel=args.parallel, donate=not args.no_donate)
  out = {"compile_s": jt.compile(), "params": jt.num_params, "xla_memory": jt.memory()}
  hw_flops = jt.step_flops()
  out["xla_step_gflop"] = (hw_flops * len(jt.devices) / 1e9 if hw_flops and
                           jt.parallel == "pmap" else
                           hw_flops / 1e9 if hw_flops else None)
  out["first_step_s"], out["rss_growth_first_step"] = perf.timed_step(jt.step, jt.sync)
  out["device_peak_bytes"] = perf.device_peak_bytes(jt.devices[0])
  log(f"  jax: compiled in {out['compile_s']:.1f} s, first step "
      f"{out['first_step_s']:.2f} s")
  return jt, config, out


def _repeat_plan(sides, args) -> tuple[int, int, float]:
  """``(steps per repeat, repeats, seconds per repeat)``: one more untimed step each sizes
  the timed repeats (at least ``min_repeat_s`` each, ``budget_s`` in all)."""
  est = {}
  for side, (step, sync) in sides.items():
    t0 = time.perf_counter()
    step()
    sync()
    est[side] = time.perf_counter() - t0
  steps = args.steps or max(1, math.ceil(args.min_repeat_s / min(est.values())))
  per_repeat = steps * sum(est.values())
  repeats = args.repeats
  if per_repeat * repeats > args.budget_s:
    repeats = max(args.min_repeats, int(args.budget_s // per_repeat))
  return steps, repeats, per_repeat


def _time_interleaved(sides, steps: int, repeats: int) -> dict:
  """Seconds of ``steps`` steps per repeat and side, the sides' order alternating."""
  times = {side: [] for side in sides}
  order = list(sides)
  for r in range(repeats):
    for side in (order if r % 2 == 0 else order[::-1]):
      step, sync = sides[side]
      sync()
      t0 = time.perf_counter()
      for _ in range(steps):
        step()
      sync()
      times[side].append(time.perf_counter() - t0)
  return times


def _summarize(out: dict, times: dict, steps: int, batch: int, model_flops, peak_flops):
  """Adds each side's images/s, step time, TFLOP/s and MFU to ``out``, and the JAX /
  PyTorch ratios where both ran."""
  for side in times:
    ips = [batch * steps / t for t in times[side]]
    out[side]["images_per_s"] = _stats(ips)
    out[side]["step_s"] = _stats([t / steps for t in times[side]])
    if model_flops:
      achieved = model_flops / out[side]["step_s"]["median"]
      out[side]["model_tflop_per_s"] = achieved / 1e12
      out[side]["mfu"] = achieved / peak_flops if peak_flops else None
  # Ratio of medians, and the median of per-repeat ratios (pairs timed back to back):
  # ``ratio`` against PyTorch eager, ``ratio_compile`` against torch.compile.
  for side, key in (("torch", "ratio"), ("torch_compile", "ratio_compile")):
    if side in times:
      out[key] = out["jax"]["images_per_s"]["median"] / out[side]["images_per_s"]["median"]
      out[key + "_paired"] = float(np.median(np.asarray(times[side])
                                             / np.asarray(times["jax"])))


def bench_train_model(name: str, args, torch_device, peak_flops, log) -> dict:
  """Interleaved JAX / PyTorch train-step timing of one model (``benchmarks.run``'s
  docstring says how)."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import jax_train  # pylint: disable=g-import-not-at-top
  size = model_image_size(name, args)
  images, labels, dists = synthetic_batch(args.batch, size, args.num_classes)
  out = {"model": name, "image_size": size, "batch": args.batch, "dtype": args.dtype,
         "torch_dtype": args.torch_dtype or args.dtype,
         "num_classes": args.num_classes, "model_kwargs": args.model_kwargs,
         "jax_step": args.step}
  fwd = jax_train.forward_flops(name, args.num_classes, size, args.batch, args.model_kwargs)
  out["forward_gflop_per_image"] = fwd / args.batch / 1e9 if fwd else None
  model_flops = 3 * fwd if fwd else None  # per step: forward + backward (2x forward)

  jt, config, out["jax"] = _jax_trainer(name, args, images, labels, dists, log)
  sides = {"jax": (lambda: jt.step(), jt.sync)}
  torch_trainers = []
  if torch_device:
    tt, out["torch"] = _torch_trainer(name, args, torch_device, config, images, labels,
                                      dists)
    sides["torch"] = (lambda: tt.step(), tt.sync)
    torch_trainers.append(tt)
    log(f"  torch: first step {out['torch']['first_step_s']:.2f} s")
    if args.torch_compile:
      tc, out["torch_compile"] = _torch_compile_trainer(
          name, args, torch_device, config, (images, labels, dists), log)
      if tc is not None:
        sides["torch_compile"] = (lambda: tc.step(), tc.sync)
        torch_trainers.append(tc)

  steps, repeats, per_repeat = _repeat_plan(sides, args)
  out["steps_per_repeat"], out["repeats"] = steps, repeats
  log(f"  timing {repeats} x {steps} step(s) per side (~{per_repeat * repeats:.0f} s)")
  times = _time_interleaved(sides, steps, repeats)
  _summarize(out, times, steps, args.batch, model_flops, peak_flops)
  for trainer in torch_trainers:
    if isinstance(trainer, torch_process.TorchProcess):
      trainer.close()  # (a daemon: it dies with this process should anything above raise)
  del jt
  jax.clear_caches()
  return out


# Who measured a peak: XLA's matmul, PyTorch's, the library's oneDNN convolution as a
# matmul (CPU); the largest is the MFU's denominator.
PEAK_SOURCES = ("jax", "torch", "onednn")


def measure_peak(args, torch_device, log) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  on_cpu = jax.default_backend() == "cpu"
  n = args.peak_n or (2048 if on_cpu else 8192)
  dtype = jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  out = {"n": n, "dtype": args.dtype, "jax": perf.jax_matmul_peak(n, jax_dtype)}
  if torch_device == "cpu" and on_cpu and args.dtype == "float32":
    # (PyTorch's CPU bfloat16 matmul can be 30x slower than float32 without hardware
    # support; the bfloat16 peak is JAX's alone.)
    import torch  # pylint: disable=g-import-not-at-top
    out["torch"] = perf.torch_matmul_peak(n, torch.float32)
  onednn = perf.onednn_matmul_peak(n, jax_dtype) if on_cpu else None
  if onednn is not None:
    out["onednn"] = onednn
  out["peak"] = max(v for k, v in out.items() if k in PEAK_SOURCES)
  if on_cpu:  # One process runs on every core; on accelerators the peak is per device.
    out["devices"] = 1
  else:
    out["devices"] = jax.local_device_count()
    out["peak"] *= out["devices"]
  log(f"matmul peak ({n}x{n} {args.dtype}): " + ", ".join(
      f"{k} {out[k] / 1e9:.1f} GFLOP/s" for k in PEAK_SOURCES if k in out))
  return out

