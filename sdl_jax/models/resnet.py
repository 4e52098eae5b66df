"""ResNet-50 in torchvision's layout (He et al. 2016, "v1.5": stride on the 3x3 conv).

Parameter names follow torchvision's state dict, so ``sdl_jax.torch_layout`` converts one
key by key: ``conv1``, ``bn1``, ``layer{1..4}_{j}`` (``layer1.0`` in PyTorch) with
``conv1/bn1`` (1x1), ``conv2/bn2`` (3x3, carries the stride), ``conv3/bn3`` (1x1, 4x
expansion) and, in the first block of a stage, ``downsample_conv/downsample_bn``; the
classifier is ``head`` (torchvision's ``fc``). Padding is PyTorch's symmetric padding
(3 for the 7x7 stem, 1 for 3x3 convs and the 3x3/2 max-pool), not TF's "SAME".
BatchNorm epsilon 1e-5, momentum 0.9 (PyTorch's 0.1), ``layers.BatchNorm`` (flax's
variables, ReLU fused where one follows). Pretrained inputs are ImageNet-normalised RGB.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sdl_jax.models.layers import BatchNorm, Conv, max_pool_3x3_s2


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (4x width) with BN after each; ReLU after the sum."""
  width: int
  stride: int
  downsample: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
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
    x = Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
             dtype=self.dtype, name="conv1")(x)
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
