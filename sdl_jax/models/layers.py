"""The layers the models are built from: convolution, BatchNorm and max-pools, each either
``sdl_jax.cpu``'s hand-written implementation for XLA:CPU or XLA's own operations.

Which one is decided when a model is traced, by ``sdl_jax.cpu.paths.hand_paths()`` (on the
CPU backend by default; ``config.cpu.kernels``, ``$SDL_JAX_KERNELS`` or
``paths.use(...)`` force either). Both compute the same function with the same flax
variables, to rounding, so checkpoints and converted weights serve either; the models
themselves only say their architecture.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from sdl_jax.cpu import conv as cpu_conv
from sdl_jax.cpu import norm as cpu_norm
from sdl_jax.cpu import paths
from sdl_jax.cpu import pool as cpu_pool


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` (same signature and result), on the hand paths
  ``sdl_jax.cpu.conv.conv_general_dilated`` (oneDNN, shifted taps, matmuls)."""
  fn = cpu_conv.conv_general_dilated if paths.hand_paths() else lax.conv_general_dilated
  return fn(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, batch_group_count, precision,
            preferred_element_type)


# ``flax.linen.Conv`` (its variables: ``kernel``, ``bias``) computing with the above.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def max_pool_2x2(x):
  """2x2 max-pool, stride 2, VALID (an odd last row/column is dropped), ``[N, H, W, C]``;
  each window's gradient goes to its first maximum (row-major)."""
  if paths.hand_paths():
    return cpu_pool.max_pool_2x2(x)
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def max_pool_3x3_s2(x):
  """3x3 max-pool, stride 2, padding 1 (with -inf), ``[N, H, W, C]``; each window's
  gradient goes to its first maximum (row-major)."""
  if paths.hand_paths():
    return cpu_pool.max_pool_3x3_s2(x)
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BatchNorm(nn.Module):
  """``flax.linen.BatchNorm`` over the last axis (same variables, same numbers), with the
  ``activation`` (``'relu'``, ``'relu6'``) applied inside it and an optional residual
  added before a ReLU. Training mode is ``sdl_jax.cpu.norm.batch_norm_train`` (a
  hand-written gradient) on the hand paths, else its forward pass under autodiff. No
  cross-device statistics (``axis_name``): each device normalises by its own batch, as the
  library's models always did.

  Variables: ``params`` ``scale``, ``bias``; ``batch_stats`` ``mean``, ``var``.
  Attributes: ``use_running_average``, ``momentum`` (running = momentum * running +
  (1 - momentum) * batch), ``epsilon``, ``dtype`` (output dtype; default ``x``'s),
  ``activation``.
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  activation: str | None = None

  @nn.compact
  def __call__(self, x, residual=None):
    """``x`` ``[..., C]``; ``residual`` (same shape, needs ``activation='relu'``) is added
    before the ReLU."""
    act = cpu_norm.check_activation(self.activation)
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    dtype = self.dtype or x.dtype
    if self.use_running_average:
      return cpu_norm.batch_norm_eval(x, ra_mean.value, ra_var.value, scale, bias,
                                      self.epsilon, act, residual).astype(dtype)
    train = cpu_norm.batch_norm_train if paths.hand_paths() else cpu_norm.batch_norm_forward
    y, mean, var = train(x, scale, bias, self.epsilon, act, residual)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(dtype)
