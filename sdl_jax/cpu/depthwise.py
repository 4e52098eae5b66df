"""Depthwise convolutions on XLA:CPU as shifted taps, with a hand-written gradient.

XLA:CPU's depthwise convolution (``feature_group_count`` = input channels, one filter per
channel) measured 20-40x slower than PyTorch's in the forward pass and ~10x slower in the
backward pass (layer micro-benchmarks, 2-core AVX2 CPU). Written as the sum over kernel
taps of shifted, strided slices times per-channel weights,

    y[n, a, b, c] = sum_{i, j} xpad[n, a * sh + i, b * sw + j, c] * w[i, j, 0, c],

it is one fused elementwise loop: EfficientNet-Lite0's train step ran ~4x faster (README,
"Performance"). Its gradient is written by hand (``depthwise``): the weight gradient as one
variadic reduction over all taps, the stride-1 input gradient as taps again.
``sdl_jax.cpu.conv`` sends depthwise convolutions here when oneDNN does not take them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


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
