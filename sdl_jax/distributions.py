"""Emotion distributions: from annotator votes, and from a single label by prior knowledge.

All functions here are NumPy functions: targets are made once, at data-set build time,
never inside a jitted step.

* Votes: ``l = votes / sum(votes)``; 11 annotators voting 5, 3, 3 give
  ``[5/11, 3/11, 3/11, 0, ...]``. The dominant label ``y`` is the arg-max, first index on
  ties (as the authors' released code did, and as ``np.argmax`` does).
* Single label ``mu`` on Mikels' wheel (Yang, She, Sun 2017, Sec. 3.2):

  - implication: ``f(i) = 1 / sqrt(2 pi sigma) * exp(-d(i, mu)^2 / (2 sigma^2)) + eps / C``,
    normalised to sum 1, with ``d`` the distance on the wheel (``min(|i-j|, C-|i-j|)``
    wheel positions);
  - exclusion: uniform over the emotions of the dominant one's polarity, 0 elsewhere;
  - combined (the authors' released code): the implication weights, kept only inside the
    dominant polarity, normalised.

Defaults ``sigma = 1.0`` (one wheel step: neighbours on the wheel get ``exp(-1/2)`` of the
peak) and ``eps = 0.1`` (a small floor so that no emotion has probability 0). The paper's
text fixes neither number; these are our choices, exposed as config fields
``config.sigma`` / ``config.eps``.
"""

from __future__ import annotations

import numpy as np

from sdl_jax.emotions import Taxonomy

DEFAULT_SIGMA = 1.0
DEFAULT_EPS = 0.1


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


def _gaussian_weights(labels, taxonomy, sigma, eps):
  if not sigma > 0:
    raise ValueError(f"sigma must be > 0, got {sigma}")
  if not eps >= 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  d = taxonomy.wheel_distances()[labels].astype(np.float64)  # [..., C]
  c = taxonomy.num_classes
  return np.exp(-d**2 / (2 * sigma**2)) / np.sqrt(2 * np.pi * sigma) + eps / c


def _normalise(w):
  return (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)


def implication(labels, taxonomy: Taxonomy, sigma: float = DEFAULT_SIGMA,
                eps: float = DEFAULT_EPS) -> np.ndarray:
  """Implication strategy: a Gaussian on the wheel around each label.

  Args:
    labels: int ``[N]`` (or a scalar) class indices in ``taxonomy``'s order.
    taxonomy: must have a wheel (Mikels-8).
    sigma: Gaussian width in wheel steps, ``> 0``.
    eps: floor mass spread as ``eps / C`` on every emotion before normalising, ``>= 0``.

  Returns:
    float32 ``[N, C]``, rows summing to 1, peaked at the label.
  """
  labels = _check_labels(labels, taxonomy)
  return _normalise(_gaussian_weights(labels, taxonomy, sigma, eps))


def exclusion(labels, taxonomy: Taxonomy) -> np.ndarray:
  """Exclusion strategy: uniform over the dominant emotion's polarity, 0 elsewhere.

  Returns float32 ``[N, C]``; needs a taxonomy with polarity.
  """
  labels = _check_labels(labels, taxonomy)
  return _normalise(taxonomy.same_polarity()[labels].astype(np.float64))


def combined(labels, taxonomy: Taxonomy, sigma: float = DEFAULT_SIGMA,
             eps: float = DEFAULT_EPS) -> np.ndarray:
  """Implication inside the dominant polarity, 0 on the other (the authors' released code).

  Returns float32 ``[N, C]``; needs a taxonomy with a wheel and polarity.
  """
  labels = _check_labels(labels, taxonomy)
  w = _gaussian_weights(labels, taxonomy, sigma, eps)
  return _normalise(w * taxonomy.same_polarity()[labels])


STRATEGIES = ("implication", "exclusion", "combined")


def from_single_label(labels, taxonomy: Taxonomy, strategy: str,
                      sigma: float = DEFAULT_SIGMA, eps: float = DEFAULT_EPS) -> np.ndarray:
  """Dispatches to one of ``STRATEGIES`` by name."""
  if strategy == "implication":
    return implication(labels, taxonomy, sigma, eps)
  if strategy == "exclusion":
    return exclusion(labels, taxonomy)
  if strategy == "combined":
    return combined(labels, taxonomy, sigma, eps)
  raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
