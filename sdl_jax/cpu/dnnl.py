"""Convolutions on oneDNN through XLA's FFI, for the CPU backend.

jaxlib 0.10.2's XLA:CPU runs convolutions on Eigen (or YNNPACK), which on an AVX-512 CPU
measured 0.3-0.9x the speed of oneDNN's, the library PyTorch uses, and the weight
gradient slowest (README, "Performance"). This module compiles ``csrc/dnnl_conv.cc``
(three XLA FFI handlers: forward, input gradient, weight gradient) against the system's
oneDNN on first use, registers them as CPU custom calls, and gives ``conv``: an
NHWC/HWIO float32 convolution (dense, or grouped: each group of channels convolved on its
own) whose forward pass and both gradients are oneDNN's,

    y[n, a, b, o] = sum_{i, j, c} xpad[n, a * sh + i, b * sw + j, c] * w[i, j, c, o],
    dx = conv_transpose(dy, w),   dw[i, j, c, o] = sum_{n, a, b} xpad[...] * dy[n, a, b, o],

the same function as ``lax.conv_general_dilated`` (the tests compare values and
gradients). Needs a C++ compiler and oneDNN's headers and library: the Python
environment's (``onednn-devel-cpu-gomp``, a dependency of the package on x86-64 Linux)
where installed, else the system's (Debian/Ubuntu: ``apt-get install libdnnl-dev``).

Which convolutions go to oneDNN: ``use(...)`` (a context manager) if inside one, else
``$SDL_JAX_DNNL`` where set (an override for one run), else ``config.cpu.dnnl`` (set by
``sdl_jax.cpu.configure``), else ``auto``:

* ``auto``: ``all`` on a CPU with AVX-512; elsewhere ``xla_large_wgrad`` with oneDNN 3.x
  (the ``onednn-devel-cpu-gomp`` wheel the package installs) and ``grouped`` with oneDNN
  2.x (Debian's ``libdnnl-dev``). Measured in the train step (README, "Performance"): on
  an AVX-512 Xeon oneDNN 2.6 made every model faster (+8% ResNet-50 to +64%
  EfficientNet-Lite0); on an AVX2-only EPYC oneDNN 2.6 made the dense convolutions slower
  than XLA's and the depthwise ones faster, and oneDNN 3.2's forward pass and input
  gradient (its brgemm kernels) were faster than XLA's; its weight gradient (a JIT kernel)
  was faster than XLA's for 1x1 kernels (EfficientNet-Lite0 +12%) and for smaller larger
  ones (the small CNN's six with 0.1-1.2 G multiply-adds, once ``after`` ordered the
  backward pass: its step +5%; Lite0's stem), slower for large ones on XLA's NHWC layout
  (2.8 G and up: ResNet-50's, VGG-16's; VGG-16 with all of them there ran at 0.66x the
  step's speed), and on its own blocked layout (``blocked_weight_grad``) faster again for
  large ones that do not widen (ResNet-50's 3x3 ones: its step +2.2%; VGG-16 level).
* ``all``: every float32 NHWC convolution.
* ``xla_large_wgrad``: every one, except that dense (ungrouped) convolutions with a
  kernel larger than 1x1 and a weight gradient of at least ``LARGE_WGRAD_MACS``
  multiply-adds (``N Ho Wo kh kw C O``, per device) whose weight gradient oneDNN would
  not run on its blocked layout (``blocked_weight_grad``: those that widen, ``C < O``, and
  all on AVX-512) have XLA's weight gradient (the same path as with oneDNN off).
* ``grouped``: grouped and depthwise convolutions only.
* ``off``: none; XLA's kernels and the hand paths of ``conv.py``.

bfloat16 (``config.dtype = "bfloat16"``: bfloat16 activations and weights, float32 master
weights): where the CPU has bfloat16 arithmetic (``avx512_bf16``, e.g. AMD Zen 4/5, or
Intel's ``amx_bf16``) and oneDNN has its own kernels for it in every direction (probed once
at load, ``bf16()``), bfloat16 convolutions go to oneDNN as float32 ones do, all three
operands bfloat16 (oneDNN sums in float32); elsewhere they stay on XLA's kernels, which on
CPUs without it are slower than float32 ones.

Asked for explicitly but unavailable (no compiler, no oneDNN), the reason is logged once
as a warning and XLA's convolutions are used; under ``auto`` the same is logged at info
level.

The shared library is cached in ``$SDL_JAX_CACHE`` (default ``~/.cache/sdl_jax``) under a
name that hashes the source, jaxlib's version and the compiler command, so a change to
any of them rebuilds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdl_jax import perf
from sdl_jax.cpu.process import cache_dir

SOURCE = Path(__file__).with_name("csrc") / "dnnl_conv.cc"
ENV = "SDL_JAX_DNNL"
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
def _load() -> str | None:
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
        f in _cpu_isa() for f in ("avx512_bf16", "amx_bf16"))
  except (OSError, RuntimeError, AttributeError) as e:
    return str(e)
  _log.info("oneDNN %s convolutions loaded", _format(_version))
  return None


_version: int | None = None
_bf16 = False


def version() -> int | None:
  """The loaded oneDNN's version, ``major * 10000 + minor * 100 + patch`` (3.2.0:
  30200), building and loading it if need be; None where it cannot be loaded."""
  _load()
  return _version


def version_string() -> str:
  """``version()`` as ``major.minor.patch``, or ``unavailable``."""
  return _format(version())


def _format(v: int | None) -> str:
  return "unavailable" if v is None else f"{v // 10000}.{v // 100 % 100}.{v % 100}"


MODES = ("auto", "all", "xla_large_wgrad", "grouped", "off")
# Between the largest weight gradients oneDNN 3.2 ran faster than XLA's in the train step
# on an AVX2 EPYC on NHWC (1.2e9 multiply-adds, the small CNN's 32 -> 32, 64 -> 64 and
# 128 -> 128 3x3 ones at batch 32, once the backward pass was ordered by ``after``) and the
# smallest XLA's ran faster (2.8e9 and up: VGG-16's first layer, ResNet-50's 3.7e9);
# README, "Performance". Applies to those not on the blocked layout only.
LARGE_WGRAD_MACS = 2e9
_override: str | None = None
_configured = "auto"


def _parse(value, where: str) -> str:
  """``value`` (one of ``MODES``; ``True``/``False`` for ``all``/``off``) as a mode, or a
  ValueError naming ``where``."""
  if isinstance(value, bool):
    return "all" if value else "off"
  mode = str(value).strip().lower()
  if mode not in MODES:
    raise ValueError(f"{where}={value!r}: expected one of {', '.join(MODES)}")
  return mode


def set_default(value) -> None:
  """The mode when neither ``use`` nor ``$SDL_JAX_DNNL`` says (``configure`` sets it)."""
  global _configured
  _configured = _parse(value, "config.cpu.dnnl")


def auto_mode(isa: list[str] | None = None, onednn: int | None = None) -> str:
  """What ``auto`` means on this CPU with the oneDNN here (or one with the ISA extensions
  ``isa`` and the oneDNN version ``onednn``, as ``version()`` gives it): ``all`` with
  AVX-512, else ``xla_large_wgrad`` with oneDNN 3 or later, else ``grouped``."""
  if "avx512f" in (_cpu_isa() if isa is None else isa):
    return "all"
  if isa is None and onednn is None:
    onednn = version()
  return "xla_large_wgrad" if (onednn or 0) >= 30000 else "grouped"


@functools.lru_cache(maxsize=None)
def _cpu_isa() -> tuple[str, ...]:
  return tuple(perf.cpu_isa())


@contextlib.contextmanager
def use(mode: bool | str):
  """Within the block, oneDNN takes the convolutions ``mode`` says (``True``: ``all``,
  ``False``: ``off``, or one of ``MODES``), whatever ``$SDL_JAX_DNNL`` and the config say;
  models traced there keep that choice."""
  global _override
  previous, _override = _override, _parse(mode, "dnnl.use")
  try:
    yield
  finally:
    _override = previous


def disabled():
  """``use(False)``: models traced in the block keep XLA's convolutions."""
  return use(False)


def _asked() -> str:
  if _override is not None:
    return _override
  env = os.environ.get(ENV, "").strip()
  return _parse(env, ENV) if env else _configured


def mode() -> str:
  """Which convolutions are asked to go to oneDNN: one of ``MODES`` but ``auto`` (see the
  module docstring; ``auto`` resolved for this CPU and oneDNN)."""
  asked = _asked()
  return auto_mode() if asked == "auto" else asked


def requested() -> bool:
  """Whether any convolutions are asked to go to oneDNN."""
  return mode() != "off"


def available() -> bool:
  """Whether oneDNN convolutions are asked for and can run here (built and registered on
  the first such call)."""
  if not requested():
    return False
  reason = _load()
  if reason is not None and not getattr(available, "_said", False):
    available._said = True
    log = _log.info if _asked() == "auto" else _log.warning
    log("oneDNN convolutions unavailable, XLA's are used instead: %s", reason)
  return reason is None


def bf16() -> bool:
  """Whether bfloat16 convolutions go to oneDNN too: it is available and this CPU has
  bfloat16 arithmetic (``avx512_bf16`` or ``amx_bf16``) for which oneDNN has kernels of
  its own for every direction (not its reference ones)."""
  return available() and _bf16


def takes(groups: int, dtype=jnp.float32) -> bool:
  """Whether an NHWC convolution with ``groups`` feature groups and operands of ``dtype``
  goes to oneDNN: float32 ones as ``mode()`` says, bfloat16 ones likewise where ``bf16()``."""
  dtype = jnp.dtype(dtype)
  if dtype != jnp.float32 and not (dtype == jnp.bfloat16 and bf16()):
    return False
  return available() and (groups > 1 or mode() != "grouped")


def takes_weight_grad(groups: int, x_shape, w_shape, strides, padding) -> bool:
  """Whether such a convolution (``takes`` given: ``conv``'s arguments, of ``x`` ``[N, H,
  W, C]`` and ``w`` ``[kh, kw, C / groups, O]``) has its weight gradient on oneDNN too."""
  m = mode()
  kh, kw = int(w_shape[0]), int(w_shape[1])
  if groups > 1 or m == "all":
    return True
  if m != "xla_large_wgrad":
    return False
  return ((kh, kw) == (1, 1)
          or weight_grad_macs(x_shape, w_shape, strides, padding) < LARGE_WGRAD_MACS
          or blocked_weight_grad(groups, w_shape))


def weight_grad_macs(x_shape, w_shape, strides, padding) -> int:
  """Multiply-adds of a dense convolution's weight gradient: ``N Ho Wo kh kw C O``."""
  n, ho, wo, _ = out_shape(x_shape, w_shape, strides, padding)
  return n * ho * wo * math.prod(int(d) for d in w_shape)


def out_shape(x_shape, w_shape, strides, padding) -> tuple[int, int, int, int]:
  """``conv``'s output shape ``(N, Ho, Wo, O)``: ``Ho = (H + top + bottom - kh) // sh + 1``,
  likewise ``Wo``."""
  n, h, wd = (int(d) for d in x_shape[:3])
  kh, kw, o = int(w_shape[0]), int(w_shape[1]), int(w_shape[3])
  (pt, pb), (pl, pr) = padding
  return (n, (h + pt + pb - kh) // strides[0] + 1, (wd + pl + pr - kw) // strides[1] + 1, o)


def blocked_weight_grad(groups: int, w_shape) -> bool:
  """Whether oneDNN's weight gradient of a convolution with ``groups`` feature groups and
  weights ``[kh, kw, C / groups, O]`` runs on oneDNN's blocked layout of ``x`` and ``dy``
  (reordered from NHWC on every call) instead of on NHWC: for dense ones larger than 1x1
  that do not widen (``C >= O``), on CPUs without AVX-512. On a 2-core AVX2 EPYC
  (``benchmarks/csrc/wgrad_layout.cc``: oneDNN 3.2's JIT kernel, reorders included):
  32 -> 32 channels at 64 px 19.8 against 26.4 ms, 64 -> 64 at 56 px 57.5 against 78.3,
  128 -> 128 at 28 px 52.0
  against 60.2, and the small CNN's other square layers 3-4% faster; widening ones level
  or slower (32 -> 64 at 32 px 9.7 against 9.1 ms, 3 -> 32 at 64 px 4.1 against 3.4).
  Unmeasured on AVX-512, so left as it was there. Under ``xla_large_wgrad`` these stay on
  oneDNN whatever their size (``takes_weight_grad``): ResNet-50's 3x3 ones (3.7e9
  multiply-adds each) made its step 2.2% faster than on XLA."""
  kh, kw, c, o = (int(d) for d in w_shape)
  return groups == 1 and kh * kw > 1 and c >= o and "avx512f" not in _cpu_isa()


def _call(name, shape, a, b, strides, padding, groups, blocked=False):
  (pt, pb), (pl, pr) = padding
  attrs = dict(sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr, groups=groups,
               blocked=int(blocked))
  return jax.ffi.ffi_call(TARGETS[name], jax.ShapeDtypeStruct(shape, a.dtype))(
      a, b, **{k: np.int64(v) for k, v in attrs.items()})


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x, w, strides, padding, groups=1):
  """Convolution of ``x`` ``[N, H, W, C]`` with ``w`` ``[kh, kw, C / groups, O]`` (float32,
  or bfloat16 where ``bf16()``; both the same),
  ``strides`` ``(sh, sw)``, ``padding`` ``((top, bottom), (left, right))`` ints, ``groups``
  feature groups (``C`` for depthwise); returns ``[N, Ho, Wo, O]`` in their dtype with
  ``Ho = (H + top + bottom - kh) // sh + 1`` (likewise ``Wo``), as
  ``lax.conv_general_dilated`` with NHWC/HWIO/NHWC and ``feature_group_count=groups``.
  Call ``available()`` first.

  Reverse mode, to any order: the three directions are each other's transposes
  (``y = F(x, w)``, ``dx = D(dy, w)``, ``dw = W(x, dy)``, all bilinear), so each one's VJP
  is written with the other two. No forward mode (``jax.jvp``).
  """
  return _call("fwd", out_shape(x.shape, w.shape, strides, padding), x, w, strides, padding,
               groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def input_grad(dy, w, x_shape, strides, padding, groups):
  """``D(dy, w)``: the input gradient of ``conv``, ``[N, H, W, C]`` (``x_shape``)."""
  return _call("bwd_data", x_shape, dy, w, strides, padding, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _weight_grad(x, dy, w_shape, strides, padding, groups):
  """``W(x, dy)``: the weight gradient of ``conv``, ``[kh, kw, C / groups, O]``
  (``w_shape``)."""
  return _call("bwd_weights", w_shape, x, dy, strides, padding, groups,
               blocked_weight_grad(groups, w_shape))


def _conv_fwd(x, w, strides, padding, groups):
  return conv(x, w, strides, padding, groups), (x, w)


def stored(x):
  """``x``, which every op that uses it reads from the buffer it is stored in: the identity
  as a custom call (``SdlStored``, its result aliasing ``x``, so nothing is copied) where
  the library is loaded (``available()``; CPU only: call it on the CPU paths), else ``x``
  itself. Differentiable (its JVP is the identity).

  Why: XLA:CPU fuses an elementwise op into each of its consumers, computing it again in
  each, even when it is stored anyway for a custom call (a convolution) that reads it. In
  ResNet-50 a block's output ``relu(bn(x) + residual)`` is the next block's residual, so
  each block's BatchNorm-add-ReLU fusion (forward, and the ReLU mask of the backward pass)
  recomputed every earlier block's output in its stage from their convolutions' outputs,
  reading up to four activation-sized tensors instead of two (README, "Performance").
  ``lax.optimization_barrier`` does not stop it: XLA removes it before
  fusing.
  """
  return _stored(x) if available() else x


@jax.custom_jvp
def _stored(x):
  return jax.ffi.ffi_call(STORED_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          input_output_aliases={0: 0})(x)


@_stored.defjvp
def _stored_jvp(primals, tangents):
  return _stored(primals[0]), tangents[0]


def after(a, b):
  """``a``, computed no earlier than ``b``: ``a + 0 * b.flat[0]``, equal to ``a`` wherever
  ``b.flat[0]`` is finite (an inf or NaN there would make it NaN, as it would the
  training anyway).

  Orders the backward pass on XLA:CPU, whose runtime runs any two ops whose operands
  exist side by side on its threads (``lax.optimization_barrier`` around the weight
  gradient did not order the traced step). Nothing reads a convolution's weight gradient
  until the optimizer, so XLA left them all to the end of the step, where they ran two at
  once, each oneDNN call's two OpenMP threads sharing the two cores with the other's
  (README, "Performance"). XLA does not fold ``0 * s`` for floats (the tests
  check that the dependency survives compilation), and the add fuses into whatever reads
  ``a`` next.
  """
  return a + (b.reshape(-1)[0] * 0).astype(a.dtype)


def _conv_bwd(strides, padding, groups, res, dy):
  x, w = res
  dx = input_grad(dy, w, x.shape, strides, padding, groups)
  dw = _weight_grad(x, dy, w.shape, strides, padding, groups)
  # What reads dx waits for dw: each layer's two gradients run before the layer below's,
  # one at a time in the traced step, as in PyTorch's backward.
  return after(dx, dw), dw


def _input_grad_fwd(dy, w, x_shape, strides, padding, groups):
  return input_grad(dy, w, x_shape, strides, padding, groups), (dy, w)


def _input_grad_bwd(x_shape, strides, padding, groups, res, g):
  # <D(dy, w), g> = <dy, F(g, w)> = <w, W(g, dy)>.
  dy, w = res
  return (conv(g, w, strides, padding, groups),
          _weight_grad(g, dy, w.shape, strides, padding, groups))


def _weight_grad_fwd(x, dy, w_shape, strides, padding, groups):
  return _weight_grad(x, dy, w_shape, strides, padding, groups), (x, dy)


def _weight_grad_bwd(w_shape, strides, padding, groups, res, g):
  # <W(x, dy), g> = <x, D(dy, g)> = <dy, F(x, g)>.
  x, dy = res
  return (input_grad(dy, g, x.shape, strides, padding, groups),
          conv(x, g, strides, padding, groups))


conv.defvjp(_conv_fwd, _conv_bwd)
input_grad.defvjp(_input_grad_fwd, _input_grad_bwd)
_weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)
