"""The PyTorch side of the train-step benchmark: same architecture, loss and optimizer.

The models come from ``tests/torch_reference.py`` (the PyTorch reference implementations
the tests compare the flax backbones against) where it defines them; ``small_cnn`` has a
local twin here so the benchmark runs before that file exists.

One step is: forward (train mode: BatchNorm batch statistics, dropout), the joint loss

    L = -1/N sum_i sum_j [(1 - lam) y_ij + lam l_ij] ln softmax(a_i)_j

(the same loss as ``sdl_jax.losses.sdl_loss``, differentiated by autograd), backward, and
``torch.optim.SGD(momentum=0.9, weight_decay=wd)``, which adds ``wd * w`` to the gradient
before the momentum (Caffe style), exactly as ``optax.chain(optax.add_decayed_weights(wd),
optax.sgd(lr, momentum=0.9))`` does.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "torch_reference.py"


def sdl_loss(logits, labels, distributions, lam: float = 0.8):
  """The joint loss on float32 logits ``[N, C]``, int64 labels ``[N]`` (negative =
  padded row), float32 distributions ``[N, C]``; a scalar tensor."""
  logp = F.log_softmax(logits.float(), dim=-1)
  y = F.one_hot(labels.clamp(min=0), logits.shape[-1]).to(logp.dtype)
  y = y * (labels >= 0).to(logp.dtype)[:, None]
  t = (1 - lam) * y + lam * distributions
  return -(t * logp).sum() / logits.shape[0]


class SmallCNN(nn.Module):
  """Twin of ``sdl_jax.models.small_cnn.SmallCNN``: (conv3x3-BN-ReLU) x 2 then a 2x2
  max-pool per width, global average pool, dropout, linear head."""

  def __init__(self, num_classes: int, widths: Sequence[int] = (32, 64, 128),
               dropout_rate: float = 0.3, stem_stride: int = 1):
    super().__init__()
    layers, cin = [], 3
    for i, w in enumerate(widths):
      for j in range(2):
        stride = stem_stride if i == j == 0 else 1
        layers += [nn.Conv2d(cin, w, 3, stride=stride, padding=1, bias=False),
                   # flax momentum 0.9 is torch momentum 0.1.
                   nn.BatchNorm2d(w, eps=1e-5, momentum=0.1), nn.ReLU(inplace=True)]
        cin = w
      layers.append(nn.MaxPool2d(2))
    self.features = nn.Sequential(*layers)
    self.dropout = nn.Dropout(dropout_rate)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.features(x).mean(dim=(2, 3))
    return self.head(self.dropout(x))


def _reference_module():
  """``tests/torch_reference.py`` as a module, or None if it is not there."""
  if not _REFERENCE.exists():
    return None
  name = "sdl_jax_torch_reference"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, _REFERENCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


def make_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """The PyTorch twin of the flax backbone ``name`` (``kwargs`` as the flax module's)."""
  ref = _reference_module()
  if ref is not None:
    return ref.make_torch_model(name, num_classes, **kwargs)
  if name == "small_cnn":
    return SmallCNN(num_classes, **kwargs)
  raise ValueError(f"no PyTorch twin of model {name!r}: {_REFERENCE} is missing")


def native_padding_(model: nn.Module) -> nn.Module:
  """Replaces each TF-"SAME" conv of ``model`` whose padding is symmetric whatever the
  input size (stride 1, odd kernel) by a plain ``nn.Conv2d`` with that padding: the same
  arithmetic without an explicitly padded copy of the input. Returns ``model``.

  The reference models pad explicitly (``F.pad``) to match TF's asymmetric padding of
  strided convolutions; PyTorch would not do that for the symmetric ones, so neither
  does the benchmark's baseline.
  """
  for parent in list(model.modules()):
    for child_name, conv in list(parent.named_children()):
      if (type(conv).__name__ != "SameConv2d" or any(s != 1 for s in conv.stride)
          or any(d != 1 for d in conv.dilation) or any(k % 2 == 0 for k in conv.kernel_size)):
        continue
      plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                        padding=tuple(k // 2 for k in conv.kernel_size), groups=conv.groups,
                        bias=conv.bias is not None)
      with torch.no_grad():
        plain.weight.copy_(conv.weight)
        if conv.bias is not None:
          plain.bias.copy_(conv.bias)
      setattr(parent, child_name, plain)
  return model


class TorchTrainer:
  """One model, its optimizer and a fixed device-resident batch; ``step()`` trains once.

  Args:
    name: model name (as in ``sdl_jax.models.MODEL_SPECS``).
    num_classes: classifier width C.
    images: float32 numpy ``[B, S, S, 3]`` (NHWC, like the JAX side).
    labels: int numpy ``[B]``; distributions: float32 numpy ``[B, C]``.
    lr, weight_decay, lam: as the JAX side.
    channels_last: keep activations NHWC in memory (oneDNN's fast layout on CPU).
    device: ``'cpu'`` or ``'cuda'``.
    bf16: run forward/backward under ``torch.autocast(dtype=bfloat16)``; weights stay
      float32 (mixed precision, like the flax ``dtype=bfloat16`` models).
  """

  def __init__(self, name, num_classes, images, labels, distributions, *, model_kwargs=None,
               lr=1e-3,
               weight_decay=5e-4, lam=0.8, channels_last=True, bf16=False, device="cpu",
               seed=0):
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    self.device = torch.device(device)
    model = native_padding_(make_model(name, num_classes, **dict(model_kwargs or {})))
    self.model = model.to(self.device, memory_format=fmt).train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9,
                               weight_decay=weight_decay)
    self.x = (torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device)
              .contiguous(memory_format=fmt))
    self.y = torch.from_numpy(labels).long().to(self.device)
    self.d = torch.from_numpy(distributions).float().to(self.device)
    self.lam = lam
    self.bf16 = bf16

  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def step(self) -> torch.Tensor:
    """One training step; returns the loss (a tensor: no host sync beyond PyTorch's own)."""
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
      logits = self.model(self.x)
    loss = sdl_loss(logits, self.y, self.d, self.lam)
    loss.backward()
    self.opt.step()
    return loss.detach()

  def sync(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)
