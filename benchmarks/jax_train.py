"""The JAX side of the train-step benchmark.

``step='library'`` (the default) times the library's own code:
``sdl_jax.train_state.create_train_state`` (Caffe-style SGD, momentum 0.9, weight decay in
the gradient, ``sdl_jax.optim``) and ``sdl_jax.train.make_pmapped_steps`` (``train_step``
pmapped over every local device, state donated): forward, ``sdl_loss`` (its custom_vjp
gradient), backward, the update, and the metric sums the training loop logs.

``step='local'`` is a minimal step kept for experiments: the same forward and loss,
``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))``, no metrics;
with ``parallel='pmap'`` (as the library) or ``'jit'`` (the batch sharded over a one-axis
mesh of the local devices, XLA inserting the reductions) and optional donation.

Both compile one program per step that never returns to the host between steps.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdl_jax import models, perf
from sdl_jax.models import table
from sdl_jax.losses import sdl_loss

_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sdl.py"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_config(preset: str):
  """``configs/sdl.py:get_config(preset)``, loaded by path as ``config_flags`` does."""
  name = "sdl_jax_bench_configs"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, _CONFIGS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
  return sys.modules[name].get_config(preset)


@flax.struct.dataclass
class LocalState:
  step: jax.Array
  params: Any
  model_state: Any  # Non-parameter collections (BatchNorm statistics), maybe empty.
  opt_state: Any
  rng: jax.Array


def _local_step(model, tx, lam, axis_name, state: LocalState, batch):
  rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    logits, new_model_state = model.apply(
        {"params": params, **state.model_state}, batch["image"], train=True,
        rngs={"dropout": rng}, mutable=list(state.model_state))
    return sdl_loss(logits, batch["label"], batch["distribution"], lam), new_model_state

  (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads, loss = jax.lax.pmean((grads, loss), axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       model_state=dict(new_model_state), opt_state=opt_state), {"loss": loss}


def bench_config(name: str, *, batch: int, dtype: str = "float32", model_kwargs=None,
                 preset: str = "paper"):
  """The training config the benchmark runs: ``preset``'s optimisation settings with
  ``name``'s default architecture, no pretrained weights."""
  config = load_config(preset)
  config.model = name
  config.model_kwargs = dict(model_kwargs or {})
  config.pretrained = None
  config.dtype = dtype
  config.batch_size = batch
  return config


class JaxTrainer:
  """One model, its train state and a fixed device-resident batch; ``step()`` trains once.

  Args:
    config: a training config (``bench_config``): model, model_kwargs, dtype, lam, seed,
      optimizer fields.
    images: float32 numpy ``[B, S, S, 3]``; labels int ``[B]``; distributions ``[B, C]``.
    step: ``'library'`` or ``'local'`` (see the module docstring).
    parallel, donate: for ``step='local'`` only.
  """

  def __init__(self, config, images, labels, distributions, *, step="library",
               parallel="pmap", donate=True):
    self.devices = jax.local_devices()
    d = len(self.devices)
    b, s = images.shape[0], images.shape[1]
    c = distributions.shape[1]
    if b % d:
      raise ValueError(f"--batch={b} must be a multiple of the {d} local devices")
    batch = {"image": images.astype(np.float32), "label": labels.astype(np.int32),
             "distribution": distributions.astype(np.float32),
             "mask": np.ones((b,), np.float32)}
    key = jax.random.key(int(config.seed))
    self.parallel = "pmap" if step == "library" else parallel
    if step == "library":
      from sdl_jax import train, train_state  # pylint: disable=g-import-not-at-top
      model = train_state.create_model(config, c)
      lr_fn = train_state.create_learning_rate_fn(config, steps_per_epoch=1000,
                                                  num_train_steps=100_000)
      state = train_state.create_train_state(key, config, model, s, lr_fn, pretrained=False)
      self.num_params = models.count_params({"params": state.params})
      self._fn, _ = train.make_pmapped_steps(config)
      self.state = jax_utils.replicate(state, self.devices)
    elif step == "local":
      model = models.get_model(config.model, c, dtype=DTYPES[config.dtype],
                               **dict(config.model_kwargs))
      tx = optax.chain(optax.add_decayed_weights(float(config.weight_decay)),
                       optax.sgd(float(config.learning_rate), momentum=float(config.momentum)))
      variables = dict(jax.jit(lambda k: model.init(
          {"params": k, "dropout": k}, jnp.zeros((1, s, s, 3)), train=False))(key))
      params = variables.pop("params")
      state = LocalState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                         opt_state=tx.init(params), rng=jax.random.fold_in(key, 1))
      self.num_params = models.count_params({"params": params})
      donate_argnums = (0,) if donate else ()
      lam = float(config.lam)
      if parallel == "pmap":
        self._fn = jax.pmap(lambda st, bt: _local_step(model, tx, lam, "batch", st, bt),
                            axis_name="batch", donate_argnums=donate_argnums)
        self.state = jax_utils.replicate(state, self.devices)
      elif parallel == "jit":
        mesh = Mesh(np.asarray(self.devices), ("data",))
        replicated = NamedSharding(mesh, P())
        self._fn = jax.jit(lambda st, bt: _local_step(model, tx, lam, None, st, bt),
                           donate_argnums=donate_argnums,
                           out_shardings=(replicated, replicated))
        self.state = jax.device_put(state, replicated)
      else:
        raise ValueError(f"--parallel must be 'pmap' or 'jit', got {parallel!r}")
    else:
      raise ValueError(f"--step must be 'library' or 'local', got {step!r}")
    if self.parallel == "pmap":
      # A pmapped identity leaves the [D, B/D, ...] batch resident, one slice per device.
      self.batch = jax.pmap(lambda x: x, devices=self.devices)(
          {k: v.reshape((d, b // d) + v.shape[1:]) for k, v in batch.items()})
    else:
      mesh = Mesh(np.asarray(self.devices), ("data",))
      self.batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    self.compiled = None
    self.compile_s = None

  def compile(self, compiler_options: dict | None = None) -> float:
    """Compiles the step ahead of time; returns the seconds spent (lowering included).
    ``compiler_options``: XLA options for this compilation only (they override
    ``$XLA_FLAGS``), e.g. ``{'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_DEFAULT'}``."""
    t0 = time.perf_counter()
    self.compiled = self._fn.lower(self.state, self.batch).compile(
        compiler_options=compiler_options or None)
    self.compile_s = time.perf_counter() - t0
    return self.compile_s

  def step(self):
    """Enqueues one training step (asynchronous: ``sync()`` waits for it)."""
    if self.compiled is None:
      self.compile()
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics

  def sync(self):
    jax.block_until_ready(self.state)

  def memory(self) -> dict | None:
    """XLA's buffer assignment of the step, per device (``perf.compiled_memory``)."""
    return perf.compiled_memory(self.compiled)

  def step_flops(self) -> float | None:
    """XLA's FLOP count of one step (per device under pmap), or None."""
    return perf.compiled_flops(self.compiled)


def forward_flops(name: str, num_classes: int, image_size: int, batch: int,
                  model_kwargs=None) -> float:
  """Model FLOPs of one inference forward pass of ``batch`` images: two per multiply-add of
  every convolution and dense layer, counted from the shapes (``models.table.count_macs``).

  Counted, not read from XLA's cost analysis, so that MFU means the same on every backend:
  on GPU, XLA's count leaves out the convolutions it hands to cuDNN (ResNet-50 came out at
  0.05 GFLOP per image on an H200); on the CPU the two agree to within 5%."""
  model = models.get_model(name, num_classes, **dict(model_kwargs or {}))
  return 2.0 * table.count_macs(model, (batch, image_size, image_size, 3), train=False)
