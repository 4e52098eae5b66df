"""The sdl_synthetic builder: oracle against a plain reference, votes, splits, determinism."""

import math

import ml_collections
import numpy as np
import pytest

from sdl_jax import data
from sdl_jax.data import synthetic
from sdl_jax.emotions import MIKELS8


def reference_oracle(hue, brightness, shape):
  """The docstring's formula, one image and one emotion at a time."""
  sigma = {0: 1.6, 1: 1.1, 2: 0.8, 3: 0.55}[shape]
  z = []
  for j in range(8):
    w = MIKELS8.wheel[j]
    d = min(abs(w - 8 * hue), 8 - abs(w - 8 * hue))
    z.append(-d * d / (2 * sigma * sigma) + 1.5 * (2 * brightness - 1) * MIKELS8.polarity[j])
  e = [math.exp(v) for v in z]
  return [v / sum(e) for v in e]


def test_oracle_matches_reference():
  rng = np.random.default_rng(1)
  hue, bright = rng.uniform(0, 1, 50), rng.uniform(0, 1, 50)
  shape = rng.integers(0, 4, 50)
  got = synthetic.oracle_distribution(hue, bright, shape)
  want = np.array([reference_oracle(h, b, s) for h, b, s in zip(hue, bright, shape)])
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_oracle_follows_the_wheel_polarity_and_sharpness():
  # Hue at amusement's wheel position (0), neutral brightness: amusement dominates.
  o = synthetic.oracle_distribution([0.0], [0.5], [0])[0]
  assert np.argmax(o) == MIKELS8.index("amusement")
  # Brighter shifts mass to positive emotions.
  dark, bright = synthetic.oracle_distribution([3.5 / 8] * 2, [0.0, 1.0], [1, 1])
  pos = np.asarray(MIKELS8.polarity) > 0
  assert bright[pos].sum() > 0.9 > 0.1 > dark[pos].sum()
  # Triangles are sharper (lower entropy) than circles.
  circle, triangle = synthetic.oracle_distribution([0.3, 0.3], [0.5, 0.5], [0, 3])
  entropy = lambda p: -np.sum(p * np.log(p))
  assert entropy(triangle) < entropy(circle) - 0.5


def test_draw_is_deterministic_and_consistent():
  a = synthetic.draw(300, seed=3, image_size=16)
  b = synthetic.draw(300, seed=3, image_size=16)
  c = synthetic.draw(300, seed=4, image_size=16)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])
  assert a["image"].shape == (300, 16, 16, 3) and a["image"].dtype == np.uint8
  np.testing.assert_array_equal(a["votes"].sum(1), np.full(300, 11.0, np.float32))
  np.testing.assert_allclose(a["distribution"], a["votes"] / 11, rtol=1e-6)
  # Dominant vote, first index on ties.
  want = [int(np.flatnonzero(v == v.max())[0]) for v in a["votes"]]
  np.testing.assert_array_equal(a["label"], want)
  np.testing.assert_allclose(
      a["oracle"], synthetic.oracle_distribution(a["hue"], a["brightness"], a["shape"]),
      atol=1e-6)


def test_votes_are_drawn_from_the_oracle():
  d = synthetic.draw(4000, seed=0, image_size=8)
  # E[votes / 11] = oracle: the mean over 4000 images agrees to a few standard errors.
  diff = d["distribution"].mean(0) - d["oracle"].mean(0)
  assert np.max(np.abs(diff)) < 0.01
  # Real ambiguity: most images do not get a unanimous vote.
  assert np.mean(d["votes"].max(1) < 11) > 0.7


def test_hue_is_visible_in_the_image():
  import colorsys
  d = synthetic.draw(200, seed=0, image_size=32)
  img = d["image"].astype(float) / 255
  sat = img.max(-1) - img.min(-1)                                 # [N, S, S]
  for i in range(200):
    # The most saturated pixel lies on the shape (the background is grey).
    y, x = np.unravel_index(np.argmax(sat[i]), sat[i].shape)
    h = colorsys.rgb_to_hsv(*img[i, y, x])[0]
    diff = abs(h - d["hue"][i])
    assert min(diff, 1 - diff) < 0.03, (i, h, d["hue"][i])


def test_splits_are_80_5_15():
  assert synthetic.split_ranges(10_000) == {
      "train": (0, 8000), "validation": (8000, 8500), "test": (8500, 10_000)}
  r = synthetic.split_ranges(333)
  assert r["train"][0] == 0 and r["test"][1] == 333
  assert r["train"][1] == r["validation"][0] and r["validation"][1] == r["test"][0]


def test_builder_builds_a_reduced_set(tmp_path):
  cfg = ml_collections.ConfigDict({"name": "synthetic", "num_examples": 200, "seed": 5,
                                   "image_size": 16, "path": None})
  builder = data.get_builder(cfg, data_dir=str(tmp_path))
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert splits == {"train": 160, "validation": 10, "test": 30}
  assert builder.info.features["label"].names == list(MIKELS8.names)
  import tensorflow_datasets as tfds
  drawn = synthetic.draw(200, seed=5, image_size=16)
  examples = list(tfds.as_numpy(builder.as_dataset("test")))
  assert len(examples) == 30
  for ex in examples:
    i = int(ex["file_name"].decode().split(".")[0])
    assert 170 <= i < 200
    np.testing.assert_array_equal(ex["image"], drawn["image"][i])  # PNG is lossless
    np.testing.assert_array_equal(ex["votes"], drawn["votes"][i])
    np.testing.assert_allclose(ex["oracle"], drawn["oracle"][i])
    assert ex["label"] == drawn["label"][i]


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match="num_examples"):
    synthetic.draw(5)
  with pytest.raises(ValueError, match="image_size"):
    synthetic.draw(100, image_size=4)
