"""The device check's markdown summary (``summary.md``), from what
``benchmarks.device_check`` writes to ``device_check.json``: the device, versions, date and
commit, each part's outcome, the test counts, the training run and the benchmark tables."""

from __future__ import annotations

from benchmarks import report


def status(res: dict) -> str:
  """A part's outcome in words: ok, failed, cut at its limit, or not run."""
  if "not_run" in res:
    return f"not run ({res['not_run']})"
  if res.get("timed_out"):
    return (f"finished, but stopped at its limit ({res['limit_s']:.0f} s) while exiting"
            if res.get("finished") else f"cut at its limit ({res['limit_s']:.0f} s)")
  return "ok" if res.get("ok") else f"failed (exit {res.get('rc')})"


def _test_lines(t: dict) -> list[str]:
  lines = ["## Tests", "",
           f"{t.get('passed', '?')} passed, {t.get('failed', '?')} failed, "
           f"{t.get('errors', '?')} errors, {t.get('skipped', '?')} skipped in "
           f"{t['seconds']:.0f} s ({status(t)}); float32 references compared at "
           "`JAX_DEFAULT_MATMUL_PRECISION=highest` (no TF32) with the CPU tolerances. "
           f"Files: {', '.join(t['selection'])}; left out: {', '.join(t['deselected'])}.", ""]
  lines += [f"- failed: `{f}`" for f in t.get("failed_ids", [])]
  return lines + ([""] if t.get("failed_ids") else [])


def _training_run_lines(r: dict) -> list[str]:
  lines = ["## Training run", "", f"{r['how']}: {status(r)} in {r['seconds']:.0f} s."]
  if "test" in r:
    t, losses = r["test"], r.get("train_loss") or []
    lines[-1] += (f" {r['steps']} steps on {r['examples']} images; test accuracy "
                  f"{t['accuracy']:.3f}, KL {t['kl']:.4f}, cosine {t['cosine']:.3f}")
    if len(losses) >= 2:
      lines[-1] += (f"; training loss {losses[0][1]:.3f} (step {losses[0][0]}) -> "
                    f"{losses[-1][1]:.3f} (step {losses[-1][0]})")
    lines[-1] += "."
  return lines + [""]


def _bench_lines(parts: dict) -> list[str]:
  rows, lines = [], []
  for name in ("bench_float32", "bench_bfloat16"):
    b = parts.get(name)
    if not b:
      continue
    lines.append(f"- {name}: {status(b)} in {b['seconds']:.0f} s"
                 + (f"; matmul peak {b['peak']['peak'] / 1e12:.2f} TFLOP/s "
                    f"({b['peak']['n']}x{b['peak']['n']} {b['peak']['dtype']})"
                    if b.get("peak") else ""))
    rows += b.get("train", [])
  ok = [r for r in rows if "error" not in r]
  table = (report.train_lines(ok) + report.compile_lines(ok)) if ok else []
  errors = [f"- {r['model']} ({r.get('dtype', '?')}): {r['error']}" for r in rows
            if "error" in r]
  return table + lines + errors + [""]


def summary(info: dict) -> str:
  """The markdown summary of ``device_check.json``'s ``info``."""
  env, parts = info["env"], info["parts"]
  bench_env = next((p["env"] for p in parts.values() if p.get("env")), {})
  # The bench's record of the device where the probe said nothing.
  device = env.get("device") or bench_env.get("device_kind") or "?"
  lines = [f"# Device check: {device} ({env.get('backend', '?')}), "
           f"{info['date']}", "",
           f"- command: `{info['command']}`{' (fast mode)' if info['fast'] else ''}",
           f"- commit {info['commit']}; jax {env.get('jax')}, torch {env.get('torch')}"
           + (f" (CUDA: {env['torch_cuda']})" if env.get("torch_cuda") else "")
           + f"; {env.get('devices')} local device(s)",
           f"- wall time {info['wall_s']:.0f} s; parts: "
           + ", ".join(f"{k} {status(v)}" for k, v in parts.items()), ""]
  for name, title, write in (("tests", "Tests", _test_lines),
                             ("train", "Training run", _training_run_lines)):
    if name in parts:
      lines += ([f"## {title}", "", status(parts[name]) + ".", ""] if "not_run" in parts[name]
                else write(parts[name]))
  if any(k.startswith("bench_") for k in parts):
    lines += _bench_lines(parts)
  return "\n".join(lines)
