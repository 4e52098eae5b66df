"""The joint loss: values against optax and a plain reference, gradient against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from sdl_jax.losses import sdl_loss, sdl_loss_reference, per_example_loss

LAMS = [0.0, 0.3, 0.8, 1.0]


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def _random_problem(seed, n=6, c=8, soft_labels=False, normalised=True, zero_rows=()):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=3.0, size=(n, c))
  labels = rng.integers(0, c, size=n)
  dist = rng.gamma(0.5, size=(n, c))
  dist[rng.random((n, c)) < 0.3] = 0.0  # zeros in the distribution
  dist[:, 0] += 0.01
  if normalised:
    dist = dist / dist.sum(1, keepdims=True)
  else:
    dist = dist * rng.uniform(0.5, 3.0, size=(n, 1))
  if soft_labels:
    labels = rng.random((n, c)) * (rng.random((n, c)) < 0.5)
  else:
    labels = labels.astype(np.int32)
  for r in zero_rows:
    dist[r] = 0.0
    if soft_labels:
      labels[r] = 0.0
    else:
      labels[r] = -1
  return logits, labels, dist


def _np_label_targets(labels, n, c):
  """Integer labels (negative = padded) or float [N, C] label weights as float64 [N, C]."""
  labels = np.asarray(labels)
  if labels.ndim == 2:
    return labels.astype(np.float64)
  y = np.zeros((n, c))
  for i, k in enumerate(labels):
    if k >= 0:
      y[i, k] = 1.0
  return y


def _numpy_loss(logits, labels, dist, lam):
  """The loss written from the definition in NumPy (float64)."""
  logits = np.asarray(logits, np.float64)
  n, c = logits.shape
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  y = _np_label_targets(labels, n, c)
  return -((1 - lam) * (y * logp).sum() + lam * (dist * logp).sum()) / n


def _numpy_grad(logits, labels, dist, lam):
  """The hand-derived general form, in NumPy."""
  logits = np.asarray(logits, np.float64)
  n, c = logits.shape
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  y = _np_label_targets(labels, n, c)
  return ((1 - lam) * (p * y.sum(1, keepdims=True) - y)
          + lam * (p * dist.sum(1, keepdims=True) - dist)) / n


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("normalised", [True, False])
def test_custom_vjp_matches_autodiff_and_hand_formula(x64, lam, soft, normalised):
  logits, labels, dist = _random_problem(
      int(lam * 10) + 3 * soft + 7 * normalised, soft_labels=soft, normalised=normalised,
      zero_rows=(2,))
  logits = jnp.asarray(logits, jnp.float64)
  loss = sdl_loss(logits, labels, dist, lam)
  ref = sdl_loss_reference(logits, labels, dist, lam)
  np.testing.assert_allclose(loss, ref, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(loss, _numpy_loss(logits, labels, dist, lam), rtol=1e-12)
  g = jax.grad(sdl_loss)(logits, labels, dist, lam)
  g_ref = jax.grad(sdl_loss_reference)(logits, labels, dist, lam)
  np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(g, _numpy_grad(logits, labels, dist, lam), rtol=1e-10, atol=1e-13)
  # The padded row (label -1 / zeros, zero distribution) gets no gradient.
  np.testing.assert_array_equal(np.asarray(g[2]), 0.0)


@pytest.mark.parametrize("lam", LAMS)
def test_one_hot_normalised_case_is_p_minus_targets(x64, lam):
  logits, labels, dist = _random_problem(11)
  n = logits.shape[0]
  g = jax.grad(sdl_loss)(jnp.asarray(logits), labels, dist, lam)
  p = jax.nn.softmax(jnp.asarray(logits))
  y = jax.nn.one_hot(labels, logits.shape[1], dtype=jnp.float64)
  np.testing.assert_allclose(g, (p - (1 - lam) * y - lam * dist) / n, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("lam", [0.0, 0.8])
def test_check_grads_all_float_arguments(x64, lam):
  logits, labels, dist = _random_problem(5, soft_labels=True)
  f = lambda a, y, l: sdl_loss(a, y, l, lam)
  check_grads(f, (jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(dist)),
              order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
  # Second-order in the logits through the hand-written rule's own autodiff.
  check_grads(lambda a: sdl_loss(a, labels, dist, lam), (jnp.asarray(logits),),
              order=2, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_lam_gets_no_gradient(x64):
  logits, labels, dist = _random_problem(2)
  g_lam = jax.grad(lambda lam: sdl_loss(jnp.asarray(logits), labels, dist, lam))(0.5)
  assert float(g_lam) == 0.0


def test_all_zero_rows_contribute_nothing(x64):
  logits, labels, dist = _random_problem(3, zero_rows=(0, 4))
  keep = [1, 2, 3, 5]
  n = logits.shape[0]
  full = sdl_loss(jnp.asarray(logits), labels, dist, 0.8)
  sub = sdl_loss(jnp.asarray(logits[keep]), labels[keep], dist[keep], 0.8)
  # Padded rows count in N but add no loss.
  np.testing.assert_allclose(full * n, sub * len(keep), rtol=1e-12)


def test_lam0_equals_optax_integer_cross_entropy():
  logits, labels, dist = _random_problem(4, n=16)
  logits = jnp.asarray(logits, jnp.float32)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  np.testing.assert_allclose(sdl_loss(logits, labels, dist, 0.0), want, rtol=1e-6)


def test_lam1_equals_optax_soft_cross_entropy():
  logits, labels, dist = _random_problem(5, n=16)
  logits = jnp.asarray(logits, jnp.float32)
  want = optax.softmax_cross_entropy(logits, dist).mean()
  np.testing.assert_allclose(sdl_loss(logits, labels, dist, 1.0), want, rtol=1e-6)


def test_jit_vmap_and_traced_lam():
  logits, labels, dist = _random_problem(6, n=4)
  logits = jnp.asarray(logits, jnp.float32)
  f = jax.jit(jax.value_and_grad(sdl_loss))
  v, g = f(logits, labels, dist, jnp.float32(0.8))
  v2, g2 = jax.value_and_grad(sdl_loss_reference)(logits, labels, dist, 0.8)
  np.testing.assert_allclose(v, v2, rtol=1e-6)
  np.testing.assert_allclose(g, g2, rtol=1e-5, atol=1e-6)
  # vmap over a leading batch-of-problems axis.
  stack = lambda a: jnp.stack([jnp.asarray(a)] * 3)
  vs = jax.vmap(lambda a, y, l: sdl_loss(a, y, l, 0.8))(
      stack(logits), stack(labels), stack(dist))
  np.testing.assert_allclose(vs, np.full(3, v), rtol=1e-6)
  gs = jax.vmap(jax.grad(lambda a, y, l: sdl_loss(a, y, l, 0.8)))(
      stack(logits), stack(labels), stack(dist))
  np.testing.assert_allclose(gs[1], g, rtol=1e-5, atol=1e-6)


@pytest.mark.multidevice
def test_pmap_gradients_over_local_devices_equal_the_global_batch():
  """Data parallelism's arithmetic, over ``jax.local_device_count()`` devices: each device's
  ``sdl_loss`` is the mean over its own ``n / n_dev`` rows, so its logits' gradient is the
  global batch's times ``n_dev``; the ``pmean`` of a parameter's gradient (as
  ``train.train_step`` takes it) is the global batch's gradient. Logits ``x @ w`` of a
  linear model; the reference is the hand formula in NumPy on the whole batch."""
  n_dev = jax.local_device_count()
  n, c, f = 4 * n_dev, 8, 5
  logits0, labels, dist = _random_problem(7, n=n, c=c)
  x = np.random.default_rng(17).normal(size=(n, f)).astype(np.float32)
  # Least squares: w with x @ w close to the problem's logits, so the rows differ.
  w = np.linalg.lstsq(x, logits0, rcond=None)[0].astype(np.float32)

  def step(w, x, y, l):
    g_logits = jax.grad(sdl_loss)(x @ w, y, l, 0.8)
    g_w = jax.grad(lambda w: sdl_loss(x @ w, y, l, 0.8))(w)
    return g_logits, jax.lax.pmean(g_w, "d")

  shard = lambda a: jnp.asarray(a).reshape((n_dev, -1) + a.shape[1:])
  g_logits, g_w = jax.pmap(step, axis_name="d", in_axes=(None, 0, 0, 0))(
      jnp.asarray(w), shard(x), shard(labels), shard(dist.astype(np.float32)))
  assert g_logits.shape == (n_dev, 4, c) and g_w.shape == (n_dev, f, c)
  want_logits = _numpy_grad(x.astype(np.float64) @ w, labels, dist, 0.8)  # [n, C], mean / n
  np.testing.assert_allclose(np.asarray(g_logits).reshape(n, c), want_logits * n_dev,
                             rtol=1e-4, atol=1e-6)
  for g in np.asarray(g_w):  # every device holds the global batch's gradient
    np.testing.assert_allclose(g, x.T.astype(np.float64) @ want_logits, rtol=1e-4, atol=1e-6)


def test_bf16_logits_computed_in_float32():
  logits, labels, dist = _random_problem(8, n=8)
  lb = jnp.asarray(logits, jnp.bfloat16)
  v = sdl_loss(lb, labels, dist, 0.8)
  assert v.dtype == jnp.float32
  want = sdl_loss(lb.astype(jnp.float32), labels, dist, 0.8)
  np.testing.assert_allclose(v, want, rtol=1e-6)
  g = jax.grad(sdl_loss)(lb, labels, dist, 0.8)
  assert g.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(g, np.float32)).all()


def test_huge_logits_and_zero_distribution_entries_are_finite():
  logits = jnp.asarray([[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, -1e4, 1e4]], jnp.float32)
  labels = jnp.asarray([1, 0])
  dist = jnp.asarray([[0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
  for lam in LAMS:
    v, g = jax.value_and_grad(sdl_loss)(logits, labels, dist, lam)
    assert np.isfinite(v) and np.isfinite(np.asarray(g)).all(), lam
    assert float(v) > 1e3  # confident and wrong: a large, finite loss
  # Confident and right: loss ~ 0.
  v = sdl_loss(logits[:1], jnp.asarray([0]), jnp.asarray([[1.0, 0, 0, 0]]), 0.8)
  assert 0.0 <= float(v) < 1e-6


def test_per_example_loss_sums_to_mean():
  logits, labels, dist = _random_problem(9, n=10, zero_rows=(3,))
  per = per_example_loss(jnp.asarray(logits), labels, dist, 0.3)
  np.testing.assert_allclose(per.mean(), sdl_loss(jnp.asarray(logits), labels, dist, 0.3),
                             rtol=1e-5)
  assert float(per[3]) == 0.0


def test_shape_errors_are_clear():
  with pytest.raises(ValueError, match="distributions must be"):
    sdl_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.zeros((2, 4)), 0.8)
  with pytest.raises(ValueError, match="integer labels must be"):
    sdl_loss(jnp.zeros((2, 3)), jnp.array([0, 1, 2]), jnp.zeros((2, 3)), 0.8)
