r"""The command line: trains, evaluates and predicts with a joint emotion model.

Installed as the ``sdl-jax`` console script (also ``python -m sdl_jax``; ``run.py`` in a
checkout is the same). Works from any folder: the configs ship inside the package.

    sdl-jax --workdir=W                                      # train + evaluate (synthetic)
    sdl-jax --config=flickr_ldl --config.data.path=/data/Flickr_LDL
    sdl-jax --config=sdl.py:paper --config.data.path=/data/Flickr_LDL
    sdl-jax --config=synthetic --config.lam=0.5 --workdir=workdirs/lam05
    sdl-jax --config=my_config.py:arg ...                    # a config file of your own
    sdl-jax --workdir=W --mode=evaluate
    sdl-jax --workdir=W --mode=predict --images=a.jpg,photos/
    sdl-jax --pretrained=ferplus --mode=predict --images=faces/   # a shipped model

``--config`` takes a preset name, ``sdl.py:<preset>`` (the packaged file), or a path to a
config file with an optional ``:<arg>``; ``sdl_jax.configs`` gives the rules. Field
overrides (``--config.lam=0.5``) need ``--config`` on the command line. Without it,
``--mode=train`` trains the ``synthetic`` preset, and evaluate and predict use the
workdir's saved config. Running the same training command again resumes from the
workdir's latest checkpoint.
"""

import sys

from absl import app
from absl import flags

from sdl_jax import configs

FLAGS = flags.FLAGS
FLAG_NAMES = ("config", "workdir", "pretrained", "mode", "images", "predict_out", "plot_dir",
              "split", "which")


def define_flags(flag_values=FLAGS):
  """Defines the command's flags in ``flag_values`` (absl's global flags by default)."""
  configs.define_config_flag("config", flag_values=flag_values)
  flags.DEFINE_string("workdir", None,
                      "Where checkpoints, metrics and the report go "
                      "(train default: ./workdirs/<config.name>).", flag_values=flag_values)
  flags.DEFINE_string("pretrained", None,
                      "predict: a model shipped with the package instead of --workdir "
                      "(ferplus: faces; flickr_ldl: photos; see docs/models/).",
                      flag_values=flag_values)
  flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"],
                    "train (and evaluate), evaluate a trained workdir, or predict images.",
                    flag_values=flag_values)
  flags.DEFINE_list("images", [], "predict: image files and/or folders, comma-separated.",
                    flag_values=flag_values)
  flags.DEFINE_string("predict_out", None,
                      "predict: write the JSON lines here (default stdout).",
                      flag_values=flag_values)
  flags.DEFINE_string("plot_dir", None, "predict: also draw one PNG per image here.",
                      flag_values=flag_values)
  flags.DEFINE_string("split", "test", "evaluate: the split to evaluate.",
                      flag_values=flag_values)
  flags.DEFINE_enum("which", "best", ["best", "latest"],
                    "evaluate / predict: the best (validation) or the latest checkpoint.",
                    flag_values=flag_values)


def _train_config(config):
  """``--config``, or the packaged default preset when it was not given."""
  if config is not None:
    return config
  from sdl_jax.configs import sdl  # pylint: disable=g-import-not-at-top
  return sdl.get_config()


def _predict(f) -> int:
  """``--mode=predict`` from the parsed flags ``f``: the one place predict's flags are
  read. Returns the exit status (non-zero if any image failed)."""
  if bool(f.workdir) == bool(f.pretrained):
    raise app.UsageError("--mode=predict needs either --workdir (a trained work directory) "
                         "or --pretrained (a shipped model), not both")
  if not f.images:
    raise app.UsageError("--images is required for --mode=predict")
  from sdl_jax import predict  # pylint: disable=g-import-not-at-top
  return predict.main(f.workdir, f.images, out=f.predict_out, plot_dir=f.plot_dir,
                      which=f.which, pretrained=f.pretrained)


def main(argv, f=FLAGS) -> int:
  """Runs ``--mode`` with the parsed flags ``f``; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _train_config(f.config) if f.mode == "train" else f.config
  # Process settings for XLA:CPU (XLA flags, allocator) before anything starts JAX; for
  # evaluate and predict without --config, the defaults. Imported here, as everything
  # below, so that --help answers without loading JAX and TensorFlow.
  from sdl_jax import cpu  # pylint: disable=g-import-not-at-top
  cpu.configure(config)
  if f.mode == "train":
    from sdl_jax import checkpoint, evaluate, train  # pylint: disable=g-import-not-at-top
    from sdl_jax import workdir_lock  # pylint: disable=g-import-not-at-top
    try:
      train.train_and_evaluate(config, f.workdir)
    except (checkpoint.CheckpointError, workdir_lock.WorkdirLockedError) as e:
      # A workdir in use, no intact checkpoint to resume, a failed save: the user acts
      # on the message, which a traceback would bury.
      return evaluate.refuse("train", e)
    return 0
  if f.mode == "predict":
    return _predict(f)
  if not f.workdir:
    raise app.UsageError("--workdir is required for --mode=evaluate")
  from sdl_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.main(config, f.workdir, split=f.split, which=f.which)


def run():
  """The console script's entry point: defines the flags, parses ``sys.argv``, runs."""
  define_flags()
  # --help lists the main program's key flags (absl keys them by sys.argv[0]); the flags
  # are defined in this module (and the config flag in ml_collections), so declare them.
  for name in FLAG_NAMES:
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
  # --help starts with the main module's docstring: the console script's has none.
  main_module = sys.modules["__main__"]
  if not getattr(main_module, "__doc__", None):
    main_module.__doc__ = __doc__
  app.run(main)
