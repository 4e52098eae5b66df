"""Backbones: each flax model equals a PyTorch reference on the same random weights and
inputs (eval-mode BatchNorm, float32, max abs difference <= ``TOL`` x max |logit|), and the
model API (shapes, dtypes, the ``head`` group, parameter and MAC counts)."""

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl_jax import models, torch_layout
from sdl_jax.cpu import paths as cpu_paths
from sdl_jax.cpu.pool import max_pool_3x3_s2
from sdl_jax.models import table
from sdl_jax.models.efficientnet_lite import block_configs, round_filters
from sdl_jax.models.vgg import adaptive_avg_pool

HAS_TORCH = importlib.util.find_spec("torch") is not None
requires_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed (pip install 'sdl-jax[torch]')")
if HAS_TORCH:
  import torch
  from benchmarks.torch_models import make_torch_model, randomize_

NAMES = ["small_cnn", "vgg16", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
         "efficientnet_lite2"]
# Flax against PyTorch, relative to the largest logit. Measured on every case below
# (2026-12-06, epyc-zen4, commit 8dc0d43): at most 4.2e-7 on the CPU paths (1.5e-7
# absolute, ResNet-50 at 64 px) and 5.3e-7 on XLA's own layers (SDL_JAX_KERNELS=xla);
# 2e-6 leaves a margin of about 4x for other summation orders (other CPUs, oneDNN or XLA
# versions).
TOL = 2e-6
# The hand-written XLA:CPU layers against XLA's own, in train mode (below).
PATHS_TOL = 1e-4


def _compare_with_torch(name, size, batch=2, num_classes=10, seed=0, **kwargs):
  """Max |flax - torch| of the logits, with the torch model's weights converted."""
  torch.manual_seed(seed)
  tm = randomize_(make_torch_model(name, num_classes, **kwargs), seed).eval()
  variables = torch_layout.convert_state_dict(tm.state_dict(), name)
  x = np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    want = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  model = models.get_model(name, num_classes, **kwargs)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert got.dtype == jnp.float32 and got.shape == (batch, num_classes)
  # Outputs that vary across classes and images, so that a small difference means something.
  assert np.std(want) > 1e-3
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"{name} {size}x{size} {kwargs or ''}: max|flax - torch| = {diff:.2e} "
        f"(max|logit| {np.max(np.abs(want)):.3f})")
  # Relative to the logits' scale, which is small with PyTorch's default init.
  assert diff <= TOL * np.max(np.abs(want)), diff / np.max(np.abs(want))
  return diff


# Fast cases test the real layouts and converters at reduced width/depth or input size;
# the full-size networks follow, marked slow.
@requires_torch
@pytest.mark.parametrize("name,size,kwargs", [
    ("small_cnn", 32, {}),
    ("small_cnn", 33, dict(stem_stride=2, widths=(8, 16))),  # TF-style asymmetric padding
    ("vgg16", 32, dict(widths=(8, 8, 16, 16, 16), fc_width=32)),
    ("vgg16", 80, dict(widths=(8, 8, 16, 16, 16), fc_width=32)),  # 2x2 map pooled to 7x7
    ("resnet50", 33, dict(stage_sizes=(1, 1, 1, 1))),
])
def test_equals_torch_reference_small(name, size, kwargs):
  _compare_with_torch(name, size, **kwargs)


@requires_torch
@pytest.mark.slow
@pytest.mark.parametrize("name,size", [
    ("vgg16", 32),
    ("resnet50", 64),
    ("efficientnet_lite0", 64),
    ("efficientnet_lite1", 65),  # odd sizes: TF "SAME" pads bottom/right more
    ("efficientnet_lite2", 67),
])
def test_equals_torch_reference_full(name, size):
  _compare_with_torch(name, size, batch=1 if name == "vgg16" else 2)


@requires_torch
@pytest.mark.parametrize("paths", ["cpu", "xla"])
def test_resnet_train_mode_gradients_equal_torch(paths):
  """Train mode (batch statistics), end to end against PyTorch's autograd: the hand-written
  gradients of BatchNorm (+ ReLU, + residual), the max-pool and the strided convolutions
  (stem and stride-2 3x3) inside a reduced ResNet-50 (``paths='cpu'``), and XLA's own
  operations that GPU/TPU take (``'xla'``). In float64: in float32 the batch statistics of
  these tiny maps amplify rounding to ~0.5% in the stem's gradient, on either side."""
  jax.config.update("jax_enable_x64", True)
  try:
    torch.manual_seed(0)
    kwargs = dict(stage_sizes=(1, 1, 1, 1))
    tm = randomize_(make_torch_model("resnet50", 10, **kwargs), 0).train().double()
    variables = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64),
        torch_layout.convert_state_dict({k: v.float() for k, v in tm.state_dict().items()},
                                   "resnet50"))
    x = np.random.default_rng(0).normal(size=(3, 37, 37, 3))
    out = tm(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    torch.sin(out).sum().backward()
    model = models.get_model("resnet50", 10, dtype=jnp.float64, **kwargs)

    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
      return jnp.sum(jnp.sin(logits)), logits

    with cpu_paths.use(paths):
      (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
          variables["params"])
    want = out.detach().numpy()
    # The model returns float32 logits, so agreement is to float32's precision.
    np.testing.assert_allclose(logits, want, atol=1e-6 * np.abs(want).max())
    pairs = [(grads["conv1"]["kernel"], tm.conv1.weight.grad.permute(2, 3, 1, 0)),  # 7x7/2
             (grads["bn1"]["scale"], tm.bn1.weight.grad),  # under the max-pool
             (grads["layer2_0"]["conv2"]["kernel"],  # 3x3/2
              tm.layer2[0].conv2.weight.grad.permute(2, 3, 1, 0)),
             (grads["layer3_0"]["bn3"]["bias"], tm.layer3[0].bn3.bias.grad),  # + residual
             (grads["layer1_0"]["bn2"]["scale"], tm.layer1[0].bn2.weight.grad)]
    for got, ref in pairs:
      ref = ref.numpy()
      np.testing.assert_allclose(got, ref, atol=1e-6 * np.abs(ref).max())
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("name,size,kwargs", [
    ("small_cnn", 33, dict(stem_stride=2, widths=(8, 16))),  # its strided stem
    ("resnet50", 37, dict(stage_sizes=(1, 1, 1, 1))),
    pytest.param("efficientnet_lite0", 33, {}, marks=pytest.mark.slow),
])
def test_hand_paths_and_xla_paths_compute_the_same(name, size, kwargs):
  """The models' hand-written XLA:CPU layers (``cpu_paths.use('cpu')``) and XLA's own
  operations (``'xla'``, what GPU/TPU take) give the same train-mode logits, gradients and
  batch statistics (float32, to 1e-4 of the largest logit and gradient); and the switch
  changes the traced program. (ResNet-50's are also checked against PyTorch's in float64,
  above.)"""
  model = models.get_model(name, 10, **kwargs)
  x = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3)), train=False))(
      jax.random.PRNGKey(0))

  def make_loss():  # a new function per mode: JAX caches traces by function
    def loss(params):
      logits, state = model.apply({**variables, "params": params}, x, train=True,
                                  mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.PRNGKey(1)})
      return jnp.sum(jnp.sin(logits)), (logits, state)
    return loss

  out, programs = {}, {}
  for paths in ("cpu", "xla"):
    with cpu_paths.use(paths):
      out[paths] = jax.jit(jax.value_and_grad(make_loss(), has_aux=True))(
          variables["params"])
      programs[paths] = str(jax.make_jaxpr(make_loss())(variables["params"]))
  (_, (logits, state)), grads = out["cpu"]
  (_, (logits_x, state_x)), grads_x = out["xla"]
  # 1e-4 as against PyTorch: train-mode BatchNorm on tiny maps amplifies rounding.
  np.testing.assert_allclose(logits_x, logits, atol=PATHS_TOL * np.abs(logits).max())
  scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=PATHS_TOL * scale),
                         grads_x, grads)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=PATHS_TOL, atol=1e-6),
                         state_x, state)
  # Each model here has hand-written gradients on the CPU paths, fewer on XLA's (small_cnn
  # keeps its 2x2 max-pool's on both).
  assert programs["cpu"].count("custom_vjp_call") > programs["xla"].count("custom_vjp_call")


def _abstract_variables(model, size, batch=2):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((batch, size, size, 3)), train=False))


@pytest.mark.parametrize("name", ["small_cnn", "vgg16", "resnet50", "efficientnet_lite2"])
def test_bfloat16_compute_float32_params_and_logits(name):
  model = models.get_model(name, 7, dtype=jnp.bfloat16)
  size = models.get_spec(name).input_size
  variables = _abstract_variables(model, size)
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype("float32")}
  head = variables["params"][models.get_spec(name).head]
  assert head["kernel"].shape[-1] == 7 and head["bias"].shape == (7,)

  def train_step(v, x):
    return model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                       mutable=["batch_stats"])

  logits, updates = jax.eval_shape(train_step, variables,
                                   jax.ShapeDtypeStruct((2, size, size, 3), jnp.bfloat16))
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert set(updates) == ({"batch_stats"} if "batch_stats" in variables else set())


@pytest.mark.parametrize("name,expected", [
    ("vgg16", 138_357_544),        # torchvision's documented counts
    ("resnet50", 25_557_032),
])
def test_count_params_matches_published(name, expected):
  model = models.get_model(name, 1000)
  assert models.count_params(_abstract_variables(model, 224, batch=1)) == expected


@requires_torch
@pytest.mark.parametrize("name", ["small_cnn", "resnet50", "efficientnet_lite0",
                                  "efficientnet_lite1", "efficientnet_lite2"])
def test_count_params_matches_torch(name):
  tm = make_torch_model(name, 1000)
  model = models.get_model(name, 1000)
  size = models.get_spec(name).input_size
  want = sum(p.numel() for p in tm.parameters())
  assert models.count_params(_abstract_variables(model, size, batch=1)) == want


def test_count_params_ignores_batch_stats():
  v = {"params": {"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros(4)}},
       "batch_stats": {"m": jnp.zeros(100)}}
  assert models.count_params(v) == 10
  assert models.count_params(v["params"]) == 10


def test_specs_of_pretrained_backbones():
  for name, size in [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                     ("efficientnet_lite2", 260), ("vgg16", 224), ("resnet50", 224)]:
    spec = models.get_spec(name)
    assert spec.input_size == size and spec.head == "head"
  x = models.preprocess("efficientnet_lite0", np.array([[[0, 127, 255]]], np.uint8))
  np.testing.assert_allclose(x, [[[-127 / 128, 0.0, 1.0]]])
  x = models.preprocess("resnet50", np.full((1, 1, 3), 255.0))
  np.testing.assert_allclose(x, [[[(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                   (1 - 0.406) / 0.225]]], rtol=1e-6)


def test_vgg_dropout_only_in_training():
  model = models.get_model("vgg16", 3, widths=(4, 4, 4, 4, 4), fc_width=64)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  # Random values in the init's shapes: compiling flax's truncated-normal init costs
  # seconds per layer on XLA:CPU.
  rng = np.random.default_rng(1)
  v = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype),
                             _abstract_variables(model, 32))
  apply = jax.jit(lambda v, x, key, train: model.apply(v, x, train=train,
                                                       rngs={"dropout": key}),
                  static_argnums=3)
  a = apply(v, x, jax.random.PRNGKey(1), False)
  np.testing.assert_array_equal(a, apply(v, x, jax.random.PRNGKey(2), False))
  b = apply(v, x, jax.random.PRNGKey(1), True)
  c = apply(v, x, jax.random.PRNGKey(2), True)
  assert not np.allclose(b, c) and not np.allclose(a, b)


def test_vgg_rejects_too_small_images():
  model = models.get_model("vgg16", 3)
  with pytest.raises(ValueError, match="H, W >= 32"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 40, 3))))


def _adaptive_avg_pool_reference(x, size):
  """Loops over PyTorch's window definition."""
  n, h, w, c = x.shape
  out = np.zeros((n, size, size, c), np.float64)
  for i in range(size):
    h0, h1 = (i * h) // size, -(-((i + 1) * h) // size)
    for j in range(size):
      w0, w1 = (j * w) // size, -(-((j + 1) * w) // size)
      out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize("h,w", [(7, 7), (1, 1), (2, 3), (10, 9), (14, 14), (15, 20)])
def test_adaptive_avg_pool_equals_reference(h, w):
  x = np.random.default_rng(h * w).normal(size=(2, h, w, 3)).astype(np.float32)
  np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), 7),
                             _adaptive_avg_pool_reference(x, 7), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2), (1, 1, 2, 1)])
def test_max_pool_3x3_s2_equals_flax_max_pool(shape):
  x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
  ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(jax.jit(max_pool_3x3_s2)(x), jax.jit(ref)(x))
  g = jax.jit(jax.grad(lambda x: jnp.sum(max_pool_3x3_s2(x) ** 2)))(x)
  g_ref = jax.jit(jax.grad(lambda x: jnp.sum(ref(x) ** 2)))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6)


def _max_pool_3x3_s2_grad_reference(x, g):
  """NumPy: each window's cotangent to its first maximum (row-major), -inf padding."""
  n, h, w, c = x.shape
  ho, wo = g.shape[1:3]
  xp = np.pad(x, ((0, 0), (1, 2), (1, 2), (0, 0)), constant_values=-np.inf)
  dxp = np.zeros_like(xp)
  for i in range(ho):
    for j in range(wo):
      win = xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(n, 9, c)
      k = win.argmax(axis=1)  # the first maximum
      for a in range(n):
        for ch in range(c):
          dxp[a, 2 * i + k[a, ch] // 3, 2 * j + k[a, ch] % 3, ch] += g[a, i, j, ch]
  return dxp[:, 1:1 + h, 1:1 + w]


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2), (1, 6, 5, 2)])
def test_max_pool_3x3_s2_gradient_goes_to_the_first_maximum(shape):
  # Few distinct values (and zeros, as after a ReLU): windows with tied maxima everywhere.
  x = np.maximum(np.random.default_rng(4).integers(-2, 3, size=shape), 0).astype(np.float32)
  g = np.random.default_rng(5).normal(size=max_pool_3x3_s2(jnp.asarray(x)).shape)
  got = jax.jit(jax.vjp(max_pool_3x3_s2, jnp.asarray(x))[1])(jnp.asarray(g, jnp.float32))[0]
  np.testing.assert_allclose(got, _max_pool_3x3_s2_grad_reference(x, g), rtol=1e-6, atol=1e-6)


def test_efficientnet_lite_block_configs():
  # Widths rounded to multiples of 8 (TF's rule), e.g. 1.1 * 112 = 123.2 -> 120.
  assert [round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == \
      [16, 24, 48, 88, 120, 208, 352]
  for width, depth, n in [(1.0, 1.0, 16), (1.0, 1.1, 21), (1.1, 1.2, 21)]:
    blocks = block_configs(width, depth)
    assert len(blocks) == n
    assert blocks[0] == (3, 1, 1, 32, 16)  # fixed stem feeds the first block
    for (_, _, _, _, cout), (_, _, _, cin, _) in zip(blocks, blocks[1:]):
      assert cin == cout
    assert sum(s == 2 for _, s, _, _, _ in blocks) == 4  # 224 -> 7 with the stem


def test_count_macs_small_cnn_by_hand():
  widths, size, classes = (8, 16), 16, 5
  model = models.get_model("small_cnn", classes, widths=widths)
  want, cin, s = 0, 3, size
  for w in widths:
    want += s * s * 9 * cin * w + s * s * 9 * w * w
    cin, s = w, s // 2
  want += cin * classes
  assert table.count_macs(model, (1, size, size, 3), train=False) == want
  assert table.count_macs(model, (3, size, size, 3), train=False) == 3 * want


def test_table_row_and_markdown():
  rows = table.backbone_rows(["small_cnn"], num_classes=8)
  assert rows[0]["name"] == "small_cnn" and rows[0]["input_size"] == 64
  assert rows[0]["params"] == models.count_params(
      _abstract_variables(models.get_model("small_cnn", 8), 64))
  # XLA counts 2 FLOPs per multiply-add (minus products with padding) plus elementwise work.
  assert 1.5 * rows[0]["gmacs"] < rows[0]["gflops"] < 3 * rows[0]["gmacs"]
  assert "| small_cnn | 64 |" in table.markdown(rows)


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_log_probs_with_and_without_mirroring_against_numpy():
  model = models.get_model("small_cnn", 5, widths=(4, 8))
  x = jax.random.normal(jax.random.key(0), (3, 12, 10, 3))
  variables = model.init(jax.random.key(1), x)
  logits = np.asarray(model.apply(variables, x), np.float64)
  mirrored = np.asarray(model.apply(variables, np.asarray(x)[:, :, ::-1]), np.float64)
  assert not np.allclose(logits, mirrored)  # else the test could not tell them apart
  np.testing.assert_allclose(models.log_probs(model.apply, variables, x),
                             _np_log_softmax(logits), rtol=1e-5, atol=1e-5)
  ref = np.log(0.5 * np.exp(_np_log_softmax(logits)) + 0.5 * np.exp(_np_log_softmax(mirrored)))
  got = models.log_probs(model.apply, variables, x, flip=True)
  assert got.dtype == jnp.float32 and got.shape == (3, 5)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_log_probs_mirrored_stays_finite_where_softmax_underflows():
  # Image and mirror confidently disagree: each softmax has exact zeros in float32.
  def apply_fn(variables, x, train):
    del variables, train
    sign = jnp.where(x[:, 0, 0, 0] > 0, 1.0, -1.0)[:, None]
    return sign * jnp.array([[200.0, -200.0, 0.0]])

  x = jnp.zeros((1, 1, 2, 3)).at[0, 0, 0, 0].set(1.0)
  out = np.asarray(models.log_probs(apply_fn, None, x, flip=True))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(np.exp(out), [[0.5, 0.5, 0.0]], atol=1e-6)
  np.testing.assert_allclose(out[0, :2], np.log(0.5), rtol=1e-6)


def test_paths_mode_from_context_environment_and_config(monkeypatch):
  monkeypatch.delenv(cpu_paths.ENV, raising=False)
  monkeypatch.setattr(cpu_paths, "_configured", "auto")
  assert cpu_paths.mode() == "auto"
  assert cpu_paths.hand_paths() == (jax.default_backend() == "cpu")
  monkeypatch.setenv(cpu_paths.ENV, " XLA ")
  assert cpu_paths.mode() == "xla" and not cpu_paths.hand_paths()
  with cpu_paths.use("cpu"):
    assert cpu_paths.hand_paths()
    with cpu_paths.use("xla"):
      assert not cpu_paths.hand_paths()
    assert cpu_paths.mode() == "cpu"
  assert cpu_paths.mode() == "xla"
  monkeypatch.setenv(cpu_paths.ENV, "cuda")
  with pytest.raises(ValueError, match="SDL_JAX_KERNELS='cuda'"):
    cpu_paths.hand_paths()
  with pytest.raises(ValueError, match="must be one of auto, cpu, xla"):
    with cpu_paths.use("fast"):
      pass
  monkeypatch.delenv(cpu_paths.ENV)
  cpu_paths.set_default("xla")  # config.cpu.kernels: below the environment and use()
  assert cpu_paths.mode() == "xla" and not cpu_paths.hand_paths()
  monkeypatch.setenv(cpu_paths.ENV, "cpu")
  assert cpu_paths.hand_paths()
  with pytest.raises(ValueError, match="config.cpu.kernels='gpu'"):
    cpu_paths.set_default("gpu")


@pytest.mark.slow
def test_efficientnet_frozen_bn_trains_as_the_eval_forward_with_fixed_statistics():
  # A shallow, narrow Lite (one block a stage) compiles in a fraction of Lite0's time.
  kw = dict(dropout_rate=0.0, drop_connect_rate=0.0, width=0.25, depth=0.1)
  frozen = models.get_model("efficientnet_lite0", 3, frozen_bn=True, **kw)
  plain = models.get_model("efficientnet_lite0", 3, **kw)
  rng = np.random.default_rng(0)
  v = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype),
                             _abstract_variables(plain, 32))
  v["batch_stats"] = jax.tree_util.tree_map(jnp.abs, v["batch_stats"])  # variances > 0
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)

  def train_forward(model, params):
    return model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])

  eval_logits = plain.apply(v, x, train=False)
  logits, updates = train_forward(frozen, v["params"])
  np.testing.assert_allclose(logits, eval_logits, rtol=1e-5, atol=1e-6)
  # The running statistics come back as they went in.
  jax.tree_util.tree_map(np.testing.assert_array_equal, updates["batch_stats"],
                         v["batch_stats"])
  plain_logits, plain_updates = train_forward(plain, v["params"])
  assert not np.allclose(plain_logits, eval_logits, atol=1e-3)  # batch statistics differ
  moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: bool(np.any(a != b)), plain_updates["batch_stats"], v["batch_stats"]))
  assert all(moved)
  # BatchNorm's scale and bias still learn.
  grads = jax.grad(lambda p: train_forward(frozen, p)[0].sum())(v["params"])
  assert float(jnp.abs(grads["stem_bn"]["scale"]).max()) > 0
  assert float(jnp.abs(grads["block3"]["dw_bn"]["bias"]).max()) > 0


def test_unknown_model_setting_is_named():
  with pytest.raises(ValueError, match=r"model 'resnet50' has no setting 'frozen_bn' "
                                       r"\(config.model_kwargs\); its settings: "):
    models.get_model("resnet50", 3, frozen_bn=True)
