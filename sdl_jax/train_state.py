"""The TrainState: the model, its optimizer and initial parameters (random, a pretrained
body, or a head fitted by the linear probe), and copies of it on the local devices.

``train.train_and_evaluate`` starts from ``create_train_state``;
``sdl_jax.evaluate.restore`` builds the same state abstractly to restore a checkpoint into it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from absl import logging
import flax
from flax import jax_utils
from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdl_jax import models
from sdl_jax import optim


class TrainState(flax_train_state.TrainState):
  """``flax.training.train_state.TrainState`` plus BatchNorm statistics (``{}`` if none)."""
  batch_stats: Any = None


# ---------------------------------------------------------------------------------------
# Model, schedule, optimizer, state.


def prng_key(seed: int):
  """The run's PRNG key: ``jax.random.key(seed, impl='rbg')``.

  XLA's RngBitGenerator instead of the default threefry: XLA:CPU measured ~15 CPU-seconds
  to compile the threefry bits of the small CNN's initialiser, ~2 s with rbg. Streams are
  deterministic for a seed on a given backend (which is all resuming needs).
  """
  return jax.random.key(int(seed), impl="rbg")


def create_model(config, num_classes: int):
  """The flax module ``config.model`` with a ``num_classes``-way head."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.dtype)
  if dtype is None:
    raise ValueError(f"config.dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
  kwargs = config.get("model_kwargs") or {}
  if isinstance(kwargs, ml_collections.ConfigDict):
    kwargs = kwargs.to_dict()
  return models.get_model(config.model, num_classes, dtype=dtype, **kwargs)


def create_learning_rate_fn(config, steps_per_epoch: int, num_train_steps: int):
  """``step -> learning rate`` (see ``sdl_jax.optim``)."""
  return optim.create_learning_rate_fn(config, steps_per_epoch, num_train_steps)


def initialized(key, image_size: int, model):
  """``model.init`` on a ``[1, S, S, 3]`` input; returns (params, batch_stats)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      {"params": key, "dropout": key}, x)
  variables = flax.core.unfreeze(variables)
  return variables["params"], variables.get("batch_stats", {})


def create_train_state(rng, config, model, image_size: int, learning_rate_fn,
                       pretrained: bool = True) -> TrainState:
  """A fresh TrainState; with ``config.pretrained`` (and ``pretrained=True``) the body is
  initialised from those weights and only the head keeps its random initialisation."""
  params, batch_stats = initialized(rng, image_size, model)
  head = models.get_spec(config.model).head
  if pretrained and config.get("pretrained"):
    # Lazy: the pretrained path needs torch; the default config must not.
    from sdl_jax import weights  # pylint: disable=g-import-not-at-top
    kwargs = config.get("model_kwargs") or {}
    if isinstance(kwargs, ml_collections.ConfigDict):
      kwargs = kwargs.to_dict()
    variables = weights.init_from_pretrained(
        {"params": params, "batch_stats": batch_stats},
        weights.load_pretrained(config.pretrained, arch=config.model, model_kwargs=kwargs),
        head=head)
    logging.info("initialised %s from %s (head %r left random)", config.model,
                 config.pretrained, head)
    variables = flax.core.unfreeze(variables)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
  tx = optim.create_optimizer(config, learning_rate_fn, params, head)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           batch_stats=batch_stats)


def model_variables(state, params=None):
  """The ``variables`` of ``state`` for ``model.apply``: its params (or ``params``) and,
  if it has any, its BatchNorm statistics."""
  v = {"params": state.params if params is None else params}
  if state.batch_stats:
    v["batch_stats"] = state.batch_stats
  return v


def head_from_probe(state: TrainState, config, builder, model, workdir: str) -> TrainState:
  """``state`` with its head replaced by the linear probe's on the frozen body's features
  (``sdl_jax.probe.probe_initialised_head``; features cached in
  ``config.probe_feature_dir``, default ``workdir/features``):
  linear probing then fine-tuning, which keeps a random head's large early gradients
  from distorting the pretrained features."""
  from sdl_jax import probe  # pylint: disable=g-import-not-at-top
  head = models.get_spec(config.model).head
  params = flax.core.unfreeze(state.params)
  fitted = probe.probe_initialised_head(config, builder, model, model_variables(state),
                                        config.get("probe_feature_dir")
                                        or os.path.join(workdir, "features"))
  for name, value in fitted.items():
    if params[head][name].shape != value.shape:
      raise ValueError(f"probe head {name} has shape {value.shape}, the model's "
                       f"{params[head][name].shape}")
    params[head][name] = jnp.asarray(value, params[head][name].dtype)
  return state.replace(params=params)


# ---------------------------------------------------------------------------------------
# Copies on the local devices (jax.pmap's leading axis).


def replicate(tree, devices=None):
  """Copies every leaf onto each of ``devices`` (default: the local devices), stacked on a
  new leading axis, as ``jax.pmap`` expects.

  The stacking happens on the host (numpy): stacking device arrays would compile one small
  XLA program per leaf shape.
  """
  return jax_utils.replicate(jax.device_get(tree), devices=devices)


def unreplicate(tree):
  """A host (numpy) copy of the first replica of each leaf of a replicated (pmap) tree.

  Reads one device's shard rather than indexing ``x[0]`` on the device (which would gather
  across devices and compile a slice per leaf shape). Unlike ``flax.jax_utils.unreplicate``
  it also drops the leading axis of a tree replicated over one device of a multi-device
  host.
  """

  def one(x):
    if isinstance(x, jax.Array) and x.ndim >= 1 and x.addressable_shards:
      return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
    return np.asarray(x)[0]

  return jax.tree_util.tree_map(one, tree)
