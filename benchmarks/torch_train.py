"""The PyTorch side of the train-step benchmark: same architecture, loss and optimizer.

The models come from ``benchmarks.torch_models`` (the PyTorch twins the tests compare the
flax backbones against).

One step is: forward (train mode: BatchNorm batch statistics, dropout), the joint loss

    L = -1/N sum_i sum_j [(1 - lam) y_ij + lam l_ij] ln softmax(a_i)_j

(the same loss as ``sdl_jax.losses.sdl_loss``, differentiated by autograd), backward, and
``torch.optim.SGD(momentum=0.9, weight_decay=wd)``, which adds ``wd * w`` to the gradient
before the momentum (Caffe style), exactly as ``optax.chain(optax.add_decayed_weights(wd),
optax.sgd(lr, momentum=0.9))`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_models import make_torch_model


def sdl_loss(logits, labels, distributions, lam: float = 0.8):
  """The joint loss on float32 logits ``[N, C]``, int64 labels ``[N]`` (negative =
  padded row), float32 distributions ``[N, C]``; a scalar tensor."""
  logp = F.log_softmax(logits.float(), dim=-1)
  y = F.one_hot(labels.clamp(min=0), logits.shape[-1]).to(logp.dtype)
  y = y * (labels >= 0).to(logp.dtype)[:, None]
  t = (1 - lam) * y + lam * distributions
  return -(t * logp).sum() / logits.shape[0]


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
    compile_mode: ``''`` (eager) or a ``torch.compile`` mode (``'default'``,
      ``'max-autotune'``, ...): the model is compiled (``torch.compile(model)``, as a
      user who compiles picks first), its forward and backward alike through
      AOTAutograd; the loss and the optimizer step stay eager. Compilation happens in
      the first ``step()``.
  """

  def __init__(self, name, num_classes, images, labels, distributions, *, model_kwargs=None,
               lr=1e-3,
               weight_decay=5e-4, lam=0.8, channels_last=True, bf16=False, device="cpu",
               seed=0, compile_mode=""):
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    self.device = torch.device(device)
    model = native_padding_(make_torch_model(name, num_classes, **dict(model_kwargs or {})))
    self.model = model.to(self.device, memory_format=fmt).train()
    # The compiled module shares the model's parameters; num_params reads the model.
    self.forward = (torch.compile(self.model, mode=compile_mode) if compile_mode
                    else self.model)
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
      logits = self.forward(self.x)
    loss = sdl_loss(logits, self.y, self.d, self.lam)
    loss.backward()
    self.opt.step()
    return loss.detach()

  def sync(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)
