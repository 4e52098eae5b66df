"""A small VGG-style CNN for the synthetic set and for FER+ from scratch."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdl_jax.models.conv import conv_general_dilated
from sdl_jax.models.norm import BatchNorm


def max_pool_2x2(x):
  """2x2 max-pool, stride 2, VALID (an odd last row/column is dropped), ``[N, H, W, C]``.

  Forward: a reshape + max. Gradient (``custom_vjp``): each window's cotangent goes to
  its first maximum in row-major order, as in PyTorch's and XLA's select-and-scatter,
  written as four elementwise masks: one loop fusion, where ``nn.max_pool``'s
  select-and-scatter measured ~4x slower on XLA:CPU and autodiff of the reshape + max
  (which splits ties, e.g. all-zero windows after a ReLU) needs extra reductions.
  """
  n, h, w, c = x.shape
  return _max_pool_2x2_even(x[:, :h - h % 2, :w - w % 2])


@jax.custom_vjp
def _max_pool_2x2_even(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_fwd(x):
  # Which of the window's four taps (row-major) holds its first maximum, int8, found in
  # the forward pass; the gradient goes there. Comparing x with y again in the backward
  # pass was not safe: the jitted small CNN's gradients moved by tens of percent with 1e-7
  # changes of the input, likely because XLA computes x (a BatchNorm + ReLU fused into
  # both passes) twice, not bit for bit alike, and a window whose maximum no longer
  # equals y lost its gradient.
  n, h, w, c = x.shape
  r = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return first_max([r[:, :, t // 2, :, t % 2, :] for t in range(4)])


def first_max(taps):
  """The elementwise maximum of the same-shape arrays ``taps`` and, as int8, the index of
  the first tap that holds it (ties go to the earlier tap)."""
  out, first = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for t, s in enumerate(taps[1:], 1):
    first = jnp.where(s > out, jnp.int8(t), first)  # strictly: the first maximum stays
    out = jnp.maximum(out, s)
  return out, first


def _max_pool_bwd(first, g):
  zero = jnp.zeros((), g.dtype)
  rows = [jnp.stack([jnp.where(first == 2 * a + b, g, zero) for b in range(2)], axis=3)
          for a in range(2)]                      # each [n, h/2, w/2, 2(b), c]
  dx = jnp.stack(rows, axis=2)                   # [n, h/2, 2(a), w/2, 2(b), c]
  n, h2, _, w2, _, c = dx.shape
  return (dx.reshape(n, 2 * h2, 2 * w2, c),)


_max_pool_2x2_even.defvjp(_max_pool_fwd, _max_pool_bwd)


class SmallCNN(nn.Module):
  """Conv-BN-ReLU blocks (two 3x3 convs each, then a 2x2 max-pool), global average pool,
  dropout, and a dense head named ``head``. BatchNorm is ``sdl_jax.models.norm``'s (the
  variables of ``flax.linen.BatchNorm``: ``bn{i}_{j}`` with ``scale``/``bias`` and
  ``batch_stats`` ``mean``/``var``).

  Input float ``[N, H, W, 3]``; output logits float32 ``[N, num_classes]``.
  ``stem_stride`` > 1 strides the very first convolution.
  """
  num_classes: int
  widths: Sequence[int] = (32, 64, 128)
  dropout_rate: float = 0.3
  stem_stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=False, dtype=self.dtype,
                             conv_general_dilated=conv_general_dilated)
    # The library's BatchNorm (flax's variables and numbers, its gradient by hand) with the
    # ReLU inside it (session 16; flax's BatchNorm and nn.relu before).
    norm = functools.partial(BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, activation="relu")
    x = x.astype(self.dtype)
    for i, w in enumerate(self.widths):
      for j in range(2):
        # A strided first conv quarters the cost of the whole net on larger inputs.
        strides = (self.stem_stride,) * 2 if i == j == 0 else (1, 1)
        x = conv(w, strides=strides, name=f"conv{i}_{j}")(x)
        x = norm(name=f"bn{i}_{j}")(x)
      x = max_pool_2x2(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
