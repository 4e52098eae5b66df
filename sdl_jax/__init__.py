"""sdl-jax: joint image emotion classification and distribution learning in JAX/Flax.

Implements Yang, She and Sun, "Joint Image Emotion Classification and Distribution
Learning via Deep Convolutional Neural Network" (IJCAI 2017).

Importing the package adds ``sdl_jax.perf.FAST_CPU_XLA_FLAGS`` to ``$XLA_FLAGS`` (XLA:CPU
convolutions on XLA's own kernels rather than YNNPACK's, whose gradients measured several
times slower, and XLA:CPU's memory-optimised scheduler; see the README's performance
section). The flags only act on CPU and only if JAX has not started yet; a flag the user
already set keeps the user's value, and ``SDL_JAX_XLA_DEFAULTS=0`` turns this off.

It also tells glibc's malloc to keep freed memory for reuse (``sdl_jax.perf.
keep_freed_memory``: XLA:CPU allocates a step's temporaries afresh on every call, and
glibc would map and page-fault them anew each time); ``SDL_JAX_MALLOC=default`` leaves the
allocator alone.
"""

import os as _os

__version__ = "0.1.0"

from sdl_jax import perf as _perf

if _os.environ.get("SDL_JAX_XLA_DEFAULTS", "1") != "0":
  _perf.use_fast_cpu_flags(keep_user_values=True)
if _perf.malloc_mode() == "keep":
  _perf.keep_freed_memory()
