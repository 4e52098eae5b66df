"""Emotion distributions: from annotator votes, and from a single label by prior knowledge.

All functions here are NumPy functions: targets are made once, at data-set build time,
never inside a jitted step.

* Votes: ``l = votes / sum(votes)``; 11 annotators voting 5, 3, 3 give
  ``[5/11, 3/11, 3/11, 0, ...]``. The dominant label ``y`` is the arg-max, first index on
  ties (as the authors' released code did, and as ``np.argmax`` does).
* Single label ``mu`` (Yang, She, Sun 2017, Sec. 3.2):

  - implication: ``f(i) = 1 / sqrt(2 pi sigma) * exp(-d(i, mu)^2 / (2 sigma^2)) + eps / C``,
    normalised to sum 1;
  - exclusion: uniform over the emotions of the dominant one's polarity, 0 elsewhere;
  - combined (the authors' released code): the implication weights, kept only inside the
    dominant polarity, normalised.

  The distance ``d`` (``distance=``) is one of ``DISTANCES``:

  - ``'wheel'`` (our default): positions round Mikels' wheel,
    ``min(|wi - wj|, C - |wi - wj|)``, so that emotions next to each other on the wheel
    are near whatever their order in the data set;
  - ``'index'``: ``|i - j|`` along the data set's class order, as the authors' released
    code computes it (see below). For Mikels-8 that order is amusement, awe, contentment,
    excitement | anger, disgust, fear, sadness, which is not the wheel's order.

Settings and their sources:

* ours (``DEFAULT_*``): ``distance='wheel'``, ``sigma = 1.0`` (one wheel step: the wheel
  neighbours get ``exp(-1/2)`` of the peak), ``eps = 0.1`` (a floor so that the
  implication strategy gives no emotion probability 0). The paper's Sec. 3.2 gives the
  formula; the numbers are our choice.
* the authors' release (``RELEASED_*``): ``distance='index'``, ``sigma = 0.45``,
  ``eps = 0``, with the combined strategy. Source: github.com/sherleens/
  EmotionDistributionLearning, commit 71d992e6, file
  caffe_KL/src/caffe/layers/softmax_my_kl_loss_layer.cpp: line 9 ``#define ee 0``; in
  ``Forward_cpu`` (from about line 103) and again in ``Backward_cpu``, a commented-out
  block ``double sigma = 0.45, mu = 0;`` that builds ``m_pro[i][j] = 1/(sqrt(2 pi) sigma)
  exp(-(j - mu)^2 / (2 sigma^2))`` with ``mu = i`` (class indices), sets
  ``m_pro[i][j] = ee`` for ``j`` of the other polarity (``j > 3`` for ``i < 4`` and
  ``j < 4`` for ``i >= 4``), and normalises each row. That code is commented out in the
  release (its final loss layers read vote distributions), so these are the settings of
  the authors' single-label experiments as far as the release shows them. Two details
  differ from the formula here and do not matter at the released ``eps = 0``: the
  release's constant factor ``1/(sqrt(2 pi) sigma)`` (cancelled by the normalisation), and
  its ``ee``, which is written onto the other polarity rather than added to every
  emotion.
"""

from __future__ import annotations

import numpy as np

from sdl_jax.emotions import Taxonomy

DISTANCES = ("wheel", "index")

DEFAULT_DISTANCE = "wheel"
DEFAULT_SIGMA = 1.0
DEFAULT_EPS = 0.1

RELEASED_DISTANCE = "index"
RELEASED_SIGMA = 0.45
RELEASED_EPS = 0.0


def from_votes(votes) -> np.ndarray:
  """Normalises vote counts to distributions.

  Args:
    votes: non-negative finite counts, ``[N, C]`` (or ``[C]``), any numeric dtype.

  Returns:
    float32 ``[N, C]`` (or ``[C]``), each row summing to 1.

  Raises:
    ValueError: naming the first offending row, for a non-finite or negative count or
      a row whose total is zero.
  """
  v = np.asarray(votes, dtype=np.float64)
  single = v.ndim == 1
  v = np.atleast_2d(v)
  if v.ndim != 2:
    raise ValueError(f"votes must be [N, C] or [C], got shape {np.shape(votes)}")
  bad = ~np.isfinite(v).all(axis=1)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"votes row {i} has a non-finite count: {v[i].tolist()}")
  bad = (v < 0).any(axis=1)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"votes row {i} has a negative count: {v[i].tolist()}")
  total = v.sum(axis=1)
  bad = total <= 0
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"votes row {i} has a zero total: {v[i].tolist()}")
  out = (v / total[:, None]).astype(np.float32)
  return out[0] if single else out


def dominant_label(distributions) -> np.ndarray:
  """Arg-max class of each row, first index on ties: int32 ``[N]`` (or a scalar)."""
  return np.argmax(np.asarray(distributions), axis=-1).astype(np.int32)


def _check_labels(labels, taxonomy: Taxonomy) -> np.ndarray:
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  c = taxonomy.num_classes
  bad = (labels < 0) | (labels >= c)
  if bad.any():
    raise ValueError(
        f"label {labels[bad].ravel()[0]} out of range for taxonomy {taxonomy.name!r} "
        f"({c} classes)")
  return labels


def emotion_distances(taxonomy: Taxonomy, distance: str = DEFAULT_DISTANCE) -> np.ndarray:
  """Distances between the taxonomy's emotions, int32 ``[C, C]``.

  ``'wheel'``: ``taxonomy.wheel_distances()`` (needs a wheel); ``'index'``:
  ``|i - j|`` over class indices in the data set's order (any taxonomy).
  """
  if distance == "wheel":
    return taxonomy.wheel_distances()
  if distance == "index":
    i = np.arange(taxonomy.num_classes)
    return np.abs(i[:, None] - i[None, :]).astype(np.int32)
  raise ValueError(f"unknown distance {distance!r}; expected one of {DISTANCES}")


def _gaussian_weights(labels, taxonomy, sigma, eps, distance):
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}")
  if not eps >= 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  d = emotion_distances(taxonomy, distance)[labels].astype(np.float64)  # [..., C]
  c = taxonomy.num_classes
  return np.exp(-d**2 / (2 * sigma**2)) / np.sqrt(2 * np.pi * sigma) + eps / c


def _normalise(w):
  return (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)


def implication(labels, taxonomy: Taxonomy, sigma: float = DEFAULT_SIGMA,
                eps: float = DEFAULT_EPS, distance: str = DEFAULT_DISTANCE) -> np.ndarray:
  """Implication strategy: a Gaussian in emotion distance around each label.

  Args:
    labels: int ``[N]`` (or a scalar) class indices in ``taxonomy``'s order.
    taxonomy: must have a wheel (Mikels-8) for ``distance='wheel'``.
    sigma: Gaussian width in steps of the distance, ``> 0``.
    eps: floor mass spread as ``eps / C`` on every emotion before normalising, ``>= 0``.
    distance: one of ``DISTANCES`` (see the module docstring).

  Returns:
    float32 ``[N, C]``, rows summing to 1, peaked at the label.
  """
  labels = _check_labels(labels, taxonomy)
  return _normalise(_gaussian_weights(labels, taxonomy, sigma, eps, distance))


def exclusion(labels, taxonomy: Taxonomy) -> np.ndarray:
  """Exclusion strategy: uniform over the dominant emotion's polarity, 0 elsewhere.

  Returns float32 ``[N, C]``; needs a taxonomy with polarity.
  """
  labels = _check_labels(labels, taxonomy)
  return _normalise(taxonomy.same_polarity()[labels].astype(np.float64))


def combined(labels, taxonomy: Taxonomy, sigma: float = DEFAULT_SIGMA,
             eps: float = DEFAULT_EPS, distance: str = DEFAULT_DISTANCE) -> np.ndarray:
  """Implication inside the dominant polarity, 0 on the other (the authors' released code).

  Arguments as ``implication``. Returns float32 ``[N, C]``; needs a taxonomy with
  polarity (and a wheel for ``distance='wheel'``). The release's own settings are
  ``sigma=RELEASED_SIGMA, eps=RELEASED_EPS, distance=RELEASED_DISTANCE``.
  """
  labels = _check_labels(labels, taxonomy)
  w = _gaussian_weights(labels, taxonomy, sigma, eps, distance)
  return _normalise(w * taxonomy.same_polarity()[labels])


STRATEGIES = ("implication", "exclusion", "combined")


def from_single_label(labels, taxonomy: Taxonomy, strategy: str,
                      sigma: float = DEFAULT_SIGMA, eps: float = DEFAULT_EPS,
                      distance: str = DEFAULT_DISTANCE) -> np.ndarray:
  """Dispatches to one of ``STRATEGIES`` by name (exclusion ignores sigma, eps, distance)."""
  if strategy == "implication":
    return implication(labels, taxonomy, sigma, eps, distance)
  if strategy == "exclusion":
    return exclusion(labels, taxonomy)
  if strategy == "combined":
    return combined(labels, taxonomy, sigma, eps, distance)
  raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
