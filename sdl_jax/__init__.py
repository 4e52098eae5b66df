"""sdl-jax: joint image emotion classification and distribution learning in JAX/Flax.

Implements Yang, She and Sun, "Joint Image Emotion Classification and Distribution
Learning via Deep Convolutional Neural Network" (IJCAI 2017).
"""

__version__ = "0.1.0"
