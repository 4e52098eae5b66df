"""A drop-in ``lax.conv_general_dilated`` for XLA:CPU (``conv_general_dilated``): float32
NHWC convolutions (and bfloat16 ones where the CPU has bfloat16 arithmetic,
``dnnl_route.bf16``) on oneDNN (``dnnl.py``) where it is installed and
``dnnl_route.mode()`` sends them, and otherwise depthwise convolutions as shifted taps, 1x1
convolutions as matmuls with a transpose-free weight gradient (``pointwise``), and dense
strided convolutions with a space-to-depth weight gradient (``strided``). oneDNN's kernels
measured level with PyTorch's (which are oneDNN's) in every direction on an AVX-512 CPU
where XLA's own ran 0.07-0.9x as fast (README, "Performance"); on an AVX2-only CPU see
``dnnl_route``'s ``auto`` mode for which directions it takes.

Depthwise convolutions are shifted taps (``sdl_jax.cpu.depthwise``); 1x1 ones and dense
strided ones have hand-written gradients (``sdl_jax.cpu.dense``). Every other convolution
is ``lax.conv_general_dilated`` unchanged: with
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
from jax import lax

from sdl_jax.cpu import dnnl, dnnl_route
from sdl_jax.cpu.dense import DN, pointwise, strided
from sdl_jax.cpu.depthwise import depthwise


def is_plain_nhwc(lhs_shape, rhs_shape, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, batch_group_count=1,
                  preferred_element_type=None) -> bool:
  """Whether a ``conv_general_dilated`` call is NHWC / HWIO without dilation or batch
  groups, and keeps the input dtype."""
  return (len(lhs_shape) == 4 and batch_group_count == 1 and preferred_element_type is None
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1)))
          and lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs_shape, rhs_shape, DN))


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
  (where ``dnnl_route.bf16()``) bfloat16, grouped or depthwise too, without dilation or
  negative padding, of the kinds ``dnnl_route.mode()`` sends there, where oneDNN is
  available (``dnnl_route.takes``)."""
  if (precision is not None or lhs.dtype != rhs.dtype
      or not is_plain_nhwc(lhs.shape, rhs.shape, lhs_dilation, rhs_dilation,
                           dimension_numbers, batch_group_count, preferred_element_type)):
    return False
  if not isinstance(padding, str) and min(min(p) for p in padding) < 0:
    return False
  return dnnl_route.takes(int(feature_group_count), lhs.dtype)


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
    if dnnl_route.takes_weight_grad(groups, lhs.shape, rhs.shape, strides, padding):
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
  (``dnnl_route.LARGE_WGRAD_MACS``): there oneDNN 3.2's brgemm kernels beat XLA's forward and
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
