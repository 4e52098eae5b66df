"""Convolution implementations the benchmark can swap into the models (``--conv``).

For experiments only: the library's models use ``sdl_jax.models.conv.conv_general_dilated``
(XLA's forward and input gradient, the weight gradient as per-tap matmuls); ``--conv``
replaces it in every model module for one run, so whole-model effects are measured by the
same tool. Variants:

* ``library``: unchanged;
* ``lax``: ``lax.conv_general_dilated`` itself (XLA's own gradients);
* ``dw_taps``: the library's, but depthwise convolutions (``feature_group_count`` = input
  channels, one filter each) as a sum of ``kh * kw`` shifted, strided slices times the
  per-channel weights (``depthwise_taps``), differentiated by JAX;
* ``lax_dw_taps``: ``lax`` with depthwise convolutions as in ``dw_taps``.
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp
from jax import lax

from sdl_jax.models import conv as library_conv

_DN = ("NHWC", "HWIO", "NHWC")
MODEL_MODULES = ("sdl_jax.models.small_cnn", "sdl_jax.models.vgg", "sdl_jax.models.resnet",
                 "sdl_jax.models.efficientnet_lite")


def depthwise_taps(x, w, strides, padding):
  """Depthwise convolution, NHWC / HWIO with ``w`` ``[kh, kw, 1, C]``:

      y[n, a, b, c] = sum_{i, j} xpad[n, a * sh + i, b * sw + j, c] * w[i, j, 0, c]

  ``padding`` is ``((top, bottom), (left, right))``. Each term is an elementwise product
  that XLA fuses into one loop; its gradient is pads and reductions, also fused.
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


def _with_depthwise_taps(base):

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1,
           precision=None, preferred_element_type=None):
    depthwise = (lhs.ndim == 4 and feature_group_count > 1 and rhs.shape[2] == 1
                 and rhs.shape[3] == lhs.shape[3] == feature_group_count
                 and batch_group_count == 1 and preferred_element_type is None
                 and all(d == 1 for d in (lhs_dilation or (1, 1)))
                 and all(d == 1 for d in (rhs_dilation or (1, 1)))
                 and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                 == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN))
    if not depthwise:
      return base(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, batch_group_count, precision,
                  preferred_element_type)
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return depthwise_taps(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))

  return conv


VARIANTS = {
    "library": library_conv.conv_general_dilated,
    "lax": lax.conv_general_dilated,
    "dw_taps": _with_depthwise_taps(library_conv.conv_general_dilated),
    "lax_dw_taps": _with_depthwise_taps(lax.conv_general_dilated),
}


def use(name: str) -> None:
  """Makes every model module build its convolutions with variant ``name``."""
  if name not in VARIANTS:
    raise ValueError(f"--conv must be one of {', '.join(VARIANTS)}, got {name!r}")
  for module_name in MODEL_MODULES:
    module = importlib.import_module(module_name)
    if hasattr(module, "conv_general_dilated"):
      module.conv_general_dilated = VARIANTS[name]
