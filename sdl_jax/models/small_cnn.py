"""A small VGG-style CNN for the synthetic set and for FER+ from scratch."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sdl_jax.models.layers import BatchNorm, Conv, max_pool_2x2


class SmallCNN(nn.Module):
  """Conv-BN-ReLU blocks (two 3x3 convs each, then a 2x2 max-pool), global average pool,
  dropout, and a dense head named ``head``. BatchNorm (``layers.BatchNorm``, ReLU inside) has
  the variables of ``flax.linen.BatchNorm``: ``bn{i}_{j}`` with ``scale``/``bias`` and
  ``batch_stats`` ``mean``/``var``.

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
    conv = functools.partial(Conv, kernel_size=(3, 3), use_bias=False, dtype=self.dtype)
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
