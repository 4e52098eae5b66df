"""configs/sdl.py: every preset parses through config_flags, overrides work, clear errors."""

from pathlib import Path
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from sdl_jax import distributions
from sdl_jax import metrics
from sdl_jax import models
from sdl_jax import train_state
from sdl_jax import validation

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "sdl.py")


def _parse(*argv):
  """Parses argv as run.py does (config_flags reads the overrides from sys.argv)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
  old = sys.argv
  sys.argv = ["prog", *argv]
  try:
    fv(sys.argv)
  finally:
    sys.argv = old
  return fv.config


def _presets():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("sdl_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.PRESETS


@pytest.mark.parametrize("preset", _presets())
def test_every_preset_parses(preset):
  c = _parse(f"--config={CONFIG}:{preset}")
  # Whole numbers of rows (a float 32.0 would fail later, in a reshape); no evaluation
  # batch means the training one.
  whole = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 1
  assert whole(c.batch_size), c.batch_size
  assert c.eval_batch_size is None or whole(c.eval_batch_size), c.eval_batch_size
  assert c.batch_size % c.get("grad_accum_steps", 1) == 0
  assert c.best_metric in metrics.HIGHER_IS_BETTER
  assert c.resize_size >= c.image_size
  assert c.schedule in ("step", "cosine", "constant")
  assert c.model in models.MODEL_SPECS
  assert c.data.name in ("synthetic", "ferplus", "emotion6", "flickr_ldl", "twitter_ldl",
                         "folders", "votes_csv")
  if c.data.name != "synthetic":
    assert c.data.path is None  # real data sets need the flag
    c = _parse(f"--config={CONFIG}:{preset}", "--config.data.path=/data")
  # The checks train.train_and_evaluate makes first pass: every field in range.
  validation.validate_config(c)


def test_default_is_synthetic_small_cnn():
  c = _parse(f"--config={CONFIG}")
  assert c.name == "synthetic" and c.data.name == "synthetic"
  assert c.model in models.MODEL_SPECS and c.pretrained is None
  assert c.batch_size == 32 and c.lam == 0.8 and c.momentum == 0.9
  validation.validate_config(c)


def test_paper_preset_is_the_released_recipe():
  """The values of the authors' vgg_solver1.prototxt and vgg_train_val16_1.prototxt."""
  c = _parse(f"--config={CONFIG}:paper")
  assert (c.model, c.learning_rate, c.momentum, c.weight_decay) == (
      "vgg16", 1e-4, 0.9, 5e-3)
  assert c.pretrained is None  # a file the user supplies: --config.pretrained=...
  assert (c.head_lr_mult, c.bias_lr_mult, c.bias_decay_mult) == (10.0, 2.0, 1.0)
  assert (c.batch_size, c.image_size, c.crop, c.flip, c.lam) == (32, 224, "random", True, 0.8)
  assert (c.schedule, c.gamma, c.step_size_steps, c.num_train_steps) == (
      "step", 0.1, 10_000, 3000)
  assert c.model_kwargs.dropout_rate == 0.5
  assert (c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps) == (20, 100, 1000)
  assert (c.data.strategy, c.data.distance, c.data.sigma, c.data.eps) == (
      "combined", "index", distributions.RELEASED_SIGMA, distributions.RELEASED_EPS)
  validation.validate_config(_parse(f"--config={CONFIG}:paper", "--config.data.path=/x"))


def test_paper_rate_never_steps_within_its_iterations():
  c = _parse(f"--config={CONFIG}:paper")
  lr = train_state.create_learning_rate_fn(c, steps_per_epoch=279, num_train_steps=3000)
  assert float(lr(0)) == float(lr(c.num_train_steps - 1)) == pytest.approx(1e-4)
  assert float(lr(c.step_size_steps)) == pytest.approx(1e-5)


def test_target_defaults_are_the_library_defaults():
  c = _parse(f"--config={CONFIG}")
  assert (c.data.distance, c.data.sigma, c.data.eps) == (
      distributions.DEFAULT_DISTANCE, distributions.DEFAULT_SIGMA, distributions.DEFAULT_EPS)
  assert c.bias_decay_mult == 0.0 and c.step_size_steps is None


@pytest.mark.parametrize("preset", ["emotion6", "flickr_ldl", "twitter_ldl", "fi"])
def test_published_presets_keep_their_own_schedule(preset):
  c = _parse(f"--config={CONFIG}:{preset}")
  assert c.num_train_steps is None and c.step_size_steps is None
  assert c.bias_decay_mult == 0.0 and c.data.distance == "wheel"
  assert (c.model, c.pretrained, c.schedule, c.batch_size) == (
      "efficientnet_lite0", "efficientnet_lite0", "cosine", 32)
  # Linear probe, then fine-tune: the fitted head needs no 10x rate.
  assert (c.head_init, c.head_lr_mult, c.eval_every_epochs) == ("probe", 1.0, 1.0)


def test_overrides_from_the_command_line():
  c = _parse(f"--config={CONFIG}", "--config.lam=0.5", "--config.data.num_examples=2000",
             "--config.pretrained=vgg16", "--config.model_kwargs.widths=(8,16)",
             "--config.num_train_steps=7", "--config.schedule=constant")
  assert c.lam == 0.5 and c.data.num_examples == 2000 and c.pretrained == "vgg16"
  assert tuple(c.model_kwargs.widths) == (8, 16) and c.num_train_steps == 7
  c = _parse(f"--config={CONFIG}:emotion6", "--config.data.path=/some/where")
  assert c.data.path == "/some/where"
  # The data sets' optional locations and image mode are fields too.
  c = _parse(f"--config={CONFIG}:flickr_ldl", "--config.data.image_dir=imgs",
             "--config.data.label_file=labels.txt", "--config.data.channels=1",
             "--config.eval_flip=True")
  assert (c.data.image_dir, c.data.label_file, c.data.channels, c.eval_flip) == (
      "imgs", "labels.txt", 1, True)


def test_unknown_field_and_preset_are_errors():
  with pytest.raises(Exception, match="no_such_field"):
    _parse(f"--config={CONFIG}", "--config.no_such_field=1")
  with pytest.raises(Exception, match="unknown preset"):
    _parse(f"--config={CONFIG}:nope")


@pytest.mark.parametrize("preset", ["emotion6", "flickr_ldl", "twitter_ldl", "fi", "ferplus",
                                    "paper"])
def test_real_data_presets_need_a_path(preset):
  c = _parse(f"--config={CONFIG}:{preset}")
  with pytest.raises(ValueError, match=r"--config\.data\.path"):
    validation.validate_config(c)


def test_bad_values_are_named():
  c = _parse(f"--config={CONFIG}", "--config.best_metric=f1")
  with pytest.raises(ValueError, match="config.best_metric"):
    validation.validate_config(c)
  c = _parse(f"--config={CONFIG}", "--config.lam=1.5")
  with pytest.raises(ValueError, match="config.lam"):
    validation.validate_config(c)


@pytest.mark.parametrize("override,field", [
    ("--config.num_train_steps=-5", "config.num_train_steps"),
    ("--config.num_epochs=0", "config.num_epochs"),
    ("--config.eval_batch_size=0", "config.eval_batch_size"),
    ("--config.batch_size=0", "config.batch_size"),
    ("--config.learning_rate=-0.1", "config.learning_rate"),
    ("--config.momentum=1.0", "config.momentum"),
    ("--config.weight_decay=-1e-4", "config.weight_decay"),
    ("--config.warmup_steps=-1", "config.warmup_steps"),
    ("--config.gamma=0", "config.gamma"),
    ("--config.image_size=300", "config.resize_size"),
    ("--config.data.split_fractions=(0.8,0.1,0.2)", "config.data.split_fractions"),
])
def test_out_of_range_numbers_are_named(override, field):
  c = _parse(f"--config={CONFIG}", override)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    validation.validate_config(c)


@pytest.mark.parametrize("preset", ["synthetic", "ferplus", "flickr_ldl", "paper"])
def test_presets_are_within_range(preset):
  validation.validate_ranges(_parse(f"--config={CONFIG}:{preset}"))
