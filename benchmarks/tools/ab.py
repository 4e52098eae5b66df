"""Interleaved A/B of the JAX train step under two or more settings, in one process: each
repeat times one step of every variant in turn (every other repeat in reverse order), so
drift of the machine's speed hits all of them alike. For changes smaller than the
run-to-run spread of ``benchmarks.run``, whose JAX/PyTorch ratios from separate runs cannot
show them.

    python -m benchmarks.tools.ab --model=efficientnet_lite0 --batch=32 --repeats=7 \\
        --variants=library,dnnl=off
    python -m benchmarks.tools.ab --model=resnet50 --variants=library,kernels=xla

A variant is ``library`` (as configured), ``dnnl=MODE`` (``sdl_jax.cpu.dnnl_route.use``),
``kernels=MODE`` (``sdl_jax.cpu.paths.use``), an XLA option for this compilation only
(``xla_...=value``, overriding ``$XLA_FLAGS``), or several joined by ``+``
(``dnnl=off+kernels=cpu``):

    python -m benchmarks.tools.ab --model=resnet50 --repeats=5 \
        --variants=library,xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT
After ``--warmup`` untimed steps of each, prints each repeat's seconds per step (``--steps``
steps of each variant per repeat, the device synchronised after them) and page faults,
then per variant the median images/s and how many repeats it was the fastest in; returns
``{variant: [seconds per step]}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time

import numpy as np

from sdl_jax import cpu
from benchmarks import WARMUP_STEPS, warm_up


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m benchmarks.tools.ab",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="efficientnet_lite0")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--model_kwargs", default="{}", help="JSON keyword arguments of the model")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--steps", type=int, default=1,
                 help="steps of each variant per repeat (more for a model whose step is "
                      "short, so that a repeat outlasts the machine's jitter)")
  p.add_argument("--warmup", type=int, default=WARMUP_STEPS,
                 help="untimed steps of each variant after compiling (benchmarks."
                      "WARMUP_STEPS: the first two page-fault a large model's buffers in)")
  p.add_argument("--variants", default="library,dnnl=off",
                 help="comma-separated variants: library, dnnl=MODE, kernels=MODE, an XLA "
                      "option xla_...=value, or several joined by '+'")
  args = p.parse_args(argv)
  cpu.configure()  # before JAX starts

  from benchmarks import jax_train  # pylint: disable=g-import-not-at-top
  from benchmarks.train_bench import synthetic_batch  # pylint: disable=g-import-not-at-top

  variants = [v for v in args.variants.split(",") if v]
  images, labels, dists = synthetic_batch(args.batch, args.image_size, 8)
  config = jax_train.bench_config(args.model, batch=args.batch,
                                  model_kwargs=json.loads(args.model_kwargs))
  trainers = {}
  for v in variants:
    with contextlib.ExitStack() as stack:  # traced (compiled) under the variant's modes
      options = _use(stack, v)
      t = jax_train.JaxTrainer(config, images, labels, dists)
      print(f"{v}: compiled in {t.compile(options):.1f} s, XLA temporaries "
            f"{t.memory()['temporaries'] / 2**20:.0f} MiB", flush=True)
    warm_up(t, args.warmup)
    trainers[v] = t
  times = {v: [] for v in variants}
  faults = {v: [] for v in variants}
  for r in range(args.repeats):
    # Every other repeat in reverse order, so that no variant always runs right after
    # the same one.
    for v, t in (list(trainers.items()) if r % 2 == 0 else list(trainers.items())[::-1]):
      faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      for _ in range(args.steps):
        t.step()
      t.sync()
      times[v].append((time.perf_counter() - t0) / args.steps)
      faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
    print(f"repeat {r}: " + ", ".join(f"{v} {times[v][-1]:.3f} s" for v in variants)
          + "; page faults " + ", ".join(str(faults[v][-1]) for v in variants), flush=True)
  fastest = np.argmin(np.asarray([times[v] for v in variants]), axis=0)
  for i, v in enumerate(variants):
    print(f"{v}: {args.batch / np.median(times[v]):.3f} img/s (median), fastest in "
          f"{int((fastest == i).sum())} of {args.repeats} repeats", flush=True)
  return times


def _use(stack: contextlib.ExitStack, variant: str) -> dict:
  """Enters one variant's modes on ``stack`` (see the module docstring); returns its XLA
  compiler options."""
  from sdl_jax.cpu import dnnl_route, paths  # pylint: disable=g-import-not-at-top
  modes = {"dnnl": dnnl_route.use, "kernels": paths.use}
  options = {}
  for part in variant.split("+"):
    key, eq, value = part.partition("=")
    if not eq and part == "library":
      continue
    if key in modes and eq:
      stack.enter_context(modes[key](value))
    elif key.startswith("xla_") and eq:
      # XLA takes a bool option only as a bool, not as the string 'true'.
      options[key] = {"true": True, "false": False}.get(value.lower(), value)
    else:
      raise ValueError(f"--variants: unknown setting {part!r} in {variant!r} "
                       "(library, dnnl=, kernels=, xla_...=)")
  return options


if __name__ == "__main__":
  main(sys.argv[1:])
