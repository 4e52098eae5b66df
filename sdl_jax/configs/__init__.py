r"""The packaged configs, how ``--config`` names them, and how a config meets the devices.

The configs ship inside the package (``sdl_jax/configs/sdl.py``: ``get_config(preset)``),
so the installed ``sdl-jax`` command and ``python -m sdl_jax.sweep`` find them from any
folder. ``--config=VALUE`` (``define_config_flag``) is resolved by ``resolve`` before
``ml_collections.config_flags`` loads it, first match wins:

1. ``PATH[:ARG]`` where ``PATH`` is an existing file: that file, as config_flags always
   did (your own config file; ``configs/sdl.py`` in a checkout re-exports the packaged
   one, so ``python run.py --config=configs/sdl.py:paper`` keeps working there).
2. ``NAME[:ARG]`` where ``NAME`` is a packaged config file (``sdl.py``): the packaged file,
   e.g. ``--config=sdl.py:flickr_ldl``.
3. ``PRESET``, a preset of the packaged ``sdl.py`` (``synthetic``, ``flickr_ldl``, ...):
   ``sdl.py:PRESET``, e.g. ``--config=ferplus``.

Anything else is an error naming the value, the packaged files and the presets. Field
overrides (``--config.lam=0.5``) work the same whichever way the file was named.
"""

from __future__ import annotations

import math
import os

# The config files shipped in this folder, by the name --config knows them.
PACKAGED_FILES = ("sdl.py",)
# What --mode=train runs without --config: the synthetic preset (sdl.py's default).
DEFAULT = "sdl.py"


def packaged_path(name: str = DEFAULT) -> str:
  """The absolute path of the packaged config file ``name`` (one of ``PACKAGED_FILES``)."""
  if name not in PACKAGED_FILES:
    raise ValueError(f"no packaged config file {name!r}; packaged: "
                     f"{', '.join(PACKAGED_FILES)}")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def resolve(value: str) -> str:
  """The ``file[:arg]`` string config_flags should load for ``--config=value``.

  See the module docstring for the three rules. Raises ValueError, naming ``value``,
  when none applies.
  """
  from sdl_jax.configs import sdl  # pylint: disable=g-import-not-at-top
  path, colon, arg = (value or "").partition(":")
  if path and os.path.isfile(path):
    return value
  if path in PACKAGED_FILES:
    return packaged_path(path) + colon + arg
  if not colon and path.strip().lower() in sdl.PRESETS:
    return f"{packaged_path(DEFAULT)}:{path}"
  raise ValueError(
      f"--config={value!r}: no such file, and neither a packaged config file "
      f"({', '.join(PACKAGED_FILES)}, e.g. --config=sdl.py:flickr_ldl) nor one of its "
      f"presets ({', '.join(sdl.PRESETS)})")


def define_config_flag(name: str = "config", flag_values=None, help_string: str | None = None):
  """``config_flags.DEFINE_config_file(name)`` (default None, locked), whose value is
  resolved by ``resolve`` first. Returns the flag holder."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS if flag_values is None else flag_values
  holder = config_flags.DEFINE_config_file(
      name, None, help_string or (
          "A preset (synthetic, flickr_ldl, ...), sdl.py:<preset>, or a config file "
          "[:<arg>]; see sdl_jax/configs/__init__.py."),
      flag_values=flag_values, lock_config=True)
  flag = flag_values[name]
  file_parser = flag.parser

  class _ResolvingParser(flags.ArgumentParser):
    """config_flags' own file parser, given the resolved value."""

    def parse(self, argument):
      return file_parser.parse(resolve(argument))

    def flag_type(self):
      return file_parser.flag_type()

  # With a None default nothing has been parsed yet, so the wrapper sees every value.
  flag.parser = _ResolvingParser()
  return holder


def scale_to_devices(config, num_devices: int, per_device_batch: int | None = None):
  """Adapts a one-device preset to ``num_devices`` data-parallel devices, in place.

  The presets are tuned for one device at ``config.batch_size`` (B). With
  ``per_device_batch`` b (default B), ``n = num_devices`` and ``k = n b / B``:

  * global batch: ``n b`` (each device gets b images a step); a set ``eval_batch_size``:
    n times it;
  * learning rate: ``k lr`` (the linear scaling rule, Goyal et al. 2017, "Accurate, Large
    Minibatch SGD"), the probe's full-batch rate unchanged;
  * everything counted in steps (warmup, decay step, validation, checkpoints, logging,
    ``num_train_steps``): divided by k, rounded up, so it falls at the same number of
    images; counts in epochs stay.

  For n = 1 and b = B the config is unchanged. Returns ``config``.
  """
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  b = config.batch_size if per_device_batch is None else int(per_device_batch)
  if b < 1:
    raise ValueError(f"per_device_batch must be >= 1, got {per_device_batch}")
  k = num_devices * b / config.batch_size
  config.batch_size = num_devices * b
  if config.get("eval_batch_size"):  # unset: the training batch
    config.eval_batch_size = config.eval_batch_size * num_devices
  config.learning_rate = config.learning_rate * k
  for field in ("warmup_steps", "step_size_steps", "num_train_steps", "eval_every_steps",
                "checkpoint_every_steps", "log_every_steps"):
    steps = config.get(field)
    if steps:  # None (unset) and 0 (no warmup) stay
      config[field] = max(1, math.ceil(steps / k))
  return config
