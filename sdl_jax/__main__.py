"""``python -m sdl_jax``: the ``sdl-jax`` command (``sdl_jax/cli.py``)."""

from sdl_jax import cli

if __name__ == "__main__":
  cli.run()
