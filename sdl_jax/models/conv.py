"""A drop-in ``lax.conv_general_dilated`` that runs depthwise convolutions as shifted taps.

XLA:CPU's depthwise convolution (``feature_group_count`` = input channels, one filter per
channel) measured 20-40x slower than PyTorch's in the forward pass and ~10x slower in the
backward pass (layer micro-benchmarks, 2-core AVX2 CPU). Written as the sum over kernel taps of shifted, strided slices times per-channel
weights,

    y[n, a, b, c] = sum_{i, j} xpad[n, a * sh + i, b * sw + j, c] * w[i, j, 0, c],

it is one fused elementwise loop whose gradient (pads and reductions, by JAX's autodiff)
is also fused: EfficientNet-Lite0's train step ran ~4x faster (README, "Performance").
Every other convolution is ``lax.conv_general_dilated`` unchanged: with
``sdl_jax.perf.FAST_CPU_XLA_FLAGS`` (set on import of ``sdl_jax``) XLA:CPU's own dense
convolutions and their gradients are as fast as PyTorch's here. (An earlier version wrote
the weight gradient as per-tap matmuls, which beat YNNPACK's convolution gradient but lost
to XLA's own by ~1.7x on the small CNN.) GPU/TPU take the same path (not timed there), so
the numerics are the same on every device.

Use it as ``flax.linen.Conv(..., conv_general_dilated=conv_general_dilated)``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

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


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """Same signature and result as ``lax.conv_general_dilated``; depthwise ones as taps."""
  if not is_depthwise(lhs.shape, rhs.shape, lhs_dilation, rhs_dilation, dimension_numbers,
                      feature_group_count, batch_group_count, preferred_element_type):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  padding = explicit_padding(lhs.shape, rhs.shape, window_strides, padding)
  return depthwise_taps(lhs, rhs, tuple(window_strides), padding)
