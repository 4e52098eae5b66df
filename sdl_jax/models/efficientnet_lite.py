"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the "lite" variants for mobile accelerators).

Lite differs from EfficientNet-B: ReLU6 instead of swish, no squeeze-excitation, and the
stem (32 channels), the head convolution (1280 channels) and the repeats of the first and
last stage are not scaled with the width/depth coefficients. Convolutions use
TensorFlow's "SAME" padding (``pad_total = max((ceil(H / s) - 1) * s + k - H, 0)``, the
odd pixel on the bottom/right), as the pretrained weights were trained with it; BatchNorm
has epsilon 1e-3 and momentum 0.99. Pretrained inputs are ``(x - 127) / 128``.

Parameter names (converted from the ``efficientnet-lite-pytorch`` layout by
``sdl_jax.torch_layout``): ``stem_conv``, ``stem_bn``, ``block{i}`` with ``expand_conv``,
``expand_bn`` (absent when the expansion ratio is 1), ``dw_conv``, ``dw_bn``,
``project_conv``, ``project_bn``; then ``top_conv``, ``top_bn`` and the classifier ``head``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sdl_jax.models.layers import BatchNorm, Conv

# Stages of EfficientNet-Lite0: (repeats, kernel, stride, expand_ratio, in, out).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_WIDTH = 32
TOP_WIDTH = 1280


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Scales a channel count by ``width``, rounded to a multiple of ``divisor``.

  ``max(divisor, int(f * width + divisor / 2) // divisor * divisor)``, plus one more
  ``divisor`` if that rounded down by more than 10% (TensorFlow's rule).
  """
  f = filters * width
  new = max(divisor, int(f + divisor / 2) // divisor * divisor)
  if new < 0.9 * f:
    new += divisor
  return int(new)


def block_configs(width: float, depth: float):
  """The MBConv blocks of a Lite model, in order.

  Returns:
    a list of ``(kernel, stride, expand_ratio, in_channels, out_channels)``, one per block.
    Repeats of the middle stages are ``ceil(depth * r)``; the first and last stage keep
    theirs, and the first block reads the fixed 32-channel stem.
  """
  blocks = []
  last = len(STAGES) - 1
  for i, (r, k, s, e, cin, cout) in enumerate(STAGES):
    cin = STEM_WIDTH if i == 0 else round_filters(cin, width)
    cout = round_filters(cout, width)
    repeats = r if i in (0, last) else int(math.ceil(depth * r))
    for j in range(repeats):
      blocks.append((k, s if j == 0 else 1, e, cin if j == 0 else cout, cout))
  return blocks


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (linear), BN after each.

  ReLU6 follows the expansion and the depthwise convolution. When the stride is 1 and
  ``in == out`` the input is added back, after drop-connect (the whole residual branch
  of a sample is zeroed with probability ``drop_rate`` and the rest scaled by
  ``1 / (1 - drop_rate)``, in training only).
  """
  kernel: int
  stride: int
  expand_ratio: int
  out_channels: int
  drop_rate: float
  dtype: Any
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(Conv, use_bias=False, padding="SAME", dtype=self.dtype)
    norm = functools.partial(BatchNorm, use_running_average=self.frozen_bn or not train,
                             momentum=0.99,
                             epsilon=1e-3, dtype=self.dtype)
    cin = x.shape[-1]
    h = x
    if self.expand_ratio != 1:
      h = conv(cin * self.expand_ratio, (1, 1), name="expand_conv")(h)
      h = norm(name="expand_bn", activation="relu6")(h)
    c = h.shape[-1]
    h = conv(c, (self.kernel,) * 2, strides=(self.stride,) * 2, feature_group_count=c,
             name="dw_conv")(h)
    h = norm(name="dw_bn", activation="relu6")(h)
    h = conv(self.out_channels, (1, 1), name="project_conv")(h)
    h = norm(name="project_bn")(h)
    if self.stride == 1 and cin == self.out_channels:
      if self.drop_rate > 0:
        h = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2, 3),
                       deterministic=not train)(h)
      h = h + x
    return h


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite with a ``num_classes``-way dense ``head``.

  Input float ``[N, H, W, 3]`` (any H, W; 224/240/260 for Lite0/1/2 pretrained);
  output logits float32 ``[N, num_classes]``. ``drop_connect_rate`` grows linearly
  with the block index, ``rate * i / num_blocks``, as in the reference implementation.
  ``frozen_bn``: every BatchNorm uses its running statistics in training too (a fixed
  per-channel affine map whose ``scale`` and ``bias`` still learn; the statistics never
  change), the usual way to fine-tune a pretrained body on a small data set.
  """
  num_classes: int
  width: float = 1.0
  depth: float = 1.0
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  dtype: Any = jnp.float32
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(BatchNorm, use_running_average=self.frozen_bn or not train,
                             momentum=0.99,
                             epsilon=1e-3, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = Conv(STEM_WIDTH, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
             dtype=self.dtype, name="stem_conv")(x)
    x = norm(name="stem_bn", activation="relu6")(x)
    blocks = block_configs(self.width, self.depth)
    for i, (k, s, e, _, cout) in enumerate(blocks):
      x = MBConv(k, s, e, cout, self.drop_connect_rate * i / len(blocks), self.dtype,
                 self.frozen_bn, name=f"block{i}")(x, train)
    x = Conv(TOP_WIDTH, (1, 1), use_bias=False, dtype=self.dtype, name="top_conv")(x)
    x = norm(name="top_bn", activation="relu6")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)


class EfficientNetLite0(EfficientNetLite):
  """EfficientNet-Lite0: width 1.0, depth 1.0, 224 pixels, dropout 0.2."""
  width: float = 1.0
  depth: float = 1.0
  dropout_rate: float = 0.2


class EfficientNetLite1(EfficientNetLite):
  """EfficientNet-Lite1: width 1.0, depth 1.1, 240 pixels, dropout 0.2."""
  width: float = 1.0
  depth: float = 1.1
  dropout_rate: float = 0.2


class EfficientNetLite2(EfficientNetLite):
  """EfficientNet-Lite2: width 1.1, depth 1.2, 260 pixels, dropout 0.3."""
  width: float = 1.1
  depth: float = 1.2
  dropout_rate: float = 0.3
