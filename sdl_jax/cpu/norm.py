"""Training-mode BatchNorm (optionally with a ReLU or ReLU6 after it, and a residual added
before a ReLU) whose gradient is written by hand: its two sums and one elementwise pass
(``batch_norm_train``), beside the same forward pass for autodiff (``batch_norm_forward``)
and the inference-mode one (``batch_norm_eval``); ``sdl_jax.models.layers.BatchNorm`` holds
the variables and picks one.

Same results as ``flax.linen.BatchNorm`` (batch statistics over all but the last axis,
variance as ``E[x^2] - E[x]^2`` clipped at 0). Why: autodiff of flax's BatchNorm + ReLU stores
``x - mean`` beside the output, and its gradient takes three reductions and two more
elementwise passes (the ReLU's mask, then BatchNorm's); in ResNet-50's step on XLA:CPU
those memory-bound passes were about a quarter of the time (README, "Performance").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sdl_jax.cpu import dnnl


def batch_norm_train(x, scale, bias, epsilon, activation=None, residual=None):
  """Training-mode BatchNorm of ``x`` ``[..., C]`` over all axes but the last.

  ``mean = E[x]``, ``var = max(E[x^2] - mean^2, 0)``, ``r = (var + epsilon)^(-1/2)``,
  ``y = (x - mean) * r * scale + bias``, then the ``activation``: ``'relu'`` ``max(y, 0)``,
  ``'relu6'`` ``min(max(y, 0), 6)``, ``None`` none; with a ``residual`` (needs ``'relu'``)
  ``max(y + residual, 0)``. Statistics and arithmetic are
  at least float32; ``y`` has ``x``'s dtype.

  Returns ``(y, mean, var)``, the statistics float32 ``[C]``. Gradient (``custom_vjp``),
  with ``M`` the number of rows, ``dy`` masked where the activation is flat (``y > 0``;
  ``0 < y < 6`` for relu6, as ``jax.nn.relu6``'s gradient) and ``xhat = (x - mean) r``:

      dbias = sum dy,  dscale = sum dy * xhat,
      dx = scale r (dy - dbias / M - xhat dscale / M) + dmean / M + 2 dvar (x - mean) / M,

  (``dresidual`` is the masked ``dy``): two sums over ``x`` and ``dy``, then ``dx`` in one
  elementwise pass; the activation's mask comes from the stored output, nothing else
  activation-sized is stored.
  """
  act = check_activation(activation)
  if residual is None:
    return _batch_norm(x, scale, bias, float(epsilon), act)
  _check_residual(act)
  # In x's dtype, so that its cotangent (the masked dy) is too; autodiff casts it back.
  return _batch_norm_add_relu(x, residual.astype(x.dtype), scale, bias, float(epsilon))


def batch_norm_forward(x, scale, bias, epsilon, activation=None, residual=None):
  """``batch_norm_train``'s forward pass (same arguments and results), for autodiff: the
  path off XLA:CPU."""
  act = check_activation(activation)
  if residual is None:
    return _batch_norm_fwd(x, scale, bias, float(epsilon), act)[0]
  _check_residual(act)
  return _forward_add_relu(x, residual.astype(x.dtype), scale, bias, float(epsilon))


def batch_norm_eval(x, mean, var, scale, bias, epsilon, activation=None, residual=None):
  """Inference-mode BatchNorm: ``(x - mean) * (var + epsilon)^(-1/2) * scale + bias``
  (``mean``, ``var`` the running statistics ``[C]``), plus ``residual``, then the
  ``activation``; at least float32 (``x``'s dtype if wider)."""
  act = check_activation(activation)
  y = _affine(x, mean, var, scale, bias, epsilon)
  if residual is not None:
    y = y + residual
  return _apply(y, act)


def _check_residual(act):
  if act != "relu":
    raise ValueError("batch_norm_train: a residual is only added before a ReLU "
                     "(activation='relu')")


ACTIVATIONS = (None, "relu", "relu6")


def check_activation(activation):
  """``activation`` if it is one of ``ACTIVATIONS``, else a ValueError."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"BatchNorm activation must be one of {ACTIVATIONS}, got {activation!r}")
  return activation


def _apply(y, act):
  if act == "relu":
    return jnp.maximum(y, 0)
  if act == "relu6":
    return jnp.clip(y, 0, 6)
  return y


def _mask(y, dy, act):
  """``dy`` where the activation's output ``y`` has slope 1, else 0."""
  if act is None:
    return dy
  keep = y > 0 if act == "relu" else (y > 0) & (y < 6)
  return jnp.where(keep, dy, jnp.zeros((), dy.dtype))


def _acc_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def _stats(x):
  acc = _acc_dtype(x)
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(acc)
  # Two plain sums, not one variadic reduce: XLA:CPU hands plain ones to YNNPACK, and its
  # own loop for a variadic reduce over the leading axes measured ~10x slower.
  s1, s2 = jnp.sum(xf, axes), jnp.sum(xf * xf, axes)
  m = x.size // x.shape[-1]
  mean = s1 / m
  return mean, jnp.maximum(s2 / m - mean * mean, 0)


def _affine(x, mean, var, scale, bias, epsilon):
  """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` in the accumulation dtype."""
  acc = _acc_dtype(x)
  mul = lax.rsqrt(var + epsilon) * scale.astype(acc)
  return (x.astype(acc) - mean) * mul + bias.astype(acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, scale, bias, epsilon, act):
  return _batch_norm_fwd(x, scale, bias, epsilon, act)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, act):
  mean, var = _stats(x)
  y = _apply(_affine(x, mean, var, scale, bias, epsilon), act).astype(x.dtype)
  # The output is kept for the activation's mask: it is the next layer's input, stored
  # anyway.
  return (y, mean, var), (x, mean, var, scale, None if act is None else y)


def _batch_norm_bwd(epsilon, act, res, cts):
  x, mean, var, scale, y = res
  dy, dmean, dvar = cts
  return _grads(x, mean, var, scale, _mask(y, dy, act), dmean, dvar, epsilon)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batch_norm_add_relu(x, residual, scale, bias, epsilon):
  return _batch_norm_add_relu_fwd(x, residual, scale, bias, epsilon)[0]


def _forward_add_relu(x, residual, scale, bias, epsilon):
  mean, var = _stats(x)
  y = _affine(x, mean, var, scale, bias, epsilon)
  return jnp.maximum(y + residual.astype(y.dtype), 0).astype(x.dtype), mean, var


def _batch_norm_add_relu_fwd(x, residual, scale, bias, epsilon):
  y, mean, var = _forward_add_relu(x, residual, scale, bias, epsilon)
  # y is the next residual block's input and residual: stored, so that XLA:CPU does not
  # recompute it (and each earlier block's output before it) inside every fusion that
  # reads it (dnnl.stored).
  y = dnnl.stored(y)
  return (y, mean, var), (x, mean, var, scale, y)


def _batch_norm_add_relu_bwd(epsilon, res, cts):
  x, mean, var, scale, y = res
  dy, dmean, dvar = cts
  g = _mask(y, dy, "relu")
  dx, dscale, dbias = _grads(x, mean, var, scale, g, dmean, dvar, epsilon)
  return dx, g.astype(x.dtype), dscale, dbias


_batch_norm_add_relu.defvjp(_batch_norm_add_relu_fwd, _batch_norm_add_relu_bwd)


def _grads(x, mean, var, scale, g, dmean, dvar, epsilon):
  """``(dx, dscale, dbias)`` of BatchNorm for the cotangent ``g`` of its (affine) output."""
  # A barrier, so that XLA does not merge ``x - mean`` below with the forward pass's and
  # store it as an activation-sized buffer between the passes.
  x, mean, var = lax.optimization_barrier((x, mean, var))
  acc = _acc_dtype(x)
  m = x.size // x.shape[-1]
  axes = tuple(range(x.ndim - 1))
  r = lax.rsqrt(var + epsilon)
  mul = r * scale.astype(acc)
  xf = x.astype(acc)
  xc = xf - mean
  ga = g.astype(acc)
  # sum g (x - mean) as sum g x - mean sum g: XLA:CPU stored x - mean as a buffer of its
  # own to feed YNNPACK's reduction (one more activation-sized pass, ~2% of ResNet-50's
  # step); the same E[.] - mean E[.] form as the forward pass's variance.
  dbias = jnp.sum(ga, axes)
  dxc = jnp.sum(ga * xf, axes) - mean * dbias
  dscale = dxc * r  # sum g * xhat
  # dx = mul * g + xc * cx + c0: the formula's per-channel coefficients folded.
  cx = -mul * r * dscale / m + 2 * dvar / m
  c0 = -mul * dbias / m + dmean / m
  dx = mul * ga + xc * cx + c0
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)
