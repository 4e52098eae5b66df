"""Backbones in flax.linen and the registry that builds them by name.

Every model is called as ``model.apply(variables, x, train=bool, rngs=...)`` with ``x``
float ``[N, H, W, 3]`` (NHWC, already normalised by ``preprocess``) and returns logits
float32 ``[N, num_classes]``. Models with BatchNorm keep a ``batch_stats`` collection;
dropout draws from the ``'dropout'`` rng. The new C-way classifier lives in the top-level
parameter group named by ``ModelSpec.head`` (the group the optimizer gives a 10x
learning rate when fine-tuning).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the rest of the code needs to know about a backbone.

  Attributes:
    module: ``'package.module:ClassName'`` of the flax module.
    input_size: the image side the backbone was designed (and pretrained) for.
    mean, std: per-channel normalisation of pixels in [0, 255]: ``(x - mean) / std``.
    head: top-level parameter name of the classifier layer.
  """
  module: str
  input_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  head: str = "head"


_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

MODEL_SPECS: dict[str, ModelSpec] = {
    "small_cnn": ModelSpec("sdl_jax.models.small_cnn:SmallCNN", 64,
                           (127.5,) * 3, (127.5,) * 3),
    "vgg16": ModelSpec("sdl_jax.models.vgg:VGG16", 224, _IMAGENET_MEAN, _IMAGENET_STD),
    "resnet50": ModelSpec("sdl_jax.models.resnet:ResNet50", 224,
                          _IMAGENET_MEAN, _IMAGENET_STD),
    "efficientnet_lite0": ModelSpec("sdl_jax.models.efficientnet_lite:EfficientNetLite0", 224,
                                    (127.0,) * 3, (128.0,) * 3),
    "efficientnet_lite1": ModelSpec("sdl_jax.models.efficientnet_lite:EfficientNetLite1", 240,
                                    (127.0,) * 3, (128.0,) * 3),
    "efficientnet_lite2": ModelSpec("sdl_jax.models.efficientnet_lite:EfficientNetLite2", 260,
                                    (127.0,) * 3, (128.0,) * 3),
}


def get_spec(name: str) -> ModelSpec:
  try:
    return MODEL_SPECS[name]
  except KeyError:
    raise ValueError(
        f"unknown model {name!r}; known: {', '.join(sorted(MODEL_SPECS))}") from None


def get_model(name: str, num_classes: int, dtype: Any = jnp.float32, **kwargs):
  """Builds the flax module ``name`` with a ``num_classes``-way head.

  Args:
    name: a key of ``MODEL_SPECS``.
    num_classes: size of the output layer (1000 for the ImageNet models themselves).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    **kwargs: passed to the module (e.g. ``dropout_rate``).
  """
  spec = get_spec(name)
  module_name, cls_name = spec.module.split(":")
  cls = getattr(importlib.import_module(module_name), cls_name)
  known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes", "dtype"}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f"model {name!r} has no setting {', '.join(map(repr, unknown))} "
                     f"(config.model_kwargs); its settings: {', '.join(sorted(known))}")
  return cls(num_classes=num_classes, dtype=dtype, **kwargs)


def preprocess(name: str, images):
  """Normalises uint8/float pixels in [0, 255], ``[..., 3]``, the way ``name`` expects."""
  spec = get_spec(name)
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)
  return (jnp.asarray(images, jnp.float32) - mean) / std


def log_probs(apply_fn, variables, images, flip: bool = False):
  """Log-probabilities float32 ``[N, C]`` of a model in inference mode on ``images``
  ``[N, H, W, 3]``.

  ``flip``: test-time mirroring. The prediction is the mean of the softmax distributions
  of the image and of its left-right mirror, ``p = (softmax(f(x)) + softmax(f(x')))/2``,
  returned as ``log p = logsumexp(log_softmax(f(x)), log_softmax(f(x'))) - log 2``: finite
  even where one softmax underflows, and usable as logits (``softmax(log p) = p``).
  """
  logits = apply_fn(variables, images, train=False).astype(jnp.float32)
  out = jax.nn.log_softmax(logits)
  if flip:
    mirrored = apply_fn(variables, images[:, :, ::-1], train=False).astype(jnp.float32)
    both = jnp.stack([out, jax.nn.log_softmax(mirrored)])
    out = jax.nn.logsumexp(both, axis=0) - jnp.log(2.0).astype(jnp.float32)
  return out


def count_params(variables) -> int:
  """Number of scalars in the ``params`` collection of ``variables`` (or in ``variables``
  itself when it has no ``params`` key); BatchNorm statistics are not parameters."""
  tree = variables["params"] if "params" in variables else variables
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))
