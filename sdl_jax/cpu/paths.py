"""Which implementation the models' layers take: this package's hand-written paths for
XLA:CPU, or XLA's own operations (``sdl_jax.models.layers`` asks ``hand_paths()``).

On XLA:CPU several layers are written by hand because XLA's own lowering was slow there:
convolutions on oneDNN (``dnnl.py``) or as shifted taps and matmuls (``conv.py``),
BatchNorm with a hand-written gradient (``norm.py``) and max-pools (``pool.py``). On
GPU/TPU, XLA's own convolutions (cuDNN on NVIDIA), ``reduce_window`` and autodiff are what
its compiler is built for, and one hand path (a strided 1x1 convolution as a matmul over a
strided slice) crashed XLA:GPU's compiler (jax 0.11.2, H200: a failed check in its Triton
tiling pass). So the hand paths are taken on the CPU backend only, unless told otherwise.
The mode, first match wins:

1. ``use(mode)``, a context manager (tests, benchmarks);
2. ``$SDL_JAX_KERNELS``, where set (an override for one run);
3. ``config.cpu.kernels``, set by ``sdl_jax.cpu.configure``;
4. ``auto``.

``auto``: hand paths if ``jax.default_backend()`` is the CPU, else XLA's; ``cpu``: hand
paths on every backend; ``xla``: XLA's operations on every backend. Both compute the same
function with the same variables, to rounding (the tests compare the two paths' train-mode
logits, gradients and batch statistics). The choice is made when a model is traced, so a
function already compiled keeps the paths it was traced with.
"""

from __future__ import annotations

import contextlib
import os

MODES = ("auto", "cpu", "xla")
ENV = "SDL_JAX_KERNELS"
_override: str | None = None
_configured = "auto"


def check(m: str, where: str) -> str:
  """``m`` lower-cased if it is one of ``MODES``, else a ValueError naming ``where``."""
  v = str(m).strip().lower()
  if v not in MODES:
    raise ValueError(f"{where}={m!r}: must be one of {', '.join(MODES)}")
  return v


def set_default(m: str) -> None:
  """The mode when neither ``use`` nor ``$SDL_JAX_KERNELS`` says (``configure`` sets it)."""
  global _configured
  _configured = check(m, "config.cpu.kernels")


def mode() -> str:
  """The requested mode (see the module docstring)."""
  if _override is not None:
    return _override
  env = os.environ.get(ENV, "").strip()
  return check(env, ENV) if env else _configured


def hand_paths() -> bool:
  """Whether the models take the hand-written XLA:CPU paths (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top  (this package imports without JAX)
  m = mode()
  return jax.default_backend() == "cpu" if m == "auto" else m == "cpu"


@contextlib.contextmanager
def use(m: str):
  """Within the block, models traced take ``m``'s paths (``auto``, ``cpu`` or ``xla``)."""
  global _override
  previous, _override = _override, check(m, "paths.use")
  try:
    yield
  finally:
    _override = previous
