"""ResNet-50 in torchvision's layout (He et al. 2016, "v1.5": stride on the 3x3 conv).

Parameter names follow torchvision's state dict, so ``sdl_jax.weights`` converts one
key by key: ``conv1``, ``bn1``, ``layer{1..4}_{j}`` (``layer1.0`` in PyTorch) with
``conv1/bn1`` (1x1), ``conv2/bn2`` (3x3, carries the stride), ``conv3/bn3`` (1x1, 4x
expansion) and, in the first block of a stage, ``downsample_conv/downsample_bn``; the
classifier is ``head`` (torchvision's ``fc``). Padding is PyTorch's symmetric padding
(3 for the 7x7 stem, 1 for 3x3 convs and the 3x3/2 max-pool), not TF's "SAME".
BatchNorm epsilon 1e-5, momentum 0.9 (PyTorch's 0.1), ``sdl_jax.models.norm.BatchNorm``
(flax's, with a hand-written gradient, ReLU fused where one follows). Pretrained inputs are
ImageNet-normalised RGB.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdl_jax.models import kernels
from sdl_jax.models.conv import conv_general_dilated
from sdl_jax.models.norm import BatchNorm
from sdl_jax.models.small_cnn import first_max


def max_pool_3x3_s2(x):
  """3x3 max-pool, stride 2, padding 1 (padded with -inf), ``[N, H, W, C]``.

  ``y[n, i, j] = max_{a, b < 3} xpad[n, 2i + a, 2j + b]``: the maximum of nine strided
  slices. Gradient (``custom_vjp``): each window's cotangent goes to its first maximum in
  row-major order, as in PyTorch and XLA's select-and-scatter. The forward pass keeps that
  tap's index (int8, a quarter of the output's bytes); the backward pass assembles ``dx`` by
  stride phase (even/odd rows and columns of ``xpad``, each a sum of 1, 2 or 4 shifted
  slices of the masked, padded cotangent) and interleaves the four phases. Autodiff of the
  slices instead scatters nine strided pads and recomputes the stem's BatchNorm and ReLU
  inside that loop; it measured the largest single op of ResNet-50's step (README,
  "Performance"), and splits ties. Off the CPU backend (``kernels.hand_paths()`` false) it
  is ``flax.linen.max_pool``.
  """
  if not kernels.hand_paths():  # XLA's reduce_window; its gradient also picks the first max
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  return _max_pool_3x3_s2(x, tuple(x.shape[1:3]))


def pool_taps(x):
  """The nine ``[N, Ho, Wo, C]`` slices of the -inf padded ``x``, in row-major tap order."""
  n, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 2 * ho - h), (1, 2 * wo - w), (0, 0)),
               constant_values=-jnp.inf)
  return [xp[:, a:a + 2 * (ho - 1) + 1:2, b:b + 2 * (wo - 1) + 1:2]
          for a in range(3) for b in range(3)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_3x3_s2(x, hw):
  del hw
  return functools.reduce(jnp.maximum, pool_taps(x))


def _max_pool_3x3_s2_fwd(x, hw):
  del hw
  return first_max(pool_taps(x))


def _max_pool_3x3_s2_bwd(hw, first, g):
  h, w = hw
  n, ho, wo, c = g.shape
  # Padded by one on each side, so every shifted slice below is in bounds.
  gp = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
  fp = jnp.pad(first, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1)
  zero = jnp.zeros((), g.dtype)
  # Tap offset a in {0, 1, 2} lands on xpad row 2i + a: phase a % 2, phase row i + a // 2.
  phases = {}
  for t in range(9):
    a, b = divmod(t, 3)
    di, dj = a // 2, b // 2
    term = jnp.where(fp == t, gp, zero)[:, 1 - di:2 - di + ho, 1 - dj:2 - dj + wo]
    key = (a % 2, b % 2)
    phases[key] = term if key not in phases else phases[key] + term
  rows = [jnp.stack([phases[(p, 0)], phases[(p, 1)]], axis=3) for p in (0, 1)]
  dxp = jnp.stack(rows, axis=2).reshape(n, 2 * ho + 2, 2 * wo + 2, c)
  return (dxp[:, 1:1 + h, 1:1 + w],)


_max_pool_3x3_s2.defvjp(_max_pool_3x3_s2_fwd, _max_pool_3x3_s2_bwd)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (4x width) with BN after each; ReLU after the sum."""
  width: int
  stride: int
  downsample: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             conv_general_dilated=conv_general_dilated)
    norm = functools.partial(BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    s = (self.stride,) * 2
    h = norm(name="bn1", activation="relu")(conv(self.width, (1, 1), padding="VALID", name="conv1")(x))
    h = conv(self.width, (3, 3), strides=s, padding=((1, 1), (1, 1)), name="conv2")(h)
    h = norm(name="bn2", activation="relu")(h)
    h = conv(self.width * 4, (1, 1), padding="VALID", name="conv3")(h)
    if self.downsample:
      x = conv(self.width * 4, (1, 1), strides=s, padding="VALID", name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return norm(name="bn3", activation="relu")(h, residual=x)  # relu(bn3(h) + x)


class ResNet50(nn.Module):
  """ResNet-50 with a ``num_classes``-way dense ``head``.

  Input float ``[N, H, W, 3]``; output logits float32 ``[N, num_classes]``.
  ``dropout_rate`` (0 in torchvision) drops pooled features before the head.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    x = nn.Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, conv_general_dilated=conv_general_dilated, name="conv1")(x)
    x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                  dtype=self.dtype, activation="relu", name="bn1")(x)
    x = max_pool_3x3_s2(x)
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        x = Bottleneck(64 * 2**i, stride, j == 0, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
