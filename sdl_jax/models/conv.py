"""A drop-in ``lax.conv_general_dilated`` whose weight gradient is a matmul.

XLA:CPU lowers the weight gradient of a convolution (a "convolution" whose window is the
whole output map) to a slow generic loop: for a 3x3, 64->64 conv on a 32x32x32 batch it
measured ~5x slower than the forward pass and ~10x slower than PyTorch's. Here the weight
gradient is written as the sum over kernel taps of plain matrix products,

    dW[kh, kw, i, o] = sum_{n, h, w} xpad[n, h*sh + kh, w*sw + kw, i] * dy[n, h, w, o],

one ``[Cin, N*Ho*Wo] @ [N*Ho*Wo, Cout]`` product per tap (grouped convolutions do it per
group), which XLA runs on its fast dot path. The forward pass and the input gradient are
XLA's own. Use it as ``flax.linen.Conv(..., conv_general_dilated=conv_general_dilated)``.
Only the NHWC / HWIO layout without dilation takes the fast path; everything else falls
back to ``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, padding, groups, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN,
                                  feature_group_count=groups, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _fast_conv(x, w, strides, padding, groups, precision):
  return _conv(x, w, strides, padding, groups, precision)


def _fast_conv_fwd(x, w, strides, padding, groups, precision):
  return _conv(x, w, strides, padding, groups, precision), (x, w)


def _fast_conv_bwd(strides, padding, groups, precision, res, g):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, strides, padding, groups, precision), x)
  (dx,) = vjp_x(g)
  kh, kw, cin_g, cout = w.shape
  n, ho, wo, _ = g.shape
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  sh, sw = strides
  taps = []
  for i in range(kh):
    for j in range(kw):
      xs = lax.slice(xp, (0, i, j, 0),
                     (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, xp.shape[3]),
                     (1, sh, sw, 1))
      if groups == 1:
        taps.append(jnp.einsum("nhwi,nhwo->io", xs, g, precision=precision))
      else:
        xs = xs.reshape(n, ho, wo, groups, cin_g)
        gg = g.reshape(n, ho, wo, groups, cout // groups)
        taps.append(jnp.einsum("nhwgi,nhwgo->igo", xs, gg, precision=precision)
                    .reshape(cin_g, cout))
  dw = jnp.stack(taps).reshape(kh, kw, cin_g, cout)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """Same signature and result as ``lax.conv_general_dilated``; faster weight gradient."""
  plain = (lhs.ndim != 4 or batch_group_count != 1 or preferred_element_type is not None
           or any(d != 1 for d in (lhs_dilation or (1, 1)))
           or any(d != 1 for d in (rhs_dilation or (1, 1)))
           or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN))
  if plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple(tuple(int(v) for v in p) for p in padding)
  return _fast_conv(lhs, rhs, tuple(window_strides), padding, int(feature_group_count),
                    precision)
