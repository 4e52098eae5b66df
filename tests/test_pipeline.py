"""The tf.data pipeline: shapes, dtypes, determinism, resume, sharding, padding, masks."""

import io

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from sdl_jax import data
from sdl_jax import metrics
from sdl_jax.data import pipeline


def _config(**overrides):
  c = ml_collections.ConfigDict({
      "seed": 0, "batch_size": 8, "eval_batch_size": None, "image_size": 16,
      "resize_size": 20, "crop": "random", "flip": True, "cache": True,
      "shuffle_buffer": 1000, "model": "small_cnn"})
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  cfg = ml_collections.ConfigDict({"name": "synthetic", "num_examples": 250, "seed": 1,
                                   "image_size": 16, "path": None})
  return data.get_builder(cfg, data_dir=str(tmp_path_factory.mktemp("tfds")))


def _take(ds, n):
  it = pipeline.as_numpy(ds)
  return [next(it) for _ in range(n)]


def test_train_batches_shapes_dtypes_masks(builder):
  ds, steps_per_epoch = pipeline.train_dataset(
      builder, _config(), process_index=0, process_count=1, local_device_count=2)
  assert steps_per_epoch == 200 // 8
  b = _take(ds, 1)[0]
  assert b["image"].shape == (2, 4, 16, 16, 3) and b["image"].dtype == np.float32
  assert b["label"].shape == (2, 4) and b["label"].dtype == np.int32
  assert b["distribution"].shape == (2, 4, 8) and b["distribution"].dtype == np.float32
  np.testing.assert_array_equal(b["mask"], np.ones((2, 4), np.float32))
  # small_cnn normalises [0, 255] to [-1, 1].
  assert -1.0 - 1e-6 <= b["image"].min() and b["image"].max() <= 1.0 + 1e-6
  np.testing.assert_allclose(b["distribution"].sum(-1), 1.0, rtol=1e-6)


def test_train_stream_is_deterministic_and_resumes_exactly(builder):
  cfg = _config()
  steps = 25  # one epoch is 25 steps: cross an epoch boundary
  a = _take(pipeline.train_dataset(builder, cfg, process_index=0, process_count=1,
                                   local_device_count=1)[0], steps + 5)
  b = _take(pipeline.train_dataset(builder, cfg, process_index=0, process_count=1,
                                   local_device_count=1)[0], steps + 5)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for start in (7, steps, steps + 3):
    r = _take(pipeline.train_dataset(builder, cfg, start_step=start, process_index=0,
                                     process_count=1, local_device_count=1)[0], 2)
    for k in r[0]:
      np.testing.assert_array_equal(r[0][k], a[start][k])
      np.testing.assert_array_equal(r[1][k], a[start + 1][k])
  # Epochs are reshuffled, and another seed gives another stream.
  assert not np.array_equal(a[0]["label"], a[steps]["label"])
  c = _take(pipeline.train_dataset(builder, _config(seed=1), process_index=0,
                                   process_count=1, local_device_count=1)[0], 1)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_one_epoch_is_a_permutation_of_the_shard(builder):
  cfg = _config(flip=False, resize_size=16)
  ds, spe = pipeline.train_dataset(builder, cfg, process_index=0, process_count=1,
                                   local_device_count=1)
  seen = np.concatenate([b["distribution"].reshape(-1, 8) for b in _take(ds, spe)])
  full = pipeline.read_targets(builder, "train")["distribution"]
  assert len(seen) == spe * 8 == 200
  # Every row appears once (sort rows to compare as multisets).
  key = lambda x: np.lexsort(np.round(x, 5).T[::-1])
  np.testing.assert_allclose(seen[key(seen)], full[key(full)])


def test_processes_read_disjoint_shards(builder):
  cfg = _config(batch_size=8)
  rows = []
  for pi in range(2):
    ds, spe = pipeline.train_dataset(builder, cfg, process_index=pi, process_count=2,
                                     local_device_count=2)
    assert spe == 100 // 4
    batches = _take(ds, spe)
    assert batches[0]["image"].shape == (2, 2, 16, 16, 3)
    rows.append(np.concatenate([b["distribution"].reshape(-1, 8) for b in batches]))
  full = pipeline.read_targets(builder, "train")["distribution"]
  both = np.concatenate(rows)
  key = lambda x: np.lexsort(np.round(x, 5).T[::-1])
  np.testing.assert_allclose(both[key(both)], full[key(full)])


def test_eval_pads_and_masks(builder):
  cfg = _config(eval_batch_size=12)
  for pc in (1, 2, 3):
    total_mask = 0
    for pi in range(pc):
      ds, steps, n = pipeline.eval_dataset(builder, cfg, "test", process_index=pi,
                                           process_count=pc, local_device_count=2)
      assert n == 38
      batches = list(pipeline.as_numpy(ds))
      assert len(batches) == steps  # the same on every process
      for b in batches:
        assert b["image"].shape == (2, 12 // pc // 2, 16, 16, 3)
        pad = b["mask"] == 0
        assert np.all(b["label"][pad] == -1)
        assert np.all(b["distribution"][pad] == 0) and np.all(b["image"][pad] == 0)
        assert np.all(b["label"][~pad] >= 0)
        total_mask += b["mask"].sum()
    assert total_mask == 38


def _reference_predictions(images01):
  """A fixed prediction that depends on the image: softmax(W mean_rgb)."""
  w = np.linspace(-2, 2, 24).reshape(3, 8)
  z = images01.mean(axis=(1, 2)) @ w * 3
  z = z - z.max(1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def test_metrics_over_padded_sharded_batches_equal_numpy_over_the_split(builder):
  # resize_size = image_size = the stored size: evaluation sees the stored pixels.
  cfg = _config(eval_batch_size=12, image_size=16, resize_size=16)
  sums = None
  for pi in range(3):
    ds, _, _ = pipeline.eval_dataset(builder, cfg, "test", process_index=pi, process_count=3,
                                     local_device_count=2)
    for b in pipeline.as_numpy(ds):
      for d in range(2):
        probs = _reference_predictions(b["image"][d])
        sums = metrics.merge(sums, metrics.batch_sums(
            jnp.asarray(probs), b["label"][d], b["distribution"][d], b["mask"][d]))
  got = metrics.finalize(sums)

  # NumPy over the whole split, images decoded with PIL.
  import tensorflow_datasets as tfds
  ds = builder.as_dataset("test", decoders={"image": tfds.decode.SkipDecoding()})
  images, labels, dists = [], [], []
  for ex in tfds.as_numpy(ds):
    images.append(np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB"), np.float64))
    labels.append(ex["label"])
    dists.append(ex["distribution"])
  x = (np.stack(images) - 127.5) / 127.5
  p, l = _reference_predictions(x), np.stack(dists).astype(np.float64)
  kl = np.sum(np.where(l > 0, l * np.log(np.where(l > 0, l, 1) / p), 0), 1).mean()
  cheb = np.abs(l - p).max(1).mean()
  inter = np.minimum(l, p).sum(1).mean()
  acc = np.mean(p.argmax(1) == np.asarray(labels))
  assert got["count"] == len(labels) == 38
  np.testing.assert_allclose(got["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(got["chebyshev"], cheb, rtol=1e-5)
  np.testing.assert_allclose(got["intersection"], inter, rtol=1e-5)
  np.testing.assert_allclose(got["accuracy"], acc)


def test_decode_turns_grey_into_three_equal_channels():
  grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
  buf = io.BytesIO()
  Image.fromarray(grey, mode="L").save(buf, format="PNG")
  img = pipeline.decode(buf.getvalue()).numpy()
  assert img.shape == (8, 8, 3)
  for c in range(3):
    np.testing.assert_array_equal(img[..., c], grey)


def test_crops_and_flip():
  import tensorflow as tf
  image = tf.constant(np.random.default_rng(0).integers(0, 255, (40, 30, 3)), tf.uint8)
  seed = tf.constant([1, 2], tf.int64)
  for crop in ("random", "random_resized"):
    out = pipeline.train_transform(image, seed, image_size=24, resize_size=28, crop=crop,
                                   flip=True)
    assert out.shape == (24, 24, 3) and out.dtype == tf.float32
    again = pipeline.train_transform(image, seed, image_size=24, resize_size=28, crop=crop,
                                     flip=True)
    np.testing.assert_array_equal(out.numpy(), again.numpy())
  # Without crop or flip the transform is a plain resize; eval takes the centre.
  plain = pipeline.train_transform(image, seed, image_size=28, resize_size=28,
                                   crop="random", flip=False)
  centre = pipeline.eval_transform(image, image_size=24, resize_size=28)
  np.testing.assert_allclose(centre.numpy(), plain.numpy()[2:26, 2:26], rtol=1e-6)
  # Flip: over seeds, some outputs are the mirror of the unflipped crop.
  flips = 0
  for s in range(8):
    a = pipeline.train_transform(image, tf.constant([s, 0], tf.int64), image_size=28,
                                 resize_size=28, crop="random", flip=True).numpy()
    flips += int(np.array_equal(a, plain.numpy()[:, ::-1]))
  assert 0 < flips < 8
  with pytest.raises(ValueError, match="config.crop"):
    pipeline.train_transform(image, seed, image_size=24, resize_size=28, crop="centre",
                             flip=False)


def test_batch_must_divide_over_devices():
  with pytest.raises(ValueError, match=r"config.batch_size=30 .* 4 local device"):
    pipeline.per_process_batch(30, 1, 4)
  assert pipeline.per_process_batch(32, 2, 4) == 16
