"""Which convolutions go to oneDNN (``sdl_jax.cpu.dnnl``), and whether it can run here.

The mode: ``use(...)`` (a context manager) if inside one, else ``$SDL_JAX_DNNL`` where
set (an override for one run), else ``config.cpu.dnnl`` (set by ``sdl_jax.cpu.configure``),
else ``auto``:

* ``auto``: ``all`` on a CPU with AVX-512; elsewhere ``xla_large_wgrad`` with oneDNN 3.x
  (the ``onednn-devel-cpu-gomp`` wheel the package installs) and ``grouped`` with oneDNN
  2.x (Debian's ``libdnnl-dev``). Measured in the train step (README, "Performance"): on
  an AVX-512 Xeon oneDNN 2.6 made every model faster (+8% ResNet-50 to +64%
  EfficientNet-Lite0); on an AVX2-only EPYC oneDNN 2.6 made the dense convolutions slower
  than XLA's and the depthwise ones faster, and oneDNN 3.2's forward pass and input
  gradient (its brgemm kernels) were faster than XLA's; its weight gradient (a JIT kernel)
  was faster than XLA's for 1x1 kernels (EfficientNet-Lite0 +12%) and for smaller larger
  ones (the small CNN's six with 0.1-1.2 G multiply-adds, once ``dnnl.after`` ordered the
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
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import jax.numpy as jnp

from sdl_jax.cpu import dnnl_lib

ENV = "SDL_JAX_DNNL"
_log = logging.getLogger(__name__)


MODES = ("auto", "all", "xla_large_wgrad", "grouped", "off")
# Between the largest weight gradients oneDNN 3.2 ran faster than XLA's in the train step
# on an AVX2 EPYC on NHWC (1.2e9 multiply-adds, the small CNN's 32 -> 32, 64 -> 64 and
# 128 -> 128 3x3 ones at batch 32, once the backward pass was ordered by ``dnnl.after``) and the
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
  if "avx512f" in (dnnl_lib.cpu_isa() if isa is None else isa):
    return "all"
  if isa is None and onednn is None:
    onednn = dnnl_lib.version()
  return "xla_large_wgrad" if (onednn or 0) >= 30000 else "grouped"


@contextlib.contextmanager
def use(mode: bool | str):
  """Within the block, oneDNN takes the convolutions ``mode`` says (``True``: ``all``,
  ``False``: ``off``, or one of ``MODES``), whatever ``$SDL_JAX_DNNL`` and the config say;
  models traced there keep that choice."""
  global _override
  previous, _override = _override, _parse(mode, "dnnl_route.use")
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
  reason = dnnl_lib.load()
  if reason is not None and not getattr(available, "_said", False):
    available._said = True
    log = _log.info if _asked() == "auto" else _log.warning
    log("oneDNN convolutions unavailable, XLA's are used instead: %s", reason)
  return reason is None


def bf16() -> bool:
  """Whether bfloat16 convolutions go to oneDNN too: it is available and this CPU has
  bfloat16 arithmetic (``avx512_bf16`` or ``amx_bf16``) for which oneDNN has kernels of
  its own for every direction (not its reference ones)."""
  return available() and dnnl_lib.bf16_kernels()


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
  return groups == 1 and kh * kw > 1 and c >= o and "avx512f" not in dnnl_lib.cpu_isa()
