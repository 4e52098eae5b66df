"""Targets: votes -> distributions, dominant labels, single-label strategies, taxonomies."""

import math

import numpy as np
import pytest

from sdl_jax import distributions as D
from sdl_jax.emotions import EMOTION6, FERPLUS, MIKELS8, Taxonomy, get_taxonomy


def test_taxonomy_orders_are_the_publishers():
  assert MIKELS8.names == ("amusement", "awe", "contentment", "excitement",
                           "anger", "disgust", "fear", "sadness")
  assert EMOTION6.names == ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")
  assert FERPLUS.names == ("neutral", "happiness", "surprise", "sadness",
                           "anger", "disgust", "fear", "contempt")
  assert get_taxonomy("Mikels8") is MIKELS8
  with pytest.raises(ValueError, match="unknown taxonomy"):
    get_taxonomy("plutchik")
  with pytest.raises(ValueError, match="not an emotion"):
    MIKELS8.index("joy")


def test_mikels_wheel_goes_round_in_the_stated_order():
  around = ["amusement", "contentment", "awe", "excitement", "fear", "sadness", "disgust", "anger"]
  for pos, name in enumerate(around):
    assert MIKELS8.wheel[MIKELS8.index(name)] == pos
  d = MIKELS8.wheel_distances()
  assert d[MIKELS8.index("amusement"), MIKELS8.index("anger")] == 1  # neighbours round the wheel
  assert d[MIKELS8.index("amusement"), MIKELS8.index("fear")] == 4   # opposite
  assert (d == d.T).all() and (np.diag(d) == 0).all() and d.max() == 4


def test_taxonomy_validation():
  with pytest.raises(ValueError, match="duplicate"):
    Taxonomy("x", ("a", "a"))
  with pytest.raises(ValueError, match="permutation"):
    Taxonomy("x", ("a", "b"), wheel=(0, 0))
  with pytest.raises(ValueError, match="no emotion wheel"):
    EMOTION6.wheel_distances()


def test_paper_vote_example():
  # 11 annotators voting 5, 3, 3.
  votes = np.array([[5, 3, 3, 0, 0, 0, 0, 0]])
  l = D.from_votes(votes)
  np.testing.assert_allclose(l[0], [5 / 11, 3 / 11, 3 / 11, 0, 0, 0, 0, 0], rtol=1e-6)
  assert l.dtype == np.float32
  assert D.dominant_label(l).tolist() == [0]


def test_dominant_label_first_index_on_ties():
  assert D.dominant_label(np.array([[0, 3, 3, 1], [2, 2, 2, 2]])).tolist() == [1, 0]


@pytest.mark.parametrize("row,msg", [([1, 0, 0], None), ([0, 0, 0], "row 1 has a zero total"),
                                     ([1, -1, 2], "row 1 has a negative"),
                                     ([1, np.nan, 0], "row 1 has a non-finite"),
                                     ([np.inf, 0, 0], "row 1 has a non-finite")])
def test_from_votes_rejects_bad_rows_naming_them(row, msg):
  votes = np.array([[1.0, 2.0, 3.0], row])
  if msg is None:
    assert D.from_votes(votes).shape == (2, 3)
  else:
    with pytest.raises(ValueError, match=msg):
      D.from_votes(votes)


def _implication_by_hand(mu, sigma, eps, distance="wheel"):
  """Written from the paper's formula with explicit loops over the wheel or the index."""
  c = 8
  pos = MIKELS8.wheel if distance == "wheel" else range(c)
  w = []
  for i in range(c):
    diff = abs(pos[i] - pos[mu])
    dist = min(diff, c - diff) if distance == "wheel" else diff
    w.append(1 / math.sqrt(2 * math.pi * sigma) * math.exp(-dist**2 / (2 * sigma**2)) + eps / c)
  s = sum(w)
  return [x / s for x in w]


@pytest.mark.parametrize("distance", ["wheel", "index"])
@pytest.mark.parametrize("sigma,eps", [(1.0, 0.1), (0.5, 0.0), (2.0, 0.3), (0.45, 0.0)])
def test_implication_matches_formula(sigma, eps, distance):
  labels = np.arange(8)
  got = D.implication(labels, MIKELS8, sigma, eps, distance)
  for mu in range(8):
    # atol: far tails fall below float32's normal range (1e-38) and lose digits.
    np.testing.assert_allclose(got[mu], _implication_by_hand(mu, sigma, eps, distance),
                               rtol=1e-6, atol=1e-12)
  assert (got.argmax(1) == labels).all()
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)


def test_implication_is_symmetric_on_the_wheel():
  got = D.implication(np.arange(8), MIKELS8)
  # Symmetric about the peak on the wheel: both wheel neighbours get the same mass.
  awe = MIKELS8.index("awe")
  np.testing.assert_allclose(got[awe, MIKELS8.index("contentment")],
                             got[awe, MIKELS8.index("excitement")], rtol=1e-6)


def test_exclusion_is_uniform_on_the_dominant_polarity():
  got = D.exclusion(np.array([MIKELS8.index("fear"), MIKELS8.index("awe")]), MIKELS8)
  np.testing.assert_allclose(got[0], [0, 0, 0, 0, .25, .25, .25, .25])
  np.testing.assert_allclose(got[1], [.25, .25, .25, .25, 0, 0, 0, 0])


def test_combined_is_gaussian_inside_polarity():
  labels = np.arange(8)
  got = D.combined(labels, MIKELS8, 1.0, 0.1)
  imp = D.implication(labels, MIKELS8, 1.0, 0.1)
  same = MIKELS8.same_polarity()[labels]
  assert (got[~same] == 0).all()
  want = imp * same
  want /= want.sum(1, keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert (got.argmax(1) == labels).all()
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)


def _released_by_hand(label, sigma, ee):
  """The authors' commented-out Gaussian (softmax_my_kl_loss_layer.cpp), loop for loop.

  m_pro[i][j] = 1 / (sqrt(2 pi) sigma) exp(-(j - i)^2 / (2 sigma^2)), then ee on the other
  polarity (j > 3 for i < 4, j < 4 for i >= 4), then each row divided by its sum.
  """
  row = []
  for j in range(8):
    value = 1.0 / (math.sqrt(2 * math.pi) * sigma) * math.exp(
        -1 * (j - label) * (j - label) / (2 * sigma * sigma))
    if (label < 4 and j > 3) or (label >= 4 and j < 4):
      value = ee
    row.append(value)
  total = sum(row)
  return [v / total for v in row]


def test_released_settings_reproduce_the_authors_gaussian():
  labels = np.arange(8)
  got = D.from_single_label(labels, MIKELS8, "combined", D.RELEASED_SIGMA, D.RELEASED_EPS,
                            D.RELEASED_DISTANCE)
  assert (D.RELEASED_DISTANCE, D.RELEASED_SIGMA, D.RELEASED_EPS) == ("index", 0.45, 0.0)
  for label in range(8):
    np.testing.assert_allclose(got[label], _released_by_hand(label, 0.45, 0.0), rtol=1e-6,
                               atol=1e-12)
  # The narrow Gaussian puts most of the mass on the label: exp(-1 / (2 * 0.45^2)) = 0.085
  # of the peak on each index neighbour.
  awe = MIKELS8.index("awe")
  assert got[awe, awe] > 0.8
  np.testing.assert_allclose(got[awe, MIKELS8.index("amusement")] / got[awe, awe],
                             math.exp(-1 / (2 * 0.45**2)), rtol=1e-5)


def test_index_and_wheel_distances_differ_on_mikels8():
  index = D.emotion_distances(MIKELS8, "index")
  wheel = D.emotion_distances(MIKELS8, "wheel")
  np.testing.assert_array_equal(index, np.abs(np.subtract.outer(np.arange(8), np.arange(8))))
  np.testing.assert_array_equal(wheel, MIKELS8.wheel_distances())
  amusement, awe = MIKELS8.index("amusement"), MIKELS8.index("awe")
  assert index[amusement, awe] == 1 and wheel[amusement, awe] == 2
  # So the targets differ too: by index, awe is amusement's nearest neighbour.
  by_index = D.implication(np.array([amusement]), MIKELS8, 1.0, 0.0, "index")[0]
  by_wheel = D.implication(np.array([amusement]), MIKELS8, 1.0, 0.0, "wheel")[0]
  assert by_index[awe] > by_wheel[awe]


def test_index_distance_needs_no_wheel():
  got = D.combined(np.array([EMOTION6.index("fear")]), EMOTION6, 1.0, 0.0, "index")[0]
  same = EMOTION6.same_polarity()[EMOTION6.index("fear")]
  assert (got[~same] == 0).all() and got.argmax() == EMOTION6.index("fear")
  with pytest.raises(ValueError, match="unknown distance"):
    D.implication(np.array([0]), MIKELS8, distance="circle")


def test_strategy_errors():
  with pytest.raises(ValueError, match="no emotion wheel"):
    D.implication(np.array([0]), FERPLUS)
  with pytest.raises(ValueError, match="defines no polarity"):
    D.exclusion(np.array([0]), Taxonomy("flat", ("a", "b")))
  with pytest.raises(ValueError, match="out of range"):
    D.exclusion(np.array([8]), MIKELS8)
  with pytest.raises(ValueError, match="sigma must be"):
    D.implication(np.array([0]), MIKELS8, sigma=0.0)
  with pytest.raises(ValueError, match="unknown strategy"):
    D.from_single_label(np.array([0]), MIKELS8, "gaussian")
  np.testing.assert_allclose(D.from_single_label(np.array([1]), MIKELS8, "exclusion"),
                             D.exclusion(np.array([1]), MIKELS8))
