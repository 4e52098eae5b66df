"""Performance helpers: XLA flags, this machine's matmul peak, FLOP, memory and HLO counts.

Used by ``benchmarks/`` and usable by training scripts. Nothing here changes numerics.
XLA flags only take effect if set before JAX initialises its backends, so
``append_xla_flags`` must run before the first computation.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import time
from typing import Any, Callable, Sequence

import numpy as np


def append_xla_flags(flags: Sequence[str], keep_user_values: bool = False) -> str:
  """Appends ``flags`` (e.g. ``['--xla_cpu_use_xnnpack=true']``) to ``$XLA_FLAGS``.

  A flag already present with another value is replaced, or, with ``keep_user_values``,
  left as it is. Must run before JAX's backend is initialised (before the first
  ``jax.devices()`` or computation) to have any effect.

  Returns:
    The new value of ``$XLA_FLAGS``.
  """
  current = os.environ.get("XLA_FLAGS", "").split()
  for flag in flags:
    if not flag.startswith("--"):
      raise ValueError(f"XLA flag {flag!r} must start with '--'")
    name = flag.split("=", 1)[0]
    if keep_user_values and any(f.split("=", 1)[0] == name for f in current):
      continue
    current = [f for f in current if f.split("=", 1)[0] != name] + [flag]
  os.environ["XLA_FLAGS"] = " ".join(current)
  return os.environ["XLA_FLAGS"]


# XLA:CPU flags that made training faster on CPU (README, "Performance"):
# - convolutions on XLA's own (Eigen) kernels instead of YNNPACK (jaxlib 0.10.2's default),
#   whose convolution gradients measured 2-10x slower; YNNPACK keeps the dots, reductions
#   and elementwise fusions, where it is faster;
# - the memory-optimised scheduler: XLA:CPU allocates a step's temporaries afresh on every
#   call, and glibc maps buffers that large anew each time, so every page of them
#   page-faults once per step; a smaller buffer assignment (ResNet-50 at batch 32: 2573
#   instead of 4026 MiB) made ResNet-50's step 7% faster (benchmarks.ab, 7 of 7 repeats),
#   the other models level.
# Ignored by other backends.
FAST_CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
                      "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")


def use_fast_cpu_flags(keep_user_values: bool = False) -> str:
  """Appends ``FAST_CPU_XLA_FLAGS`` to ``$XLA_FLAGS``; call before JAX's first computation.

  Returns:
    The new value of ``$XLA_FLAGS``.
  """
  return append_xla_flags(FAST_CPU_XLA_FLAGS, keep_user_values=keep_user_values)


MALLOC_ENV = "SDL_JAX_MALLOC"
MALLOC_MODES = ("keep", "default")
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def malloc_mode(value: str | None = None) -> str:
  """``$SDL_JAX_MALLOC`` (or ``value``): ``keep`` (the default) or ``default``; a
  ValueError naming the variable otherwise."""
  v = (os.environ.get(MALLOC_ENV, "") if value is None else value).strip().lower() or "keep"
  if v not in MALLOC_MODES:
    raise ValueError(f"${MALLOC_ENV} must be one of {MALLOC_MODES}, got {v!r}")
  return v


def keep_freed_memory() -> bool:
  """Tells glibc's malloc to keep the memory it frees for reuse instead of returning it to
  the system: one arena for all threads (``M_ARENA_MAX`` 1), no separate ``mmap`` for
  large blocks (``M_MMAP_MAX`` 0), never trim the heap (``M_TRIM_THRESHOLD`` the largest
  ``size_t``); what ``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:
  glibc.malloc.trim_threshold=...`` does when set before the process starts.

  Why: XLA:CPU allocates a step's temporaries (gigabytes for the 224-pixel models) afresh
  on every call, and glibc serves blocks that large with a fresh ``mmap`` and unmaps them on
  free, so every page page-faults once per step (EfficientNet-Lite0 at batch 32: ~570,000
  faults and ~2.3 s of system time per step on the 2-core machine; README, "Performance").
  Kept, the memory is reused and the faults go; the process keeps its peak heap, and the
  single heap can fragment: Lite0's peak RSS grew once or twice by a step's temporaries
  (3.3 -> 5.5 GiB at step 16 of 40, then steady; 5.5 -> 7.7 GiB at step 9 of 12 in another
  run; 3.4 GiB with glibc's defaults), that step taking ~6 s. Threads that allocated
  before the call keep their own arenas, so it must run before JAX starts its CPU client:
  importing ``sdl_jax`` calls it unless ``$SDL_JAX_MALLOC`` is ``default``.

  Returns:
    whether it was applied (False where the C library is not glibc).
  """
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  global _freed_memory_kept
  # -1 as mallopt's int is read as the largest size_t for the trim threshold.
  # Every option is tried (a list, not all()'s short circuit): one refused leaves the others.
  applied = [mallopt(p, v) == 1 for p, v in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))]
  _freed_memory_kept = all(applied)
  return _freed_memory_kept


_freed_memory_kept = False


def freed_memory_kept() -> bool:
  """Whether ``keep_freed_memory`` has been applied in this process."""
  return _freed_memory_kept


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
  take ``dtype`` here (``dnnl.takes``). On some CPUs it outruns XLA's own matmul, and
  without it a model's FLOP utilisation could read above 100%."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sdl_jax.models import dnnl  # pylint: disable=g-import-not-at-top
  dtype = jnp.float32 if dtype is None else dtype
  if jax.default_backend() != "cpu" or not dnnl.takes(1, dtype):
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
