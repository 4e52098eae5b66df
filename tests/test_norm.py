"""sdl_jax.models.layers.BatchNorm equals flax's BatchNorm (+ ReLU or ReLU6); the
hand-written gradient of sdl_jax.cpu.norm equals autodiff's of a plain implementation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sdl_jax.cpu.norm import batch_norm_train
from sdl_jax.models.layers import BatchNorm


# batch_norm_train is the CPU backend's hand path: it marks its output stored with a
# custom call (sdl_jax.cpu.dnnl.stored) that XLA:CPU alone runs; other backends train with
# batch_norm_forward under autodiff (sdl_jax.models.layers.BatchNorm), tested below too.
# (A string: evaluated when each test runs, not when the module is collected.)
cpu_only = pytest.mark.skipif("jax.default_backend() != 'cpu'",
                              reason="the hand-written BatchNorm is XLA:CPU's path only")

ACTS = {None: lambda y: y, "relu": jax.nn.relu, "relu6": jax.nn.relu6}
NP_ACTS = {None: lambda y: y, "relu": lambda y: np.maximum(y, 0),
           "relu6": lambda y: np.clip(y, 0, 6)}


def _plain_batch_norm(x, scale, bias, eps, act):
  """Plain jnp, autodiff's gradient (``jax.nn.relu``/``relu6``'s): the reference for the
  custom_vjp."""
  mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
  var = jnp.maximum(jnp.mean(x * x, axis=tuple(range(x.ndim - 1))) - mean ** 2, 0)
  y = (x - mean) / jnp.sqrt(var + eps) * scale + bias
  return ACTS[act](y), mean, var


def _numpy_batch_norm(x, scale, bias, eps):
  x = x.astype(np.float64)
  mean = x.reshape(-1, x.shape[-1]).mean(0)
  var = x.reshape(-1, x.shape[-1]).var(0)
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


@cpu_only
@pytest.mark.parametrize("relu", [None, "relu", "relu6"])
def test_batch_norm_train_values_and_gradient(relu):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(4, 5, 3, 6)) * 2 + 1).astype(np.float32)
  # Up to 4 standard deviations times 4: some outputs above relu6's 6, some below 0.
  scale, bias = np.linspace(0.5, 4, 6, dtype=np.float32), np.linspace(-1, 1, 6, dtype=np.float32)
  y, mean, var = batch_norm_train(jnp.asarray(x), scale, bias, 1e-5, relu)
  want_y, want_mean, want_var = _numpy_batch_norm(x, scale, bias, 1e-5)
  if relu == "relu6":
    assert (want_y > 6).sum() > 3 and (want_y < 0).sum() > 3
  np.testing.assert_allclose(y, NP_ACTS[relu](want_y), atol=2e-5)
  np.testing.assert_allclose(mean, want_mean, atol=1e-5)
  np.testing.assert_allclose(var, want_var, rtol=1e-5)

  def loss(f):
    def fn(x, s, b):
      y, m, v = f(x, s, b, 1e-5, relu)
      return jnp.sum(jnp.sin(y)) + jnp.sum(m ** 2) + jnp.sum(jnp.cos(v))  # every output
    return jax.grad(fn, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))

  for g, r in zip(loss(batch_norm_train), loss(_plain_batch_norm)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@cpu_only
def test_float32_gradient_of_off_centre_inputs_stays_close_to_float64():
  """The weight-gradient sum is ``sum g x - mean sum g`` (no stored ``x - mean``): with
  inputs whose mean is 6 standard deviations off zero, the float32 gradients still match
  float64 autodiff of the plain implementation."""
  rng = np.random.default_rng(7)
  x = (rng.normal(size=(32, 8, 8, 16)) + 6).astype(np.float32)
  scale, bias = np.linspace(0.5, 2, 16, dtype=np.float32), np.zeros(16, np.float32)
  cot = rng.normal(size=x.shape).astype(np.float32)

  def grads(f, dtype):
    def fn(x, s, b):
      return jnp.sum(f(x, s, b, 1e-5, "relu")[0] * cot.astype(dtype))
    return jax.grad(fn, argnums=(0, 1, 2))(*(jnp.asarray(a, dtype) for a in (x, scale, bias)))

  got = grads(batch_norm_train, jnp.float32)
  jax.config.update("jax_enable_x64", True)
  try:
    want = [np.asarray(w) for w in grads(_plain_batch_norm, jnp.float64)]
  finally:
    jax.config.update("jax_enable_x64", False)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * np.abs(w).max())


@cpu_only
@pytest.mark.parametrize("relu", [None, "relu", "relu6"])
def test_batch_norm_check_grads_float64(relu):
  jax.config.update("jax_enable_x64", True)
  try:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 4, 5)))
    s, b = jnp.linspace(0.5, 8, 5), jnp.linspace(-0.1, 0.1, 5)
    check_grads(lambda x, s, b: batch_norm_train(x, s, b, 1e-5, relu), (x, s, b), order=2,
                modes=["rev"])
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("relu", [None, "relu", "relu6"])
@pytest.mark.parametrize("train", [True, False])
def test_module_equals_flax_batch_norm(relu, train):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3, 3, 5)) * 3 + 2, jnp.float32)
  ref = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  mine = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, activation=relu)
  v_ref, v_mine = ref.init(jax.random.key(0), x), mine.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v_ref) == jax.tree.map(jnp.shape, v_mine)
  variables = {"params": {"scale": jnp.linspace(0.5, 5, 5), "bias": jnp.linspace(-1, 1, 5)},
               "batch_stats": {"mean": jnp.linspace(0, 1, 5), "var": jnp.linspace(1, 2, 5)}}

  def run(module, act):
    def loss(params, x):
      y, state = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(act(y))), state
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)

  (l_ref, s_ref), g_ref = run(ref, ACTS[relu])
  (l_mine, s_mine), g_mine = run(mine, lambda y: y)
  np.testing.assert_allclose(l_mine, l_ref, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((s_mine, g_mine)), jax.tree.leaves((s_ref, g_ref))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_output_and_float32_statistics():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 4, 4, 3)), jnp.bfloat16)
  mine = BatchNorm(momentum=0.9, dtype=jnp.bfloat16)
  ref = nn.BatchNorm(use_running_average=False, momentum=0.9, dtype=jnp.bfloat16)
  v = ref.init(jax.random.key(0), x)
  y, st = mine.apply(v, x, mutable=["batch_stats"])
  y_ref, st_ref = ref.apply(v, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16 and st["batch_stats"]["mean"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                             atol=2e-2)
  np.testing.assert_allclose(st["batch_stats"]["var"], st_ref["batch_stats"]["var"], rtol=1e-5)
  g = jax.grad(lambda x: jnp.sum(mine.apply(v, x, mutable=["batch_stats"])[0]
                                 .astype(jnp.float32) ** 2))(x)
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@cpu_only
def test_residual_before_relu_values_and_gradient():
  """relu(bn(x) + residual) (ResNet's bn3), against autodiff of the plain version."""
  rng = np.random.default_rng(6)
  x, res = (jnp.asarray(rng.normal(size=(3, 4, 2, 5)), jnp.float32) for _ in range(2))
  s, b = jnp.linspace(0.5, 2, 5), jnp.linspace(-0.5, 0.5, 5)

  def plain(x, res, s, b):
    y, m, v = _plain_batch_norm(x, s, b, 1e-5, None)
    return jnp.maximum(y + res, 0), m, v

  def loss(f):
    fn = lambda *a: jnp.sum(jnp.sin(f(*a)[0]))
    return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(x, res, s, b)

  mine = lambda x, res, s, b: batch_norm_train(x, s, b, 1e-5, "relu", residual=res)
  (l1, g1), (l2, g2) = loss(mine), loss(plain)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, r in zip(g1, g2):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="only added before a ReLU"):
    batch_norm_train(x, s, b, 1e-5, None, residual=res)
  with pytest.raises(ValueError, match="only added before a ReLU"):
    batch_norm_train(x, s, b, 1e-5, "relu6", residual=res)


def test_unknown_activation_is_an_error():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="activation must be one of"):
    batch_norm_train(x, jnp.ones(3), jnp.zeros(3), 1e-5, "gelu")
  with pytest.raises(ValueError, match="activation must be one of"):
    BatchNorm(activation=True).init(jax.random.key(0), x)
