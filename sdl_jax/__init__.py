"""sdl-jax: joint image emotion classification and distribution learning in JAX/Flax.

Implements Yang, She and Sun, "Joint Image Emotion Classification and Distribution
Learning via Deep Convolutional Neural Network" (IJCAI 2017).

Importing the package changes nothing process-wide: the XLA:CPU flags and the allocator
setting are applied by ``sdl_jax.cpu.configure(config)``, which the entry points (``run.py``,
``python -m sdl_jax.sweep``, the benchmarks) call before JAX starts.
"""

__version__ = "0.1.0"
