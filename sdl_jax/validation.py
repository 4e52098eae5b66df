"""Checks of a training config: clear errors for settings that would otherwise fail deep
inside JAX or TFDS."""

from __future__ import annotations

from absl import logging

from sdl_jax import metrics as metrics_lib
from sdl_jax import models


def validate_config(config) -> None:
  """Clear errors for settings that would otherwise fail deep inside JAX or TFDS."""
  if config.data.name != "synthetic" and not config.data.get("path"):
    raise ValueError(
        f"data set {config.data.name!r} (preset {config.get('name')!r}) reads its files "
        "from disk: pass --config.data.path=/path/to/the/data/set/folder")
  if config.best_metric not in metrics_lib.HIGHER_IS_BETTER:
    raise ValueError(f"config.best_metric must be one of "
                     f"{', '.join(metrics_lib.HIGHER_IS_BETTER)}, got {config.best_metric!r}")
  if not 0.0 <= float(config.lam) <= 1.0:
    raise ValueError(f"config.lam must be in [0, 1], got {config.lam}")
  for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    if int(config[name]) <= 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]}")
  validate_ranges(config)
  if config.get("head_init", "random") not in ("random", "probe"):
    raise ValueError(f"config.head_init must be 'random' or 'probe', got {config.head_init!r}")
  if config.get("eval_every_epochs") is not None and float(config.eval_every_epochs) <= 0:
    raise ValueError(f"config.eval_every_epochs must be positive, got {config.eval_every_epochs}")
  validate_step_config(config)
  models.get_spec(config.model)
  if config.model != "small_cnn" and not config.get("pretrained"):
    logging.warning(
        "training %s from scratch: the paper fine-tunes ImageNet weights; pass "
        "--config.pretrained=/path/to/weights (see sdl_jax/weights.py)", config.model)


def validate_step_config(config) -> None:
  """Clear errors for the train step's memory settings, ``remat`` and ``grad_accum_steps``."""
  remat = config.get("remat", False)
  if not isinstance(remat, bool):
    raise ValueError(f"config.remat must be True or False, got {remat!r}")
  k = config.get("grad_accum_steps", 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"config.grad_accum_steps must be an integer >= 1, got {k!r}")
  if int(config.batch_size) % k:
    raise ValueError(f"config.grad_accum_steps={k} must divide config.batch_size="
                     f"{config.batch_size} (each device's share too)")



# (field, lowest allowed, whether the lowest itself is allowed, whether unset is allowed)
_RANGES = (
    ("batch_size", 1, True, False), ("eval_batch_size", 1, True, True),
    ("num_epochs", 0, False, False), ("num_train_steps", 1, True, True),
    ("learning_rate", 0, True, False), ("momentum", 0, True, False),
    ("weight_decay", 0, True, False), ("warmup_steps", 0, True, False),
    ("step_size_epochs", 0, False, False), ("gamma", 0, False, False),
    ("head_lr_mult", 0, True, False), ("bias_lr_mult", 0, True, False),
    ("keep_checkpoints", 1, True, False), ("image_size", 1, True, False),
    ("resize_size", 1, True, False), ("prefetch_to_device", 1, True, False),
)


def validate_ranges(config) -> None:
  """Each numeric field within its range (e.g. ``num_epochs > 0``, ``batch_size >= 1``,
  ``momentum`` in ``[0, 1)``, split fractions in ``[0, 1]`` summing to 1): a ValueError
  naming the field otherwise, instead of an untrained model or a silent default."""
  for name, low, inclusive, optional in _RANGES:
    if name not in config:
      continue
    value = config[name]
    if value is None and optional:
      continue
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"config.{name} must be a number, got {value!r}")
    if value < low or (value == low and not inclusive):
      bound = f">= {low}" if inclusive else f"> {low}"
      raise ValueError(f"config.{name} must be {bound}, got {value!r}")
  if "momentum" in config and not float(config.momentum) < 1:
    raise ValueError(f"config.momentum must be < 1, got {config.momentum!r}")
  if int(config.resize_size) < int(config.image_size):
    raise ValueError(f"config.resize_size ({config.resize_size}) must be at least "
                     f"config.image_size ({config.image_size}): the crop is taken from it")
  fractions = config.data.get("split_fractions")
  if fractions is not None:
    f = [float(x) for x in fractions]
    if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1) > 1e-6:
      raise ValueError("config.data.split_fractions must be three fractions (train, "
                       f"validation, test) >= 0 summing to 1, got {tuple(fractions)}")
