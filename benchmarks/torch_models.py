"""PyTorch reference implementations of every backbone in ``sdl_jax.models``.

Plain ``torch.nn`` modules (torchvision does not import beside the pinned torch build),
written in the PyTorch layouts that ``sdl_jax.torch_layout`` converts: torchvision's VGG-16 and
ResNet-50, the ``efficientnet-lite-pytorch`` layout of EfficientNet-Lite, and a
PyTorch twin of ``SmallCNN`` whose parameter names equal the flax ones. The one home of
the PyTorch twins: the equivalence tests (``tests/test_models.py``, ``test_weights.py``)
and the benchmarks (``benchmarks/torch_train.py``) import it as ``benchmarks.torch_models``;
it imports nothing from the library or the tests:

    model = make_torch_model("resnet50", num_classes=8).eval()
    randomize_(model, seed=0)   # non-trivial BatchNorm statistics
    variables = sdl_jax.torch_layout.convert_state_dict(model.state_dict(), "resnet50")

Inputs are NCHW float32 here; the flax models take NHWC.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SameConv2d(nn.Conv2d):
  """``nn.Conv2d`` with TensorFlow's "SAME" padding for the actual input size.

  ``pad_total = max((ceil(H / s) - 1) * s + (k - 1) * d + 1 - H, 0)``, ``pad_total // 2``
  before and the rest after (so the odd pixel goes bottom/right), likewise for W.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, padding=0, **kwargs)

  def forward(self, x):
    pads = []
    for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
      total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
      pads.append((total // 2, total - total // 2))
    (pt, pb), (pl, pr) = pads
    return super().forward(F.pad(x, [pl, pr, pt, pb]))


# --------------------------------------------------------------------------- SmallCNN


class TorchSmallCNN(nn.Module):
  """Twin of ``sdl_jax.models.small_cnn.SmallCNN``; modules named as the flax ones
  (``conv{i}_{j}``, ``bn{i}_{j}``, ``head``)."""

  def __init__(self, num_classes, widths=(32, 64, 128), dropout_rate=0.3, stem_stride=1):
    super().__init__()
    self.widths = tuple(widths)
    cin = 3
    for i, w in enumerate(self.widths):
      for j in range(2):
        stride = stem_stride if i == j == 0 else 1
        setattr(self, f"conv{i}_{j}", SameConv2d(cin, w, 3, stride=stride, bias=False))
        setattr(self, f"bn{i}_{j}", nn.BatchNorm2d(w, eps=1e-5, momentum=0.1))
        cin = w
    self.dropout = nn.Dropout(dropout_rate)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    for i in range(len(self.widths)):
      for j in range(2):
        x = F.relu(getattr(self, f"bn{i}_{j}")(getattr(self, f"conv{i}_{j}")(x)))
      x = F.max_pool2d(x, 2)
    return self.head(self.dropout(x.mean(dim=(2, 3))))


# --------------------------------------------------------------------------- VGG-16


class TorchVGG16(nn.Module):
  """torchvision's ``vgg16`` layout: ``features.{0..30}``, ``avgpool`` (adaptive 7x7),
  ``classifier.{0,3,6}``."""

  def __init__(self, num_classes=1000, widths=(64, 128, 256, 512, 512), fc_width=4096,
               dropout_rate=0.5):
    super().__init__()
    layers, cin = [], 3
    for n, w in zip((2, 2, 3, 3, 3), widths):
      for _ in range(n):
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True)]
        cin = w
      layers.append(nn.MaxPool2d(2, 2))
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(cin * 49, fc_width), nn.ReLU(True), nn.Dropout(dropout_rate),
        nn.Linear(fc_width, fc_width), nn.ReLU(True), nn.Dropout(dropout_rate),
        nn.Linear(fc_width, num_classes))

  def forward(self, x):
    x = self.avgpool(self.features(x))
    return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- ResNet-50


class TorchBottleneck(nn.Module):
  """torchvision's ``Bottleneck`` (stride on the 3x3 conv)."""

  def __init__(self, cin, width, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(width * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if downsample:
      self.downsample = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(width * 4))

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class TorchResNet50(nn.Module):
  """torchvision's ``resnet50`` layout: ``conv1``, ``bn1``, ``layer1..4``, ``fc``."""

  def __init__(self, num_classes=1000, stage_sizes=(3, 4, 6, 3), dropout_rate=0.0):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    cin = 64
    for i, n in enumerate(stage_sizes):
      blocks = []
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(TorchBottleneck(cin, 64 * 2**i, stride, j == 0))
        cin = 64 * 2**i * 4
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.stage_count = len(stage_sizes)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dropout = nn.Dropout(dropout_rate)  # not in torchvision; 0 by default
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(self.stage_count):
      x = getattr(self, f"layer{i + 1}")(x)
    return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# --------------------------------------------------------------------------- EfficientNet-Lite

# (width, depth, dropout) of Lite0/1/2, from efficientnet_lite_builder.py (TF).
LITE_PARAMS = {
    "efficientnet_lite0": (1.0, 1.0, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 0.3),
}
# Block strings of the TF builder: repeats, kernel, stride, expand ratio, in, out.
_LITE_BLOCKS = ("r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r2_k5_s22_e6_i24_o40",
                "r3_k3_s22_e6_i40_o80", "r3_k5_s11_e6_i80_o112", "r4_k5_s22_e6_i112_o192",
                "r1_k3_s11_e6_i192_o320")


def _round_filters(filters, width, divisor=8):
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  return int(new + divisor if new < 0.9 * filters else new)


class TorchMBConv(nn.Module):
  """``efficientnet-lite-pytorch``'s ``MBConvBlock`` without squeeze-excitation."""

  def __init__(self, cin, cout, kernel, stride, expand, drop_rate=0.0):
    super().__init__()
    mid = cin * expand
    self.drop_rate = drop_rate
    self.expand = expand
    self.skip = stride == 1 and cin == cout
    if expand != 1:
      self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
      self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
    self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
    self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
    self._project_conv = SameConv2d(mid, cout, 1, bias=False)
    self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)

  def forward(self, x):
    h = x
    if self.expand != 1:
      h = F.relu6(self._bn0(self._expand_conv(h)))
    h = F.relu6(self._bn1(self._depthwise_conv(h)))
    h = self._bn2(self._project_conv(h))
    if not self.skip:
      return h
    if self.training and self.drop_rate > 0:  # drop-connect: the branch, per sample
      keep = 1 - self.drop_rate
      mask = torch.floor(keep + torch.rand(h.shape[0], 1, 1, 1, dtype=h.dtype,
                                           device=h.device))
      h = h / keep * mask
    return h + x


class TorchEfficientNetLite(nn.Module):
  """EfficientNet-Lite in the ``efficientnet-lite-pytorch`` layout: ``_conv_stem``,
  ``_bn0``, ``_blocks.{i}``, ``_conv_head``, ``_bn1``, ``_fc`` (TF "SAME" padding)."""

  def __init__(self, width, depth, num_classes=1000, dropout_rate=0.2,
               drop_connect_rate=0.2):
    super().__init__()
    self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
    self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
    configs = []
    for i, s in enumerate(_LITE_BLOCKS):
      o = dict((p[0], p[1:]) for p in s.split("_"))
      r, k, stride, e = int(o["r"]), int(o["k"]), int(o["s"][0]), int(o["e"])
      cin = 32 if i == 0 else _round_filters(int(o["i"]), width)
      cout = _round_filters(int(o["o"]), width)
      if i not in (0, len(_LITE_BLOCKS) - 1):  # stem-side and head-side stages keep repeats
        r = int(math.ceil(depth * r))
      for j in range(r):
        configs.append((cin if j == 0 else cout, cout, k, stride if j == 0 else 1, e))
    # Drop-connect grows with depth: rate * i / num_blocks.
    self._blocks = nn.ModuleList(
        TorchMBConv(*c, drop_rate=drop_connect_rate * i / len(configs))
        for i, c in enumerate(configs))
    self._conv_head = SameConv2d(cout, 1280, 1, bias=False)
    self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
    self._dropout = nn.Dropout(dropout_rate)
    self._fc = nn.Linear(1280, num_classes)

  def forward(self, x):
    x = F.relu6(self._bn0(self._conv_stem(x)))
    for block in self._blocks:
      x = block(x)
    x = F.relu6(self._bn1(self._conv_head(x)))
    return self._fc(self._dropout(x.mean(dim=(2, 3))))


# --------------------------------------------------------------------------- registry


def make_torch_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """The PyTorch twin of ``sdl_jax.models.get_model(name, num_classes)`` (float32,
  freshly initialised by PyTorch; call ``.eval()`` to compare outputs)."""
  if name == "small_cnn":
    return TorchSmallCNN(num_classes, **kwargs)
  if name == "vgg16":
    return TorchVGG16(num_classes, **kwargs)
  if name == "resnet50":
    return TorchResNet50(num_classes, **kwargs)
  if name in LITE_PARAMS:
    width, depth, dropout = LITE_PARAMS[name]
    kwargs = {"width": width, "depth": depth, "dropout_rate": dropout, **kwargs}
    return TorchEfficientNetLite(num_classes=num_classes, **kwargs)
  raise ValueError(f"no PyTorch reference for {name!r}")


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Gives every BatchNorm random affine parameters and running statistics, so that
  eval-mode BatchNorm is not close to an identity; returns ``model``.

  scale ~ U(0.5, 1.5), bias ~ N(0, 0.1), running_mean ~ N(0, 0.1), running_var ~
  U(0.5, 1.5): activations stay of order one through deep networks.
  """
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      n = m.num_features
      m.weight.copy_(torch.rand(n, generator=g) + 0.5)
      m.bias.copy_(torch.randn(n, generator=g) * 0.1)
      m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
  return model
