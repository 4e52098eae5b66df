"""A small VGG-style CNN for the synthetic set and for FER+ from scratch."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class SmallCNN(nn.Module):
  """Conv-BN-ReLU blocks (two convs each, then 2x2 max-pool), global average pool,
  dropout, and a dense head.

  Input float ``[N, H, W, 3]``; output logits float32 ``[N, num_classes]``.
  """
  num_classes: int
  widths: Sequence[int] = (32, 64, 128)
  dropout_rate: float = 0.3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                epsilon=1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    for i, w in enumerate(self.widths):
      for j in range(2):
        x = nn.Conv(w, (3, 3), use_bias=False, dtype=self.dtype, name=f"conv{i}_{j}")(x)
        x = nn.relu(norm()(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)
