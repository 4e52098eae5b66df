"""Convolution implementations the benchmark can swap into the models (``--conv``), flax's
BatchNorm for ResNet-50 and EfficientNet-Lite (``--norm``) and ResNet-50's earlier max-pool
(``--pool``).

For experiments only: the library's models use ``sdl_jax.models.conv.conv_general_dilated``
(XLA's own convolutions, depthwise ones as shifted taps); ``--conv`` replaces it in every
model module for one run, so whole-model effects are measured by the same tool. Variants:

* ``library``: unchanged (convolutions on oneDNN as ``SDL_JAX_DNNL`` says, where it is
  available: ``sdl_jax.models.dnnl``);
* ``dnnl``: the library with oneDNN on for every convolution (``SDL_JAX_DNNL=all``);
* ``dnnl_grouped``: the library with oneDNN for grouped and depthwise convolutions only
  (``SDL_JAX_DNNL=grouped``);
* ``dnnl_xla_wgrad``: the library with oneDNN for every convolution but the dense ones'
  weight gradients (``SDL_JAX_DNNL=xla_wgrad``);
* ``dnnl_xla_spatial_wgrad``: the same, but with 1x1 ones' weight gradients on oneDNN too
  (``SDL_JAX_DNNL=xla_spatial_wgrad``);
* ``dnnl_xla_large_wgrad``: the same, but with small ones' weight gradients on oneDNN too
  (fewer than ``dnnl.LARGE_WGRAD_MACS`` multiply-adds; ``SDL_JAX_DNNL=xla_large_wgrad``);
* ``dnnl_spatial``, ``dnnl_spatial_xla_wgrad``: as ``dnnl`` and ``dnnl_xla_wgrad`` for
  grouped convolutions and dense ones larger than 1x1, dense 1x1 ones as matmuls (the
  library's ``pointwise``);
* ``unordered``: the library without ``dnnl.after``: oneDNN's input and weight gradients
  of a convolution left unordered, as before session 15 (XLA then left the weight
  gradients to the end of the step and ran them two at once);
* ``nhwc_wgrad``: the library with oneDNN's weight gradients on NHWC activations always
  (``dnnl.blocked_weight_grad`` off), as before session 15;
* ``session14``: the library as session 14 left it: unordered, NHWC weight gradients,
  and dense weight gradients of 1e9 multiply-adds or more on XLA (``LARGE_WGRAD_MACS``
  1e9, now 2e9);
* ``session15``: the library as session 15 left it: every dense KxK weight gradient of
  ``LARGE_WGRAD_MACS`` multiply-adds or more on XLA, the square ones too (now oneDNN's,
  on its blocked layout);
* ``no_dnnl``: the library with oneDNN off (XLA's kernels and the hand paths); the
  variants below run with oneDNN off too, as earlier states of the library;
* ``lax``: ``lax.conv_general_dilated`` itself, depthwise included;
* ``no_pointwise``: the library without its 1x1 path (``pointwise``): 1x1 convolutions by
  ``lax.conv_general_dilated`` and its autodiff gradient, depthwise ones as in ``library``;
* ``taps_autodiff``: the library with depthwise convolutions as taps differentiated by
  autodiff (``depthwise_taps``) instead of the hand-written VJP (``depthwise``): one
  reduction per tap for the weight gradient (the library before session 4);
* ``no_strided``: the library with dense strided convolutions (ResNet-50's stride-2 3x3 and
  7x7 ones, EfficientNet's 3x3 stem) left to ``lax.conv_general_dilated`` and its autodiff
  weight gradient instead of ``strided`` (the library before session 5);
* ``dw_strided_autodiff``: the library with strided depthwise convolutions' input gradient
  by autodiff of the taps instead of by stride phase (the library before session 6);
* ``dw_batch_split``: dense stride-1 KxK convolutions (K > 1) with XLA's own weight
  gradient summed over 4 (or 2) slices of the batch (session 8, an AVX-512 machine where
  that gradient did not use both cores);
* ``tap_matmul_dw``: the weight gradient of every non-depthwise convolution as per-tap
  matmuls (``tap_matmul_conv``; the library's convolution before the XLA flag was found),
  depthwise ones as in ``library``.
"""

from __future__ import annotations

import functools
import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sdl_jax.models import conv as library_conv
from sdl_jax.models import dnnl as library_dnnl
from sdl_jax.models import efficientnet_lite as library_lite
from sdl_jax.models import norm as library_norm
from sdl_jax.models import resnet as library_resnet
from sdl_jax.models import small_cnn as library_small_cnn

_DN = ("NHWC", "HWIO", "NHWC")
MODEL_MODULES = ("sdl_jax.models.small_cnn", "sdl_jax.models.vgg", "sdl_jax.models.resnet",
                 "sdl_jax.models.efficientnet_lite")


def _conv(x, w, strides, padding, groups):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN,
                                  feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _tap_matmul(x, w, strides, padding, groups):
  return _conv(x, w, strides, padding, groups)


def _tap_matmul_fwd(x, w, strides, padding, groups):
  return _conv(x, w, strides, padding, groups), (x, w)


def _tap_matmul_bwd(strides, padding, groups, res, g):
  """dW[kh, kw, i, o] = sum_{n,h,w} xpad[n, h*sh + kh, w*sw + kw, i] * dy[n, h, w, o]."""
  x, w = res
  (dx,) = jax.vjp(lambda x_: _conv(x_, w, strides, padding, groups), x)[1](g)
  kh, kw, cin_g, cout = w.shape
  n, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0),) + padding + ((0, 0),))
  sh, sw = strides
  taps = []
  for i in range(kh):
    for j in range(kw):
      xs = lax.slice(xp, (0, i, j, 0),
                     (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, xp.shape[3]),
                     (1, sh, sw, 1))
      xs = xs.reshape(n, ho, wo, groups, cin_g)
      gg = g.reshape(n, ho, wo, groups, cout // groups)
      taps.append(jnp.einsum("nhwgi,nhwgo->igo", xs, gg).reshape(cin_g, cout))
  return dx, jnp.stack(taps).reshape(kh, kw, cin_g, cout).astype(w.dtype)


_tap_matmul.defvjp(_tap_matmul_fwd, _tap_matmul_bwd)


def tap_matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                    precision=None, preferred_element_type=None):
  """The library's convolution, but dense NHWC ones get a per-tap matmul weight gradient."""
  plain = (precision is not None
           or not library_conv.is_plain_nhwc(lhs.shape, rhs.shape, lhs_dilation,
                                             rhs_dilation, dimension_numbers,
                                             batch_group_count, preferred_element_type)
           or library_conv.is_depthwise(lhs.shape, rhs.shape, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count,
                                        batch_group_count, preferred_element_type))
  if plain:
    return library_conv.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  padding = library_conv.explicit_padding(lhs.shape, rhs.shape, window_strides, padding)
  return _tap_matmul(lhs, rhs, tuple(window_strides), padding, int(feature_group_count))


def without_dnnl(conv):
  """``conv`` traced with oneDNN off (``dnnl.disabled``): its dense convolutions on XLA's
  kernels and the hand paths, as on a machine without oneDNN (and as the library was
  before session 8)."""
  @functools.wraps(conv)
  def wrapped(*args, **kwargs):
    with library_dnnl.disabled():
      return conv(*args, **kwargs)
  return wrapped


no_dnnl_conv = without_dnnl(library_conv.conv_general_dilated)


def with_dnnl(mode):
  """The library's convolution traced with ``dnnl.use(mode)``, whatever ``$SDL_JAX_DNNL``
  says."""
  def conv(*args, **kwargs):
    with library_dnnl.use(mode):
      return library_conv.conv_general_dilated(*args, **kwargs)
  return conv


dnnl_conv = with_dnnl("all")


def dnnl_spatial(dense_mode):
  """oneDNN for the grouped convolutions and (as ``dnnl.use(dense_mode)`` says) the dense
  ones with a kernel larger than 1x1; dense 1x1 ones on the library's XLA path
  (``pointwise``: a matmul)."""
  def conv(lhs, rhs, window_strides, padding, *args, **kwargs):
    mode = "grouped" if tuple(rhs.shape[:2]) == (1, 1) else dense_mode
    with library_dnnl.use(mode):
      return library_conv.conv_general_dilated(lhs, rhs, window_strides, padding, *args,
                                               **kwargs)
  return conv


def no_pointwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                      precision=None, preferred_element_type=None):
  """The library's convolution with 1x1 ones left to ``lax.conv_general_dilated``."""
  if library_conv.is_depthwise(lhs.shape, rhs.shape, lhs_dilation, rhs_dilation,
                               dimension_numbers, feature_group_count, batch_group_count,
                               preferred_element_type):
    return library_conv.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type)


def taps_autodiff_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                       rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                       batch_group_count=1, precision=None, preferred_element_type=None):
  """The library's convolution with depthwise ones differentiated by autodiff of the taps."""
  if library_conv.is_depthwise(lhs.shape, rhs.shape, lhs_dilation, rhs_dilation,
                               dimension_numbers, feature_group_count, batch_group_count,
                               preferred_element_type):
    padding = library_conv.explicit_padding(lhs.shape, rhs.shape, window_strides, padding)
    return library_conv.depthwise_taps(lhs, rhs, tuple(window_strides), padding)
  return library_conv.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type)


def no_strided_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                    precision=None, preferred_element_type=None):
  """The library's convolution with dense strided ones left to ``lax.conv_general_dilated``."""
  args = (lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
          batch_group_count, precision, preferred_element_type)
  if (feature_group_count == 1 and any(s > 1 for s in window_strides)
      and tuple(rhs.shape[:2]) != (1, 1)):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args)
  return library_conv.conv_general_dilated(lhs, rhs, window_strides, padding, *args)


_LIBRARY_DW_STRIDED_INPUT_GRAD = library_conv.depthwise_input_grad_strided
_LIBRARY_AFTER = library_dnnl.after
_LIBRARY_BLOCKED = library_dnnl.blocked_weight_grad
_LIBRARY_TAKES_WEIGHT_GRAD = library_dnnl.takes_weight_grad


def _session15_takes_weight_grad(groups, x_shape, w_shape, strides, padding):
  """``dnnl.takes_weight_grad`` as session 15 left it: under ``xla_large_wgrad`` every
  dense KxK weight gradient of ``LARGE_WGRAD_MACS`` or more on XLA, whatever its shape."""
  if (library_dnnl.mode() == "xla_large_wgrad" and groups == 1
      and int(w_shape[0]) * int(w_shape[1]) > 1
      and (library_dnnl.weight_grad_macs(x_shape, w_shape, strides, padding)
           >= library_dnnl.LARGE_WGRAD_MACS)):
    return False
  return _LIBRARY_TAKES_WEIGHT_GRAD(groups, x_shape, w_shape, strides, padding)


def _unordered(a, b):  # pylint: disable=unused-argument
  """``dnnl.after`` undone: ``a`` with no dependency on ``b``."""
  return a


def with_large_wgrad_macs(macs, conv):
  """``conv`` traced with ``dnnl.LARGE_WGRAD_MACS`` set to ``macs`` (the routing is decided
  when the forward pass is traced)."""
  def traced(*args, **kwargs):
    old, library_dnnl.LARGE_WGRAD_MACS = library_dnnl.LARGE_WGRAD_MACS, macs
    try:
      return conv(*args, **kwargs)
    finally:
      library_dnnl.LARGE_WGRAD_MACS = old
  return traced


def _autodiff_strided_input_grad(dy, w, hw, strides, padding):
  """``dw_strided_autodiff``: autodiff's input gradient of strided depthwise taps."""
  x = jnp.zeros(dy.shape[:1] + tuple(hw) + dy.shape[3:], dy.dtype)
  return jax.vjp(lambda x_: library_conv.depthwise_taps(x_, w, strides, padding), x)[1](dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dw_split(x, w, strides, padding, chunks):
  return _conv(x, w, strides, padding, 1)


def _dw_split_fwd(x, w, strides, padding, chunks):
  return _conv(x, w, strides, padding, 1), (x, w)


def _dw_split_bwd(strides, padding, chunks, res, g):
  """XLA's own gradients, the weight gradient summed over ``chunks`` slices of the batch."""
  x, w = res
  (dx,) = jax.vjp(lambda x_: _conv(x_, w, strides, padding, 1), x)[1](g)
  dw = None
  for xs, gs in zip(jnp.split(x, chunks), jnp.split(g, chunks)):
    (part,) = jax.vjp(lambda w_: _conv(xs, w_, strides, padding, 1), w)[1](gs)
    dw = part if dw is None else dw + part
  return dx, dw


_dw_split.defvjp(_dw_split_fwd, _dw_split_bwd)


def dw_batch_split_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                        rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                        batch_group_count=1, precision=None, preferred_element_type=None):
  """The library's convolution, but dense stride-1 KxK (K > 1) ones take their weight
  gradient as the sum of ``gcd(batch, 4)`` batch slices' (``--conv=dw_batch_split``)."""
  dense = (precision is None and feature_group_count == 1
           and all(s == 1 for s in window_strides) and tuple(rhs.shape[:2]) != (1, 1)
           and math.gcd(lhs.shape[0], 4) > 1
           and library_conv.is_plain_nhwc(lhs.shape, rhs.shape, lhs_dilation, rhs_dilation,
                                          dimension_numbers, batch_group_count,
                                          preferred_element_type))
  if not dense:
    return library_conv.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  padding = library_conv.explicit_padding(lhs.shape, rhs.shape, window_strides, padding)
  return _dw_split(lhs, rhs, tuple(window_strides), padding, math.gcd(lhs.shape[0], 4))


VARIANTS = {
    "library": library_conv.conv_general_dilated,
    "lax": lax.conv_general_dilated,
    "no_dnnl": no_dnnl_conv,
    "dnnl": dnnl_conv,
    "dnnl_grouped": with_dnnl("grouped"),
    "dnnl_xla_wgrad": with_dnnl("xla_wgrad"),
    "dnnl_xla_spatial_wgrad": with_dnnl("xla_spatial_wgrad"),
    "dnnl_xla_large_wgrad": with_dnnl("xla_large_wgrad"),
    # The library; ``use`` swaps ``dnnl.after`` for ``_unordered``.
    "unordered": library_conv.conv_general_dilated,
    "nhwc_wgrad": library_conv.conv_general_dilated,  # ``use`` swaps blocked_weight_grad
    "session14": with_large_wgrad_macs(1e9, library_conv.conv_general_dilated),
    # The library; ``use`` swaps ``dnnl.takes_weight_grad`` for session 15's rule.
    "session15": library_conv.conv_general_dilated,
    "dnnl_spatial": dnnl_spatial("all"),
    "dnnl_spatial_xla_wgrad": dnnl_spatial("xla_wgrad"),
    # Earlier states of the library, before its dense convolutions went to oneDNN.
    "tap_matmul_dw": without_dnnl(tap_matmul_conv),
    "dw_batch_split": without_dnnl(dw_batch_split_conv),
    "no_pointwise": without_dnnl(no_pointwise_conv),
    "no_strided": without_dnnl(no_strided_conv),
    "taps_autodiff": without_dnnl(taps_autodiff_conv),
    # The library's convolution; ``use`` swaps its strided depthwise input gradient.
    "dw_strided_autodiff": library_conv.conv_general_dilated,
}


class FlaxBatchNorm(library_norm.BatchNorm):
  """``--norm=flax``: ``flax.linen.BatchNorm`` (autodiff gradient), then the residual and the
  activation as separate ops: ResNet-50's normalisation before session 5, EfficientNet-Lite's
  before session 7, the small CNN's before session 16. The attributes and call of
  ``sdl_jax.models.norm.BatchNorm``; its variables sit one level deeper (benchmarks
  only)."""

  @nn.compact
  def __call__(self, x, residual=None):
    y = nn.BatchNorm(use_running_average=self.use_running_average, momentum=self.momentum,
                     epsilon=self.epsilon, dtype=self.dtype)(x)
    if residual is not None:
      y = y + residual
    return {"relu": nn.relu, "relu6": nn.relu6}.get(self.activation, lambda v: v)(y)


def autodiff_max_pool_3x3_s2(x):
  """``--pool=autodiff``: the 3x3/2 max-pool as the maximum of the library's nine strided
  slices of the -inf padded input, differentiated by autodiff (ResNet-50's before
  session 5)."""
  return functools.reduce(jnp.maximum, library_resnet.pool_taps(x))


_LIBRARY_BN_GRADS = library_norm._grads  # pylint: disable=protected-access


def _session15_bn_grads(x, mean, var, scale, g, dmean, dvar, epsilon):
  """``--norm=session15``: the library's BatchNorm as session 15 left it (its block outputs
  not ``dnnl.stored``, as with ``--norm=no_stored``), its gradient with
  ``sum g (x - mean)`` summed from ``x - mean`` (which XLA:CPU stored as a buffer of its
  own) instead of as ``sum g x - mean sum g``."""
  x, mean, var = lax.optimization_barrier((x, mean, var))
  acc = jnp.promote_types(x.dtype, jnp.float32)
  m = x.size // x.shape[-1]
  axes = tuple(range(x.ndim - 1))
  r = lax.rsqrt(var + epsilon)
  mul = r * scale.astype(acc)
  xc = x.astype(acc) - mean
  ga = g.astype(acc)
  dbias, dxc = jnp.sum(ga, axes), jnp.sum(ga * xc, axes)
  dscale = dxc * r
  cx = -mul * r * dscale / m + 2 * dvar / m
  c0 = -mul * dbias / m + dmean / m
  dx = mul * ga + xc * cx + c0
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


NORMS = {"library": library_norm.BatchNorm, "flax": FlaxBatchNorm,
         "no_stored": library_norm.BatchNorm, "session15": library_norm.BatchNorm}
_BN_GRADS = {"session15": _session15_bn_grads}
_LIBRARY_STORED = library_dnnl.stored
POOLS = {"library": library_resnet.max_pool_3x3_s2, "autodiff": autodiff_max_pool_3x3_s2}


def use_model_ops(norm: str = "library", pool: str = "library") -> None:
  """Makes ResNet-50, EfficientNet-Lite and the small CNN build their BatchNorm from variant
  ``norm``, and ResNet-50 its max-pool from ``pool``."""
  if norm not in NORMS:
    raise ValueError(f"--norm must be one of {', '.join(NORMS)}, got {norm!r}")
  if pool not in POOLS:
    raise ValueError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
  library_resnet.BatchNorm = NORMS[norm]
  library_lite.BatchNorm = NORMS[norm]
  library_small_cnn.BatchNorm = NORMS[norm]
  library_norm._grads = _BN_GRADS.get(norm, _LIBRARY_BN_GRADS)  # pylint: disable=protected-access
  library_dnnl.stored = ((lambda x: x) if norm in ("no_stored", "session15")
                         else _LIBRARY_STORED)
  library_resnet.max_pool_3x3_s2 = POOLS[pool]


def use(name: str) -> None:
  """Makes every model module build its convolutions with variant ``name``."""
  if name not in VARIANTS:
    raise ValueError(f"--conv must be one of {', '.join(VARIANTS)}, got {name!r}")
  for module_name in MODEL_MODULES:
    module = importlib.import_module(module_name)
    if hasattr(module, "conv_general_dilated"):
      module.conv_general_dilated = VARIANTS[name]
  library_conv.depthwise_input_grad_strided = (
      _autodiff_strided_input_grad if name == "dw_strided_autodiff"
      else _LIBRARY_DW_STRIDED_INPUT_GRAD)
  library_dnnl.after = _unordered if name in ("unordered", "session14") else _LIBRARY_AFTER
  library_dnnl.blocked_weight_grad = (
      (lambda groups, w_shape: False) if name in ("nhwc_wgrad", "session14")
      else _LIBRARY_BLOCKED)
  library_dnnl.takes_weight_grad = (_session15_takes_weight_grad if name == "session15"
                                    else _LIBRARY_TAKES_WEIGHT_GRAD)
