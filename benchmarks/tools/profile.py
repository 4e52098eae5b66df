r"""Where one train step's time goes, op by op: the library's JAX step or PyTorch's.

    python -m benchmarks.tools.profile --model=resnet50                    # the library's step
    python -m benchmarks.tools.profile --model=resnet50 --framework=torch  # PyTorch's twin
    python -m benchmarks.tools.profile --model=efficientnet_lite0 --top=40 --out=prof.json

The step is the one ``benchmarks.run`` times (``jax_train.JaxTrainer``: the library's
pmapped ``train_step``; ``torch_train.TorchTrainer``), on the same synthetic batch. Run
each framework in a process of its own, as ``benchmarks.run`` does.

JAX: after compiling and three warm-up steps (``benchmarks.WARMUP_STEPS``), ``--steps``
steps run under ``jax.profiler``; every traced event whose name is an instruction of the
compiled step (the optimised HLO) is one op's run. Reported per step: the wall time, the
sum of the ops' times, the time at least one op ran ("busy") and at least two ran at once
("concurrent": XLA:CPU runs independent ops on its pool's threads side by side, and then
each one's time includes waiting for the cores), and the ops grouped by kind (oneDNN's
three convolution directions, XLA's own convolutions, ``ynn_fusion`` reductions, the
fusion kinds XLA names) and by layer (from the HLO's ``op_name``, forward or backward).
An op that hands its work to XLA's pool (XLA's own convolutions) is traced only for its
hand-off; the wall time not covered by any op ("untraced") is mostly theirs.

PyTorch: ``torch.profiler`` over the same number of steps; each aten op's self CPU time
per step (PyTorch's eager step runs one op at a time, its intra-op threads inside).

Exploratory, like ``benchmarks.tools.ab``: what it prints is for finding where a gap sits, not
for the README's speed figures, which come from ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import numpy as np

from sdl_jax import cpu, perf
from sdl_jax.cpu import dnnl_lib
from benchmarks import warm_up, write_report

ONEDNN_TARGETS = {dnnl_lib.TARGETS[d]: f"oneDNN conv {label}" for d, label in (
    ("fwd", "forward"), ("bwd_data", "input grad"), ("bwd_weights", "weight grad"))}
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(")


def hlo_ops(hlo_text: str) -> dict[str, dict]:
  """The optimised HLO's instructions: ``{name: {kind, layer, direction}}``.

  ``kind``: a oneDNN call's direction (``ONEDNN_TARGETS``), another custom call's target,
  a fusion's name without its number (``add_select_fusion``), else the opcode
  (``convolution``, ``copy``). ``layer`` and ``direction`` come from the ``op_name``
  metadata (``jit(f)/transpose(jvp(ResNet50))/layer1_2/bn3/jit(_where)/select_n``:
  ``layer1_2/bn3``, ``backward``); ``''`` where there is none."""
  ops = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    target = re.search(r'custom_call_target="([^"]+)"', line)
    if target:
      kind = ONEDNN_TARGETS.get(target.group(1), target.group(1))
    elif opcode == "fusion":
      kind = re.sub(r"\.\d+$", "", name)
    else:
      kind = opcode
    op_name = re.search(r'op_name="([^"]*)"', line)
    layer, direction = layer_of(op_name.group(1) if op_name else "")
    ops[name] = {"kind": kind, "layer": layer, "direction": direction}
  return ops


def layer_of(op_name: str) -> tuple[str, str]:
  """``(layer path, 'forward' | 'backward' | '')`` of an HLO ``op_name``: the path's
  plain segments (module names) but the last (the primitive), and ``backward`` where the
  path runs through a ``transpose(...)`` (reverse-mode autodiff)."""
  if not op_name:
    return "", ""
  direction = "backward" if "transpose(" in op_name else "forward"
  segments = [s for s in op_name.split("/") if s and "(" not in s and ")" not in s]
  return "/".join(segments[:-1]), direction


def _intervals_stats(intervals: list[tuple[float, float]]) -> tuple[float, float]:
  """``(busy, concurrent)``: the time covered by at least one and by at least two of the
  ``[start, end)`` intervals (a sweep over their end points)."""
  points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
  busy = concurrent = 0.0
  depth, last = 0, None
  for t, d in points:
    if last is not None:
      busy += (t - last) * (depth >= 1)
      concurrent += (t - last) * (depth >= 2)
    depth += d
    last = t
  return busy, concurrent


def summarise_trace(events: list[dict], ops: dict[str, dict], steps: int) -> dict:
  """Per-step figures (milliseconds) of the trace ``events`` (Chrome trace format, times
  in microseconds) of ``steps`` steps of the program whose instructions are ``ops``."""
  runs = [e for e in events if e.get("ph") == "X" and e.get("name") in ops]
  by_kind, by_layer, by_op = (collections.defaultdict(lambda: [0.0, 0]) for _ in range(3))
  for e in runs:
    op = ops[e["name"]]
    ms = e["dur"] / 1e3 / steps
    for table, key in ((by_kind, op["kind"]),
                       (by_layer, f"{op['layer'] or '(none)'} {op['direction']}".strip()),
                       (by_op, e["name"])):
      table[key][0] += ms
      table[key][1] += 1
  busy, concurrent = _intervals_stats([(e["ts"], e["ts"] + e["dur"]) for e in runs])

  def rows(table, label):
    out = [{label: k, "ms": v[0], "count": v[1] / steps} for k, v in table.items()]
    return sorted(out, key=lambda r: -r["ms"])

  top = rows(by_op, "name")
  for r in top:
    r.update(ops[r["name"]])
  return {"ops_ms": sum(e["dur"] for e in runs) / 1e3 / steps,
          "busy_ms": busy / 1e3 / steps, "concurrent_ms": concurrent / 1e3 / steps,
          "by_kind": rows(by_kind, "kind"), "by_layer": rows(by_layer, "layer"), "ops": top}


def profile_jax(name, images, labels, dists, steps: int, trace_dir: str,
                model_kwargs=None) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import jax_train  # pylint: disable=g-import-not-at-top
  config = jax_train.bench_config(name, batch=images.shape[0], model_kwargs=model_kwargs)
  trainer = jax_train.JaxTrainer(config, images, labels, dists)
  trainer.compile()
  warm_up(trainer)
  jax.profiler.start_trace(trace_dir)
  try:
    step_s = [perf.timed_step(trainer.step, trainer.sync)[0] for _ in range(steps)]
  finally:
    jax.profiler.stop_trace()
  found = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
  if not found:
    raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
  with gzip.open(max(found, key=os.path.getmtime)) as f:
    events = json.load(f)["traceEvents"]
  out = summarise_trace(events, hlo_ops(trainer.compiled.as_text()), steps)
  wall_ms = 1e3 * float(np.median(step_s))
  out.update(step_s=step_s, wall_ms=wall_ms, untraced_ms=max(0.0, wall_ms - out["busy_ms"]))
  return out


def profile_torch(name, images, labels, dists, steps: int, model_kwargs=None) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_train  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(perf.cpu_count())
  trainer = torch_train.TorchTrainer(name, dists.shape[1], images, labels, dists,
                                     model_kwargs=model_kwargs)
  warm_up(trainer)
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    step_s = [perf.timed_step(trainer.step, trainer.sync)[0] for _ in range(steps)]
  ops = [{"name": ev.key, "ms": ev.self_cpu_time_total / 1e3 / steps,
          "count": ev.count / steps} for ev in prof.key_averages()]
  ops.sort(key=lambda r: -r["ms"])
  return {"step_s": step_s, "wall_ms": 1e3 * float(np.median(step_s)),
          "ops_ms": sum(r["ms"] for r in ops), "ops": ops}


def markdown(report: dict, top: int) -> str:
  r = report["result"]
  lines = [f"# {report['framework']} train step: {report['model']}, batch {report['batch']}, "
           f"{report['image_size']} px, {report['steps']} profiled steps", "",
           f"- wall per step (median): {r['wall_ms']:.1f} ms "
           f"(steps: {', '.join(f'{1e3 * s:.0f}' for s in r['step_s'])} ms)",
           f"- ops' time summed: {r['ops_ms']:.1f} ms per step"]
  if "busy_ms" in r:
    lines += [f"- some op running: {r['busy_ms']:.1f} ms; two or more at once: "
              f"{r['concurrent_ms']:.1f} ms; untraced (wall - busy): {r['untraced_ms']:.1f} ms"]
    for table, label in (("by_kind", "kind"), ("by_layer", "layer")):
      lines += ["", f"| {label} | ms per step | ops per step |", "|---|---|---|"]
      lines += [f"| {x[label]} | {x['ms']:.1f} | {x['count']:g} |" for x in r[table][:top]]
    lines += ["", "| op | kind | layer | direction | ms per step |", "|---|---|---|---|---|"]
    lines += [f"| {x['name']} | {x['kind']} | {x['layer']} | {x['direction']} | "
              f"{x['ms']:.1f} |" for x in r["ops"][:top]]
  else:
    lines += ["", "| aten op | self CPU ms per step | calls per step |", "|---|---|---|"]
    lines += [f"| {x['name']} | {x['ms']:.1f} | {x['count']:g} |" for x in r["ops"][:top]]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(prog="python -m benchmarks.tools.profile",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="resnet50")
  p.add_argument("--framework", choices=("jax", "torch"), default="jax")
  p.add_argument("--model_kwargs", default="{}", help="JSON keyword arguments of the model")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--image_size", type=int, default=0,
                 help="0: 224, or the small CNN's 64")
  p.add_argument("--steps", type=int, default=2, help="steps profiled (after 3 warm-up)")
  p.add_argument("--top", type=int, default=25, help="rows of each table")
  p.add_argument("--trace_dir", default="",
                 help="keep JAX's trace here (for Perfetto/TensorBoard); default: a "
                      "temporary folder, removed")
  p.add_argument("--out", default="", help="write the JSON here")
  args = p.parse_args(argv)
  cpu.configure()  # before JAX starts: XLA flags, allocator
  if args.steps < 1:
    p.error(f"--steps must be at least 1, got {args.steps}")

  from benchmarks.train_bench import synthetic_batch  # pylint: disable=g-import-not-at-top
  size = args.image_size or (64 if args.model == "small_cnn" else 224)
  kwargs = json.loads(args.model_kwargs)
  images, labels, dists = synthetic_batch(args.batch, size, 8)
  if args.framework == "jax":
    keep = contextlib.nullcontext(args.trace_dir) if args.trace_dir else None
    with keep or tempfile.TemporaryDirectory() as d:
      result = profile_jax(args.model, images, labels, dists, args.steps, d, kwargs)
  else:
    result = profile_torch(args.model, images, labels, dists, args.steps, kwargs)
  report = {"framework": args.framework, "model": args.model, "batch": args.batch,
            "image_size": size, "steps": args.steps,
            "command": "python -m benchmarks.tools.profile " + " ".join(argv),
            "result": result}
  return write_report(report, markdown(report, args.top), args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
