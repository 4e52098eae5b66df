"""PyTorch state dicts of the supported architectures -> flax variables.

Layout conversion: conv weights ``[O, I/groups, kh, kw]`` -> flax kernels
``[kh, kw, I/groups, O]``; linear ``[O, I]`` -> ``[I, O]``; BatchNorm ``weight, bias`` ->
params ``scale, bias`` and ``running_mean, running_var`` -> ``batch_stats mean, var``
(``num_batches_tracked`` is dropped). VGG-16's ``fc6`` rows are permuted from PyTorch's
(c, h, w) flattening to flax's (h, w, c). Module names are mapped per architecture
(torchvision ResNet-50 / VGG-16, ``efficientnet-lite-pytorch``, ``SmallCNN``'s own).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax.traverse_util
import numpy as np


ARCHS = ("small_cnn", "vgg16", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
         "efficientnet_lite2")


def _small_cnn_name(prefix: str) -> tuple[str, ...]:
  return (prefix,)


_VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_CONV_NAMES = tuple(f"conv{s + 1}_{i + 1}" for s, n in enumerate((2, 2, 3, 3, 3))
                        for i in range(n))
_VGG_NAMES = {f"features.{k}": v for k, v in zip(_VGG_CONV_INDICES, _VGG_CONV_NAMES)}
_VGG_NAMES.update({"classifier.0": "fc6", "classifier.3": "fc7", "classifier.6": "head"})


def _vgg_name(prefix: str) -> tuple[str, ...]:
  if prefix not in _VGG_NAMES:
    raise KeyError(prefix)
  return (_VGG_NAMES[prefix],)


def _resnet_name(prefix: str) -> tuple[str, ...]:
  if prefix in ("conv1", "bn1"):
    return (prefix,)
  if prefix == "fc":
    return ("head",)
  m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)", prefix)
  if not m:
    raise KeyError(prefix)
  layer = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(
      m.group(3), m.group(3))
  return (f"layer{m.group(1)}_{m.group(2)}", layer)


_LITE_BLOCK_NAMES = {"_expand_conv": "expand_conv", "_bn0": "expand_bn",
                     "_depthwise_conv": "dw_conv", "_bn1": "dw_bn",
                     "_project_conv": "project_conv", "_bn2": "project_bn"}
_LITE_TOP_NAMES = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "top_conv",
                   "_bn1": "top_bn", "_fc": "head"}


def _lite_name(prefix: str) -> tuple[str, ...]:
  if prefix in _LITE_TOP_NAMES:
    return (_LITE_TOP_NAMES[prefix],)
  m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", prefix)
  if not m or m.group(2) not in _LITE_BLOCK_NAMES:
    raise KeyError(prefix)
  return (f"block{m.group(1)}", _LITE_BLOCK_NAMES[m.group(2)])


_RENAMERS: dict[str, Callable[[str], tuple[str, ...]]] = {
    "small_cnn": _small_cnn_name,
    "vgg16": _vgg_name,
    "resnet50": _resnet_name,
    "efficientnet_lite0": _lite_name,
    "efficientnet_lite1": _lite_name,
    "efficientnet_lite2": _lite_name,
}


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor; torch itself is not imported here
    v = v.detach().cpu().numpy()
  return np.asarray(v)


def convert_state_dict(state_dict: Mapping[str, Any], arch: str) -> dict:
  """Converts a PyTorch state dict of architecture ``arch`` to flax variables.

  Args:
    state_dict: PyTorch parameter name -> tensor or array (torch tensors or numpy).
    arch: one of ``ARCHS``.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (no ``batch_stats`` for VGG-16), nested dicts
    of float32 numpy arrays, as ``get_model(arch, num_classes)`` takes them.

  Raises:
    ValueError: naming the first key that has no place in ``arch``'s layout.
  """
  if arch not in _RENAMERS:
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
  rename = _RENAMERS[arch]
  groups: dict[str, dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    prefix, _, leaf = key.rpartition(".")
    groups.setdefault(prefix, {})[leaf] = _to_numpy(value)
  flat = {}
  for prefix, t in groups.items():
    try:
      path = rename(prefix)
    except KeyError:
      raise ValueError(f"state dict key {prefix!r} ({', '.join(sorted(t))}) has no place in "
                       f"the {arch} layout") from None
    w = t.get("weight")
    if "running_mean" in t:  # BatchNorm
      flat[("params", *path, "scale")] = w
      flat[("params", *path, "bias")] = t["bias"]
      flat[("batch_stats", *path, "mean")] = t["running_mean"]
      flat[("batch_stats", *path, "var")] = t["running_var"]
      continue
    if w is None or w.ndim not in (2, 4):
      raise ValueError(f"state dict group {prefix!r} ({', '.join(sorted(t))}) is neither a "
                       f"conv, a linear layer nor a BatchNorm")
    flat[("params", *path, "kernel")] = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    if "bias" in t:
      flat[("params", *path, "bias")] = t["bias"]
  flat = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()}
  if arch == "vgg16" and ("params", "fc6", "kernel") in flat:
    k = flat[("params", "fc6", "kernel")]  # [C*7*7 in (c, h, w) order, F]
    c = k.shape[0] // 49
    flat[("params", "fc6", "kernel")] = np.ascontiguousarray(
        k.reshape(c, 7, 7, -1).transpose(1, 2, 0, 3).reshape(k.shape))
  return flax.traverse_util.unflatten_dict(flat)


def infer_arch(state_dict: Mapping[str, Any]) -> str:
  """Which of ``ARCHS`` a PyTorch state dict is, from its keys and a few shapes.

  Raises:
    ValueError: the layout is none of the supported ones (the message shows some keys).
  """
  keys = set(state_dict)
  if "_conv_stem.weight" in keys:
    n = len({k.split(".")[1] for k in keys if k.startswith("_blocks.")})
    top_in = _to_numpy(state_dict["_conv_head.weight"]).shape[1] if (
        "_conv_head.weight" in keys) else None
    for arch, (blocks, cin) in {"efficientnet_lite0": (16, 320),
                                "efficientnet_lite1": (21, 320),
                                "efficientnet_lite2": (21, 352)}.items():
      if n == blocks and top_in == cin:
        return arch
    raise ValueError(f"an EfficientNet state dict with {n} blocks and a {top_in}-channel "
                     f"head input is none of EfficientNet-Lite0/1/2")
  if "layer4.2.conv3.weight" in keys and "fc.weight" in keys:
    if "layer3.5.conv3.weight" in keys and "layer3.6.conv3.weight" not in keys:
      return "resnet50"
  if "features.28.weight" in keys and "classifier.6.weight" in keys:
    if "features.30.weight" not in keys:
      return "vgg16"
  if "conv0_0.weight" in keys and "head.weight" in keys:
    return "small_cnn"
  some = ", ".join(sorted(keys)[:6])
  raise ValueError(f"cannot tell the architecture of a state dict with keys {some}, ...; "
                   f"supported: torchvision resnet50 / vgg16, efficientnet-lite-pytorch "
                   f"lite0-2, small_cnn (or pass arch= explicitly)")
