"""Dense 1x1 (``pointwise``) and strided (``strided``) convolutions on XLA:CPU with
hand-written gradients, where autodiff of ``lax.conv_general_dilated`` gives XLA:CPU a slow
weight gradient (see each function). ``sdl_jax.cpu.conv`` sends them here when oneDNN does
not take them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

DN = ("NHWC", "HWIO", "NHWC")


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
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
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
      lambda k: lax.conv_general_dilated(xs, k, (1, 1), "VALID", dimension_numbers=DN,
                                         precision=precision),
      jax.ShapeDtypeStruct((uh, uw, sh * sw * c, co), jnp.result_type(xs, dy)))(dy)
  dw = dws.reshape(uh, uw, sh, sw, c, co).transpose(0, 2, 1, 3, 4, 5).reshape(
      uh * sh, uw * sw, c, co)
  return dw[:kh, :kw]
