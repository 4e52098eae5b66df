r"""The benchmark: one command, a markdown report on stdout and the figures as JSON.

    python -m benchmarks.run --out=bench.json                          # everything
    python -m benchmarks.run --models=small_cnn,resnet50 --sections=train
    python -m benchmarks.run --dtype=bfloat16 --xla_flags=--xla_cpu_use_xnnpack=true

Sections (``--sections``, default all):

* ``train``: images/s of one training step (forward, ``sdl_loss``, backward, SGD momentum
  0.9 + weight decay) for each model of ``--models``, at ``--batch`` and ``--image_size``
  (``small_cnn`` at ``--small_cnn_size``), in JAX (the library's pmapped ``train_step``
  over every local device) and in PyTorch (the same architecture from
  ``benchmarks.torch_models``, the same loss and optimizer). After compiling and one
  warm-up step each, ``--repeats`` timed repeats of ``--steps`` steps alternate between
  the two (JAX first on even repeats, PyTorch first on odd ones); the report gives the
  median images/s, the spread (min-max), their ratio, the compile time, FLOP/s achieved
  against this machine's measured matmul peak (model FLOPs utilisation, with model FLOPs
  = 3 x the forward pass's, counted from the layers' shapes, for both), and peak memory.
* ``memory``: peak resident memory of the training process, the library's and PyTorch's,
  each in a fresh process, with XLA's buffer figures and ``--memory_variants`` of the
  library's step (remat, gradient accumulation) (``memory``).
* ``loss``: the loss gradient alone, custom_vjp against autodiff (``loss_bench``).
* ``pipeline``: images/s of the tf.data training pipeline (``sdl_jax.data.pipeline``) on
  small stand-in data sets built by the real TFDS builders, for the presets of
  ``--pipeline_presets``, against the train step's consumption (``pipeline_bench``).

Absolute figures on a shared machine are noisy; the interleaved ratios are what count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np

from benchmarks import torch_process  # first: it records the environment
from sdl_jax import cpu, perf
from sdl_jax.cpu import process

ALL_SECTIONS = ("train", "memory", "loss", "pipeline")
DEFAULT_MODELS = "small_cnn,efficientnet_lite0,resnet50,vgg16"


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default=",".join(ALL_SECTIONS),
                 help="comma-separated subset of: " + ", ".join(ALL_SECTIONS))
  p.add_argument("--out", default="", help="write the JSON results here")
  p.add_argument("--markdown", default="", help="also write the markdown report here")
  g = p.add_argument_group("train")
  g.add_argument("--models", default=DEFAULT_MODELS)
  g.add_argument("--batch", type=int, default=32, help="global batch (all devices)")
  g.add_argument("--image_size", type=int, default=224)
  g.add_argument("--small_cnn_size", type=int, default=0,
                 help="image size of small_cnn (0: its ModelSpec input size)")
  g.add_argument("--num_classes", type=int, default=8)
  g.add_argument("--model_kwargs", default="{}",
                 help='JSON keyword arguments for every model on both sides, e.g. '
                      '\'{"widths": [8, 16]}\' for a tiny small_cnn')
  g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="computation dtype on both sides (float32 master weights)")
  g.add_argument("--torch_dtype", default="", choices=("", "float32", "bfloat16"),
                 help="PyTorch's computation dtype (default: --dtype)")
  g.add_argument("--repeats", type=int, default=5)
  g.add_argument("--min_repeats", type=int, default=3,
                 help="fewest repeats when --budget_s cuts them")
  g.add_argument("--steps", type=int, default=0,
                 help="steps per timed repeat (0: enough for --min_repeat_s)")
  g.add_argument("--min_repeat_s", type=float, default=2.0)
  g.add_argument("--budget_s", type=float, default=240.0,
                 help="timed seconds per model (both sides) before repeats are cut")
  g.add_argument("--peak_n", type=int, default=0,
                 help="matmul size for the peak (0: 2048 on CPU, 8192 on accelerators)")
  g.add_argument("--step", default="library", choices=("library", "local"),
                 help="JAX step: the library's train_step, or the minimal local one")
  g.add_argument("--parallel", default="pmap", choices=("pmap", "jit"),
                 help="data parallelism of the local step")
  g.add_argument("--no_donate", action="store_true", help="local step: no donation")
  g.add_argument("--kernels", default="", choices=("", "auto", "cpu", "xla"),
                 help="the models' layer implementations (sdl_jax/cpu/paths.py): cpu "
                      "(hand-written XLA:CPU paths), xla (XLA's own ops) or auto (cpu on "
                      "the CPU backend; the default, unless $SDL_JAX_KERNELS says otherwise)")
  g.add_argument("--xla_flags", default="",
                 help="space-separated flags appended to $XLA_FLAGS before JAX starts")
  g.add_argument("--torch", default="auto", choices=("auto", "cpu", "cuda", "none"),
                 help="PyTorch device (auto: cuda if available; skipped against a JAX "
                      "accelerator when only its CPU build is there)")
  g.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads (0: the CPUs this process may use)")
  g.add_argument("--torch_layout", default="channels_last",
                 choices=("channels_last", "contiguous"))
  g.add_argument("--torch_process", default="separate", choices=("separate", "same"),
                 help="run PyTorch's train step in a child process of its own (default; "
                      "benchmarks/torch_process.py) or in this one beside JAX's")
  g.add_argument("--torch_malloc", default="default", choices=("default", "keep"),
                 help="glibc's allocator in PyTorch's process: as PyTorch runs it (default) "
                      "or keeping freed memory as the library's process does (keep; "
                      "sdl_jax.cpu.process.keep_freed_memory); with --torch_process=same it is "
                      "JAX's process's")
  g = p.add_argument_group("memory (also takes --models, --batch, --image_size, --dtype)")
  g.add_argument("--memory_steps", type=int, default=5,
                 help="train steps in each memory process")
  g.add_argument("--memory_variants",
                 default="efficientnet_lite0:remat,efficientnet_lite0:grad_accum=4",
                 help="extra library rows, MODEL:remat, MODEL:grad_accum=K or both joined "
                      "by +, comma-separated (rows only for models of --models)")
  g = p.add_argument_group("loss")
  g.add_argument("--loss_sizes", default="32x8,4096x1000", help="NxC,NxC,...")
  g.add_argument("--loss_repeats", type=int, default=7)
  g.add_argument("--loss_variants", default="custom_vjp,autodiff",
                 help="gradients to compare (benchmarks/loss_bench.py VARIANTS); the "
                      "first two must be custom_vjp,autodiff")
  g.add_argument("--loss_iters", type=int, default=0,
                 help="gradients per timed loop (0: automatic)")
  g = p.add_argument_group("pipeline")
  g.add_argument("--pipeline_presets", default="paper,ferplus")
  g.add_argument("--pipeline_images", type=int, default=400,
                 help="images in each stand-in data set")
  g.add_argument("--pipeline_batches", type=int, default=30, help="timed batches")
  g.add_argument("--pipeline_image_size", type=int, default=0,
                 help="override the presets' image_size (resize_size scales with it)")
  g.add_argument("--pipeline_batch", type=int, default=0,
                 help="override the presets' batch_size")
  g.add_argument("--pipeline_consumer", default="",
                 help="model whose train step is the consumer (default: the preset's; "
                      "an override is built with --model_kwargs)")
  g.add_argument("--jpeg_size", default="500x375", help="stand-in JPEGs' WxH")
  g.add_argument("--ferplus_archive", default="",
                 help="FER+ tar.gz (default: ../shared/data/ferplus.tar.gz beside the "
                      "repo, if there; else synthetic PNGs)")
  args = p.parse_args(argv)
  args.sections = [s for s in args.sections.split(",") if s]
  bad = set(args.sections) - set(ALL_SECTIONS)
  if bad:
    p.error(f"--sections: unknown {sorted(bad)}; known: {', '.join(ALL_SECTIONS)}")
  args.models = [m for m in args.models.split(",") if m]
  try:
    args.loss_sizes = [tuple(int(v) for v in s.split("x")) for s in args.loss_sizes.split(",")
                       if s]
    assert all(len(s) == 2 and min(s) > 0 for s in args.loss_sizes)
  except (ValueError, AssertionError):
    p.error(f"--loss_sizes must look like 32x8,4096x1000, got {args.loss_sizes!r}")
  args.pipeline_presets = [s for s in args.pipeline_presets.split(",") if s]
  try:
    from benchmarks import memory  # pylint: disable=g-import-not-at-top
    memory.parse_variants(args.memory_variants)
  except ValueError as e:
    p.error(str(e))
  if args.memory_steps < 2:
    p.error(f"--memory_steps must be at least 2 (growth from the first step), got "
            f"{args.memory_steps}")
  args.loss_variants = tuple(s for s in args.loss_variants.split(",") if s)
  if args.loss_variants[:2] != ("custom_vjp", "autodiff"):
    p.error("--loss_variants must start with custom_vjp,autodiff")
  try:
    args.model_kwargs = json.loads(args.model_kwargs)
    assert isinstance(args.model_kwargs, dict)
  except (ValueError, AssertionError):
    p.error(f"--model_kwargs must be a JSON object, got {args.model_kwargs!r}")
  return args


# ---------------------------------------------------------------------------------------
# Environment.


def environment(args, torch_device) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from sdl_jax.cpu import dnnl  # pylint: disable=g-import-not-at-top
  from sdl_jax.cpu import paths as kernels  # pylint: disable=g-import-not-at-top
  env = {
      "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
      "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "cpu": perf.cpu_model(),
      "cpu_isa": perf.cpu_isa(),
      "cpus": perf.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "local_devices": jax.local_device_count(),
      "device_kind": jax.local_devices()[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "kernels": kernels.mode(),
      "hand_paths": kernels.hand_paths(),
      # Which convolutions the library sends to oneDNN here: all, xla_wgrad, grouped or off.
      "dnnl": dnnl.mode() if kernels.hand_paths() and dnnl.available() else "off",
      "onednn": dnnl.version_string() if kernels.hand_paths() and dnnl.available() else None,
      # XLA:CPU runs one intra-op (Eigen) pool of one thread per CPU; no knob sizes it.
      "xla_threads": perf.cpu_count() if jax.default_backend() == "cpu" else None,
      # Whether glibc keeps freed memory in this process (sdl_jax.cpu.process.keep_freed_memory).
      "malloc_keep": process.freed_memory_kept(),
  }
  try:
    import flax  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    env["flax"], env["optax"] = flax.__version__, optax.__version__
  except ImportError:
    pass
  if torch_device:
    import torch  # pylint: disable=g-import-not-at-top
    env["torch"] = torch.__version__
    env["torch_device"] = torch_device
    env["torch_threads"] = torch.get_num_threads()
    env["torch_interop_threads"] = torch.get_num_interop_threads()
    env["torch_layout"] = args.torch_layout
    env["torch_process"] = args.torch_process
    env["torch_malloc_keep"] = (args.torch_malloc == "keep" if args.torch_process == "separate"
                                else env["malloc_keep"])
  return env


def _yes_no(value) -> str:
  return {True: "yes", False: "no"}.get(value, "not recorded")


def pick_torch_device(args) -> str | None:
  if args.torch == "none":
    return None
  import jax  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("PyTorch is not installed: JAX side only.", file=sys.stderr)
    return None
  if args.torch == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and jax.default_backend() != "cpu":
      print(f"JAX runs on {jax.default_backend()} but PyTorch only on the CPU: "
            "no PyTorch comparison (pass --torch=cpu to force one).", file=sys.stderr)
      return None
    return device
  return args.torch


# ---------------------------------------------------------------------------------------
# Train step.


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


def bench_train_model(name: str, args, torch_device, peak_flops, log) -> dict:
  """Interleaved JAX / PyTorch train-step timing of one model (see the module docstring)."""
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

  config = jax_train.bench_config(name, batch=args.batch, dtype=args.dtype,
                                  model_kwargs=args.model_kwargs)
  jt = jax_train.JaxTrainer(config, images, labels, dists, step=args.step,
                            parallel=args.parallel, donate=not args.no_donate)
  out["jax"] = {"compile_s": jt.compile(), "params": jt.num_params,
                "xla_memory": jt.memory()}
  hw_flops = jt.step_flops()
  out["jax"]["xla_step_gflop"] = (hw_flops * len(jt.devices) / 1e9 if hw_flops and
                                  jt.parallel == "pmap" else
                                  hw_flops / 1e9 if hw_flops else None)
  out["jax"]["first_step_s"], out["jax"]["rss_growth_first_step"] = perf.timed_step(
      jt.step, jt.sync)
  out["jax"]["device_peak_bytes"] = perf.device_peak_bytes(jt.devices[0])
  log(f"  jax: compiled in {out['jax']['compile_s']:.1f} s, first step "
      f"{out['jax']['first_step_s']:.2f} s")

  sides = {"jax": (lambda: jt.step(), jt.sync)}
  if torch_device:
    from benchmarks import torch_train  # pylint: disable=g-import-not-at-top
    torch_args = (name, args.num_classes, images, labels, dists)
    torch_kwargs = dict(
        model_kwargs=args.model_kwargs, lr=float(config.learning_rate),
        weight_decay=float(config.weight_decay), lam=float(config.lam),
        channels_last=args.torch_layout == "channels_last",
        bf16=(args.torch_dtype or args.dtype) == "bfloat16", device=torch_device)
    if args.torch_process == "separate":
      tt = torch_process.TorchProcess(*torch_args, threads=args.torch_threads
                                      or perf.cpu_count(), malloc=args.torch_malloc,
                                      **torch_kwargs)
      out["torch"] = {"params": tt.num_params(),
                      "malloc_keep": tt.info["freed_memory_kept"]}
      if out["torch"]["malloc_keep"] != (args.torch_malloc == "keep"):
        raise RuntimeError(f"PyTorch's process was asked for --torch_malloc="
                           f"{args.torch_malloc} but kept freed memory: "
                           f"{out['torch']['malloc_keep']}")
      first = tt.first_step()
      out["torch"]["first_step_s"] = first["seconds"]
      out["torch"]["rss_growth_first_step"] = first["rss_growth"]
      if torch_device == "cuda":
        out["torch"]["device_peak_bytes"] = tt.peak_bytes()
    else:
      tt = torch_train.TorchTrainer(*torch_args, **torch_kwargs)
      out["torch"] = {"params": tt.num_params()}
      out["torch"]["first_step_s"], out["torch"]["rss_growth_first_step"] = perf.timed_step(
          tt.step, tt.sync)
      if torch_device == "cuda":
        import torch  # pylint: disable=g-import-not-at-top
        out["torch"]["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    sides["torch"] = (lambda: tt.step(), tt.sync)
    log(f"  torch: first step {out['torch']['first_step_s']:.2f} s")

  # One more untimed step each sizes the timed repeats.
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
  out["steps_per_repeat"], out["repeats"] = steps, repeats
  log(f"  timing {repeats} x {steps} step(s) per side (~{per_repeat * repeats:.0f} s)")

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
  for side in sides:
    ips = [args.batch * steps / t for t in times[side]]
    out[side]["images_per_s"] = _stats(ips)
    out[side]["step_s"] = _stats([t / steps for t in times[side]])
    if model_flops:
      achieved = model_flops / out[side]["step_s"]["median"]
      out[side]["model_tflop_per_s"] = achieved / 1e12
      out[side]["mfu"] = achieved / peak_flops if peak_flops else None
  if "torch" in sides:
    # Ratio of medians, and the median of per-repeat ratios (pairs timed back to back).
    out["ratio"] = out["jax"]["images_per_s"]["median"] / out["torch"]["images_per_s"]["median"]
    out["ratio_paired"] = float(np.median(np.asarray(times["torch"]) / np.asarray(times["jax"])))
    if isinstance(tt, torch_process.TorchProcess):
      tt.close()  # (a daemon: it dies with this process should anything above raise)
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


# ---------------------------------------------------------------------------------------
# Markdown.


def _mb(b):
  return "-" if b is None else f"{b / 2**20:.0f}"


def _ips(s):
  return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def markdown(results: dict) -> str:
  env = results["env"]
  dnnl_mode = env.get("dnnl", "off")
  dnnl_mode = {True: "all", False: "off"}.get(dnnl_mode, dnnl_mode)  # older JSON: a bool
  lines = ["## Environment", "",
           f"- command: `{env['command']}`",
           f"- devices: {', '.join(env['devices'])} ({env['device_kind']}); CPU: "
           f"{env['cpu']} ({', '.join(env.get('cpu_isa') or ['ISA unknown'])}), "
           f"{env['cpus']} CPUs usable",
           f"- jax {env['jax']}, flax {env.get('flax')}, optax {env.get('optax')}"
           + (f", torch {env['torch']} on {env['torch_device']}" if env.get("torch") else ""),
           f"- threads: XLA intra-op pool {env['xla_threads']} (one per CPU)"
           + (f"; torch {env['torch_threads']} intra-op, {env['torch_interop_threads']} "
              f"inter-op, {env['torch_layout']}, in "
              + ("a process of its own" if env.get("torch_process") == "separate"
                 else "the same process as JAX") if env.get("torch") else ""),
           "- glibc malloc keeps freed memory (`sdl_jax.cpu.process.keep_freed_memory`): "
           + _yes_no(env.get("malloc_keep")) + " in JAX's process"
           + (f", {_yes_no(env.get('torch_malloc_keep'))} in PyTorch's"
              if env.get("torch") else ""),
           f"- XLA_FLAGS: `{env['xla_flags'] or '(none)'}`; convolutions: "
           + (f"{' '.join(filter(None, ['oneDNN', env.get('onednn')]))} for {dnnl_mode} "
              "convolutions" if dnnl_mode != "off" else "XLA's"),
           ""]
  peak = results.get("peak")
  if peak:
    lines += [f"Matmul peak ({peak['n']}x{peak['n']}, {peak['dtype']}): "
              + ", ".join(f"{k} {peak[k] / 1e9:.1f} GFLOP/s" for k in PEAK_SOURCES
                          if k in peak)
              + f"; MFU below is against {peak['peak'] / 1e9:.1f} GFLOP/s.", ""]
  train = results.get("train")
  if train:
    lines += ["## Train step (forward, sdl_loss, backward, SGD momentum + weight decay)", "",
              "| model | px | batch | dtype | JAX img/s (min-max) | PyTorch img/s (min-max) "
              "| JAX/PyTorch | JAX compile s | GFLOP/img fwd | MFU JAX | MFU PyTorch "
              "| JAX XLA MiB | RSS growth MiB JAX / PyTorch |",
              "|---" * 13 + "|"]
    for r in train:
      if "error" in r:
        lines.append(f"| {r['model']} | error: {r['error']} |" + " |" * 11)
        continue
      j, t = r["jax"], r.get("torch")
      mfu = lambda s: "-" if not s or s.get("mfu") is None else f"{100 * s['mfu']:.1f}%"
      xla_mem = (j.get("xla_memory") or {}).get("total")
      dtype = r["dtype"] if r.get("torch_dtype", r["dtype"]) == r["dtype"] else (
          f"{r['dtype']} / {r['torch_dtype']}")
      lines.append(
          f"| {r['model']} | {r['image_size']} | {r['batch']} | {dtype} "
          f"| {_ips(j['images_per_s'])} | {_ips(t['images_per_s']) if t else '-'} "
          f"| {r['ratio']:.2f}x" if t else
          f"| {r['model']} | {r['image_size']} | {r['batch']} | {dtype} "
          f"| {_ips(j['images_per_s'])} | - | -")
      fwd = r.get("forward_gflop_per_image")
      lines[-1] += (f" | {j['compile_s']:.1f} | {fwd:.2f}" if fwd else
                    f" | {j['compile_s']:.1f} | -")
      lines[-1] += (f" | {mfu(j)} | {mfu(t)} | {_mb(xla_mem)} "
                    f"| {_mb(j['rss_growth_first_step'])} / "
                    f"{_mb(t['rss_growth_first_step']) if t else '-'} |")
    lines += ["", "Each model: " + "; ".join(
        f"{r['model']} {r['repeats']} repeats x {r['steps_per_repeat']} steps"
        for r in train if "error" not in r) + " per side, interleaved; medians.", ""]
  if results.get("memory"):
    from benchmarks import memory  # pylint: disable=g-import-not-at-top
    lines += memory.markdown(results["memory"])
  loss = results.get("loss")
  if loss:
    lines += ["## Loss gradient alone (d sdl_loss / d logits)", "",
              "| logits | gradient | us per gradient, in a loop (min-max) | us per jitted call "
              "| autodiff / this (loop) | HLO ops (fusions) |", "|---" * 6 + "|"]
    for r in loss:
      auto = r["autodiff"]["loop_us_median"]
      for v in [k for k in r if isinstance(r[k], dict) and "hlo_ops" in r[k]]:
        x = r[v]
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {v} | {x['loop_us_median']:.2f} "
            f"({min(x['loop_us']):.2f}-{max(x['loop_us']):.2f}) | {x['call_us_median']:.1f} "
            f"| {auto / x['loop_us_median']:.2f}x | {x['hlo_ops']['total']} "
            f"({x['hlo_ops']['fusions']}) |")
    lines += ["", "Largest difference between the gradients: "
              + ", ".join(f"{r['shape'][0]}x{r['shape'][1]}: {r['max_abs_diff']:.1e}"
                          for r in loss) + ".", ""]
  pipe = results.get("pipeline")
  if pipe:
    lines += ["## Input pipeline (tf.data, AUTOTUNE) against the train step", "",
              "| preset | data | px | batch | pipeline img/s | consumer | consumer img/s "
              "| pipeline/consumer |", "|---" * 8 + "|"]
    for r in pipe:
      if "error" in r:
        lines.append(f"| {r['preset']} | error: {r['error']} |" + " |" * 6)
        continue
      cons = r.get("consumer") or {}
      ratio = f"{r['ratio']:.1f}x" if r.get("ratio") else "-"
      lines.append(
          f"| {r['preset']} | {r['data']} | {r['image_size']} | {r['batch']} "
          f"| {r['images_per_s']:.0f} | {cons.get('what', '-')} "
          f"| {cons.get('images_per_s', float('nan')):.1f} | {ratio} |")
    lines.append("")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.xla_flags:
    process.append_xla_flags(args.xla_flags.split())
  cpu.configure()  # before JAX starts; $SDL_JAX_MALLOC=keep for the allocator setting
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  start = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr,
                          flush=True)
  torch_device = (pick_torch_device(args) if {"train", "memory"} & set(args.sections)
                  else None)
  if torch_device:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.torch_threads or perf.cpu_count())
  if args.kernels:
    os.environ["SDL_JAX_KERNELS"] = args.kernels  # sdl_jax.cpu.paths.ENV
  results = {"env": environment(args, torch_device)}
  log(f"devices: {results['env']['devices']}")

  def save():
    if args.out:
      tmp = args.out + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
      os.replace(tmp, args.out)

  if "train" in args.sections:
    results["peak"] = measure_peak(args, torch_device, log)
    results["train"] = []
    for name in args.models:
      log(f"train step: {name}")
      try:
        results["train"].append(bench_train_model(name, args, torch_device,
                                                  results["peak"]["peak"], log))
      except Exception as e:  # pylint: disable=broad-except
        # One broken model must not lose the others' figures; the error is reported.
        log(f"  {name} failed: {type(e).__name__}: {e}")
        results["train"].append({"model": name, "error": f"{type(e).__name__}: {e}"})
      save()
  if "memory" in args.sections:
    from benchmarks import memory  # pylint: disable=g-import-not-at-top
    results["memory"] = []
    memory.bench_memory(args, torch_device, model_image_size, log, results["memory"], save)
  if "loss" in args.sections:
    from benchmarks import loss_bench  # pylint: disable=g-import-not-at-top
    results["loss"] = []
    for n, c in args.loss_sizes:
      log(f"loss gradient {n}x{c}")
      results["loss"].append(loss_bench.bench_loss(
          n, c, repeats=args.loss_repeats, iters=args.loss_iters, variants=args.loss_variants))
    save()
  if "pipeline" in args.sections:
    from benchmarks import pipeline_bench  # pylint: disable=g-import-not-at-top
    results["pipeline"] = []
    with tempfile.TemporaryDirectory(prefix="sdl_bench_") as tmp:
      for preset in args.pipeline_presets:
        log(f"input pipeline: {preset}")
        try:
          results["pipeline"].append(pipeline_bench.bench_preset(
              preset, args, tmp, results.get("train") or [], log))
        except Exception as e:  # pylint: disable=broad-except
          log(f"  {preset} failed: {type(e).__name__}: {e}")
          results["pipeline"].append({"preset": preset, "error": f"{type(e).__name__}: {e}"})
        save()
  save()
  report = markdown(results)
  print(report)
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(report + "\n")
  return results


if __name__ == "__main__":
  main()
