"""Accuracy and the label-distribution-learning measures, as mergeable sums.

Measures (Geng, "Label Distribution Learning", IEEE TKDE 2016), for a target
distribution ``l`` and a prediction ``p`` over C classes, per example:

* Chebyshev     ``max_j |l_j - p_j|``                              (distance, lower is better)
* Clark         ``sqrt(sum_j (l_j - p_j)^2 / (l_j + p_j)^2)``      (distance)
* Canberra      ``sum_j |l_j - p_j| / (l_j + p_j)``                (distance)
* KL            ``sum_j l_j ln(l_j / p_j)``                         (distance, KL(l || p))
* Cosine        ``sum_j l_j p_j / (||l|| ||p||)``                   (similarity, higher is better)
* Intersection  ``sum_j min(l_j, p_j)``                            (similarity)

Five more, as PyLDL defines them (``EXTRA_MEASURES``; always computed, shown in tables
on request, e.g. ``config.extra_measures`` or the sweep's ``--extra_measures``):

* Euclidean     ``sqrt(sum_j (l_j - p_j)^2)``                       (distance)
* Sorensen      ``sum_j |l_j - p_j| / sum_j (l_j + p_j)``           (distance)
* Squared chi2  ``sum_j (l_j - p_j)^2 / (l_j + p_j)``               (distance)
* Fidelity      ``sum_j sqrt(l_j p_j)``                             (similarity)
* Jensen-Shannon ``(KL(l || m) + KL(p || m)) / 2``, ``m = (l + p) / 2`` (distance, in
  [0, ln 2])

Conventions: ``0 ln 0 = 0`` and ``0 / 0 = 0`` (a class where both are 0 adds nothing to
Clark, Canberra, squared chi2 or Jensen-Shannon); logarithms are natural; ``p`` is clipped
below at the smallest normal float of its dtype inside KL, so a prediction that
underflowed to 0 gives a large, finite KL (Jensen-Shannon needs no clipping: ``m > 0``
wherever ``l`` or ``p`` is).

Top-1 accuracy compares ``argmax p`` with the dominant label.

Evaluation over padded, sharded batches is exact because every measure is kept as a
masked per-example **sum** plus a count: ``batch_sums`` per batch, ``merge`` (or
``jax.lax.psum`` across devices) to combine, ``finalize`` to turn sums into means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LDL_MEASURES = ("chebyshev", "clark", "canberra", "kl", "cosine", "intersection")
EXTRA_MEASURES = ("euclidean", "sorensen", "squared_chi2", "fidelity", "jensen_shannon")
ALL_MEASURES = LDL_MEASURES + EXTRA_MEASURES
# True where higher is better.
HIGHER_IS_BETTER = {"accuracy": True, "chebyshev": False, "clark": False,
                    "canberra": False, "kl": False, "cosine": True,
                    "intersection": True, "loss": False,
                    "euclidean": False, "sorensen": False, "squared_chi2": False,
                    "fidelity": True, "jensen_shannon": False}


def _safe_div(num, den):
  """num / den with 0 / 0 = 0 (den >= 0)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def ldl_measures(target, pred):
  """Per-example LDL measures.

  Args:
    target: float ``[N, C]`` target distributions ``l``.
    pred: float ``[N, C]`` predicted distributions ``p``.

  Returns:
    dict name -> float ``[N]`` for each name in ``ALL_MEASURES``.
  """
  l = jnp.asarray(target)
  p = jnp.asarray(pred)
  dtype = jnp.promote_types(jnp.result_type(l, p), jnp.float32)
  l, p = l.astype(dtype), p.astype(dtype)
  diff = l - p
  s = l + p
  tiny = jnp.finfo(dtype).tiny
  log_ratio = jnp.log(jnp.where(l > 0, l, 1)) - jnp.log(jnp.maximum(p, tiny))
  norm = jnp.linalg.norm(l, axis=-1) * jnp.linalg.norm(p, axis=-1)
  # Jensen-Shannon: x ln(x / m) with m = (l + p) / 2 >= x / 2 > 0 wherever x > 0.
  m = s / 2
  log_m = jnp.log(jnp.where(m > 0, m, 1))
  def _kl_to_m(x):
    return jnp.sum(jnp.where(x > 0, x * (jnp.log(jnp.where(x > 0, x, 1)) - log_m), 0), -1)
  return {
      "chebyshev": jnp.max(jnp.abs(diff), axis=-1),
      "clark": jnp.sqrt(jnp.sum(_safe_div(diff**2, s**2), axis=-1)),
      "canberra": jnp.sum(_safe_div(jnp.abs(diff), s), axis=-1),
      "kl": jnp.sum(jnp.where(l > 0, l * log_ratio, 0), axis=-1),
      "cosine": _safe_div(jnp.sum(l * p, axis=-1), norm),
      "intersection": jnp.sum(jnp.minimum(l, p), axis=-1),
      "euclidean": jnp.sqrt(jnp.sum(diff**2, axis=-1)),
      "sorensen": _safe_div(jnp.sum(jnp.abs(diff), axis=-1), jnp.sum(s, axis=-1)),
      "squared_chi2": jnp.sum(_safe_div(diff**2, s), axis=-1),
      # clip: a float round-off below 0 would make sqrt's value (and gradient) nan.
      "fidelity": jnp.sum(jnp.sqrt(jnp.maximum(l * p, 0)), axis=-1),
      "jensen_shannon": (_kl_to_m(l) + _kl_to_m(p)) / 2,
  }


def batch_sums(probs, labels, distributions, mask=None, loss=None):
  """Masked per-example sums of accuracy and the LDL measures for one batch.

  Args:
    probs: float ``[N, C]`` predicted distributions (softmax outputs).
    labels: int ``[N]`` dominant labels.
    distributions: float ``[N, C]`` target distributions.
    mask: optional bool/float ``[N]``; 0 marks padding. Defaults to all ones.
    loss: optional float ``[N]`` per-example loss to sum as well.

  Returns:
    dict of float32 scalars: ``count`` (number of real examples), ``accuracy`` (number
    correct) and one sum per measure of ``ALL_MEASURES`` (and ``loss``). Add dicts
    with ``merge`` or ``jax.lax.psum``; turn into means with ``finalize``.
  """
  n = probs.shape[0]
  m = jnp.ones((n,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  out = {"count": jnp.sum(m), "accuracy": jnp.sum(m * correct)}
  for name, v in ldl_measures(distributions, probs).items():
    # where, not multiply: a padded row's garbage (even nan) must not leak into the sum.
    out[name] = jnp.sum(jnp.where(m > 0, v, 0)).astype(jnp.float32)
  if loss is not None:
    out["loss"] = jnp.sum(jnp.where(m > 0, loss, 0)).astype(jnp.float32)
  return out


def merge(a, b):
  """Adds two sum dicts (``None`` is the empty sum)."""
  if a is None:
    return b
  return jax.tree_util.tree_map(lambda x, y: x + y, a, b)


def finalize(sums):
  """Sum dict -> dict of Python float means (count stays a count)."""
  sums = jax.device_get(sums)
  count = float(sums["count"])
  if count == 0:
    raise ValueError("no examples to average: the evaluated split is empty")
  out = {k: float(v) / count for k, v in sums.items() if k != "count"}
  out["count"] = int(round(count))
  return out
