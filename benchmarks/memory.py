"""Training memory: the library's train step against PyTorch's, each in a fresh process.

    python -m benchmarks.run --sections=memory
    python -m benchmarks.run --sections=memory --models=resnet50 --memory_steps=8

For every model of ``--models`` (same batch, image size and dtype as the ``train``
section), one child process runs the library's step (``jax_train.JaxTrainer``: the pmapped,
donating ``sdl_jax.train.train_step``) and another PyTorch's twin
(``torch_train.TorchTrainer``), ``--memory_steps`` steps each on one fixed batch. A fresh
interpreter per side: nothing the other framework or an earlier model allocated counts.
Each child reports

* ``peak_rss``: the process's peak resident memory (Linux ``VmHWM``): imports, weights,
  compilation and the steps; the larger of ``peak_rss_setup`` (up to the first step, the
  library's compilation included) and ``peak_rss_steps`` (the high-water mark, reset after
  the set-up, over the steps);
* ``rss_after_step``: resident memory after each step, for growth over a run;
* ``step_s``: seconds per step (the first one, which pages its buffers in, apart);
* on the library's side, XLA's buffer assignment of the compiled step
  (``compiled.memory_analysis()``: arguments, outputs, temporaries, donated-and-reused,
  generated code), per device.

``--memory_variants`` adds rows for the library's step with other settings of the same
model, e.g. ``efficientnet_lite0:remat,efficientnet_lite0:grad_accum=4`` (``config.remat``
and ``config.grad_accum_steps``); they are set against the same PyTorch process's figures.

Glibc's allocator runs as the environment says: the PyTorch child as PyTorch runs it
(``torch_process.child_env``), the library's child with the parent's ``$SDL_JAX_MALLOC``;
each row records whether its process kept freed memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

CHILD_FLAG = "--child="


def reset_peak_rss() -> bool:
  """Resets this process's ``VmHWM`` to its current RSS (``/proc/self/clear_refs``)."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
      f.write("5")
    return True
  except OSError:
    return False


def run_steps(step, sync, steps: int, before_steps=None) -> dict:
  """``steps`` times ``step(); sync()``, with this process's memory around them.

  ``before_steps()`` runs first (the library's compilation) and counts as set-up.

  Returns:
    ``peak_rss_setup`` (high-water mark up to the first step), ``peak_rss_steps`` (over
    the steps alone, or None where the mark cannot be reset), ``peak_rss`` (the larger),
    ``rss_before_steps``, ``rss_after_step`` (a list), ``step_s`` (a list), in bytes and
    seconds.
  """
  from sdl_jax.perf import _proc_status as proc_status_bytes  # pylint: disable=g-import-not-at-top
  if before_steps is not None:
    before_steps()
  out = {"peak_rss_setup": proc_status_bytes("VmHWM"),
         "rss_before_steps": proc_status_bytes("VmRSS")}
  reset = reset_peak_rss()
  out["rss_after_step"], out["step_s"] = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    sync()
    out["step_s"].append(time.perf_counter() - t0)
    out["rss_after_step"].append(proc_status_bytes("VmRSS"))
  out["peak_rss_steps"] = proc_status_bytes("VmHWM") if reset else None
  out["peak_rss"] = max(v for v in (out["peak_rss_setup"], out["peak_rss_steps"])
                        if v is not None)
  return out


def xla_memory(compiled) -> dict | None:
  """XLA's buffer assignment of a compiled step (``sdl_jax.perf.compiled_memory``) plus the
  size of its generated code, in bytes."""
  from sdl_jax import perf  # pylint: disable=g-import-not-at-top
  out = perf.compiled_memory(compiled)
  if out is not None:
    code = getattr(compiled.memory_analysis(), "generated_code_size_in_bytes", None)
    out["generated_code"] = None if code is None else int(code)
  return out


def _jax_child(spec: dict) -> dict:
  from benchmarks import jax_train  # pylint: disable=g-import-not-at-top
  from benchmarks.train_bench import synthetic_batch  # pylint: disable=g-import-not-at-top
  from sdl_jax.cpu import process  # pylint: disable=g-import-not-at-top
  config = jax_train.bench_config(spec["model"], batch=spec["batch"], dtype=spec["dtype"],
                                  model_kwargs=spec["model_kwargs"])
  config.remat = bool(spec.get("remat", False))
  config.grad_accum_steps = int(spec.get("grad_accum_steps", 1))
  trainer = jax_train.JaxTrainer(config, *synthetic_batch(
      spec["batch"], spec["image_size"], spec["num_classes"]))
  out = run_steps(trainer.step, trainer.sync, spec["steps"], before_steps=trainer.compile)
  out.update(xla=xla_memory(trainer.compiled), compile_s=trainer.compile_s,
             params=trainer.num_params, malloc_keep=process.freed_memory_kept())
  return out


def _torch_child(spec: dict) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_train  # pylint: disable=g-import-not-at-top
  from benchmarks.train_bench import synthetic_batch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(spec["threads"])
  trainer = torch_train.TorchTrainer(
      spec["model"], spec["num_classes"],
      *synthetic_batch(spec["batch"], spec["image_size"], spec["num_classes"]),
      model_kwargs=spec["model_kwargs"], bf16=spec["dtype"] == "bfloat16", device="cpu")
  out = run_steps(trainer.step, trainer.sync, spec["steps"])
  out.update(params=trainer.num_params(), threads=torch.get_num_threads())
  return out


def run_child(side: str, spec: dict, env: dict | None = None) -> dict:
  """Runs ``_jax_child`` or ``_torch_child`` (``side``) on ``spec`` in a fresh Python
  process (``python -m benchmarks.memory --child=SIDE SPEC_JSON``) and returns its dict.
  Raises RuntimeError with the child's stderr if it fails."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.memory", CHILD_FLAG + side, json.dumps(spec)],
      cwd=repo, env=env, capture_output=True, text=True, check=False)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    raise RuntimeError(f"the {side} memory process failed (exit code {proc.returncode}):\n"
                       + proc.stderr[-4000:])
  return json.loads(lines[-1])


def parse_variants(text: str) -> list[tuple[str, dict]]:
  """``'m:remat,m:grad_accum=4,m:remat+grad_accum=2'`` -> ``[(model, settings), ...]`` with
  settings ``{'remat': bool, 'grad_accum_steps': int}``; a ValueError naming the flag."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    model, _, rest = item.partition(":")
    settings = {"remat": False, "grad_accum_steps": 1}
    for part in filter(None, rest.split("+")):
      key, _, value = part.partition("=")
      if key == "remat" and not value:
        settings["remat"] = True
      elif key == "grad_accum" and value.isdigit() and int(value) >= 1:
        settings["grad_accum_steps"] = int(value)
      else:
        raise ValueError(f"--memory_variants: {part!r} in {item!r} is not 'remat' or "
                         "'grad_accum=K' (K >= 1)")
    if not model or not rest:
      raise ValueError(f"--memory_variants: {item!r} must look like MODEL:remat or "
                       "MODEL:grad_accum=4")
    out.append((model, settings))
  return out


def variant_name(settings: dict) -> str:
  parts = (["remat"] if settings.get("remat") else []) + (
      [f"grad_accum={settings['grad_accum_steps']}"]
      if settings.get("grad_accum_steps", 1) > 1 else [])
  return "+".join(parts) or "library"


def bench_memory(args, torch_device, image_size, log, rows=None, save=lambda: None):
  """The section's rows: per model, the library's default step and PyTorch's, then the
  library's ``--memory_variants`` of that model. Appends each to ``rows`` (returned) and
  calls ``save()`` after it, so an interrupted run keeps the rows it finished."""
  from benchmarks import torch_process  # pylint: disable=g-import-not-at-top
  from sdl_jax import perf  # pylint: disable=g-import-not-at-top
  variants = parse_variants(args.memory_variants)
  rows = [] if rows is None else rows
  for name in args.models:
    spec = {"model": name, "batch": args.batch, "image_size": image_size(name, args),
            "num_classes": args.num_classes, "dtype": args.dtype,
            "model_kwargs": args.model_kwargs, "steps": args.memory_steps}
    torch_row = None
    if torch_device == "cpu":
      log(f"memory: {name}, PyTorch")
      try:
        torch_row = run_child("torch", {**spec, "threads": perf.cpu_count()},
                              env=torch_process.child_env("default"))
      except RuntimeError as e:
        log(f"  failed: {e}")
        torch_row = {"error": str(e)[:2000]}
    for settings in [{"remat": False, "grad_accum_steps": 1}] + [
        s for m, s in variants if m == name]:
      row = {**spec, "variant": variant_name(settings), **settings, "torch": torch_row}
      log(f"memory: {name}, library ({row['variant']})")
      try:
        row["jax"] = run_child("jax", {**spec, **settings})
      except RuntimeError as e:
        log(f"  failed: {e}")
        row["jax"] = {"error": str(e)[:2000]}
      if "peak_rss" in row["jax"] and torch_row and "peak_rss" in torch_row:
        row["ratio"] = row["jax"]["peak_rss"] / torch_row["peak_rss"]
      rows.append(row)
      save()
  return rows


def _mib(b) -> str:
  return "-" if b is None else f"{b / 2**20:.0f}"


def _median(values) -> float | None:
  v = sorted(values)
  return None if not v else (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def growth(rss_after_step) -> float | None:
  """RSS after the last step over RSS after the first, minus one (0.05 = grew 5%)."""
  if not rss_after_step or len(rss_after_step) < 2 or not rss_after_step[0]:
    return None
  return rss_after_step[-1] / rss_after_step[0] - 1


def markdown(rows: list[dict]) -> list[str]:
  """The section's markdown lines: one row per model and variant."""
  lines = ["## Training memory (peak resident memory of each framework's process)", "",
           "| model | px | batch | library step | library peak RSS MiB "
           "| PyTorch peak RSS MiB | library / PyTorch | XLA temp MiB | XLA args MiB "
           "| XLA out MiB | XLA code MiB | library s/step | PyTorch s/step "
           "| RSS growth first->last step, library / PyTorch |", "|---" * 14 + "|"]
  for r in rows:
    j, t = r.get("jax") or {}, r.get("torch") or {}
    head = f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['variant']} "
    if "error" in j:
      lines.append(head + f"| error: {j['error'].splitlines()[-1][:200]} |" + " |" * 9)
      continue
    x = j.get("xla") or {}
    ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
    grow = lambda s: "-" if growth(s.get("rss_after_step")) is None else (
        f"{100 * growth(s['rss_after_step']):+.1f}%")
    step = lambda s: "-" if not s.get("step_s") else f"{_median(s['step_s'][1:] or s['step_s']):.2f}"
    lines.append(
        head + f"| {_mib(j.get('peak_rss'))} | {_mib(t.get('peak_rss'))} | {ratio} "
        f"| {_mib(x.get('temporaries'))} | {_mib(x.get('arguments'))} "
        f"| {_mib(x.get('outputs'))} | {_mib(x.get('generated_code'))} | {step(j)} "
        f"| {step(t)} | {grow(j)} / {grow(t)} |")
  lines += ["", "Peak RSS: the process's high-water mark (imports, weights, compilation and "
            "the steps); XLA's figures are the compiled step's buffer assignment per device; "
            "s/step: median after the first step.", ""]
  return lines


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2 or not argv[0].startswith(CHILD_FLAG):
    raise SystemExit("usage (internal, started by benchmarks.run --sections=memory): "
                     "python -m benchmarks.memory --child=jax|torch SPEC_JSON")
  side, spec = argv[0][len(CHILD_FLAG):], json.loads(argv[1])
  fn = {"jax": _jax_child, "torch": _torch_child}.get(side)
  if fn is None:
    raise SystemExit(f"--child must be jax or torch, got {side!r}")
  print(json.dumps(fn(spec)), flush=True)


if __name__ == "__main__":
  main()
