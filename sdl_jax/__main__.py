# `python -m sdl_jax`: the `sdl-jax` command; its --help shows sdl_jax/cli.py's docstring.
from sdl_jax import cli

if __name__ == "__main__":
  cli.run()
