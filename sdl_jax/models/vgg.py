"""VGG-16 (Simonyan & Zisserman 2015, configuration D), as used by Yang et al. 2017.

Thirteen 3x3 convolutions (padding 1, ReLU, no BatchNorm) in five stages of
``(2, 2, 3, 3, 3)``, each followed by a 2x2/2 max-pool; an adaptive average pool to 7x7
(torchvision's, an identity at 224 pixels, so Caffe weights converted to torchvision's
layout fit too); then ``fc6`` and ``fc7`` of 4096 with ReLU and dropout 0.5, and the new
C-way classifier ``head`` (the paper's fc8, trained with a 10x learning rate).
Conv parameters are named in Caffe's style, ``conv{stage}_{i}``. Pretrained inputs are
ImageNet-normalised RGB.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sdl_jax.models.layers import Conv, max_pool_2x2

STAGE_CONVS = (2, 2, 3, 3, 3)


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``A[i, h] = 1 / (e_i - s_i)`` for ``s_i <= h < e_i``, ``s_i = floor(i n_in / n_out)``,
  ``e_i = ceil((i + 1) n_in / n_out)`` (PyTorch's AdaptiveAvgPool windows); float32."""
  a = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    s, e = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
    a[i, s:e] = 1.0 / (e - s)
  return a


def adaptive_avg_pool(x, size: int):
  """PyTorch's ``AdaptiveAvgPool2d(size)`` on ``[N, H, W, C]`` -> ``[N, size, size, C]``.

  Windows overlap or repeat when H or W is not a multiple of ``size`` (an input smaller
  than ``size`` is replicated); an identity when ``H == W == size``.
  """
  _, h, w, _ = x.shape
  if h == w == size:
    return x
  ah = jnp.asarray(_adaptive_pool_matrix(h, size), x.dtype)
  aw = jnp.asarray(_adaptive_pool_matrix(w, size), x.dtype)
  return jnp.einsum("ih,jw,nhwc->nijc", ah, aw, x)


class VGG16(nn.Module):
  """VGG-16 with a ``num_classes``-way dense ``head``.

  Input float ``[N, H, W, 3]`` (H, W >= 32); output logits float32 ``[N, num_classes]``.
  ``widths`` and ``fc_width`` exist to build a narrow copy of the same layout in tests;
  the pretrained network has the defaults. ``fc6``'s input is the 7x7 map flattened in
  (h, w, c) order (``sdl_jax.torch_layout`` permutes PyTorch's (c, h, w) rows to it).
  """
  num_classes: int
  dropout_rate: float = 0.5
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  fc_width: int = 4096
  pool_size: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)),
                             dtype=self.dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    if x.ndim != 4 or min(x.shape[1:3]) < 32:
      raise ValueError(f"VGG16 takes [N, H, W, C] images with H, W >= 32 (five 2x2 "
                       f"max-pools); got shape {x.shape}")
    x = x.astype(self.dtype)
    for stage, (n, w) in enumerate(zip(STAGE_CONVS, self.widths)):
      for i in range(n):
        x = nn.relu(conv(w, name=f"conv{stage + 1}_{i + 1}")(x))
      x = max_pool_2x2(x)
    x = adaptive_avg_pool(x, self.pool_size)
    x = x.reshape(x.shape[0], -1)
    for name in ("fc6", "fc7"):
      x = nn.relu(dense(self.fc_width, name=name)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = dense(self.num_classes, name="head")(x)
    return x.astype(jnp.float32)
