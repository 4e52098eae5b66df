"""The benchmark's markdown report, from the results dict ``benchmarks.run`` writes as
JSON."""

from __future__ import annotations

from benchmarks.train_bench import PEAK_SOURCES


def _yes_no(value) -> str:
  return {True: "yes", False: "no"}.get(value, "not recorded")


def _mb(b):
  return "-" if b is None else f"{b / 2**20:.0f}"


def _ips(s):
  return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def _environment_lines(env: dict) -> list[str]:
  """The environment section: command, devices, versions, threads, allocator, kernels."""
  dnnl_mode = env.get("dnnl", "off")
  dnnl_mode = {True: "all", False: "off"}.get(dnnl_mode, dnnl_mode)  # older JSON: a bool
  lines = ["## Environment", "",
           f"- command: `{env['command']}`",
           f"- devices: {', '.join(env['devices'])} ({env['device_kind']}); CPU: "
           f"{env['cpu']} ({', '.join(env.get('cpu_isa') or ['ISA unknown'])}), "
           f"{env['cpus']} CPUs usable",
           f"- jax {env['jax']}, flax {env.get('flax')}, optax {env.get('optax')}"
           + (f", torch {env['torch']} on {env['torch_device']}" if env.get("torch") else "")
           + (f", eager and torch.compile (mode {env['torch_compile']})"
              if env.get("torch_compile") else ""),
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
  return lines


def train_lines(train: list) -> list[str]:
  """The train-step table, one row per model."""
  lines = ["## Train step (forward, sdl_loss, backward, SGD momentum + weight decay)", "",
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
  return lines


def _peak_mib(side) -> str:
  """A side's peak memory: on an accelerator the device's peak bytes in use, else the
  growth of the process's peak RSS during the first step."""
  if not side or "skipped" in side:
    return "-"
  peak = side.get("device_peak_bytes")
  return _mb(peak if peak is not None else side.get("rss_growth_first_step"))


def compile_lines(train: list) -> list[str]:
  """PyTorch eager beside ``torch.compile`` (``--torch_compile``), with each side's peak
  memory, one row per model."""
  lines = ["## Against PyTorch eager and torch.compile, with peak memory", "",
           "| model | px | batch | dtype | JAX img/s | PyTorch eager img/s "
           "| torch.compile img/s | JAX/eager | JAX/compiled | compile s (first step) "
           "| peak MiB JAX / eager / compiled |", "|---" * 11 + "|"]
  for r in train:
    if "error" in r or "torch_compile" not in r:
      continue
    j, t, c = r["jax"], r["torch"], r["torch_compile"]
    compiled = (f"skipped ({c['skipped']})" if "skipped" in c else _ips(c["images_per_s"]))
    lines.append(
        f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['dtype']} "
        f"| {_ips(j['images_per_s'])} | {_ips(t['images_per_s'])} | {compiled} "
        f"| {r['ratio']:.2f}x | "
        + (f"{r['ratio_compile']:.2f}x | {c['first_step_s']:.1f}" if "ratio_compile" in r
           else "- | -")
        + f" | {_peak_mib(j)} / {_peak_mib(t)} / {_peak_mib(c)} |")
  lines += ["", "Peak memory: on an accelerator the device's peak bytes in use (JAX: "
            "`memory_stats()['peak_bytes_in_use']`, a high-water mark over the process, "
            "so of the largest model so far; PyTorch: `torch.cuda.max_memory_allocated()`, "
            "one process per side and model); on the CPU the growth of the process's peak "
            "RSS during the first step.", ""]
  return lines


def _loss_lines(loss: list) -> list[str]:
  """The loss-gradient table, one row per shape and gradient."""
  lines = ["## Loss gradient alone (d sdl_loss / d logits)", "",
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
  return lines


def _pipeline_lines(pipe: list) -> list[str]:
  """The input-pipeline table, one row per preset."""
  lines = ["## Input pipeline (tf.data, AUTOTUNE) against the train step", "",
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
  return lines


def markdown(results: dict) -> str:
  """The markdown report of ``results``: the environment, then a section per benchmark run."""
  lines = _environment_lines(results["env"])
  peak = results.get("peak")
  if peak:
    lines += [f"Matmul peak ({peak['n']}x{peak['n']}, {peak['dtype']}): "
              + ", ".join(f"{k} {peak[k] / 1e9:.1f} GFLOP/s" for k in PEAK_SOURCES
                          if k in peak)
              + f"; MFU below is against {peak['peak'] / 1e9:.1f} GFLOP/s.", ""]
  train = results.get("train")
  if train:
    lines += train_lines(train)
    if any("torch_compile" in r for r in train):
      lines += compile_lines(train)
  if results.get("memory"):
    from benchmarks import memory  # pylint: disable=g-import-not-at-top
    lines += memory.markdown(results["memory"])
  loss = results.get("loss")
  if loss:
    lines += _loss_lines(loss)
  pipe = results.get("pipeline")
  if pipe:
    lines += _pipeline_lines(pipe)
  return "\n".join(lines)
