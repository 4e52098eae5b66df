r"""Learning-rate schedules and the Caffe-style SGD with per-group multipliers.

The optimizer reproduces Caffe's ``SGD`` solver exactly. For a parameter ``w`` with
gradient ``g`` of the (batch-mean) loss, base rate ``lr_t`` from the schedule, the
parameter group's learning-rate multiplier ``m`` and weight decay ``wd``:

    v_t = momentum v_{t-1} + lr_t m (g + wd w)        (decay added to the gradient)
    w_t = w_{t-1} - v_t

Note the rate sits *inside* the momentum buffer, as in Caffe (``optax.sgd`` puts it
outside; the two differ only right after a change of rate).

Parameter groups (``param_labels``), following the Caffe prototxts of fine-tuning recipes
(``lr_mult: 1, decay_mult: 1`` for weights, ``lr_mult: 2`` for biases, and the new layer's
multipliers times ten). Caffe decays a parameter by ``weight_decay * decay_mult``:

* ``body_weight``: kernels outside the head: ``m = 1``, ``wd = weight_decay``;
* ``body_bias``: every other parameter outside the head (biases, and also BatchNorm
  scale and offset): ``m = bias_lr_mult``, ``wd = weight_decay * bias_decay_mult``;
* ``head_weight``: the head's kernel: ``m = head_lr_mult``, ``wd = weight_decay``;
* ``head_bias``: the head's bias: ``m = head_lr_mult * bias_lr_mult``,
  ``wd = weight_decay * bias_decay_mult``.

``bias_decay_mult`` defaults to 0 (biases not decayed, the common fine-tuning prototxts'
``decay_mult: 0``); the authors' released prototxt sets no ``decay_mult``, and Caffe's
default is 1, so its biases are decayed: the ``paper`` preset sets 1.

A parameter is a "weight" if its name is ``kernel`` or ``embedding`` (rank >= 2 in
practice); the head is the top-level parameter group named by the model's
``ModelSpec.head``.

Schedules (``create_learning_rate_fn``), with an optional linear warm-up from 0 over
``warmup_steps``:

* ``constant``: ``lr``;
* ``step`` (Caffe's "step" policy): ``lr * gamma ** floor(t / step_size)`` with
  ``step_size = step_size_steps`` when that is set (Caffe's ``stepsize``, in iterations),
  else ``step_size_epochs * steps_per_epoch`` steps;
* ``cosine``: ``lr * (1 + cos(pi * t' / T')) / 2`` after warm-up, reaching 0 at the last
  step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

GROUPS = ("body_weight", "body_bias", "head_weight", "head_bias")
_WEIGHT_NAMES = ("kernel", "embedding")


def create_learning_rate_fn(config, steps_per_epoch: int, num_train_steps: int):
  """The learning-rate schedule ``step -> lr`` named by ``config.schedule``."""
  lr = float(config.learning_rate)
  warmup = int(config.get("warmup_steps", 0) or 0)
  name = config.schedule
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "step":
    steps = config.get("step_size_steps", None)
    if steps is not None and int(steps) < 1:
      raise ValueError(f"config.step_size_steps must be >= 1 or None, got {steps}")
    step_size = (int(steps) if steps is not None else
                 max(1, int(round(float(config.step_size_epochs) * steps_per_epoch))))
    main = optax.exponential_decay(lr, transition_steps=step_size,
                                   decay_rate=float(config.gamma), staircase=True)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps=max(1, num_train_steps - warmup))
  else:
    raise ValueError(
        f"config.schedule must be 'constant', 'step' or 'cosine', got {name!r}")
  if warmup <= 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], boundaries=[warmup])


def param_labels(params, head: str = "head"):
  """A pytree like ``params`` with each leaf's group name (see the module docstring)."""

  def label(path, leaf):
    del leaf
    keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    part = "head" if keys and keys[0] == head else "body"
    kind = "weight" if keys and keys[-1] in _WEIGHT_NAMES else "bias"
    return f"{part}_{kind}"

  return jax.tree_util.tree_map_with_path(label, params)


def caffe_sgd(learning_rate, momentum: float, weight_decay: float, lr_mult: float = 1.0):
  """One group's Caffe SGD: decay into the gradient, scale by the rate, momentum."""
  rate = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_schedule(lambda step: rate(step) * lr_mult))
  if momentum:
    parts.append(optax.trace(decay=momentum, nesterov=False))
  parts.append(optax.scale(-1.0))
  return optax.chain(*parts)


def create_optimizer(config, learning_rate_fn, params, head: str = "head"):
  """``optax.multi_transform`` of ``caffe_sgd`` over the four groups of ``param_labels``.

  Uses ``config.momentum``, ``config.weight_decay``, ``config.head_lr_mult``,
  ``config.bias_lr_mult`` and ``config.bias_decay_mult`` (absent: 0).
  """
  head_mult = float(config.head_lr_mult)
  bias_mult = float(config.bias_lr_mult)
  wd = float(config.weight_decay)
  bias_wd = wd * float(config.get("bias_decay_mult", 0.0) or 0.0)
  mom = float(config.momentum)
  transforms = {
      "body_weight": caffe_sgd(learning_rate_fn, mom, wd, 1.0),
      "body_bias": caffe_sgd(learning_rate_fn, mom, bias_wd, bias_mult),
      "head_weight": caffe_sgd(learning_rate_fn, mom, wd, head_mult),
      "head_bias": caffe_sgd(learning_rate_fn, mom, bias_wd, head_mult * bias_mult),
  }
  return optax.multi_transform(transforms, param_labels(params, head))


def global_norm(tree):
  """sqrt of the sum of squares of all leaves (float32 scalar)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))
