"""Convolutions on oneDNN through XLA's FFI custom calls, for the CPU backend.

jaxlib 0.10.2's XLA:CPU runs convolutions on Eigen (or YNNPACK), which on an AVX-512 CPU
measured 0.3-0.9x the speed of oneDNN's, the library PyTorch uses, and the weight
gradient slowest (README, "Performance"). ``conv`` is an NHWC/HWIO float32 convolution
(dense, or grouped: each group of channels convolved on its own) whose forward pass and
both gradients are oneDNN's,

    y[n, a, b, o] = sum_{i, j, c} xpad[n, a * sh + i, b * sw + j, c] * w[i, j, c, o],
    dx = conv_transpose(dy, w),   dw[i, j, c, o] = sum_{n, a, b} xpad[...] * dy[n, a, b, o],

the same function as ``lax.conv_general_dilated`` (the tests compare values and
gradients); ``stored`` and ``after`` steer XLA's fusion and ordering around them.

Whether a convolution goes here: ``sdl_jax.cpu.dnnl_route``; the compiled library and its
build: ``sdl_jax.cpu.dnnl_lib``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from sdl_jax.cpu import dnnl_lib, dnnl_route

def _call(name, shape, a, b, strides, padding, groups, blocked=False):
  (pt, pb), (pl, pr) = padding
  attrs = dict(sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr, groups=groups,
               blocked=int(blocked))
  return jax.ffi.ffi_call(dnnl_lib.TARGETS[name],
                         jax.ShapeDtypeStruct(shape, a.dtype))(
      a, b, **{k: np.int64(v) for k, v in attrs.items()})


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x, w, strides, padding, groups=1):
  """Convolution of ``x`` ``[N, H, W, C]`` with ``w`` ``[kh, kw, C / groups, O]`` (float32,
  or bfloat16 where ``dnnl_route.bf16()``; both the same),
  ``strides`` ``(sh, sw)``, ``padding`` ``((top, bottom), (left, right))`` ints, ``groups``
  feature groups (``C`` for depthwise); returns ``[N, Ho, Wo, O]`` in their dtype with
  ``Ho = (H + top + bottom - kh) // sh + 1`` (likewise ``Wo``), as
  ``lax.conv_general_dilated`` with NHWC/HWIO/NHWC and ``feature_group_count=groups``.
  Call ``dnnl_route.available()`` first.

  Reverse mode, to any order: the three directions are each other's transposes
  (``y = F(x, w)``, ``dx = D(dy, w)``, ``dw = W(x, dy)``, all bilinear), so each one's VJP
  is written with the other two. No forward mode (``jax.jvp``).
  """
  return _call("fwd", dnnl_route.out_shape(x.shape, w.shape, strides, padding), x, w,
               strides, padding, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def input_grad(dy, w, x_shape, strides, padding, groups):
  """``D(dy, w)``: the input gradient of ``conv``, ``[N, H, W, C]`` (``x_shape``)."""
  return _call("bwd_data", x_shape, dy, w, strides, padding, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _weight_grad(x, dy, w_shape, strides, padding, groups):
  """``W(x, dy)``: the weight gradient of ``conv``, ``[kh, kw, C / groups, O]``
  (``w_shape``)."""
  return _call("bwd_weights", w_shape, x, dy, strides, padding, groups,
               dnnl_route.blocked_weight_grad(groups, w_shape))


def _conv_fwd(x, w, strides, padding, groups):
  return conv(x, w, strides, padding, groups), (x, w)


def stored(x):
  """``x``, which every op that uses it reads from the buffer it is stored in: the identity
  as a custom call (``SdlStored``, its result aliasing ``x``, so nothing is copied) where
  the library is loaded (``dnnl_route.available()``; CPU only: call it on the CPU paths), else ``x``
  itself. Differentiable (its JVP is the identity).

  Why: XLA:CPU fuses an elementwise op into each of its consumers, computing it again in
  each, even when it is stored anyway for a custom call (a convolution) that reads it. In
  ResNet-50 a block's output ``relu(bn(x) + residual)`` is the next block's residual, so
  each block's BatchNorm-add-ReLU fusion (forward, and the ReLU mask of the backward pass)
  recomputed every earlier block's output in its stage from their convolutions' outputs,
  reading up to four activation-sized tensors instead of two (README, "Performance").
  ``lax.optimization_barrier`` does not stop it: XLA removes it before
  fusing.
  """
  return _stored(x) if dnnl_route.available() else x


@jax.custom_jvp
def _stored(x):
  return jax.ffi.ffi_call(dnnl_lib.STORED_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                          input_output_aliases={0: 0})(x)


@_stored.defjvp
def _stored_jvp(primals, tangents):
  return _stored(primals[0]), tangents[0]


def after(a, b):
  """``a``, computed no earlier than ``b``: ``a + 0 * b.flat[0]``, equal to ``a`` wherever
  ``b.flat[0]`` is finite (an inf or NaN there would make it NaN, as it would the
  training anyway).

  Orders the backward pass on XLA:CPU, whose runtime runs any two ops whose operands
  exist side by side on its threads (``lax.optimization_barrier`` around the weight
  gradient did not order the traced step). Nothing reads a convolution's weight gradient
  until the optimizer, so XLA left them all to the end of the step, where they ran two at
  once, each oneDNN call's two OpenMP threads sharing the two cores with the other's
  (README, "Performance"). XLA does not fold ``0 * s`` for floats (the tests
  check that the dependency survives compilation), and the add fuses into whatever reads
  ``a`` next.
  """
  return a + (b.reshape(-1)[0] * 0).astype(a.dtype)


def _conv_bwd(strides, padding, groups, res, dy):
  x, w = res
  dx = input_grad(dy, w, x.shape, strides, padding, groups)
  dw = _weight_grad(x, dy, w.shape, strides, padding, groups)
  # What reads dx waits for dw: each layer's two gradients run before the layer below's,
  # one at a time in the traced step, as in PyTorch's backward.
  return after(dx, dw), dw


def _input_grad_fwd(dy, w, x_shape, strides, padding, groups):
  return input_grad(dy, w, x_shape, strides, padding, groups), (dy, w)


def _input_grad_bwd(x_shape, strides, padding, groups, res, g):
  # <D(dy, w), g> = <dy, F(g, w)> = <w, W(g, dy)>.
  dy, w = res
  return (conv(g, w, strides, padding, groups),
          _weight_grad(g, dy, w.shape, strides, padding, groups))


def _weight_grad_fwd(x, dy, w_shape, strides, padding, groups):
  return _weight_grad(x, dy, w_shape, strides, padding, groups), (x, dy)


def _weight_grad_bwd(w_shape, strides, padding, groups, res, g):
  # <W(x, dy), g> = <x, D(dy, g)> = <dy, F(x, g)>.
  x, dy = res
  return (input_grad(dy, g, x.shape, strides, padding, groups),
          conv(x, g, strides, padding, groups))


conv.defvjp(_conv_fwd, _conv_bwd)
input_grad.defvjp(_input_grad_fwd, _input_grad_bwd)
_weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)
