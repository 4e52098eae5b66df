r"""oneDNN's primitives in the train step, the library's and PyTorch's side by side.

    python -m benchmarks.tools.primitives --model=small_cnn
    python -m benchmarks.tools.primitives --model=resnet50 --steps=2 --rounds=1 --out=prims.json

Both frameworks run their convolutions on oneDNN (the library through its FFI handlers,
``sdl_jax.cpu.dnnl``; PyTorch through its bundled copy), and oneDNN times every call it
runs when ``ONEDNN_VERBOSE=1`` is set. Each round runs the library's step and then
PyTorch's (the step ``benchmarks.run`` times, on the same synthetic batch), each in a child
process of its own with that variable set, ``--steps`` steps after three warm-up ones, and
this tool matches the calls by primitive, direction and shape: the median milliseconds per
call, calls per step and the ratio. A convolution whose call takes longer inside the
library's step than inside PyTorch's, with the same kernel, is waiting for the cores (XLA
ran another op beside it); a different kernel name means oneDNN chose differently (oneDNN
3.2 here against PyTorch's newer one). In the library's process jaxlib's own copy of
oneDNN also reports the small matrix products XLA's own convolutions and dots are built
from (``gemm_api``; XLA runs them on both threads at once, so their sum overstates wall
time); they are summed in one row. The printing slows both steps, and where XLA's own
convolutions run (ResNet-50's and VGG-16's large weight gradients print thousands of
``gemm_api`` lines a step) it slows the library's far more (ResNet-50: 7.5 s a step
against 6.0 s without it, and single forward calls 2-4x their time in a
``benchmarks.tools.profile`` trace): compare calls, and trust the step times only for models
whose convolutions are all oneDNN's (the small CNN, EfficientNet-Lite0).

Exploratory, like ``benchmarks.tools.profile``: for finding where a gap sits, not for the
README's speed figures, which come from ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys

import numpy as np

from sdl_jax import cpu, perf
from benchmarks import warm_up, write_report

FRAMEWORKS = ("jax", "torch")
_START, _END = "=====sdl_jax primitives start", "=====sdl_jax primitives end"


def parse_line(line: str) -> dict | None:
  """One ``ONEDNN_VERBOSE`` execution line as ``{primitive, direction, impl, shape, ms}``,
  or None for any other line. Reads both oneDNN 3.2's layout
  (``onednn_verbose,exec,cpu,convolution,<impl>,<direction>,...,<shape>,<ms>``) and newer
  ones' (``onednn_verbose,v1,primitive,exec,cpu,...``)."""
  if not line.startswith("onednn_verbose") or ",exec," not in line:
    return None
  f = line.rstrip("\n").split(",")
  i = f.index("exec")
  try:
    ms = float(f[-1])
  except ValueError:
    return None
  return {"primitive": f[i + 2], "impl": f[i + 3], "direction": f[i + 4],
          "shape": f[-2], "ms": ms}


def _key(call: dict) -> tuple[str, str, str]:
  if call["primitive"] == "gemm_api":
    return ("gemm_api", "", "")  # XLA's matmul blocks: one row
  if call["primitive"] == "reorder":
    return ("reorder", "", "")   # weight layouts: one row
  shape = re.sub(r"^mb\d+_", "", call["shape"])
  return (call["primitive"], call["direction"], shape)


def summarise(calls: list[dict], steps: int) -> dict:
  """Per ``(primitive, direction, shape)``: median ms per call, calls per step, ms per step
  (the sum over calls / steps), and the kernels' names."""
  groups = collections.defaultdict(list)
  for c in calls:
    groups[_key(c)].append(c)
  out = {}
  for key, cs in groups.items():
    ms = [c["ms"] for c in cs]
    out[key] = {"median_ms": float(np.median(ms)), "per_step": len(cs) / steps,
                "ms_per_step": sum(ms) / steps,
                "impl": sorted({c["impl"] for c in cs if c["impl"]})}
  return out


def _child(args) -> None:
  from benchmarks.train_bench import synthetic_batch  # pylint: disable=g-import-not-at-top
  size = args.image_size or (64 if args.model == "small_cnn" else 224)
  images, labels, dists = synthetic_batch(args.batch, size, 8)
  if args.child == "jax":
    from benchmarks import jax_train  # pylint: disable=g-import-not-at-top
    config = jax_train.bench_config(args.model, batch=args.batch)
    trainer = jax_train.JaxTrainer(config, images, labels, dists)
    trainer.compile()
  else:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_train  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(perf.cpu_count())
    trainer = torch_train.TorchTrainer(args.model, dists.shape[1], images, labels, dists)
  warm_up(trainer)
  print(_START, flush=True)
  step_s = [perf.timed_step(trainer.step, trainer.sync)[0] for _ in range(args.steps)]
  print(f"{_END} {json.dumps(step_s)}", flush=True)


def run_child(framework: str, args) -> dict:
  """Runs one framework's steps in a child process with ``ONEDNN_VERBOSE=1``; returns its
  parsed calls and step times."""
  cmd = [sys.executable, "-m", "benchmarks.tools.primitives", f"--child={framework}",
         f"--model={args.model}", f"--batch={args.batch}", f"--image_size={args.image_size}",
         f"--steps={args.steps}"]
  env = dict(os.environ, ONEDNN_VERBOSE="1", DNNL_VERBOSE="1")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  out = proc.stdout
  if proc.returncode != 0 or _START not in out or _END not in out:
    raise RuntimeError(f"{framework} child failed (exit {proc.returncode}):\n"
                       + (proc.stderr or out)[-3000:])
  body, tail = out.split(_START, 1)[1].split(_END, 1)
  calls = [c for c in map(parse_line, body.splitlines()) if c]
  return {"calls": calls, "step_s": json.loads(tail.strip().splitlines()[0])}


def compare(jax_rows: dict, torch_rows: dict) -> list[dict]:
  """One row per key in either; ``ratio`` is the library's median over PyTorch's."""
  rows = []
  for key in sorted(set(jax_rows) | set(torch_rows)):
    j, t = jax_rows.get(key), torch_rows.get(key)
    rows.append({"primitive": key[0], "direction": key[1], "shape": key[2],
                 "jax": j, "torch": t,
                 "ratio": j["median_ms"] / t["median_ms"] if j and t and t["median_ms"]
                 else None})
  return rows


def markdown(report: dict) -> str:
  def cell(r):
    if not r:
      return "-"
    return f"{r['median_ms']:.2f} x {r['per_step']:g} ({', '.join(r['impl'])})"
  lines = [f"# oneDNN primitives in the train step: {report['model']}, batch "
           f"{report['batch']}, {report['steps']} steps x {report['rounds']} rounds",
           "", f"- step ms (median): JAX {report['step_ms']['jax']:.1f}, PyTorch "
           f"{report['step_ms']['torch']:.1f}",
           "- oneDNN ms per step (sum of its calls, XLA's gemm_api blocks left out): "
           f"JAX {report['sum_ms']['jax']:.1f}, PyTorch {report['sum_ms']['torch']:.1f}", "",
           "| primitive | direction | shape | JAX ms x calls/step (kernel) | "
           "PyTorch ms x calls/step (kernel) | JAX/PyTorch |", "|---|---|---|---|---|---|"]
  for r in report["rows"]:
    ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    lines.append(f"| {r['primitive']} | {r['direction']} | {r['shape']} | {cell(r['jax'])} "
                 f"| {cell(r['torch'])} | {ratio} |")
  return "\n".join(lines)


def main(argv=None) -> dict | None:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(prog="python -m benchmarks.tools.primitives",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="small_cnn")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--image_size", type=int, default=0,
                 help="0: 224, or the small CNN's 64")
  p.add_argument("--steps", type=int, default=5, help="steps per round (after 3 warm-up)")
  p.add_argument("--rounds", type=int, default=2,
                 help="rounds, each running the library's steps and then PyTorch's")
  p.add_argument("--out", default="", help="write the JSON here")
  p.add_argument("--child", choices=FRAMEWORKS, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  cpu.configure()  # before JAX starts: XLA flags, allocator
  if args.steps < 1 or args.rounds < 1:
    p.error("--steps and --rounds must be at least 1")
  if args.child:
    _child(args)
    return None
  calls = {f: [] for f in FRAMEWORKS}
  step_s = {f: [] for f in FRAMEWORKS}
  for _ in range(args.rounds):
    for f in FRAMEWORKS:
      got = run_child(f, args)
      calls[f] += got["calls"]
      step_s[f] += got["step_s"]
  steps = args.steps * args.rounds
  summaries = {f: summarise(calls[f], steps) for f in FRAMEWORKS}
  report = {"model": args.model, "batch": args.batch, "steps": args.steps,
            "rounds": args.rounds,
            "command": "python -m benchmarks.tools.primitives " + " ".join(argv),
            "step_ms": {f: 1e3 * float(np.median(step_s[f])) for f in FRAMEWORKS},
            "sum_ms": {f: sum(r["ms_per_step"] for k, r in summaries[f].items()
                              if k[0] != "gemm_api") for f in FRAMEWORKS},
            "rows": compare(summaries["jax"], summaries["torch"])}
  return write_report(report, markdown(report), args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
