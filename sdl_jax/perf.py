"""Performance helpers: this machine's CPU and matmul peak, FLOP, memory and HLO counts,
timing and peak RSS.

Used by ``benchmarks/`` and usable by training scripts. Nothing here changes numerics or
the process (XLA flags and the allocator are ``sdl_jax.cpu.configure``'s).
"""

from __future__ import annotations

import os
import platform
import re
import time
from typing import Any, Callable

import numpy as np


def cpu_count() -> int:
  """CPUs this process may run on (its affinity mask), not the machine's total."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


# The vector and matrix extensions that decide which kernels the libraries run (oneDNN,
# YNNPACK and LLVM pick theirs at run time): ratios measured on an AVX2 machine need not
# hold on an AVX-512 one (README, "Performance").
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_isa(cpuinfo: str | None = None) -> list[str]:
  """Which of ``ISA_FLAGS`` the CPU has, from the ``flags`` line of ``/proc/cpuinfo``
  (or of the text ``cpuinfo``); ``[]`` where there is no such line (not Linux/x86)."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpuinfo = f.read()
    except OSError:
      return []
  for line in cpuinfo.splitlines():
    if line.startswith("flags"):
      have = set(line.split(":", 1)[1].split())
      return [flag for flag in ISA_FLAGS if flag in have]
  return []


def time_call(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any] = lambda r: r):
  """Seconds per call of ``fn()``, one figure per repeat (``sync`` waits for the result)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return times


def jax_matmul_peak(n: int = 2048, dtype: Any = None, repeats: int = 5, inner: int = 4,
                    device=None) -> float:
  """This machine's measured matmul throughput in FLOP/s: best of ``repeats`` runs.

  Multiplies ``inner`` times an ``[n, n]`` by ``[n, n]`` matrix (2 n^3 FLOPs each) of
  ``dtype`` (default float32) on ``device`` (default: the first local device), inside one
  jitted ``lax.fori_loop`` so dispatch is not counted.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dtype = jnp.float32 if dtype is None else dtype
  device = device or jax.local_devices()[0]
  a = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(n, n)) / np.sqrt(n),
                                 dtype), device)

  @jax.jit
  def chain(a):
    # Each product feeds the next, so XLA can neither skip nor merge them.
    return jax.lax.fori_loop(0, inner, lambda _, b: (b @ a).astype(dtype), a)

  chain(a).block_until_ready()
  best = min(time_call(lambda: chain(a), repeats, lambda r: r.block_until_ready()))
  return 2.0 * n**3 * inner / best


def onednn_matmul_peak(n: int = 2048, dtype: Any = None, repeats: int = 5,
                       inner: int = 4) -> float | None:
  """The same measurement with the matmul run by the library's oneDNN convolution (a 1x1
  convolution of ``[1, n, 1, n]`` by ``[1, 1, n, n]`` is an ``[n, n] @ [n, n]`` product),
  the kernels the train step's convolutions use on the CPU; None where oneDNN does not
  take ``dtype`` here (``dnnl_route.takes``). On some CPUs it outruns XLA's own matmul, and
  without it a model's FLOP utilisation could read above 100%."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sdl_jax.cpu import dnnl, dnnl_route  # pylint: disable=g-import-not-at-top
  dtype = jnp.float32 if dtype is None else dtype
  if jax.default_backend() != "cpu" or not dnnl_route.takes(1, dtype):
    return None
  w = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, n, n)) / np.sqrt(n), dtype)
  nowhere = ((0, 0), (0, 0))

  @jax.jit
  def chain(w):
    return jax.lax.fori_loop(
        0, inner, lambda _, b: dnnl.conv(b, w, (1, 1), nowhere, 1), w.reshape(1, n, 1, n))

  chain(w).block_until_ready()
  best = min(time_call(lambda: chain(w), repeats, lambda r: r.block_until_ready()))
  return 2.0 * n**3 * inner / best


def torch_matmul_peak(n: int = 2048, dtype: Any = None, repeats: int = 5,
                      inner: int = 4) -> float:
  """The same measurement as ``jax_matmul_peak`` with ``torch.mm`` on the CPU."""
  import torch  # pylint: disable=g-import-not-at-top
  dtype = torch.float32 if dtype is None else dtype
  a = torch.randn(n, n, dtype=torch.float32).div_(np.sqrt(n)).to(dtype)

  def chain():
    b = a
    for _ in range(inner):
      b = torch.mm(b, a)
    return b

  with torch.no_grad():
    chain()
    best = min(time_call(chain, repeats))
  return 2.0 * n**3 * inner / best


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled JAX computation, from XLA's cost analysis (or None)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def compiled_memory(compiled) -> dict[str, int] | None:
  """Bytes a compiled JAX computation needs on its device, from XLA's buffer assignment.

  Returns:
    ``{'arguments', 'outputs', 'temporaries', 'aliased', 'total'}`` in bytes, where
    ``total = arguments + outputs + temporaries - aliased`` (donated inputs reused as
    outputs are counted once), or None where the backend does not say.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
         "temporaries": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes)}
  out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


_HLO_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+\s*=\s*\S")


def hlo_op_count(hlo_text: str) -> dict[str, int]:
  """Counts instructions in HLO text (e.g. ``compiled.as_text()``).

  Returns:
    ``{'total': instructions in all computations (fused bodies included), 'entry':
    instructions of the entry computation, 'fusions': fusion instructions}``; parameters,
    constants, tuples and get-tuple-elements are not counted, as they cost nothing.
  """
  free = (" parameter(", " constant(", " tuple(", " get-tuple-element(", " bitcast(")
  total = entry = fusions = 0
  in_entry = False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
      continue
    if line.startswith("}"):
      in_entry = False
      continue
    if not _HLO_INSTRUCTION.match(line) or any(op in line for op in free):
      continue
    total += 1
    entry += in_entry
    fusions += " fusion(" in line
  return {"total": total, "entry": entry, "fusions": fusions}


def _proc_status(field: str) -> int | None:
  try:
    with open("/proc/self/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


class PeakRSS:
  """Peak resident memory growth of this process over a ``with`` block, in bytes (Linux).

  Resets the kernel's high-water mark (``/proc/self/clear_refs``) on entry, so
  ``.growth`` = peak RSS inside the block minus RSS at its start. None where the
  platform does not support it. Memory freed and reused inside the block is counted once;
  memory an allocator keeps cached from before the block is not counted.
  """

  def __init__(self):
    self.growth: int | None = None
    self._start: int | None = None

  def __enter__(self):
    try:
      with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
      self._start = _proc_status("VmRSS")
    except OSError:
      self._start = None
    return self

  def __exit__(self, *exc):
    peak = _proc_status("VmHWM")
    if self._start is not None and peak is not None:
      self.growth = max(0, peak - self._start)
    return False


def timed_step(step: Callable[[], Any], sync: Callable[[], Any]) -> tuple[float, int | None]:
  """Seconds and peak RSS growth (``PeakRSS``) of one ``step(); sync()``."""
  with PeakRSS() as rss:
    t0 = time.perf_counter()
    step()
    sync()
    seconds = time.perf_counter() - t0
  return seconds, rss.growth


def device_peak_bytes(device) -> int | None:
  """``peak_bytes_in_use`` of an accelerator's allocator (None on CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return stats.get("peak_bytes_in_use")
