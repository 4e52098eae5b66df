"""A tiny trained work directory, built once per pytest run, for the user-surface tests.

Import the fixture into a test module with ``from workdir_fixture import trained_workdir``
(pytest puts ``tests/`` on ``sys.path``). Every module that imports it gets the same
directory: the training runs once per pytest run, whichever module asks first.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The training run's settings; the tests compare against them.
TINY_STEPS = 6
TINY_LAM = 0.8
TINY_SEED = 0

_CACHE: dict[str, Path] = {}


def sdl_configs():
  """The ``configs/sdl.py`` module of this repository."""
  spec = importlib.util.spec_from_file_location("sdl_configs_for_tests",
                                                REPO / "configs" / "sdl.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(data_dir):
  """The synthetic preset shrunk to seconds: 240 drawn 16 px images, a 2-block CNN of
  widths 8 and 16, 6 steps of batch 16, validation and checkpoints every 3 steps."""
  c = sdl_configs().get_config("synthetic")
  c.data.num_examples = 240
  c.data.image_size = 16
  c.data.cache_dir = str(data_dir)
  c.image_size, c.resize_size = 16, 18
  c.model_kwargs.widths = (8, 16)
  c.batch_size = 16
  c.num_train_steps = TINY_STEPS
  c.warmup_steps = 1
  c.eval_every_steps = c.checkpoint_every_steps = 3
  c.log_every_steps = 3
  c.lam = TINY_LAM
  c.seed = TINY_SEED
  return c


def data_dir(tmp_path_factory) -> Path:
  """One TFDS data directory per pytest run (the synthetic set is prepared once)."""
  if "data" not in _CACHE:
    _CACHE["data"] = tmp_path_factory.mktemp("sdl_data")
  return _CACHE["data"]


def build_trained_workdir(tmp_path_factory) -> Path:
  if "workdir" not in _CACHE:
    from sdl_jax import train  # pylint: disable=g-import-not-at-top
    workdir = tmp_path_factory.mktemp("tiny_workdir")
    train.train_and_evaluate(tiny_config(data_dir(tmp_path_factory)), str(workdir))
    _CACHE["workdir"] = workdir
  return _CACHE["workdir"]


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory) -> Path:
  """A workdir trained by ``train.train_and_evaluate`` on ``tiny_config`` (read-only:
  tests that write into a workdir copy it first)."""
  return build_trained_workdir(tmp_path_factory)
