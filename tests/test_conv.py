"""The XLA:CPU convolution (``sdl_jax.cpu.conv``: oneDNN, or XLA's own with depthwise ones
as taps, 1x1 ones as matmuls, strided ones with a space-to-depth weight gradient) equals
lax's, value and gradients; the 2x2 max-pool equals flax's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from sdl_jax.cpu import dnnl_route
from sdl_jax.cpu.conv import conv_general_dilated as fast_conv
from sdl_jax.cpu.dense import strided_weight_grad
from sdl_jax.cpu.depthwise import depthwise_input_grad_strided, depthwise_weight_grad
from sdl_jax.cpu.pool import max_pool_2x2

DN = ("NHWC", "HWIO", "NHWC")
CASES = [  # (H, Cin, Cout, kernel, strides, padding, groups)
    (9, 4, 6, 3, (1, 1), "SAME", 1),
    (9, 4, 6, 3, (2, 2), "SAME", 1),  # dense strided: the space-to-depth weight gradient
    (10, 3, 5, 7, (2, 2), ((3, 3), (3, 3)), 1),  # ... ResNet's 7x7/2 stem
    (10, 4, 6, 3, (3, 2), "VALID", 1),  # ... rows and columns no window reads
    (11, 2, 3, 4, (2, 3), ((0, 2), (1, 0)), 1),  # ... even kernel, asymmetric padding
    (8, 4, 8, 1, (1, 1), "VALID", 1),
    (11, 6, 6, 5, (2, 2), ((0, 1), (0, 1)), 6),  # depthwise, TF-style asymmetric pad
    (9, 4, 4, 3, (1, 1), "SAME", 4),  # depthwise, stride 1: input gradient as correlation
    (8, 6, 6, 5, (1, 1), ((2, 1), (0, 3)), 6),  # ... asymmetric padding
    (8, 3, 3, 3, (1, 1), ((3, 0), (1, 1)), 3),  # ... padding past the kernel: by phase
    (12, 5, 5, 3, (2, 2), "SAME", 5),  # depthwise 3x3/2, even size (Lite0): by phase
    (10, 3, 3, 3, (3, 2), ((2, 0), (1, 2)), 3),  # ... mixed strides, asymmetric padding
    (9, 4, 4, 2, (2, 2), "VALID", 4),  # ... even kernel, rows no window reads
    (10, 4, 8, 3, (1, 2), ((1, 1), (2, 0)), 2),  # grouped, mixed strides
    (9, 5, 7, 1, (2, 2), "SAME", 1),   # 1x1, strided, odd size: pointwise path
    (7, 3, 4, 1, (2, 1), "VALID", 1),  # 1x1, mixed strides
    (6, 3, 4, 1, (1, 1), ((1, 0), (0, 1)), 1),  # 1x1 with padding: lax
]


def no_dnnl_conv(*args, **kwargs):
  """``fast_conv`` traced with oneDNN off: XLA's kernels and the hand paths."""
  with dnnl_route.disabled():
    return fast_conv(*args, **kwargs)


@pytest.mark.parametrize("impl", [fast_conv, no_dnnl_conv], ids=["library", "no_dnnl"])
@pytest.mark.parametrize("h,cin,cout,k,strides,padding,groups", CASES)
def test_value_and_gradients_equal_lax(impl, h, cin, cout, k, strides, padding, groups):
  rng = np.random.default_rng(h + k)
  x = jnp.asarray(rng.normal(size=(2, h, h + 1, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.float32)

  def loss(conv, x, w):
    y = conv(x, w, strides, padding, dimension_numbers=DN, feature_group_count=groups)
    return jnp.sum(jnp.sin(y))

  np.testing.assert_allclose(
      impl(x, w, strides, padding, dimension_numbers=DN, feature_group_count=groups),
      lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                               feature_group_count=groups), rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda x, w: loss(impl, x, w), argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: loss(lax.conv_general_dilated, x, w), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_check_grads_float64():
  jax.config.update("jax_enable_x64", True)
  try:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))
    for strides in [(2, 2), (1, 1)]:  # strided: the space-to-depth VJP; stride 1: lax
      f = lambda x, w: fast_conv(x, w, strides, "SAME", dimension_numbers=DN)
      check_grads(f, (x, w), order=2, modes=["rev"])
    wd = jnp.asarray(rng.normal(size=(3, 3, 1, 3)))  # depthwise: taps, hand-written VJP
    for strides in [(2, 2), (1, 1)]:
      f = lambda x, w: fast_conv(x, w, strides, "SAME", dimension_numbers=DN,
                                 feature_group_count=3)
      check_grads(f, (x, wd), order=2, modes=["rev"])
    w1 = jnp.asarray(rng.normal(size=(1, 1, 3, 5)))  # 1x1: the pointwise VJP
    f = lambda x, w: fast_conv(x, w, (2, 2), "SAME", dimension_numbers=DN)
    check_grads(f, (x, w1), order=2, modes=["rev"])
  finally:
    jax.config.update("jax_enable_x64", False)


def test_other_layouts_fall_back_to_lax():
  x = jnp.ones((1, 3, 5, 5))
  w = jnp.ones((4, 3, 3, 3))
  got = fast_conv(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
  want = lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                  dimension_numbers=("NCHW", "OIHW", "NCHW"))
  np.testing.assert_array_equal(got, want)


def test_flax_conv_with_fast_conv_matches_default():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
  plain = nn.Conv(5, (3, 3))
  fast = nn.Conv(5, (3, 3), conv_general_dilated=fast_conv)
  v = plain.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(fast.apply(v, x), plain.apply(v, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 5, 2)])
def test_max_pool_2x2_equals_flax_max_pool(shape):
  x = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
  ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  np.testing.assert_array_equal(max_pool_2x2(x), ref(x))
  g = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) ** 2))(x)
  g_ref = jax.grad(lambda x: jnp.sum(ref(x) ** 2))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6)


def _first_max_pool_grad(x, g):
  """NumPy: each 2x2 window's cotangent to its first maximum in row-major order."""
  n, h, w, c = x.shape
  dx = np.zeros_like(x)
  for i in range(n):
    for a in range(h // 2):
      for b in range(w // 2):
        for ch in range(c):
          win = x[i, 2 * a:2 * a + 2, 2 * b:2 * b + 2, ch].reshape(-1)
          k = int(np.argmax(win))  # NumPy's argmax is the first maximum.
          dx[i, 2 * a + k // 2, 2 * b + k % 2, ch] = g[i, a, b, ch]
  return dx


@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_2x2_gradient_goes_to_the_first_maximum(ties):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
  if ties:  # As after a ReLU: many all-zero windows, and some with two equal maxima.
    x = np.maximum(np.round(x), 0).astype(np.float32)
  g = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
  _, vjp = jax.vjp(max_pool_2x2, jnp.asarray(x))
  (got,) = vjp(jnp.asarray(g))
  np.testing.assert_array_equal(got, _first_max_pool_grad(x, g))
  if ties:
    assert (x.reshape(2, 7, 6, 3)[:, :6].reshape(2, 3, 2, 3, 2, 3) == 0).all(axis=(2, 4)).any()


@dnnl_route.disabled()
def test_pointwise_gradient_is_a_dot_not_a_convolution():
  """The point of the 1x1 path (without oneDNN): no convolution (and its operand
  transposes) in the step."""
  x = jnp.ones((2, 5, 5, 3))
  w = jnp.ones((1, 1, 3, 4))
  grad = jax.grad(lambda x, w: jnp.sum(fast_conv(x, w, (1, 1), "SAME",
                                                 dimension_numbers=DN) ** 2), argnums=(0, 1))
  text = str(jax.make_jaxpr(grad)(x, w))
  assert "conv_general_dilated" not in text and "dot_general" in text
  grad3 = jax.grad(lambda x, w: jnp.sum(fast_conv(x, w, (1, 1), "SAME",
                                                  dimension_numbers=DN) ** 2), argnums=(0, 1))
  assert "conv_general_dilated" in str(jax.make_jaxpr(grad3)(x, jnp.ones((3, 3, 3, 4))))


def _depthwise_weight_grad_reference(x, dy, k, strides, padding):
  """NumPy, float64: dW[i, j, 0, c] = sum_{n,a,b} xpad[n, a*sh + i, b*sw + j, c] dy[n, a, b, c]."""
  (pt, pb), (pl, pr) = padding
  xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, ho, wo, c = dy.shape
  dw = np.zeros((k, k, 1, c))
  for i in range(k):
    for j in range(k):
      for a in range(ho):
        for b in range(wo):
          dw[i, j, 0] += (xp[:, a * strides[0] + i, b * strides[1] + j] * dy[:, a, b]).sum(0)
  return dw


@pytest.mark.parametrize("h,k,strides,padding", [
    (9, 3, (1, 1), ((1, 1), (1, 1))),
    (11, 5, (2, 2), ((1, 2), (1, 2))),
    (8, 3, (2, 1), ((0, 1), (1, 1))),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_depthwise_weight_gradient_equals_reference(h, k, strides, padding, dtype):
  rng = np.random.default_rng(h)
  x = rng.normal(size=(3, h, h + 2, 5)).astype(np.float32)
  ho = (h + sum(padding[0]) - k) // strides[0] + 1
  wo = (h + 2 + sum(padding[1]) - k) // strides[1] + 1
  dy = rng.normal(size=(3, ho, wo, 5)).astype(np.float32)
  got = depthwise_weight_grad(jnp.asarray(x, dtype), jnp.asarray(dy, dtype), (k, k), strides,
                              padding)
  assert got.dtype == jnp.float32  # bfloat16 products are summed in float32
  # The reference sees the same (rounded) inputs, so float32 sums leave only their own error.
  want = _depthwise_weight_grad_reference(np.asarray(jnp.asarray(x, dtype), np.float64),
                                          np.asarray(jnp.asarray(dy, dtype), np.float64),
                                          k, strides, padding)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _depthwise_input_grad_reference(dy, w, hw, strides, padding):
  """NumPy, float64: dx[n, a*sh + i - pt, b*sw + j - pl, c] += dy[n, a, b, c] w[i, j, 0, c]."""
  (pt, pb), (pl, pr) = padding
  n, ho, wo, c = dy.shape
  kh, kw = w.shape[:2]
  dxp = np.zeros((n, hw[0] + pt + pb, hw[1] + pl + pr, c))
  for a in range(ho):
    for b in range(wo):
      for i in range(kh):
        for j in range(kw):
          dxp[:, a * strides[0] + i, b * strides[1] + j] += dy[:, a, b] * w[i, j, 0]
  return dxp[:, pt:pt + hw[0], pl:pl + hw[1]]


@pytest.mark.parametrize("h,k,strides,padding", [
    (12, (3, 3), (2, 2), ((0, 1), (0, 1))),  # Lite0's stride-2 3x3 (TF "SAME", even size)
    (11, (5, 5), (2, 2), ((1, 2), (1, 2))),  # ... its 5x5
    (10, (3, 2), (3, 2), ((2, 0), (1, 2))),
    (8, (2, 3), (1, 1), ((3, 0), (0, 4))),  # padding past the kernel
])
def test_depthwise_strided_input_gradient_equals_reference(h, k, strides, padding):
  rng = np.random.default_rng(h)
  hw = (h, h + 1)
  ho = (hw[0] + sum(padding[0]) - k[0]) // strides[0] + 1
  wo = (hw[1] + sum(padding[1]) - k[1]) // strides[1] + 1
  dy = rng.normal(size=(2, ho, wo, 3)).astype(np.float32)
  w = rng.normal(size=k + (1, 3)).astype(np.float32)
  got = depthwise_input_grad_strided(jnp.asarray(dy), jnp.asarray(w), hw, strides, padding)
  np.testing.assert_allclose(got, _depthwise_input_grad_reference(dy, w, hw, strides, padding),
                             rtol=1e-5, atol=1e-5)


@dnnl_route.disabled()
def test_depthwise_weight_gradient_is_one_reduction():
  """The point of the depthwise VJP (without oneDNN): all taps summed by one (variadic)
  reduce, no conv."""
  x = jnp.ones((2, 6, 6, 4))
  w = jnp.ones((3, 3, 1, 4))
  grad = jax.grad(lambda w: jnp.sum(fast_conv(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                              feature_group_count=4) ** 2))
  text = str(jax.make_jaxpr(grad)(w))
  assert "conv_general_dilated" not in text
  assert text.count("= reduce[") == 1  # the nine taps' products, one pass
  assert "reduce_sum[axes=(0, 1, 2)" not in text  # no per-tap reductions (autodiff's)


def _dense_weight_grad_reference(x, dy, k, strides, padding):
  """NumPy, float64: dW[i, j, c, o] = sum_{n,a,b} xpad[n, a*sh + i, b*sw + j, c] dy[n, a, b, o]."""
  (pt, pb), (pl, pr) = padding
  xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, ho, wo, co = dy.shape
  dw = np.zeros((k[0], k[1], x.shape[3], co))
  for i in range(k[0]):
    for j in range(k[1]):
      for a in range(ho):
        for b in range(wo):
          dw[i, j] += xp[:, a * strides[0] + i, b * strides[1] + j].T @ dy[:, a, b]
  return dw


@pytest.mark.parametrize("h,k,strides,padding", [
    (12, (7, 7), (2, 2), ((3, 3), (3, 3))),  # ResNet's stem
    (9, (3, 3), (2, 2), ((1, 1), (1, 1))),  # a stride-2 3x3: odd size
    (10, (3, 2), (3, 2), ((0, 0), (1, 0))),  # the last rows read by no window
    (8, (5, 3), (2, 1), ((2, 2), (0, 2))),
])
def test_strided_weight_gradient_equals_reference(h, k, strides, padding):
  rng = np.random.default_rng(h)
  x = rng.normal(size=(2, h, h + 1, 3)).astype(np.float32)
  ho = (h + sum(padding[0]) - k[0]) // strides[0] + 1
  wo = (h + 1 + sum(padding[1]) - k[1]) // strides[1] + 1
  dy = rng.normal(size=(2, ho, wo, 4)).astype(np.float32)
  got = strided_weight_grad(jnp.asarray(x), jnp.asarray(dy), k, strides, padding)
  np.testing.assert_allclose(got, _dense_weight_grad_reference(x, dy, k, strides, padding),
                             rtol=1e-5, atol=1e-5)


@dnnl_route.disabled()
def test_strided_weight_gradient_has_no_dilated_kernel():
  """The point of the strided VJP (without oneDNN): autodiff's weight gradient convolves
  with the output gradient dilated by the stride (``rhs_dilation=(2, 2)``); the library's
  with none."""
  x = jnp.ones((2, 9, 9, 3))
  w = jnp.ones((3, 3, 3, 4))
  loss = lambda conv: (lambda w: jnp.sum(conv(x, w, (2, 2), "SAME", dimension_numbers=DN) ** 2))
  assert "rhs_dilation=(2, 2)" in str(jax.make_jaxpr(jax.grad(loss(lax.conv_general_dilated)))(w))
  text = str(jax.make_jaxpr(jax.grad(loss(fast_conv)))(w))
  assert "conv_general_dilated" in text and "rhs_dilation=(2, 2)" not in text
