r"""The benchmark: one command, a markdown report on stdout and the figures as JSON.

    python -m benchmarks.run --out=bench.json                          # everything
    python -m benchmarks.run --models=small_cnn,resnet50 --sections=train
    python -m benchmarks.run --dtype=bfloat16 --xla_flags=--xla_cpu_use_xnnpack=true

Sections (``--sections``, default all):

* ``train``: images/s of one training step (forward, ``sdl_loss``, backward, SGD momentum
  0.9 + weight decay) for each model of ``--models``, at ``--batch`` and ``--image_size``
  (``small_cnn`` at ``--small_cnn_size``), in JAX (the library's pmapped ``train_step``
  over every local device) and in PyTorch (the same architecture from
  ``benchmarks.torch_models``, the same loss and optimizer; with ``--torch_compile`` also
  under ``torch.compile``, a third side). After compiling and one
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
import os
import sys
import tempfile
import time

# First: benchmarks.train_bench imports benchmarks.torch_process, which records the
# environment before the library changes it.
from benchmarks import train_bench
from benchmarks import environment
from benchmarks import report
from sdl_jax import cpu, perf
from sdl_jax.cpu import process

ALL_SECTIONS = ("train", "memory", "loss", "pipeline")
DEFAULT_MODELS = "small_cnn,efficientnet_lite0,resnet50,vgg16"


def _train_flags(p) -> None:
  """The train section's flags (the memory and pipeline sections read some of them too)."""
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
  g.add_argument("--torch_compile", action="store_true",
                 help="also time PyTorch's step under torch.compile, a third side beside "
                      "eager (its compilation is its first step, not timed; skipped with "
                      "a note where it does not compile)")
  g.add_argument("--torch_compile_mode", default="default",
                 choices=("default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"),
                 help="torch.compile's mode for --torch_compile")
  g.add_argument("--torch_malloc", default="default", choices=("default", "keep"),
                 help="glibc's allocator in PyTorch's process: as PyTorch runs it (default) "
                      "or keeping freed memory as the library's process does (keep; "
                      "sdl_jax.cpu.process.keep_freed_memory); with --torch_process=same it is "
                      "JAX's process's")


def _other_flags(p) -> None:
  """The memory, loss and pipeline sections' flags."""
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


def _checked(p, args):
  """``args`` with the list flags split and parsed; ``p.error`` on a bad value."""
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


def parse_args(argv=None):
  """The command line (``argv``, default ``sys.argv[1:]``), checked."""
  p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default=",".join(ALL_SECTIONS),
                 help="comma-separated subset of: " + ", ".join(ALL_SECTIONS))
  p.add_argument("--out", default="", help="write the JSON results here")
  p.add_argument("--markdown", default="", help="also write the markdown report here")
  _train_flags(p)
  _other_flags(p)
  return _checked(p, p.parse_args(argv))


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
  torch_device = (environment.pick_torch_device(args)
                  if {"train", "memory"} & set(args.sections) else None)
  if torch_device:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.torch_threads or perf.cpu_count())
  if args.kernels:
    os.environ["SDL_JAX_KERNELS"] = args.kernels  # sdl_jax.cpu.paths.ENV
  results = {"env": environment.environment(args, torch_device)}
  log(f"devices: {results['env']['devices']}")

  def save():
    if args.out:
      tmp = args.out + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
      os.replace(tmp, args.out)

  if "train" in args.sections:
    results["peak"] = train_bench.measure_peak(args, torch_device, log)
    results["train"] = []
    for name in args.models:
      log(f"train step: {name}")
      try:
        results["train"].append(train_bench.bench_train_model(
            name, args, torch_device, results["peak"]["peak"], log))
      except Exception as e:  # pylint: disable=broad-except
        # One broken model must not lose the others' figures; the error is reported.
        log(f"  {name} failed: {type(e).__name__}: {e}")
        results["train"].append({"model": name, "error": f"{type(e).__name__}: {e}"})
      save()
  if "memory" in args.sections:
    from benchmarks import memory  # pylint: disable=g-import-not-at-top
    results["memory"] = []
    memory.bench_memory(args, torch_device, train_bench.model_image_size, log,
                        results["memory"], save)
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
  text = report.markdown(results)
  print(text)
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return results


if __name__ == "__main__":
  main()
