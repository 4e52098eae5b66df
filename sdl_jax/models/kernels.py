"""Which implementation the models' layers take: hand-written paths for XLA:CPU, or XLA's
own operations.

On XLA:CPU several layers are written by hand because XLA's own lowering was slow there
(README, "Performance"): float32 convolutions on oneDNN through XLA's FFI where it is
installed (``dnnl.py``), else those in ``conv.py`` (depthwise as shifted taps, 1x1 as
matmuls, strided ones with a space-to-depth weight gradient), ResNet-50's BatchNorm
(``norm.py``) and its 3x3/2 max-pool (``resnet.py``). On GPU/TPU, XLA's own convolutions
(cuDNN on NVIDIA), ``reduce_window`` and autodiff are what its compiler is built for, and
one hand path (a strided 1x1 convolution as a matmul over a strided slice) crashed
XLA:GPU's compiler (jax 0.11.2, H200: a failed check in its Triton tiling pass). So the
models take the hand paths only on the CPU backend, unless told otherwise:

``SDL_JAX_KERNELS`` (environment) or ``kernels.use(mode)`` (a context manager):
  ``auto`` (default): hand paths if ``jax.default_backend()`` is the CPU, else XLA's;
  ``cpu``: hand paths on every backend; ``xla``: XLA's operations on every backend.

Both compute the same function with the same variables, to rounding (the tests compare
the two paths' train-mode logits, gradients and batch statistics, and check ResNet-50's on
each path against PyTorch's). The choice is made when
a model is traced, so a function already compiled keeps the paths it was traced with.
"""

from __future__ import annotations

import contextlib
import os

import jax

MODES = ("auto", "cpu", "xla")
ENV = "SDL_JAX_KERNELS"
_override: str | None = None


def mode() -> str:
  """The requested mode: ``use``'s if inside one, else ``$SDL_JAX_KERNELS``, else auto."""
  m = _override or os.environ.get(ENV, "").strip().lower() or "auto"
  if m not in MODES:
    raise ValueError(f"{ENV}={m!r}: must be one of {', '.join(MODES)}")
  return m


def hand_paths() -> bool:
  """Whether the models take the hand-written XLA:CPU paths (see the module docstring)."""
  m = mode()
  return jax.default_backend() == "cpu" if m == "auto" else m == "cpu"


@contextlib.contextmanager
def use(m: str):
  """Within the block, models traced take ``m``'s paths (``auto``, ``cpu`` or ``xla``)."""
  global _override
  if m not in MODES:
    raise ValueError(f"kernels.use: mode must be one of {', '.join(MODES)}, got {m!r}")
  previous, _override = _override, m
  try:
    yield
  finally:
    _override = previous
