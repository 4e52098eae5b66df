"""Shared test set-up: float64 is enabled per test where needed; TF never sees a GPU.

The suite runs on the CPU: CUDA devices are hidden from every framework, unless
``$SDL_JAX_TEST_ACCELERATOR=1`` (``benchmarks/device_check.py`` sets it), which leaves them
to JAX (TensorFlow, used for data only, hides them from itself: ``sdl_jax.data.pipeline``)
so that the tests run on JAX's default backend, whichever it is."""

import os

# Keep TensorFlow quiet and off any accelerator in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("SDL_JAX_TEST_ACCELERATOR") != "1":
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
