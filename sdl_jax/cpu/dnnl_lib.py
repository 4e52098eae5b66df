"""The oneDNN convolution library: compiled, loaded and registered with XLA's FFI.

``build`` compiles ``csrc/dnnl_conv.cc`` (XLA FFI handlers: forward, input gradient, weight
gradient, and ``SdlStored``) against the system's oneDNN on first use; ``load`` registers
them as CPU custom calls (``sdl_jax.cpu.dnnl`` calls them). Needs a C++ compiler and
oneDNN's headers and library: the Python environment's (``onednn-devel-cpu-gomp``, a
dependency of the package on x86-64 Linux) where installed, else the system's
(Debian/Ubuntu: ``apt-get install libdnnl-dev``).

The shared library is cached in ``$SDL_JAX_CACHE`` (default ``~/.cache/sdl_jax``) under a
name that hashes the source, jaxlib's version and the compiler command, so a change to
any of them rebuilds it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from sdl_jax import perf
from sdl_jax.cpu.process import cache_dir


SOURCE = Path(__file__).with_name("csrc") / "dnnl_conv.cc"
TARGETS = {"fwd": "SdlDnnlConvFwd", "bwd_data": "SdlDnnlConvBwdData",
           "bwd_weights": "SdlDnnlConvBwdWeights"}
STORED_TARGET = "SdlStored"  # ``stored``'s identity, in the same library
_log = logging.getLogger(__name__)


def onednn_prefix() -> Path | None:
  """The Python environment's oneDNN (the ``onednn-devel-cpu-gomp`` wheel installs its
  headers and library under ``sys.prefix``), or None: then the system's is used."""
  prefix = Path(sys.prefix)
  if ((prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp").exists()
      and any((prefix / "lib").glob("libdnnl.so*"))):
    return prefix
  return None


def _compile_command(out: Path) -> list[str]:
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
  prefix = onednn_prefix()
  # The wheel's library is found at load time through the rpath, not LD_LIBRARY_PATH.
  where = ([f"-I{prefix / 'include'}", f"-L{prefix / 'lib'}",
            f"-Wl,-rpath,{prefix / 'lib'}"] if prefix else [])
  return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}",
          *where, str(SOURCE), "-o", str(out), "-ldnnl"]


def build() -> Path:
  """Compiles ``csrc/dnnl_conv.cc`` into the cache (once) and returns the library's path.

  Raises:
    RuntimeError: the compiler failed (its message included) or is missing.
  """
  import jaxlib  # pylint: disable=g-import-not-at-top
  probe = _compile_command(Path("OUT"))
  key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode()
                       + " ".join(probe).encode()).hexdigest()[:16]
  target = cache_dir() / f"dnnl_conv_{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  _log.info("compiling %s against oneDNN into %s (once; cached there)", SOURCE.name, target)
  # Built beside the target and renamed, so concurrent processes never load half a file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  try:
    proc = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True,
                          timeout=300, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    os.unlink(tmp)
    raise RuntimeError(f"compiling {SOURCE.name}: {e}") from e
  if proc.returncode != 0:
    os.unlink(tmp)
    errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()] or [proc.stderr]
    raise RuntimeError(f"compiling {SOURCE.name} failed (is oneDNN installed: "
                       "onednn-devel-cpu-gomp or libdnnl-dev?): "
                       + " | ".join(errors)[:2000])
  os.replace(tmp, target)
  return target


@functools.lru_cache(maxsize=None)
def load() -> str | None:
  """Builds, loads and registers the handlers once; returns why not, or None if done."""
  # oneDNN runs on OpenMP threads beside XLA's pool: waiting threads sleep rather than
  # spin, leaving the cores to XLA's between calls (AVX-512: the small CNN +28%
  # over XLA's convolutions with it, +23% in an earlier run without; not an A/B of the
  # policy itself). Read when libgomp loads, below.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  global _version
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for name in (*TARGETS.values(), STORED_TARGET):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    _version = int(lib.SdlDnnlVersion())
    global _bf16
    _bf16 = bool(lib.SdlDnnlBf16()) and any(
        f in cpu_isa() for f in ("avx512_bf16", "amx_bf16"))
  except (OSError, RuntimeError, AttributeError) as e:
    return str(e)
  _log.info("oneDNN %s convolutions loaded", _format(_version))
  return None


_version: int | None = None
_bf16 = False


def version() -> int | None:
  """The loaded oneDNN's version, ``major * 10000 + minor * 100 + patch`` (3.2.0:
  30200), building and loading it if need be; None where it cannot be loaded."""
  load()
  return _version


def version_string() -> str:
  """``version()`` as ``major.minor.patch``, or ``unavailable``."""
  return _format(version())


def _format(v: int | None) -> str:
  return "unavailable" if v is None else f"{v // 10000}.{v // 100 % 100}.{v % 100}"


@functools.lru_cache(maxsize=None)
def cpu_isa() -> tuple[str, ...]:
  return tuple(perf.cpu_isa())


def bf16_kernels() -> bool:
  """Whether the loaded library has oneDNN kernels of its own for bfloat16 in every
  direction and this CPU has bfloat16 arithmetic (probed by ``load``)."""
  return _bf16
