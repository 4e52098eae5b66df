r"""Trains, evaluates and predicts with a joint emotion classification + distribution model.

    python run.py --config=configs/sdl.py                      # train + evaluate (synthetic)
    python run.py --config=configs/sdl.py:paper --config.data.path=/data/Flickr_LDL
    python run.py --config=configs/sdl.py --config.lam=0.5 --workdir=workdirs/lam05
    python run.py --config=configs/sdl.py --workdir=W --mode=evaluate
    python run.py --workdir=W --mode=predict --images=a.jpg,photos/
    python run.py --pretrained=ferplus --mode=predict --images=faces/   # a shipped model

The same as the installed ``sdl-jax`` command (``sdl_jax/cli.py`` documents the flags;
``--config=<preset>`` works too). Running the same training command again resumes from
the workdir's latest checkpoint.
"""

from sdl_jax import cli

if __name__ == "__main__":
  cli.run()
