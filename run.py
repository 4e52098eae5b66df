r"""Trains, evaluates and predicts with a joint emotion classification + distribution model.

    python run.py --config=configs/sdl.py                      # train + evaluate (synthetic)
    python run.py --config=configs/sdl.py:paper --config.data.path=/data/Flickr_LDL
    python run.py --config=configs/sdl.py --config.lam=0.5 --workdir=workdirs/lam05
    python run.py --config=configs/sdl.py --workdir=W --mode=evaluate
    python run.py --workdir=W --mode=predict --images=a.jpg,photos/
    python run.py --pretrained=ferplus --mode=predict --images=faces/   # a shipped model

Running the same training command again resumes from the workdir's latest checkpoint.
"""


from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/sdl.py:<preset>.",
    lock_config=True)
flags.DEFINE_string("workdir", None,
                    "Where checkpoints, metrics and the report go "
                    "(train default: ./workdirs/<config.name>).")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"],
                  "train (and evaluate), evaluate a trained workdir, or predict images.")
flags.DEFINE_list("images", [], "predict: image files and/or folders, comma-separated.")
flags.DEFINE_string("predict_out", None, "predict: write the JSON lines here (default stdout).")
flags.DEFINE_string("plot_dir", None, "predict: also draw one PNG per image here.")
flags.DEFINE_string("pretrained", None,
                    "predict: a model shipped with the package instead of --workdir "
                    "(ferplus: faces; flickr_ldl: photos; see docs/models/).")
flags.DEFINE_string("split", "test", "evaluate: the split to evaluate.")
flags.DEFINE_enum("which", "best", ["best", "latest"],
                  "evaluate / predict: the best (validation) or the latest checkpoint.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Process settings for XLA:CPU (XLA flags, allocator) before anything starts JAX; for
  # evaluate and predict without --config, the defaults. Imported here, as everything
  # below, so that --help answers without loading JAX and TensorFlow.
  from sdl_jax import cpu  # pylint: disable=g-import-not-at-top
  cpu.configure(FLAGS.config)
  if FLAGS.mode == "train":
    if FLAGS.config is None:
      raise app.UsageError("--config is required for --mode=train")
    from sdl_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    return 0
  if FLAGS.mode == "predict":
    return _predict()
  if not FLAGS.workdir:
    raise app.UsageError(f"--workdir is required for --mode={FLAGS.mode}")
  from sdl_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.main(FLAGS.config, FLAGS.workdir, split=FLAGS.split, which=FLAGS.which)


def _predict():
  if bool(FLAGS.workdir) == bool(FLAGS.pretrained):
    raise app.UsageError("--mode=predict needs either --workdir (a trained work directory) "
                         "or --pretrained (a shipped model), not both")
  if not FLAGS.images:
    raise app.UsageError("--images is required for --mode=predict")
  from sdl_jax import predict  # pylint: disable=g-import-not-at-top
  return predict.main(FLAGS.workdir, FLAGS.images, out=FLAGS.predict_out,
                      plot_dir=FLAGS.plot_dir, which=FLAGS.which,
                      pretrained=FLAGS.pretrained)


if __name__ == "__main__":
  app.run(main)
