"""Linear probe: features stop at the head, are cached once, the head trains and tests."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from sdl_jax import metrics as metrics_lib
from sdl_jax import models
from sdl_jax import probe

from workdir_fixture import sdl_configs

HEADER = "images-name Amusement Awe Contentment Excitement Anger Disgust Fear Sadness "


def _hand_made_flickr(root, n=96):
  """A Flickr_LDL-format folder whose images say their emotion: odd images are bright
  red with most votes on amusement, even ones dark blue with most votes on sadness."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "images"))
  lines = [HEADER]
  for i in range(1, n + 1):
    positive = i % 2 == 1
    base = np.array([220, 60, 40] if positive else [30, 40, 150], np.float64)
    pixels = np.clip(base + rng.normal(0, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, "images", f"{i}.jpg"), quality=95)
    votes = np.zeros(8, int)
    votes[0 if positive else 7] = 6 + i % 3
    votes[(1 if positive else 6)] = 3
    votes[(i * 5) % 8] += 2
    lines.append(f"{i}.jpg " + " ".join(map(str, votes)) + " ")
  with open(os.path.join(root, "ground_truth.txt"), "w", newline="\r\n") as f:
    f.write("\n".join(lines) + "\n")
  return root


def _config(root, cache_dir):
  c = sdl_configs().get_config("flickr_ldl")
  c.data.path = str(root)
  c.data.cache_dir = str(cache_dir)
  c.model = "small_cnn"
  c.pretrained = None
  c.model_kwargs = {"widths": (8, 16), "dropout_rate": 0.5, "stem_stride": 1}
  c.image_size, c.resize_size = 16, 18
  c.batch_size = 16
  c.probe = True
  c.probe_steps = 300
  c.probe_weight_decays = (1e-3, 1e-1)
  return c


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory):
  """The probe run twice in one workdir; the second must read every feature file."""
  tmp = tmp_path_factory.mktemp("probe")
  config = _config(_hand_made_flickr(str(tmp / "Flickr_LDL")), tmp / "tfds")
  workdir = str(tmp / "work")
  first = probe.probe_and_evaluate(config, workdir)
  real_extract = probe.extract_features

  def no_extraction(*args, **kwargs):
    raise AssertionError("features were computed again")

  probe.extract_features = no_extraction
  try:
    second = probe.probe_and_evaluate(config, workdir)
  finally:
    probe.extract_features = real_extract
  return first, second, workdir, config


def test_features_cached_once(probe_runs):
  first, second, workdir, _ = probe_runs
  assert first["probe"]["feature_splits_computed"] == 3
  assert second["probe"]["feature_splits_computed"] == 0
  assert sorted(os.listdir(os.path.join(workdir, "features"))) == [
      "test.npz", "train.npz", "validation.npz"]
  for m in ("accuracy", "kl"):
    assert second["test"][m] == pytest.approx(first["test"][m], rel=1e-6)
  with np.load(os.path.join(workdir, "features", "train.npz")) as f:
    assert f["features"].shape[1] == 16  # the pooled width of the last stage
    assert f["features"].shape[0] == f["label"].shape[0] == f["distribution"].shape[0]
  with np.load(os.path.join(workdir, "features", "test.npz")) as f:
    assert f["label"].shape[0] == first["test"]["count"]


def test_head_trains_and_beats_uniform(probe_runs):
  results = probe_runs[0]
  for row in results["probe"]["grid"]:
    assert row["objective_last"] < 0.8 * row["objective_first"]
  test, uniform = results["test"], results["baselines"]["uniform"]
  assert test["kl"] < uniform["kl"]
  assert test["accuracy"] > uniform["accuracy"]
  assert results["probe"]["weight_decay"] in (1e-3, 1e-1)


def test_results_keys_match_training(probe_runs):
  results, _, workdir, _ = probe_runs
  on_disk = json.loads(open(os.path.join(workdir, "results.json")).read())
  assert on_disk["method"] == "probe"
  for key in ("name", "model", "data", "lam", "best_metric", "best_step", "test",
              "baselines", "validation_best", "wall_time_s"):
    assert key in on_disk, key
  assert set(on_disk["test"]) >= {"count", "accuracy", "loss",
                                  *metrics_lib.ALL_MEASURES}
  assert set(on_disk["baselines"]) >= {"uniform", "train_mean"}
  assert on_disk["lam"] == 0.8 and on_disk["split_seed"] == 0
  report = open(os.path.join(workdir, "report.md")).read()
  assert "linear probe" in report and "training set's mean distribution" in report
  assert json.load(open(os.path.join(workdir, "config.json")))["probe"] is True


def test_training_entry_point_dispatches_to_the_probe(probe_runs, tmp_path):
  from sdl_jax import train  # pylint: disable=g-import-not-at-top
  first, _, workdir, config = probe_runs
  config = config.copy_and_resolve_references()
  config.probe_feature_dir = os.path.join(workdir, "features")
  results = train.train_and_evaluate(config, str(tmp_path / "via_train"))
  assert results["method"] == "probe"
  assert results["probe"]["feature_splits_computed"] == 0  # the shared cache was read
  assert results["test"]["kl"] == pytest.approx(first["test"]["kl"], rel=1e-6)
  assert (tmp_path / "via_train" / "results.json").exists()
  assert not (tmp_path / "via_train" / "checkpoints").exists()


def test_a_probe_refuses_a_workdir_in_use_and_releases_its_own(probe_runs, tmp_path):
  from sdl_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  _, _, workdir, config = probe_runs
  config = config.copy_and_resolve_references()
  config.probe_feature_dir = os.path.join(workdir, "features")
  target = tmp_path / "busy"
  target.mkdir()
  with workdir_lock.WorkdirLock(str(target), "training"):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"in use by process {os.getpid()}"):
      probe.probe_and_evaluate(config, str(target))
  assert not (target / "results.json").exists()
  probe.probe_and_evaluate(config, str(target))  # free again: runs, and lets go
  assert (target / "results.json").exists()
  assert (target / workdir_lock.LOCK_FILE).read_text() == ""


def test_mirrored_features_are_added_beside_the_cached_ones(probe_runs, tmp_path):
  _, _, workdir, config = probe_runs
  config = config.copy_and_resolve_references()
  feature_dir = tmp_path / "features"
  feature_dir.mkdir()
  for split in ("train", "validation", "test"):  # the centre crops, already computed
    shutil.copy(os.path.join(workdir, "features", f"{split}.npz"), feature_dir)
  config.probe_feature_dir = str(feature_dir)
  config.probe_flip = True
  results = probe.probe_and_evaluate(config, str(tmp_path / "flip"))
  assert results["probe"]["mirrored"] is True
  assert results["probe"]["feature_splits_computed"] == 3  # the mirrored ones only
  with np.load(feature_dir / "test.npz") as centre, \
       np.load(feature_dir / "test_mirrored.npz") as mirrored:
    np.testing.assert_array_equal(centre["label"], mirrored["label"])
    assert centre["features"].shape == mirrored["features"].shape
    assert not np.allclose(centre["features"], mirrored["features"])
  assert results["test"]["kl"] < results["baselines"]["uniform"]["kl"]


def test_features_are_the_heads_input():
  model = models.get_model("small_cnn", 5, widths=(4, 8), dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  feats = probe.feature_apply(model.apply, "head")(variables, x)
  assert feats.shape == (3, 8)
  head = variables["params"]["head"]
  want = model.apply(variables, x, train=False)
  np.testing.assert_allclose(feats @ head["kernel"] + head["bias"], want, rtol=1e-5,
                             atol=1e-5)


def test_standardizer_against_numpy():
  rng = np.random.default_rng(0)
  f = rng.normal(3.0, 2.0, (50, 4)).astype(np.float32)
  f[:, 2] = 7.0  # a constant dimension
  mu, sigma = probe.standardizer(f)
  np.testing.assert_allclose(mu, f.mean(0), rtol=1e-5)
  np.testing.assert_allclose(sigma[[0, 1, 3]], f.std(0)[[0, 1, 3]], rtol=1e-5)
  assert sigma[2] == 1.0


def _np_objective_and_grad(w, b, z, y, l, lam, wd):
  """The probe's objective and its gradient, written out: softmax cross-entropy to
  ``(1 - lam) onehot(y) + lam l``, plus ``wd / 2 ||w||^2``."""
  a = z @ w + b
  a = a - a.max(1, keepdims=True)
  p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
  t = (1 - lam) * np.eye(w.shape[1])[y] + lam * l
  n = len(z)
  value = -np.sum(t * np.log(p)) / n + 0.5 * wd * np.sum(w**2)
  g = (p * t.sum(1, keepdims=True) - t) / n
  return value, z.T @ g + wd * w, g.sum(0)


def test_objective_and_fitted_head_against_numpy():
  rng = np.random.default_rng(1)
  n, f, c = 60, 5, 4
  z = rng.normal(size=(n, f)).astype(np.float32)
  l = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
  y = l.argmax(1).astype(np.int32)
  lam, wd = 0.8, 0.05
  w = rng.normal(size=(f, c)).astype(np.float32)
  b = rng.normal(size=(c,)).astype(np.float32)
  got = probe.objective({"w": w, "b": b}, z, y, l, lam, wd)
  want, _, _ = _np_objective_and_grad(w.astype(np.float64), b.astype(np.float64), z, y, l,
                                      lam, wd)
  assert float(got) == pytest.approx(want, rel=1e-5)
  head, trace = probe.fit_head(z, y, l, lam, wd, 0.05, steps=2000)
  trace = np.asarray(trace)
  assert trace[-1] < trace[0]
  # Strongly convex (wd > 0): at the minimum the gradient vanishes.
  value, gw, gb = _np_objective_and_grad(np.asarray(head["w"], np.float64),
                                         np.asarray(head["b"], np.float64), z, y, l, lam, wd)
  assert np.abs(gw).max() < 1e-3 and np.abs(gb).max() < 1e-3
  assert value == pytest.approx(float(trace[-1]), rel=1e-4)
  # The zero start is the uniform prediction: the first value is ln C.
  assert float(trace[0]) == pytest.approx(np.log(c), rel=1e-5)


def test_heads_fitted_together_equal_heads_fitted_alone():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(40, 6)).astype(np.float32)
  l = rng.dirichlet(np.ones(3), size=40).astype(np.float32)
  y = l.argmax(1).astype(np.int32)
  decays = np.array([1e-3, 0.1, 3.0], np.float32)
  heads, traces = probe.fit_heads(z, y, l, 0.5, decays, 0.05, steps=200)
  for k, wd in enumerate(decays):
    head, trace = probe.fit_head(z, y, l, 0.5, wd, 0.05, steps=200)
    np.testing.assert_allclose(heads["w"][k], head["w"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(traces[k], trace, rtol=1e-5)
  # More weight decay, smaller weights.
  norms = [float(np.sum(np.asarray(heads["w"][k])**2)) for k in range(3)]
  assert norms[0] > norms[1] > norms[2]


def test_mirrored_views_average_the_distributions():
  rng = np.random.default_rng(2)
  head = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
  views = rng.normal(size=(2, 5, 3)).astype(np.float32)
  soft = lambda a: np.exp(a) / np.exp(a).sum(1, keepdims=True)
  want = (soft(views[0] @ head["w"]) + soft(views[1] @ head["w"])) / 2
  np.testing.assert_allclose(probe.predict(head, views), want, rtol=1e-5)


def test_head_for_raw_features_matches_standardised_head():
  rng = np.random.default_rng(1)
  h = rng.normal(3.0, 2.0, (7, 5)).astype(np.float32)
  mu, sigma = h.mean(0), h.std(0) + 0.5
  head = {"w": rng.normal(size=(5, 4)).astype(np.float32),
          "b": rng.normal(size=(4,)).astype(np.float32)}
  dense = probe.head_for_raw_features(head, mu, sigma)
  want = ((h - mu) / sigma) @ head["w"] + head["b"]
  np.testing.assert_allclose(h @ dense["kernel"] + dense["bias"], want, rtol=1e-5, atol=1e-5)


def test_head_from_probe_gives_the_probes_logits(tmp_path):
  """LP-FT's start: the model with the probe's head predicts, in inference mode, what the
  probe's head predicts on the cached features of the same images."""
  from sdl_jax import run_io, train_state
  from sdl_jax.data import pipeline
  config = _config(_hand_made_flickr(str(tmp_path / "Flickr_LDL"), n=48), tmp_path / "tfds")
  config.probe = False
  config.head_init = "probe"
  builder = run_io.load_data(config, str(tmp_path / "work"))
  model = train_state.create_model(config, 8)
  state = train_state.create_train_state(train_state.prng_key(0), config, model,
                                         config.image_size, lambda step: 0.0)
  before = np.asarray(state.params["head"]["kernel"])
  state = train_state.head_from_probe(state, config, builder, model, str(tmp_path / "work"))
  assert not np.allclose(before, state.params["head"]["kernel"])
  assert sorted(os.listdir(tmp_path / "work" / "features")) == [
      "test.npz", "train.npz", "validation.npz"]
  ds, _, _ = pipeline.eval_dataset(builder, config, "test", process_index=0,
                                   process_count=1, local_device_count=1)
  batch = next(iter(pipeline.as_numpy(ds)))
  keep = batch["mask"][0] > 0
  logits = np.asarray(model.apply(train_state.model_variables(state), batch["image"][0],
                                  train=False))[keep]
  with np.load(tmp_path / "work" / "features" / "test.npz") as f:
    feats = f["features"][:keep.sum()]
  dense = state.params["head"]
  np.testing.assert_allclose(logits, feats @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]),
                             rtol=1e-4, atol=1e-4)
  # and the probe's head is better than the random one it replaced on these images
  dist = batch["distribution"][0][keep]
  kl = lambda p: float(np.mean(metrics_lib.ldl_measures(dist, p)["kl"]))  # noqa: E731
  assert kl(jax.nn.softmax(logits)) < kl(np.full_like(dist, 1 / 8))


def test_head_init_is_validated(tmp_path):
  from sdl_jax import validation
  config = _config(str(tmp_path), tmp_path / "tfds")
  config.head_init = "zeros"
  with pytest.raises(ValueError, match="config.head_init"):
    validation.validate_config(config)
