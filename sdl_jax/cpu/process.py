"""Process-wide settings for XLA:CPU: XLA's flags and glibc's allocator.

Both only act if set before JAX starts its backends (XLA reads ``$XLA_FLAGS`` once; threads
keep the malloc arena they first allocated in), and both change the whole process, so
nothing here runs on import: entry points call ``sdl_jax.cpu.configure``, which calls these.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

_log = logging.getLogger(__name__)

# XLA:CPU flags that made training faster on CPU (README, "Performance"):
# - convolutions on XLA's own (Eigen) kernels instead of YNNPACK (jaxlib 0.10.2's default),
#   whose convolution gradients measured 2-10x slower; YNNPACK keeps the dots, reductions
#   and elementwise fusions, where it is faster;
# - the memory-optimised scheduler: a smaller buffer assignment (ResNet-50 at batch 32: 2573
#   instead of 4026 MiB) made ResNet-50's step 7% faster (7 of 7 interleaved repeats), the
#   other models level.
# Ignored by other backends.
FAST_CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
                      "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")


def cache_dir() -> Path:
  """Where compiled kernels and probe results are kept: ``$SDL_JAX_CACHE``, default
  ``~/.cache/sdl_jax``."""
  return Path(os.environ.get("SDL_JAX_CACHE") or Path.home() / ".cache" / "sdl_jax")


def append_xla_flags(flags: Sequence[str], keep_user_values: bool = False) -> str:
  """Appends ``flags`` (e.g. ``['--xla_cpu_use_xnnpack=true']``) to ``$XLA_FLAGS``.

  A flag already present with another value is replaced, or, with ``keep_user_values``,
  left as it is. Acts only if it runs before JAX's backend is initialised.

  Returns:
    The new value of ``$XLA_FLAGS``.
  """
  current = os.environ.get("XLA_FLAGS", "").split()
  for flag in flags:
    if not flag.startswith("--"):
      raise ValueError(f"XLA flag {flag!r} must start with '--'")
    name = _name(flag)
    if keep_user_values and any(_name(f) == name for f in current):
      continue
    current = [f for f in current if _name(f) != name] + [flag]
  os.environ["XLA_FLAGS"] = " ".join(current)
  return os.environ["XLA_FLAGS"]


def _name(flag: str) -> str:
  return flag.split("=", 1)[0]


def known_xla_flags(flags: Sequence[str]) -> list[str]:
  """``flags`` less those the installed jaxlib does not know, each dropped with a warning.

  XLA aborts the process on an unknown name in ``$XLA_FLAGS``, so the names are tried once
  in a child process (``import jax; jax.devices()`` on the CPU with only these flags; ~3 s)
  and the answer is cached in ``cache_dir()`` per jaxlib build and set of names. Where the
  child fails for another reason, all are dropped with a warning.
  """
  flags = list(flags)
  if not flags:
    return []
  unknown = _unknown_names(tuple(sorted(set(flags))))
  for f in flags:
    if _name(f) in unknown:
      _log.warning("XLA flag %s dropped: the installed jaxlib does not know it", f)
  return [f for f in flags if _name(f) not in unknown]


_UNKNOWN = re.compile(r"Unknown flags? in XLA_FLAGS:\s*(.*)")  # "flag" when only one


def _unknown_names(flags: tuple[str, ...]) -> set[str]:
  """The names of those of ``flags`` the installed jaxlib does not know (cached on disk)."""
  try:
    import importlib.metadata  # pylint: disable=g-import-not-at-top
    jaxlib = importlib.metadata.version("jaxlib")
  except Exception:  # pylint: disable=broad-except
    jaxlib = "unknown"
  key = hashlib.sha256(f"{jaxlib} {sys.executable} {' '.join(flags)}".encode()).hexdigest()
  path = cache_dir() / f"xla_flags_{key[:16]}.json"
  try:
    return set(json.loads(path.read_text())["unknown"])
  except (OSError, ValueError, KeyError):
    pass
  unknown = probe_xla_flags(flags)
  if unknown is None:
    return {_name(f) for f in flags}  # not cached: the next process tries again
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"jaxlib": jaxlib, "unknown": sorted(unknown)}))
    os.replace(tmp, path)
  except OSError as e:
    _log.info("could not cache the XLA flag probe in %s: %s", path, e)
  return unknown


def probe_xla_flags(flags: Sequence[str]) -> set[str] | None:
  """Starts JAX's CPU backend in a child process with only ``flags`` in ``$XLA_FLAGS`` and
  returns the names XLA rejected as unknown (empty if it started), or None (with a warning)
  where the child failed otherwise."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0",
             XLA_FLAGS=" ".join(flags))
  try:
    proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    _log.warning("XLA flag probe failed (%s): dropping %s", e, " ".join(flags))
    return None
  if proc.returncode == 0:
    return set()
  m = _UNKNOWN.search(proc.stderr)
  if m is None:
    _log.warning("XLA flag probe failed (exit %s): dropping %s; its stderr ends: %s",
                 proc.returncode, " ".join(flags), proc.stderr[-500:])
    return None
  return {_name(f) for f in m.group(1).split()} & {_name(f) for f in flags}


# ---------------------------------------------------------------------------------------
# glibc's malloc.

MALLOC_MODES = ("default", "keep")


def check_malloc(value: str, where: str) -> str:
  """``value`` lower-cased if it is one of ``MALLOC_MODES``, else a ValueError naming
  ``where``."""
  v = str(value).strip().lower()
  if v not in MALLOC_MODES:
    raise ValueError(f"{where}={value!r}: must be one of {', '.join(MALLOC_MODES)}")
  return v

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# ``keep``'s trim threshold: never trim. A bound (1 GiB) brought the page faults back and
# did not lower the peak (``keep_freed_memory``).
KEEP_TRIM_THRESHOLD = -1
_freed_memory_kept = False


def keep_freed_memory(trim_threshold: int = KEEP_TRIM_THRESHOLD) -> bool:
  """Tells glibc's malloc to keep the memory it frees for reuse: one arena for all threads
  (``M_ARENA_MAX`` 1), no separate ``mmap`` for large blocks (``M_MMAP_MAX`` 0), and the
  heap trimmed only when more than ``trim_threshold`` bytes are free at its top
  (``M_TRIM_THRESHOLD``; -1: never); ``GLIBC_TUNABLES=glibc.malloc.arena_max=1:
  glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`` does the same when set before
  the process starts.

  Why: XLA:CPU allocates a step's temporaries (gigabytes for the 224-pixel models) afresh
  on every call, and glibc serves blocks that large with a fresh ``mmap`` and unmaps them
  on free, so every page page-faults once per step (EfficientNet-Lite0 at batch 32:
  ~570,000 faults and ~2.3 s of system time per step on a 2-core machine). Kept, the memory
  is reused and the faults go. The cost: the single heap fragments, and the process keeps
  its peak; a training run grew to 24 GB and was killed for memory, where glibc's defaults
  peaked at 7.4 GB. Twelve EfficientNet-Lite0 train steps (batch 32, 224 px; 2026-12-05,
  2-core AMD EPYC, shared with other jobs, so the times are rough): glibc's defaults
  7.1 s/step, peak RSS 3.0 GB, 13.2 s system time, 5.5 M page faults; kept, never trimmed
  6.9 s/step, 6.1 GB, 5.0 s, 1.5 M; kept with a 1 GiB trim threshold 8.9 s/step, 7.8 GB,
  11.4 s, 4.9 M: the bound gave the faults back without bounding the peak, so
  ``KEEP_TRIM_THRESHOLD`` is -1. Threads that allocated before the call keep their own
  arenas, so it must run before JAX starts.

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
  # -1 as mallopt's int is read as the largest size_t for the trim threshold; mallopt takes
  # an int, so a bound is at most 2 GiB - 1.
  trim = min(int(trim_threshold), 2**31 - 1)
  # Every option is tried (a list, not all()'s short circuit): one refused leaves the others.
  applied = [mallopt(p, v) == 1 for p, v in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim))]
  _freed_memory_kept = all(applied)
  return _freed_memory_kept


def freed_memory_kept() -> bool:
  """Whether ``keep_freed_memory`` has been applied in this process."""
  return _freed_memory_kept
