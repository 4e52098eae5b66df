r"""The joint classification + distribution loss, with a hand-derived gradient.

For logits ``a`` ``[N, C]``, ``p = softmax(a)``, targets ``y`` (label) and ``l``
(distribution), both ``[N, C]`` and non-negative, and ``lam`` in [0, 1]:

    L_cls = -1/N sum_i sum_j y_ij ln p_ij
    L_sdl = -1/N sum_i sum_j l_ij ln p_ij
    L     = (1 - lam) L_cls + lam L_sdl

``L_sdl`` equals ``KL(l || p)`` up to the (constant) entropy of ``l``. The gradient with
respect to the logits is, in general,

    dL/da_ij = 1/N [ (1 - lam) (p_ij sum_k y_ik - y_ij) + lam (p_ij sum_k l_ik - l_ij) ]

which for one-hot ``y`` and normalised ``l`` is ``(p - (1 - lam) y - lam l) / N``. A row
whose ``y`` and ``l`` are all zero contributes neither loss nor gradient, which is how
padded rows are masked. ``N`` counts every row, padded ones included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _compute_dtype(logits):
  # bf16 / f16 logits are computed in float32; float64 stays float64.
  return jnp.promote_types(logits.dtype, jnp.float32)


def _as_targets(logits, labels, distributions):
  """Returns (logits, y, l) as floats of the compute dtype, each ``[N, C]``."""
  logits = jnp.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [N, C], got shape {logits.shape}")
  n, c = logits.shape
  dtype = _compute_dtype(logits)
  labels = jnp.asarray(labels)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    if labels.shape != (n,):
      raise ValueError(f"integer labels must be [N]={n}, got shape {labels.shape}")
    # one_hot of a negative label is all zeros: a padded row.
    y = jax.nn.one_hot(labels, c, dtype=dtype)
  else:
    if labels.shape != (n, c):
      raise ValueError(f"float labels must be [N, C]={(n, c)}, got shape {labels.shape}")
    y = labels.astype(dtype)
  distributions = jnp.asarray(distributions)
  if distributions.shape != (n, c):
    raise ValueError(
        f"distributions must be [N, C]={(n, c)}, got shape {distributions.shape}")
  return logits.astype(dtype), y, distributions.astype(dtype)


@jax.custom_vjp
def _joint_loss(logits, y, l, lam):
  return _joint_loss_fwd(logits, y, l, lam)[0]


def _joint_loss_fwd(logits, y, l, lam):
  n = logits.shape[0]
  # log_softmax written out so that exp(shifted) and its row sums are residuals: the
  # backward pass then needs no second exp (jax.nn.log_softmax would leave only log p).
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(shifted)
  s = jnp.sum(e, axis=-1, keepdims=True)
  logp = shifted - jnp.log(s)
  # Weighted targets: the loss is linear in them, so one reduction serves both terms.
  t = (1 - lam) * y + lam * l
  loss = -jnp.sum(t * logp) / n
  return loss, (e, s, logp, y, l, lam)


def _joint_loss_bwd(res, g):
  e, s, logp, y, l, lam = res
  n = logp.shape[0]
  # Hand-derived: dL/da = [p * sum_k t_k - t] / N with t = (1 - lam) y + lam l and
  # p = e / s. The scalars g / N, (1 - lam), lam are folded into the targets first and
  # 1 / s into a per-row factor, so each [N, C] element costs three multiplies and two
  # adds (XLA does not reassociate floating point to find this by itself).
  a, b = g / n * (1 - lam), g / n * lam
  st = a * y + b * l                                   # g t / N
  d_logits = e * (jnp.sum(st, axis=-1, keepdims=True) / s) - st
  # The loss is linear in the targets: dL/dy = -(1 - lam) ln p / N, dL/dl = -lam ln p / N.
  # (Under jit these are dropped when only the logits' gradient is asked for.)
  d_y = -a * logp
  d_l = -b * logp
  # lam is a mixing weight, not a parameter: it gets no gradient.
  return d_logits, d_y, d_l, jnp.zeros_like(lam)


_joint_loss.defvjp(_joint_loss_fwd, _joint_loss_bwd)


def sdl_loss(logits, labels, distributions, lam=0.8):
  """Joint loss ``(1 - lam) L_cls + lam L_sdl``, mean over the N rows.

  Args:
    logits: float ``[N, C]`` (any float dtype; bf16/f16 are computed in float32).
    labels: int ``[N]`` class indices (a negative index marks a padded row) or float
      ``[N, C]`` label weights (e.g. one-hot; all zero for a padded row).
    distributions: float ``[N, C]`` target distributions (all zero for a padded row).
      Need not be normalised: the gradient uses the general form above.
    lam: Python float or scalar array in [0, 1]. Gets no gradient.

  Returns:
    Scalar loss in the compute dtype (float32, or float64 for float64 logits). Its
    gradient is the hand-derived ``custom_vjp`` rule in this module.
  """
  logits, y, l = _as_targets(logits, labels, distributions)
  lam = jnp.asarray(lam, dtype=logits.dtype)
  return _joint_loss(logits, y, l, lam)


def sdl_loss_reference(logits, labels, distributions, lam=0.8):
  """The same loss written plainly, differentiated by JAX autodiff. For tests only."""
  logits, y, l = _as_targets(logits, labels, distributions)
  lam = jax.lax.stop_gradient(jnp.asarray(lam, dtype=logits.dtype))
  logp = jax.nn.log_softmax(logits, axis=-1)
  n = logits.shape[0]
  l_cls = -jnp.sum(y * logp) / n
  l_sdl = -jnp.sum(l * logp) / n
  return (1 - lam) * l_cls + lam * l_sdl


def per_example_loss(logits, labels, distributions, lam=0.8):
  """Per-row joint loss, float ``[N]`` (autodiff; for reports, not for training)."""
  logits, y, l = _as_targets(logits, labels, distributions)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(((1 - lam) * y + lam * l) * logp, axis=-1)
