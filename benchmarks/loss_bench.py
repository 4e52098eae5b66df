"""The loss gradient alone: ``sdl_loss``'s hand-written custom_vjp against autodiff.

For logits ``[N, C]``, int labels and distributions, both gradients
``d sdl_loss / d logits`` are compiled; reported per variant: the optimised HLO's
instruction count, and the time of one gradient measured two ways:

* ``loop_us``: ``iters`` gradient evaluations chained inside one compiled
  ``lax.fori_loop`` (``a <- a - 0.1 grad(a)``), so dispatch is not counted: the compute;
* ``call_us``: one jitted call from Python, dispatch included: what a tiny loss costs
  when called on its own.

Repeats of the two variants are interleaved; medians are reported.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from sdl_jax import perf
from sdl_jax.losses import sdl_loss, sdl_loss_reference

VARIANTS = {"custom_vjp": sdl_loss, "autodiff": sdl_loss_reference}
DEFAULT_VARIANTS = ("custom_vjp", "autodiff")


def _inputs(n, c, seed=0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, c, size=n), jnp.int32)
  d = rng.random((n, c)).astype(np.float32)
  return logits, labels, jnp.asarray(d / d.sum(1, keepdims=True))


def bench_loss(n: int, c: int, *, repeats: int = 5, iters: int = 0, lam: float = 0.8,
               variants=DEFAULT_VARIANTS):
  """Benchmarks the gradients of ``variants`` (keys of ``VARIANTS``, the first two being
  ``custom_vjp`` and ``autodiff``) at ``[n, c]``; returns a dict per variant + the
  speed-up of custom_vjp over autodiff.

  ``iters`` = gradients per timed loop (0: about 2e7 / (n c) + 10, at most 1e5, so a
  loop lasts long enough to time at every size).
  """
  args = _inputs(n, c)
  iters = iters or min(int(2e7 // (n * c)) + 10, 100_000)
  out = {"shape": [n, c], "iters": iters}
  runs = {}
  for name in variants:
    loss = VARIANTS[name]
    # Targets are arguments, as in a train step (closed-over ones would be constant-folded).
    grad = jax.grad(lambda a, y, d, loss=loss: loss(a, y, d, lam))
    one = jax.jit(grad).lower(*args).compile()
    loop = jax.jit(lambda a, y, d, grad=grad: jax.lax.fori_loop(
        0, iters, lambda _, x: x - 0.1 * grad(x, y, d), a)).lower(*args).compile()
    one(*args).block_until_ready()
    loop(*args).block_until_ready()
    runs[name] = (one, loop)
    out[name] = {"hlo_ops": perf.hlo_op_count(one.as_text()), "loop_us": [], "call_us": []}
  calls = max(10, iters // 10)
  for r in range(repeats):
    names = list(variants) if r % 2 == 0 else list(variants)[::-1]
    for name in names:
      one, loop = runs[name]
      t0 = time.perf_counter()
      loop(*args).block_until_ready()
      out[name]["loop_us"].append((time.perf_counter() - t0) / iters * 1e6)
      t0 = time.perf_counter()
      for _ in range(calls):
        g = one(*args)
      g.block_until_ready()
      out[name]["call_us"].append((time.perf_counter() - t0) / calls * 1e6)
  for name in variants:
    for k in ("loop_us", "call_us"):
      out[name][k + "_median"] = float(np.median(out[name][k]))
  g_auto = runs["autodiff"][0](*args)
  out["max_abs_diff"] = max(float(jnp.max(jnp.abs(runs[v][0](*args) - g_auto)))
                            for v in variants if v != "autodiff")
  out["speedup_loop"] = out["autodiff"]["loop_us_median"] / out["custom_vjp"]["loop_us_median"]
  out["speedup_call"] = out["autodiff"]["call_us_median"] / out["custom_vjp"]["call_us_median"]
  return out
