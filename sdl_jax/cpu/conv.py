"""A drop-in ``lax.conv_general_dilated`` for XLA:CPU (``conv_general_dilated``): float32
NHWC convolutions (and bfloat16 ones where the CPU has bfloat16 arithmetic, ``dnnl.bf16``)
on oneDNN (``dnnl.py``) where it is installed and ``dnnl.mode()`` sends them, and otherwise
depthwise convolutions as shifted taps, 1x1 convolutions as matmuls with a transpose-free
weight gradient (``pointwise``), and dense strided convolutions with a space-to-depth
weight gradient (``strided``). oneDNN's kernels measured level with PyTorch's (which are
oneDNN's) in every direction on an AVX-512 CPU where XLA's own ran 0.07-0.9x as fast
(README, "Performance"); on an AVX2-only CPU see ``dnnl``'s ``auto`` mode for which
directions it takes. The paths below are what the rest takes.

XLA:CPU's depthwise convolution (``feature_group_count`` = input channels, one filter per
channel) measured 20-40x slower than PyTorch's in the forward pass and ~10x slower in the
backward pass (layer micro-benchmarks, 2-core AVX2 CPU). Written as the sum over kernel
taps of shifted, strided slices times per-channel weights,

    y[n, a, b, c] = sum_{i, j} xpad[n, a * sh + i, b * sw + j, c] * w[i, j, 0, c],

it is one fused elementwise loop: EfficientNet-Lite0's train step ran ~4x faster (README,
"Performance"). Its gradient is written by hand (``depthwise``): the weight gradient as one
variadic reduction over all taps, the stride-1 input gradient as taps again.
1x1 convolutions (most of ResNet-50's and EfficientNet's) are ``pointwise``: see its
docstring for why their gradient is written by hand.
Dense strided ones (ResNet-50's 7x7 stem and stride-2 3x3 convolutions) are ``strided``.
Every other convolution is ``lax.conv_general_dilated`` unchanged: with
``sdl_jax.cpu.process.FAST_CPU_XLA_FLAGS`` (set by ``sdl_jax.cpu.configure``) XLA:CPU's own
dense convolutions and their gradients are as fast as PyTorch's here. (An earlier version
wrote the weight gradient as per-tap matmuls, which beat YNNPACK's convolution gradient
but lost to XLA's own by ~1.7x on the small CNN.)

The models reach it through ``sdl_jax.models.layers``, which takes it on the CPU backend
only (``paths.hand_paths()``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sdl_jax.cpu import dnnl

_DN = ("NHWC", "HWIO", "NHWC")


def depthwise_taps(x, w, strides, padding):
  """Depthwise convolution of ``x`` ``[N, H, W, C]`` with ``w`` ``[kh, kw, 1, C]`` (HWIO).

  Args:
    x: input, NHWC.
    w: per-channel filters, ``[kh, kw, 1, C]``.
    strides: ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))``.

  Returns:
    ``[N, Ho, Wo, C]`` with ``Ho = (H + top + bottom - kh) // sh + 1`` (likewise ``Wo``),
    in the dtype of ``x * w``.
  """
  n, h, wd, c = x.shape
  kh, kw = w.shape[:2]
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  ho, wo = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  y = None
  for i in range(kh):
    for j in range(kw):
      xs = lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                     (1, sh, sw, 1))
      term = xs * w[i, j, 0]
      y = term if y is None else y + term
  return y


def depthwise(x, w, strides, padding):
  """``depthwise_taps`` (same arguments and result) with a hand-written VJP.

  The input gradient of a stride-1 convolution is a stride-1 correlation of ``dy`` with the
  flipped kernel (``depthwise_input_grad``); a strided one's is assembled by stride phase
  (``depthwise_input_grad_strided``).
  The weight gradient

      dw[i, j, 0, c] = sum_{n, a, b} xpad[n, a * sh + i, b * sw + j, c] * dy[n, a, b, c]

  is one variadic ``lax.reduce`` that sums all ``kh * kw`` tap products over ``(a, b)`` in a
  single pass over ``x`` and ``dy`` (giving ``[kh * kw, N, C]``), then over ``n``. Autodiff
  of the taps gives ``kh * kw`` separate reductions, each reading both tensors again: the
  weight gradient was most of the depthwise backward and measured 2-5x slower (README,
  "Performance"). Products and sums are at least float32 (bfloat16 inputs are summed in
  float32); the result is in ``w``'s dtype. Reverse mode only, like any ``custom_vjp``.
  """
  return _depthwise(x, w, tuple(strides), tuple(tuple(p) for p in padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, w, strides, padding):
  return depthwise_taps(x, w, strides, padding)


def _depthwise_fwd(x, w, strides, padding):
  return depthwise_taps(x, w, strides, padding), (x, w)


def _depthwise_bwd(strides, padding, res, dy):
  x, w = res
  kh, kw = w.shape[:2]
  (pt, pb), (pl, pr) = padding
  if tuple(strides) == (1, 1) and max(pt, pb) < kh and max(pl, pr) < kw:
    dx = depthwise_input_grad(dy, w, padding)
  else:
    dx = depthwise_input_grad_strided(dy, w, x.shape[1:3], strides, padding)
  dw = depthwise_weight_grad(x, dy, (kh, kw), strides, padding)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_input_grad(dy, w, padding):
  """The input gradient of a stride-1 ``depthwise_taps``: ``[N, H, W, C]``.

  ``dx[n, h, v, c] = sum_{i, j} dy[n, h + pt - i, v + pl - j, c] * w[i, j, 0, c]`` (terms
  outside ``dy`` are zero), i.e. the taps of ``dy`` padded by ``(kh - 1 - pt, kh - 1 - pb)``
  rows and ``(kw - 1 - pl, kw - 1 - pr)`` columns with the flipped kernel: one pad, then
  shifted slices. Autodiff's transpose instead sums ``kh * kw`` pads of ``dy * w[i, j]``,
  which XLA:CPU fuses into a loop with per-element bounds checks, measured up to 5x slower
  (README, "Performance").
  """
  kh, kw = w.shape[:2]
  (pt, pb), (pl, pr) = padding
  return depthwise_taps(dy, w[::-1, ::-1], (1, 1),
                        ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))


def depthwise_input_grad_strided(dy, w, hw, strides, padding):
  """The input gradient of ``depthwise_taps`` for any stride, by stride phase: ``[N, H, W, C]``.

  With ``xpad`` row ``r = sh * u + p`` (``p < sh``) and tap row ``i = sh * m + p``, the rows
  of phase ``p`` are ``dxpad[n, sh * u + p] = sum_{m, j} dy[n, u - m, ...] * w[sh * m + p, j]``
  (likewise for columns): each of the ``sh * sw`` phases is a sum of shifted slices of the
  zero-padded ``dy`` times its taps (``kh * kw`` taps over all phases together), then the
  phases are interleaved and ``xpad``'s padding cropped. Autodiff of the strided taps
  instead sums ``kh * kw`` strided pads of ``dy * w[i, j]``, which XLA:CPU fused into one
  loop with a select per element and per tap (in EfficientNet-Lite0's step, fused with the
  recomputed BatchNorm before it, the step's largest op; README, "Performance").

  Args:
    dy: the cotangent of the output, ``[N, Ho, Wo, C]``.
    w: ``[kh, kw, 1, C]``; hw: the input's ``(H, W)``; strides, padding as in
      ``depthwise_taps``.
  """
  kh, kw = w.shape[:2]
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  h, wd = hw
  n, ho, wo, c = dy.shape
  # Phase grid: u < U rows of each of the sh row phases cover xpad (and a little more).
  uu, vv = -(-(h + pt + pb) // sh), -(-(wd + pl + pr) // sw)
  mh, mw = -(-kh // sh) - 1, -(-kw // sw) - 1  # the largest tap shifts m, l
  dyp = jnp.pad(dy, ((0, 0), (mh, uu - ho), (mw, vv - wo), (0, 0)))
  rows = []
  for p in range(sh):
    cols = []
    for q in range(sw):
      phase = jnp.zeros((n, uu, vv, c), jnp.result_type(dy, w))
      for m in range(-(-(kh - p) // sh)):
        for l in range(-(-(kw - q) // sw)):
          phase = phase + (dyp[:, mh - m:mh - m + uu, mw - l:mw - l + vv]
                           * w[sh * m + p, sw * l + q, 0])
      cols.append(phase)
    rows.append(jnp.stack(cols, axis=3))       # [n, U, V, sw, c]
  dxp = jnp.stack(rows, axis=2).reshape(n, uu * sh, vv * sw, c)
  return dxp[:, pt:pt + h, pl:pl + wd]


def depthwise_weight_grad(x, dy, kernel, strides, padding):
  """The weight gradient of ``depthwise_taps``: ``[kh, kw, 1, C]`` (see ``depthwise``).

  Args:
    x: the convolution's input, ``[N, H, W, C]``.
    dy: the cotangent of its output, ``[N, Ho, Wo, C]``.
    kernel: ``(kh, kw)``; strides, padding as in ``depthwise_taps``.
  """
  kh, kw = kernel
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  n, ho, wo, c = dy.shape
  acc = jnp.promote_types(jnp.result_type(x, dy), jnp.float32)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  products = tuple(
      (lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                 (1, sh, sw, 1)).astype(acc) * dy.astype(acc))
      for i in range(kh) for j in range(kw))
  zeros = tuple(jnp.zeros((), acc) for _ in products)
  sums = lax.reduce(products, zeros,
                    lambda a, b: tuple(u + v for u, v in zip(a, b)), (1, 2))
  return jnp.stack(sums).sum(axis=1).reshape(kh, kw, 1, c)


def pointwise(x, w, strides=(1, 1), precision=None):
  """1x1 convolution of ``x`` ``[N, H, W, Ci]`` with ``w`` ``[1, 1, Ci, Co]`` (HWIO), no
  padding: ``y[n, a, b, o] = sum_i x[n, a * sh, b * sw, i] * w[0, 0, i, o]``.

  A strided one first takes every ``sh``-th row and ``sw``-th column. The product is a
  matmul over the flattened ``[N*H*W, Ci]`` pixels, with a hand-written VJP (below) whose
  weight gradient is ``x_flat^T dy_flat`` as one dot contracting the pixel dimension.
  Differentiating ``lax.conv_general_dilated`` instead, XLA:CPU writes that gradient as a
  convolution with an HxW window over ``[Ci, H, W, N]`` and ``[H, W, N, Co]`` copies of
  both operands: without this path ResNet-50's train step took 1.33x as long on a 2-core
  CPU (README, "Performance"; EfficientNet-Lite0's was unchanged).
  Returns ``[N, Ho, Wo, Co]`` in the dtype of ``x * w``.
  """
  sh, sw = strides
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw]
  return _pointwise(x, w, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise(x, w, precision):
  return lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())), precision=precision)


def _pointwise_fwd(x, w, precision):
  return _pointwise(x, w, precision), (x, w)


def _pointwise_bwd(precision, res, dy):
  x, w = res
  ci, co = w.shape[2:]
  dx = lax.dot_general(dy, w[0, 0], (((3,), (1,)), ((), ())), precision=precision)
  dw = lax.dot_general(x.reshape(-1, ci), dy.reshape(-1, co), (((0,), (0,)), ((), ())),
                       precision=precision)
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def strided(x, w, strides, padding, precision=None):
  """Dense strided convolution of ``x`` ``[N, H, W, Ci]`` with ``w`` ``[kh, kw, Ci, Co]``
  (HWIO): ``lax.conv_general_dilated`` with a hand-written VJP.

  The forward pass and the input gradient are XLA's. The weight gradient is
  ``strided_weight_grad``: XLA writes autodiff's as a convolution whose kernel is the output
  gradient dilated by the stride, which XLA:CPU ran 10x slower than the stride-1 form used
  here (ResNet-50's stride-2 3x3 and 7x7 layers; README, "Performance").
  ``padding`` is ``((top, bottom), (left, right))``. Reverse mode only.
  """
  return _strided(x, w, tuple(strides), tuple(tuple(p) for p in padding), precision)


def _strided_conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided(x, w, strides, padding, precision):
  return _strided_conv(x, w, strides, padding, precision)


def _strided_fwd(x, w, strides, padding, precision):
  return _strided_conv(x, w, strides, padding, precision), (x, w)


def _strided_bwd(strides, padding, precision, res, dy):
  x, w = res
  (dx,) = jax.vjp(lambda x_: _strided_conv(x_, w, strides, padding, precision), x)[1](dy)
  dw = strided_weight_grad(x, dy, w.shape[:2], strides, padding, precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_strided.defvjp(_strided_fwd, _strided_bwd)


def strided_weight_grad(x, dy, kernel, strides, padding, precision=None):
  """The weight gradient of a dense convolution, by space-to-depth: ``[kh, kw, Ci, Co]``.

      dw[i, j, c, o] = sum_{n, a, b} xpad[n, a * sh + i, b * sw + j, c] * dy[n, a, b, o].

  With ``i = sh * u + p``, ``j = sw * v + q`` (``p < sh``, ``q < sw``) and the input
  rearranged by the stride, ``xs[n, a, b, (p, q, c)] = xpad[n, a * sh + p, b * sw + q, c]``,

      dw[sh * u + p, sw * v + q, c, o]
          = sum_{n, a, b} xs[n, a + u, b + v, (p, q, c)] * dy[n, a, b, o],

  the weight gradient of a stride-1 VALID convolution of ``xs`` with a
  ``ceil(kh / sh) x ceil(kw / sw)`` kernel (taps past ``kh``, ``kw`` computed and dropped).

  Args:
    x: the convolution's input, ``[N, H, W, Ci]``.
    dy: the cotangent of its output, ``[N, Ho, Wo, Co]``.
    kernel: ``(kh, kw)``; strides ``(sh, sw)``; padding ``((top, bottom), (left, right))``.
  """
  kh, kw = kernel
  sh, sw = strides
  (pt, _), (pl, _) = padding
  n, h, wd, c = x.shape
  _, ho, wo, co = dy.shape
  uh, uw = -(-kh // sh), -(-kw // sw)
  hs, ws = ho + uh - 1, wo + uw - 1
  # Pads (or crops rows no window reads) to exactly hs * sh rows and ws * sw columns.
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               ((0, 0, 0), (pt, hs * sh - h - pt, 0), (pl, ws * sw - wd - pl, 0), (0, 0, 0)))
  xs = (xp.reshape(n, hs, sh, ws, sw, c).transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, hs, ws, sh * sw * c))
  (dws,) = jax.linear_transpose(
      lambda k: lax.conv_general_dilated(xs, k, (1, 1), "VALID", dimension_numbers=_DN,
                                         precision=precision),
      jax.ShapeDtypeStruct((uh, uw, sh * sw * c, co), jnp.result_type(xs, dy)))(dy)
  dw = dws.reshape(uh, uw, sh, sw, c, co).transpose(0, 2, 1, 3, 4, 5).reshape(
      uh * sh, uw * sw, c, co)
  return dw[:kh, :kw]


def is_plain_nhwc(lhs_shape, rhs_shape, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, batch_group_count=1,
                  preferred_element_type=None) -> bool:
  """Whether a ``conv_general_dilated`` call is NHWC / HWIO without dilation or batch
  groups, and keeps the input dtype."""
  return (len(lhs_shape) == 4 and batch_group_count == 1 and preferred_element_type is None
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1)))
          and lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs_shape, rhs_shape, _DN))


def is_pointwise(lhs_shape, rhs_shape, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                 preferred_element_type=None) -> bool:
  """Whether a ``conv_general_dilated`` call is a plain NHWC/HWIO 1x1 convolution without
  groups or padding (``padding`` already explicit)."""
  return (is_plain_nhwc(lhs_shape, rhs_shape, lhs_dilation, rhs_dilation, dimension_numbers,
                        batch_group_count, preferred_element_type)
          and feature_group_count == 1 and tuple(rhs_shape[:2]) == (1, 1)
          and all(v == 0 for pair in padding for v in pair))


def is_depthwise(lhs_shape, rhs_shape, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                 preferred_element_type=None) -> bool:
  """Whether a ``conv_general_dilated`` call is a plain NHWC/HWIO depthwise convolution."""
  return (is_plain_nhwc(lhs_shape, rhs_shape, lhs_dilation, rhs_dilation, dimension_numbers,
                        batch_group_count, preferred_element_type)
          and feature_group_count > 1 and rhs_shape[2] == 1
          and rhs_shape[3] == lhs_shape[3] == feature_group_count)


def explicit_padding(lhs_shape, rhs_shape, window_strides, padding):
  """``padding`` ('SAME', 'VALID' or pairs) as ``((top, bottom), (left, right))`` ints."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], window_strides, padding)
  return tuple(tuple(int(v) for v in p) for p in padding)


def _is_dnnl(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
             feature_group_count, batch_group_count, precision, preferred_element_type):
  """Whether a call goes to oneDNN (``dnnl.conv``): an NHWC/HWIO convolution, float32 or
  (where ``dnnl.bf16()``) bfloat16, grouped or depthwise too, without dilation or negative
  padding, of the kinds
  ``dnnl.mode()`` sends there, where oneDNN is available (``dnnl.takes``)."""
  if (precision is not None or lhs.dtype != rhs.dtype
      or not is_plain_nhwc(lhs.shape, rhs.shape, lhs_dilation, rhs_dilation,
                           dimension_numbers, batch_group_count, preferred_element_type)):
    return False
  if not isinstance(padding, str) and min(min(p) for p in padding) < 0:
    return False
  return dnnl.takes(int(feature_group_count), lhs.dtype)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """Same signature and result as ``lax.conv_general_dilated``: on oneDNN where ``dnnl``
  takes it, else depthwise ones as taps, 1x1 ones as ``pointwise``, other dense strided
  ones as ``strided``, the rest as ``lax.conv_general_dilated``."""
  if _is_dnnl(
      lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, precision, preferred_element_type):
    strides = tuple(int(s) for s in window_strides)
    padding = explicit_padding(lhs.shape, rhs.shape, window_strides, padding)
    groups = int(feature_group_count)
    if dnnl.takes_weight_grad(groups, lhs.shape, rhs.shape, strides, padding):
      return dnnl.conv(lhs, rhs, strides, padding, groups)
    return dnnl_xla_weight_grad(lhs, rhs, strides, padding)
  return _xla_paths(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count, precision,
                    preferred_element_type)


def _xla_paths(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
               precision=None, preferred_element_type=None):
  """``conv_general_dilated`` without oneDNN."""
  def xla():
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)

  if is_depthwise(lhs.shape, rhs.shape, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count, batch_group_count, preferred_element_type):
    padding = explicit_padding(lhs.shape, rhs.shape, window_strides, padding)
    return depthwise(lhs, rhs, tuple(window_strides), padding)
  if (len(lhs.shape) == 4 and len(rhs.shape) == 4 and is_pointwise(
      lhs.shape, rhs.shape, explicit_padding(lhs.shape, rhs.shape, window_strides, padding),
      lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
      preferred_element_type)):
    return pointwise(lhs, rhs, tuple(window_strides), precision)
  if (len(lhs.shape) == 4 and len(rhs.shape) == 4 and feature_group_count == 1
      and any(s > 1 for s in window_strides)
      and is_plain_nhwc(lhs.shape, rhs.shape, lhs_dilation, rhs_dilation, dimension_numbers,
                        batch_group_count, preferred_element_type)):
    padding = explicit_padding(lhs.shape, rhs.shape, window_strides, padding)
    return strided(lhs, rhs, tuple(window_strides), padding, precision)
  return xla()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dnnl_xla_weight_grad(x, w, strides, padding):
  """A dense NHWC/HWIO float32 convolution (``dnnl.conv``'s arguments, ``groups`` 1) whose
  forward pass and input gradient are oneDNN's and whose weight gradient is XLA's: the
  weight gradient of ``_xla_paths`` (``pointwise``'s for 1x1, ``strided``'s for strided
  ones, XLA's own for the rest). Under ``xla_large_wgrad`` (``auto`` on an AVX2 CPU with
  oneDNN 3) for dense convolutions larger than 1x1 with a large weight gradient
  (``dnnl.LARGE_WGRAD_MACS``): there oneDNN 3.2's brgemm kernels beat XLA's forward and
  backward-data convolutions in the train step, while its weight gradient (a JIT kernel)
  won for 1x1 and small kernels only."""
  return dnnl.conv(x, w, strides, padding, 1)


def _dnnl_xla_weight_grad_fwd(x, w, strides, padding):
  return dnnl.conv(x, w, strides, padding, 1), (x, w)


def _dnnl_xla_weight_grad_bwd(strides, padding, res, dy):
  x, w = res
  dx = dnnl.input_grad(dy, w, x.shape, strides, padding, 1)
  # Only the weight cotangent of the XLA path's VJP is used; XLA drops its input gradient.
  _, vjp = jax.vjp(lambda w: _xla_paths(x, w, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")), w)
  return dx, vjp(dy)[0]


dnnl_xla_weight_grad.defvjp(_dnnl_xla_weight_grad_fwd, _dnnl_xla_weight_grad_bwd)
