r"""Trains and evaluates a joint emotion classification + distribution model.

    python run.py --config=configs/sdl.py                      # built-in synthetic set
    python run.py --config=configs/sdl.py:paper --config.data.path=/data/Flickr_LDL
    python run.py --config=configs/sdl.py --config.lam=0.5 --workdir=workdirs/lam05

Running the same command again resumes from the workdir's latest checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from sdl_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/sdl.py:<preset>.",
    lock_config=True)
flags.DEFINE_string("workdir", None,
                    "Where checkpoints, metrics and the report go "
                    "(default: ./workdirs/<config.name>).")
flags.DEFINE_enum("mode", "train", ["train"], "What to do: train (and evaluate).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
