"""Max-pools with hand-written gradients, for XLA:CPU.

Both send each window's cotangent to its first maximum in row-major order, as PyTorch's
pools and XLA's select-and-scatter do, so they compute the same function as
``flax.linen.max_pool`` (the tests compare values and gradients); what differs is how
XLA:CPU runs them. The tap index of the first maximum is found in the forward pass and
kept (int8); the backward pass is elementwise masks of the cotangent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def first_max(taps):
  """The elementwise maximum of the same-shape arrays ``taps`` and, as int8, the index of
  the first tap that holds it (ties go to the earlier tap)."""
  out, first = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for t, s in enumerate(taps[1:], 1):
    first = jnp.where(s > out, jnp.int8(t), first)  # strictly: the first maximum stays
    out = jnp.maximum(out, s)
  return out, first


def max_pool_2x2(x):
  """2x2 max-pool, stride 2, VALID (an odd last row/column is dropped), ``[N, H, W, C]``.

  Forward: a reshape + max. Gradient (``custom_vjp``): four elementwise masks, one loop
  fusion, where ``nn.max_pool``'s select-and-scatter measured ~4x slower on XLA:CPU and
  autodiff of the reshape + max (which splits ties, e.g. all-zero windows after a ReLU)
  needs extra reductions.
  """
  n, h, w, c = x.shape
  return _max_pool_2x2_even(x[:, :h - h % 2, :w - w % 2])


@jax.custom_vjp
def _max_pool_2x2_even(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _max_pool_2x2_fwd(x):
  # Which of the window's four taps (row-major) holds its first maximum, int8, found in
  # the forward pass; the gradient goes there. Comparing x with y again in the backward
  # pass was not safe: the jitted small CNN's gradients moved by tens of percent with 1e-7
  # changes of the input, likely because XLA computes x (a BatchNorm + ReLU fused into
  # both passes) twice, not bit for bit alike, and a window whose maximum no longer
  # equals y lost its gradient.
  n, h, w, c = x.shape
  r = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return first_max([r[:, :, t // 2, :, t % 2, :] for t in range(4)])


def _max_pool_2x2_bwd(first, g):
  zero = jnp.zeros((), g.dtype)
  rows = [jnp.stack([jnp.where(first == 2 * a + b, g, zero) for b in range(2)], axis=3)
          for a in range(2)]                      # each [n, h/2, w/2, 2(b), c]
  dx = jnp.stack(rows, axis=2)                   # [n, h/2, 2(a), w/2, 2(b), c]
  n, h2, _, w2, _, c = dx.shape
  return (dx.reshape(n, 2 * h2, 2 * w2, c),)


_max_pool_2x2_even.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def max_pool_3x3_s2(x):
  """3x3 max-pool, stride 2, padding 1 (padded with -inf), ``[N, H, W, C]``.

  ``y[n, i, j] = max_{a, b < 3} xpad[n, 2i + a, 2j + b]``: the maximum of nine strided
  slices. Gradient (``custom_vjp``): the forward pass keeps the first maximum's tap index
  (int8, a quarter of the output's bytes); the backward pass assembles ``dx`` by stride
  phase (even/odd rows and columns of ``xpad``, each a sum of 1, 2 or 4 shifted slices of
  the masked, padded cotangent) and interleaves the four phases. Autodiff of the slices
  instead scatters nine strided pads and recomputes the stem's BatchNorm and ReLU inside
  that loop; it measured the largest single op of ResNet-50's step on XLA:CPU, and splits
  ties.
  """
  return _max_pool_3x3_s2(x, tuple(x.shape[1:3]))


def pool_taps(x):
  """The nine ``[N, Ho, Wo, C]`` slices of the -inf padded ``x``, in row-major tap order."""
  n, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  xp = jnp.pad(x, ((0, 0), (1, 2 * ho - h), (1, 2 * wo - w), (0, 0)),
               constant_values=-jnp.inf)
  return [xp[:, a:a + 2 * (ho - 1) + 1:2, b:b + 2 * (wo - 1) + 1:2]
          for a in range(3) for b in range(3)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_3x3_s2(x, hw):
  del hw
  return functools.reduce(jnp.maximum, pool_taps(x))


def _max_pool_3x3_s2_fwd(x, hw):
  del hw
  return first_max(pool_taps(x))


def _max_pool_3x3_s2_bwd(hw, first, g):
  h, w = hw
  n, ho, wo, c = g.shape
  # Padded by one on each side, so every shifted slice below is in bounds.
  gp = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
  fp = jnp.pad(first, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1)
  zero = jnp.zeros((), g.dtype)
  # Tap offset a in {0, 1, 2} lands on xpad row 2i + a: phase a % 2, phase row i + a // 2.
  phases = {}
  for t in range(9):
    a, b = divmod(t, 3)
    di, dj = a // 2, b // 2
    term = jnp.where(fp == t, gp, zero)[:, 1 - di:2 - di + ho, 1 - dj:2 - dj + wo]
    key = (a % 2, b % 2)
    phases[key] = term if key not in phases else phases[key] + term
  rows = [jnp.stack([phases[(p, 0)], phases[(p, 1)]], axis=3) for p in (0, 1)]
  dxp = jnp.stack(rows, axis=2).reshape(n, 2 * ho + 2, 2 * wo + 2, c)
  return (dxp[:, 1:1 + h, 1:1 + w],)


_max_pool_3x3_s2.defvjp(_max_pool_3x3_s2_fwd, _max_pool_3x3_s2_bwd)
