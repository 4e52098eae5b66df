"""oneDNN convolutions through XLA's FFI (``sdl_jax.cpu.dnnl``) against lax."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sdl_jax.cpu import dnnl, dnnl_lib, dnnl_route
from sdl_jax.cpu.conv import conv_general_dilated as library_conv

REPO = Path(__file__).resolve().parents[1]
DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def _dnnl_on():
  """By default (``auto``) only some convolutions go to oneDNN on some CPUs; these tests
  send every one there."""
  with dnnl_route.use(True):
    yield


with dnnl_route.use(True):
  _AVAILABLE = dnnl_route.available()
# .ci/run installs oneDNN; elsewhere these tests say why they cannot run.
needs_dnnl = pytest.mark.skipif(not _AVAILABLE,
                                reason="oneDNN convolutions unavailable here (logged reason; "
                                       "pip install onednn-devel-cpu-gomp, or apt-get install libdnnl-dev)")


@needs_dnnl
@pytest.mark.parametrize("h,cin,cout,k,strides,padding,groups", [
    (9, 3, 5, 3, (1, 1), ((1, 1), (1, 1)), 1),      # 3x3 SAME on RGB
    (8, 4, 6, 1, (1, 1), ((0, 0), (0, 0)), 1),      # 1x1
    (11, 3, 4, 7, (2, 2), ((3, 3), (3, 3)), 1),     # ResNet-50's 7x7/2 stem
    (10, 4, 4, 3, (2, 2), ((0, 1), (0, 1)), 1),     # TF-style SAME, stride 2, even size
    (9, 5, 3, 3, (2, 1), ((2, 0), (1, 2)), 1),      # mixed strides, asymmetric padding
    (10, 2, 3, 2, (3, 3), ((0, 0), (0, 0)), 1),     # rows no window reads: zero gradient
    (9, 6, 6, 3, (1, 1), ((1, 1), (1, 1)), 6),      # depthwise 3x3
    (12, 5, 5, 5, (2, 2), ((1, 2), (1, 2)), 5),     # depthwise 5x5/2, TF-style SAME
    (8, 4, 8, 3, (1, 2), ((1, 1), (2, 0)), 2),      # grouped, two outputs per input channel
])
def test_conv_value_and_gradients_equal_lax(h, cin, cout, k, strides, padding, groups):
  rng = np.random.default_rng(h * k)
  x = jnp.asarray(rng.normal(size=(2, h, h + 1, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.float32)
  ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                              feature_group_count=groups)
  got = jax.jit(lambda x, w: dnnl.conv(x, w, strides, padding, groups))(x, w)
  np.testing.assert_allclose(got, ref(x, w), rtol=1e-5, atol=1e-5)
  # A loss whose output gradient varies by element, so every tap and channel is checked.
  loss = lambda conv: (lambda x, w: jnp.sum(jnp.sin(conv(x, w))))
  grads = jax.jit(jax.grad(loss(lambda x, w: dnnl.conv(x, w, strides, padding, groups)),
                           argnums=(0, 1)))(x, w)
  want = jax.grad(loss(ref), argnums=(0, 1))(x, w)
  for g, r in zip(grads, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@needs_dnnl
@pytest.mark.parametrize("groups", [1, 3])
def test_second_order_gradients_equal_lax(groups):
  """Each direction's VJP is written with the other two, so gradients of gradients work
  and equal autodiff's of lax."""
  strides, padding = (2, 1), ((1, 1), (0, 2))
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 7, 8, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3 // groups, 6)) * 0.5, jnp.float32)

  def outer(conv):
    def inner(x, w):
      gx, gw = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1))(x, w)
      return jnp.sum(jnp.sin(gx)) + jnp.sum(jnp.cos(gw))
    return jax.grad(inner, argnums=(0, 1))(x, w)

  got = outer(lambda x, w: dnnl.conv(x, w, strides, padding, groups))
  want = outer(lambda x, w: lax.conv_general_dilated(x, w, strides, padding,
                                                      dimension_numbers=DN,
                                                      feature_group_count=groups))
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@needs_dnnl
def test_library_sends_float32_nhwc_convolutions_to_dnnl_only():
  x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 4))
  trace = lambda x, w, **kw: str(jax.make_jaxpr(
      lambda x, w: library_conv(x, w, (1, 1), "SAME", dimension_numbers=DN, **kw))(x, w))
  assert "SdlDnnlConvFwd" in trace(x, w)
  assert "SdlDnnlConvFwd" in trace(x, jnp.ones((3, 3, 1, 4)), feature_group_count=4)
  # bfloat16 only where this CPU has fast bfloat16 kernels (dnnl_route.bf16); float16, another
  # layout, and with oneDNN off: not oneDNN.
  bf = lambda a: a.astype(jnp.bfloat16)
  assert ("SdlDnnlConvFwd" in trace(bf(x), bf(w))) == dnnl_route.bf16()
  assert "SdlDnnlConv" not in trace(x.astype(jnp.float16), w.astype(jnp.float16))
  nchw = str(jax.make_jaxpr(lambda x, w: library_conv(
      x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")))(
          jnp.ones((2, 4, 6, 6)), jnp.ones((4, 4, 3, 3))))
  assert "SdlDnnlConv" not in nchw
  with dnnl_route.disabled():
    assert "SdlDnnlConv" not in trace(x, w)
  assert "SdlDnnlConvFwd" in trace(x, w)


needs_bf16 = pytest.mark.skipif(
    not (_AVAILABLE and dnnl_route.bf16()),
    reason="no oneDNN bfloat16 kernels on this CPU (needs avx512_bf16 or amx_bf16)")


def _bf16_close(got, want, what):
  """bfloat16 results against float32 ones computed from the same (rounded) inputs: off by
  the output's rounding (2^-9 relative) and float32 sums in another order, so within 1% of
  the largest magnitude; a wrong tap, channel or layout is off by order one."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = float(np.max(np.abs(want)))
  err = float(np.max(np.abs(got - want)))
  assert err <= 1e-2 * scale, f"{what}: max error {err:.3g} against max |value| {scale:.3g}"


@needs_bf16
@pytest.mark.parametrize("h,cin,cout,k,strides,padding,groups", [
    (9, 3, 8, 3, (2, 2), ((0, 1), (0, 1)), 1),      # RGB stem, stride 2, TF-style SAME
    (8, 16, 24, 1, (1, 1), ((0, 0), (0, 0)), 1),    # 1x1
    (9, 16, 16, 3, (1, 1), ((1, 1), (1, 1)), 1),    # 3x3 SAME
    (12, 16, 16, 5, (2, 2), ((1, 2), (1, 2)), 16),  # depthwise 5x5/2
    (9, 8, 8, 3, (1, 1), ((1, 1), (1, 1)), 8),      # depthwise 3x3
])
def test_bf16_conv_value_and_gradients_match_float32_lax(h, cin, cout, k, strides, padding,
                                                         groups):
  rng = np.random.default_rng(h * k + groups)
  x = jnp.asarray(rng.normal(size=(2, h, h + 1, cin)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)
  ref = lambda x, w: lax.conv_general_dilated(f32(x), f32(w), strides, padding,
                                              dimension_numbers=DN, feature_group_count=groups)
  conv = lambda x, w: dnnl.conv(x, w, strides, padding, groups)
  got = jax.jit(conv)(x, w)
  assert got.dtype == jnp.bfloat16
  _bf16_close(got, ref(x, w), "forward")
  dy = jnp.asarray(rng.normal(size=got.shape), jnp.bfloat16)
  gx, gw = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy))(x, w, dy)
  rx, rw = jax.vjp(ref, x, w)[1](f32(dy))
  assert gx.dtype == gw.dtype == jnp.bfloat16
  _bf16_close(gx, rx, "input gradient")
  _bf16_close(gw, rw, "weight gradient")


@needs_dnnl
def test_bf16_stays_on_xla_where_the_cpu_has_no_fast_kernels(monkeypatch):
  x, w = jnp.ones((2, 6, 6, 4), jnp.bfloat16), jnp.ones((3, 3, 4, 4), jnp.bfloat16)
  monkeypatch.setattr(dnnl_lib, "_bf16", False)
  assert not dnnl_route.bf16() and not dnnl_route.takes(1, jnp.bfloat16) and dnnl_route.takes(1)
  jaxpr = str(jax.make_jaxpr(lambda x, w: library_conv(x, w, (1, 1), "SAME",
                                                       dimension_numbers=DN))(x, w))
  assert "SdlDnnlConv" not in jaxpr and "conv_general_dilated" in jaxpr


@needs_dnnl
def test_handler_names_the_problem_with_mixed_dtypes():
  """Called directly with a float32 input and bfloat16 weights the handler refuses with
  its own message rather than reading the buffers wrongly."""
  x, w = jnp.ones((1, 4, 4, 2), jnp.float32), jnp.ones((1, 1, 2, 2), jnp.bfloat16)
  with pytest.raises(Exception, match="all be float32 or all bfloat16"):
    jax.block_until_ready(dnnl._call("fwd", (1, 4, 4, 2), x, w, (1, 1), ((0, 0), (0, 0)), 1))


@needs_bf16
def test_small_cnn_bf16_train_step_gradients_as_close_to_float32_as_xla_paths():
  """The bfloat16 model's gradients on oneDNN and on XLA's paths, each against the float32
  model's: both round activations to bfloat16 (5-10% relative error per leaf here, the
  BatchNorm ones cancelling), at different points, so oneDNN's may be no more than twice
  as far off as XLA's; a wrong convolution is off by order one."""
  from sdl_jax import models  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12, 12, 3)), jnp.float32)

  def grads(dtype, dnnl_on):
    model = models.get_model("small_cnn", 10, widths=(8, 16), dtype=dtype)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 3)), train=False)

    def loss(params):
      y, _ = model.apply({**variables, "params": params}, x, train=True,
                         mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
      return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    with dnnl_route.use(dnnl_on):
      if dtype == jnp.bfloat16:
        assert ("SdlDnnlConv" in str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
                ) == dnnl_on
      return jax.jit(jax.grad(loss))(variables["params"])

  want = grads(jnp.float32, False)
  on, off = grads(jnp.bfloat16, True), grads(jnp.bfloat16, False)
  for (path, r), g, h in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(on),
                             jax.tree.leaves(off)):
    r = np.asarray(r, np.float32)
    err = lambda a: np.linalg.norm(np.asarray(a, np.float32) - r) / np.linalg.norm(r)
    assert err(g) <= 2 * err(h) + 1e-2, (jax.tree_util.keystr(path), err(g), err(h))


@needs_dnnl
@pytest.mark.parametrize("batch,size,kwargs", [
    (4, 12, {}),
    # Its strided stem on an odd size. Here the 2x2 max-pool's gradient, when it compared x
    # with the pooled y again in the backward pass, made the two paths' gradients differ
    # by up to 50% (likely windows lost where XLA computed x twice, not bit for bit alike).
    (3, 33, {"stem_stride": 2}),
])
def test_small_cnn_train_step_gradients_match_xla_paths(batch, size, kwargs):
  from sdl_jax import models  # pylint: disable=g-import-not-at-top
  model = models.get_model("small_cnn", 10, widths=(8, 16), **kwargs)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)

  def make_loss():  # one per path: jit caches traces by function
    def loss(params):
      y, _ = model.apply({**variables, "params": params}, x, train=True,
                         mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
      return jnp.sum(jnp.sin(y))
    return loss

  got = jax.jit(jax.grad(make_loss()))(variables["params"])
  with dnnl_route.disabled():
    want = jax.jit(jax.grad(make_loss()))(variables["params"])
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_xla_convolutions_when_off_or_when_the_build_fails(tmp_path):
  """XLA's convolutions, never a crash: with ``SDL_JAX_DNNL=off`` silently, by default
  (``auto``) with a compiler that fails logged at info level only, asked for with that
  compiler with a warning."""
  code = ("import logging, jax.numpy as jnp; logging.basicConfig();"
          "from sdl_jax.cpu import dnnl_route;"
          "from sdl_jax.cpu.conv import conv_general_dilated as c;"
          "print('AVAILABLE', dnnl_route.available());"
          "y = c(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), (1, 1), 'SAME',"
          " dimension_numbers=('NHWC', 'HWIO', 'NHWC')); print('SUM', float(y.sum()))")
  base = dict(os.environ, PYTHONPATH=str(REPO), SDL_JAX_CACHE=str(tmp_path / "cache"),
              JAX_PLATFORMS="cpu")
  base.pop("SDL_JAX_DNNL", None)
  broken = str(tmp_path / "no-such-compiler")
  for extra, warned in [({"SDL_JAX_DNNL": "off"}, False), ({"CXX": broken}, False),
                        ({"SDL_JAX_DNNL": "auto", "CXX": broken}, False),
                        ({"SDL_JAX_DNNL": "all", "CXX": broken}, True),
                        ({"SDL_JAX_DNNL": "grouped", "CXX": broken}, True)]:
    proc = subprocess.run([sys.executable, "-c", code], env={**base, **extra}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "AVAILABLE False" in proc.stdout and "SUM 400.0" in proc.stdout, extra
    assert ("oneDNN convolutions unavailable" in proc.stderr) == warned, proc.stderr[-2000:]
    if warned:
      assert "compiling dnnl_conv.cc" in proc.stderr


def test_modes_from_use_the_environment_and_the_config(monkeypatch):
  assert dnnl_route.auto_mode(["avx2", "fma", "avx512f"], 20603) == "all"
  assert dnnl_route.auto_mode(["avx2", "fma", "avx512f"], 30200) == "all"
  assert dnnl_route.auto_mode(["avx2", "fma"], 30200) == "xla_large_wgrad"
  assert dnnl_route.auto_mode(["avx2", "fma"], 20603) == dnnl_route.auto_mode([]) == "grouped"
  monkeypatch.setattr(dnnl_route, "_override", None)  # not this module's fixture's choice
  monkeypatch.setattr(dnnl_route, "_configured", "auto")
  for value, want in [("", dnnl_route.auto_mode()), ("auto", dnnl_route.auto_mode()),
                      ("ALL", "all"), ("grouped", "grouped"),
                      ("xla_large_wgrad", "xla_large_wgrad"),
                      (" off ", "off")]:
    monkeypatch.setenv("SDL_JAX_DNNL", value)
    assert dnnl_route.mode() == want, value
    assert dnnl_route.requested() == (want != "off")
  for dropped in ("1", "on", "xla_wgrad", "xla_spatial_wgrad", "maybe"):
    monkeypatch.setenv("SDL_JAX_DNNL", dropped)
    with pytest.raises(ValueError, match=f"SDL_JAX_DNNL='{dropped}'.*auto, all, "
                                         "xla_large_wgrad, grouped, off"):
      dnnl_route.mode()
  monkeypatch.delenv("SDL_JAX_DNNL")
  dnnl_route.set_default("grouped")  # config.cpu.dnnl, below the environment
  assert dnnl_route.mode() == "grouped"
  monkeypatch.setenv("SDL_JAX_DNNL", "off")
  assert dnnl_route.mode() == "off"
  with pytest.raises(ValueError, match="config.cpu.dnnl='dense'"):
    dnnl_route.set_default("dense")
  with pytest.raises(ValueError, match="dnnl_route.use='dense'"):
    with dnnl_route.use("dense"):
      pass
  with dnnl_route.use("grouped"):  # use() wins over the environment
    assert dnnl_route.mode() == "grouped"
    with dnnl_route.use(False):
      assert dnnl_route.mode() == "off"
    assert dnnl_route.mode() == "grouped"


@needs_dnnl
def test_grouped_mode_sends_only_grouped_convolutions_to_dnnl():
  x = jnp.ones((2, 6, 6, 4))
  trace = lambda w, **kw: str(jax.make_jaxpr(
      lambda x, w: library_conv(x, w, (1, 1), "SAME", dimension_numbers=DN, **kw))(x, w))
  with dnnl_route.use("grouped"):
    assert "SdlDnnlConv" not in trace(jnp.ones((3, 3, 4, 4)))
    assert "SdlDnnlConvFwd" in trace(jnp.ones((3, 3, 1, 4)), feature_group_count=4)
    assert "SdlDnnlConvFwd" in trace(jnp.ones((3, 3, 2, 4)), feature_group_count=2)
  with dnnl_route.use("all"):
    assert "SdlDnnlConvFwd" in trace(jnp.ones((3, 3, 4, 4)))


@needs_dnnl
@pytest.mark.parametrize("k,strides,padding", [
    (3, (1, 1), ((1, 1), (1, 1))),   # XLA's own weight gradient
    (1, (1, 1), ((0, 0), (0, 0))),   # pointwise's
    (1, (2, 2), ((0, 0), (0, 0))),   # pointwise's, strided
    (3, (2, 2), ((0, 1), (0, 1))),   # strided's (space-to-depth)
])
@pytest.mark.parametrize("limit", [1e9, 1])
def test_xla_large_wgrad_mode_value_and_gradients_equal_lax(k, strides, padding, limit,
                                                            monkeypatch):
  """``xla_large_wgrad``: dense convolutions forward and input gradient on oneDNN, the
  weight gradient too for 1x1 ones and those with fewer than ``LARGE_WGRAD_MACS``
  multiply-adds (all of these with 1e9; none larger than 1x1 with 1), else on XLA's path;
  grouped ones wholly on oneDNN."""
  monkeypatch.setattr(dnnl_route, "LARGE_WGRAD_MACS", limit)
  monkeypatch.setattr(dnnl_route, "blocked_weight_grad", lambda groups, w_shape: False)
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 4, 6)), jnp.float32)
  loss = lambda conv: (lambda x, w: jnp.sum(jnp.sin(conv(x, w))))
  ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)
  mine = lambda x, w: library_conv(x, w, strides, padding, dimension_numbers=DN)
  with dnnl_route.use("xla_large_wgrad"):
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(mine), argnums=(0, 1)))(x, w))
    got = jax.jit(jax.grad(loss(mine), argnums=(0, 1)))(x, w)
    value = jax.jit(mine)(x, w)
    dw_traced = str(jax.make_jaxpr(lambda x, w: library_conv(
        x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2))(
            x, jnp.ones((3, 3, 2, 4))))
  assert "SdlDnnlConvFwd" in jaxpr and "SdlDnnlConvBwdData" in jaxpr
  assert ("SdlDnnlConvBwdWeights" in jaxpr) == (k == 1 or limit > 1)
  assert "SdlDnnlConvFwd" in dw_traced  # grouped: oneDNN
  np.testing.assert_allclose(value, ref(x, w), rtol=1e-5, atol=1e-5)
  for g, r in zip(got, jax.grad(loss(ref), argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_weight_grad_routing_by_mode_kernel_and_multiply_adds(monkeypatch):
  x_shape, strides, padding = (2, 9, 10, 4), (2, 1), ((1, 0), (1, 1))
  w3, w1 = (3, 3, 4, 6), (1, 1, 4, 6)
  ho, wo = (9 + 1 + 0 - 3) // 2 + 1, (10 + 2 - 3) // 1 + 1
  assert dnnl_route.out_shape(x_shape, w3, strides, padding) == (2, ho, wo, 6) == jax.eval_shape(
      lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN),
      jnp.zeros(x_shape), jnp.zeros(w3)).shape
  macs = 2 * ho * wo * 3 * 3 * 4 * 6
  takes = lambda groups, w: dnnl_route.takes_weight_grad(groups, x_shape, w, strides, padding)
  with dnnl_route.use("xla_large_wgrad"):
    monkeypatch.setattr(dnnl_route, "LARGE_WGRAD_MACS", macs + 1)
    assert takes(1, w3) and takes(1, w1) and takes(2, (3, 3, 2, 6))
    monkeypatch.setattr(dnnl_route, "LARGE_WGRAD_MACS", macs)
    assert not takes(1, w3) and takes(1, w1) and takes(2, (3, 3, 2, 6))
    monkeypatch.setattr(dnnl_route, "LARGE_WGRAD_MACS", 1)
    assert takes(1, w1)  # 1x1: oneDNN's whatever the size
    # Large ones that do not widen: oneDNN's where it runs them on its blocked layout.
    square = (3, 3, 6, 6)
    for blocked in (True, False):
      monkeypatch.setattr(dnnl_route, "blocked_weight_grad", lambda groups, w_shape: blocked)
      assert takes(1, square) == blocked and takes(1, w1)
  monkeypatch.setattr(dnnl_route, "LARGE_WGRAD_MACS", 1e9)
  for mode, want3, want1 in [("all", True, True), ("grouped", False, False)]:
    with dnnl_route.use(mode):
      assert (takes(1, w3), takes(1, w1), takes(2, (3, 3, 2, 6))) == (want3, want1, True)


@needs_dnnl
def test_xla_large_wgrad_mode_second_order_gradients_equal_lax(monkeypatch):
  monkeypatch.setattr(dnnl_route, "LARGE_WGRAD_MACS", 1)  # the weight gradient on XLA's path
  monkeypatch.setattr(dnnl_route, "blocked_weight_grad", lambda groups, w_shape: False)
  strides, padding = (1, 1), ((1, 1), (1, 1))
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 6, 7, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)) * 0.5, jnp.float32)

  def outer(conv):
    def inner(x, w):
      gx, gw = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1))(x, w)
      return jnp.sum(jnp.sin(gx)) + jnp.sum(jnp.cos(gw))
    return jax.grad(inner, argnums=(0, 1))(x, w)

  with dnnl_route.use("xla_large_wgrad"):
    got = outer(lambda x, w: library_conv(x, w, strides, padding, dimension_numbers=DN))
  want = outer(lambda x, w: lax.conv_general_dilated(x, w, strides, padding,
                                                      dimension_numbers=DN))
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@needs_dnnl
def test_loading_logs_the_version_at_info_level():
  """(Logging it once recursed into ``dnnl_lib.load`` until the stack ran out: run.py logs at
  info level.)"""
  code = ("import logging; logging.basicConfig(level=logging.INFO);"
          "from sdl_jax.cpu import dnnl_route;"
          "print('MODE', dnnl_route.mode(), dnnl_route.available())")
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("SDL_JAX_DNNL", None)
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"MODE {dnnl_route.auto_mode()} True" in proc.stdout
  assert f"oneDNN {dnnl_lib.version_string()} convolutions loaded" in proc.stderr


@needs_dnnl
def test_version_is_the_loaded_onednn():
  v = dnnl_lib.version()
  assert v is not None and v >= 20000, v
  assert dnnl_lib.version_string() == f"{v // 10000}.{v // 100 % 100}.{v % 100}"
  # The wheel installed with the package is what the build uses, where present.
  if dnnl_lib.onednn_prefix() is not None:
    assert v >= 30000, v


@needs_dnnl
def test_build_is_cached_by_source_and_compiler(tmp_path, monkeypatch):
  monkeypatch.setenv("SDL_JAX_CACHE", str(tmp_path))
  first = dnnl_lib.build()
  assert first.parent == tmp_path and first.exists()
  mtime = first.stat().st_mtime_ns
  assert dnnl_lib.build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left


CONCURRENT_WORKER = r'''
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from sdl_jax.cpu import dnnl, dnnl_route
assert dnnl_route.available() and jax.local_device_count() == 2
pad, dn = ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")
rng = np.random.default_rng(0)
for cin, cout, groups in [(3, 8, 1), (8, 16, 1), (8, 8, 8)]:
  x = jnp.asarray(rng.normal(size=(2, 2, 16, 16, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, cin // groups, cout)), jnp.float32)
  grads = lambda conv: jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1))
  ours = jax.pmap(grads(lambda x, w: dnnl.conv(x, w, (1, 1), pad, groups)), in_axes=(0, None))
  ref = grads(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=dn,
                                                    feature_group_count=groups))
  want = [ref(x[d], w) for d in range(2)]
  for _ in range(10):
    gx, gw = ours(x, w)
    for d in range(2):
      np.testing.assert_allclose(gx[d], want[d][0], rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(gw[d], want[d][1], rtol=1e-4, atol=1e-4)
print("OK")
'''


@needs_dnnl
def test_two_devices_run_the_same_convolutions_at_once():
  """XLA runs a pmap's devices on several threads at once, so the same oneDNN primitive
  runs on two threads together. With oneDNN's own scratchpad this deadlocked in the first
  few steps (the 3->8 weight gradient); each thread now brings its own."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", SDL_JAX_DNNL="all",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", CONCURRENT_WORKER], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_after_is_exact_and_the_dependency_survives_compilation():
  """``after(a, b)`` is ``a`` bit for bit (finite ``b``), has no gradient in ``b``, and the
  compiled program still reads ``b``: the ordering of the backward pass rests on XLA not
  folding ``0 * b[0]`` away."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(2, 5, 4, 3)), jnp.float32).at[0, 0, 0, 0].set(-0.0)
  b = jnp.asarray(rng.normal(size=(3, 3, 3, 2)) * 1e30, jnp.float32)
  out = jax.jit(dnnl.after)(a, b)
  np.testing.assert_array_equal(out, a)
  ga, gb = jax.grad(lambda a, b: jnp.sum(jnp.sin(dnnl.after(a, b))), argnums=(0, 1))(a, b)
  np.testing.assert_allclose(ga, jnp.cos(a), rtol=1e-6)
  assert not np.any(np.asarray(gb))
  hlo = jax.jit(dnnl.after).lower(a, b).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  param = re.search(r"%(\S+) = f32\[3,3,3,2\]\{[^}]*\} parameter\(1\)", entry)
  assert param and entry.count(f"%{param.group(1)}") >= 2, entry  # declared and read


@needs_dnnl
def test_stored_is_the_identity_and_its_consumers_read_the_stored_buffer():
  """``stored(y)`` is ``y`` bit for bit, with the identity's gradient; compiled, the
  custom call is there and the two elementwise consumers of its result read it instead of
  recomputing ``y`` from ``x`` and ``r`` (which XLA:CPU does without it)."""
  rng = np.random.default_rng(1)
  x, r = (jnp.asarray(rng.normal(size=(4, 6, 5, 8)), jnp.float32) for _ in range(2))

  def f(store):
    def fn(x, r):
      y = jnp.maximum(x * 1.5 + r, 0)
      y = dnnl.stored(y) if store else y
      return jnp.sin(y) + x, y * 3 - r
    return fn

  for got, want in zip(jax.jit(f(True))(x, r), jax.jit(f(False))(x, r)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(dnnl.stored(x), x)
  loss = lambda store: lambda x, r: sum(jnp.sum(o) for o in f(store)(x, r))
  for got, want in zip(jax.grad(loss(True), argnums=(0, 1))(x, r),
                       jax.grad(loss(False), argnums=(0, 1))(x, r)):
    np.testing.assert_allclose(got, want, rtol=1e-6)

  def fusions_reading_both(store):
    hlo = jax.jit(f(store)).lower(x, r).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    names = [re.search(rf"%(\S+) = f32\[4,6,5,8\]\{{[^}}]*\}} parameter\({i}\)", entry)
             .group(1) for i in (0, 1)]
    return hlo, [line for line in entry.splitlines() if " fusion(" in line
                 and all(f"%{n}" in line for n in names)]
  hlo, both = fusions_reading_both(True)
  assert dnnl_lib.STORED_TARGET in hlo and len(both) <= 1, both  # y's own fusion only
  assert len(fusions_reading_both(False)[1]) >= 2  # without it, y recomputed in each


def test_blocked_weight_grad_rule(monkeypatch):
  """oneDNN's weight gradient on its blocked layout: dense, larger than 1x1, not widening,
  and only without AVX-512 (where it was measured)."""
  monkeypatch.setattr(dnnl_lib, "cpu_isa", lambda: ("avx2", "fma"))
  assert dnnl_route.blocked_weight_grad(1, (3, 3, 32, 32))
  assert dnnl_route.blocked_weight_grad(1, (3, 3, 64, 32))
  assert not dnnl_route.blocked_weight_grad(1, (3, 3, 32, 64))   # widening
  assert not dnnl_route.blocked_weight_grad(1, (1, 1, 64, 64))   # 1x1
  assert not dnnl_route.blocked_weight_grad(4, (3, 3, 1, 4))     # depthwise
  monkeypatch.setattr(dnnl_lib, "cpu_isa", lambda: ("avx2", "avx512f"))
  assert not dnnl_route.blocked_weight_grad(1, (3, 3, 32, 32))


@needs_dnnl
@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("c,o,strides,padding", [
    (12, 12, (1, 1), ((1, 1), (1, 1))),   # channels not a multiple of the 8-wide block
    (16, 8, (2, 1), ((1, 0), (2, 1))),    # narrowing, strided, asymmetric padding
])
def test_weight_grad_in_either_layout_equals_lax(blocked, c, o, strides, padding,
                                                 monkeypatch):
  monkeypatch.setattr(dnnl_route, "blocked_weight_grad", lambda groups, w_shape: blocked)
  rng = np.random.default_rng(c + o)
  x = jnp.asarray(rng.normal(size=(3, 10, 9, c)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, c, o)), jnp.float32)
  loss = lambda conv: (lambda w: jnp.sum(jnp.sin(conv(x, w))))
  got = jax.jit(jax.grad(loss(lambda x, w: dnnl.conv(x, w, strides, padding, 1))))(w)
  want = jax.grad(loss(lambda x, w: lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=DN)))(w)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
