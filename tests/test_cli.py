"""The command line: --config names packaged presets from any folder; flags; device scaling."""

import importlib.util
import math
import os
from pathlib import Path
import subprocess
import sys

from absl import app
from absl import flags
import pytest

from sdl_jax import cli
from sdl_jax import configs
from sdl_jax.configs import sdl

REPO = Path(__file__).resolve().parents[1]
CHECKOUT_CONFIG = REPO / "configs" / "sdl.py"


def _parse(monkeypatch, *argv):
  """Parses argv with the command's flags (config_flags reads overrides from sys.argv)."""
  fv = flags.FlagValues()
  cli.define_flags(fv)
  monkeypatch.setattr(sys, "argv", ["sdl-jax", *argv])
  fv(sys.argv)
  return fv


def test_resolve_rules(tmp_path, monkeypatch):
  packaged = configs.packaged_path("sdl.py")
  assert os.path.isfile(packaged) and Path(packaged).parent == Path(sdl.__file__).parent
  # An existing file wins, with or without an argument.
  own = tmp_path / "mine.py"
  own.write_text("def get_config(arg=None):\n  return {'arg': arg}\n")
  assert configs.resolve(f"{own}:x") == f"{own}:x"
  assert configs.resolve(str(CHECKOUT_CONFIG)) == str(CHECKOUT_CONFIG)
  # Elsewhere (no sdl.py in the working directory): the packaged file, and preset names.
  monkeypatch.chdir(tmp_path)
  assert configs.resolve("sdl.py:paper") == f"{packaged}:paper"
  assert configs.resolve("sdl.py") == packaged
  for preset in sdl.PRESETS:
    assert configs.resolve(preset) == f"{packaged}:{preset}"
  # A file named like a preset in the working directory is that file.
  (tmp_path / "paper").write_text("")
  assert configs.resolve("paper") == "paper"


@pytest.mark.parametrize("value", ["nope", "configs/nope.py", "flickr_ldl:x", ""])
def test_resolve_names_what_it_could_not_find(value, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="no such file.*sdl.py.*synthetic, emotion6"):
    configs.resolve(value)


@pytest.mark.parametrize("preset", sdl.PRESETS)
def test_checkout_config_is_the_packaged_one(preset, tmp_path, monkeypatch):
  spec = importlib.util.spec_from_file_location("checkout_sdl", CHECKOUT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.PRESETS == sdl.PRESETS
  monkeypatch.chdir(tmp_path)
  by_name = _parse(monkeypatch, f"--config={preset}").config
  by_file = _parse(monkeypatch, f"--config=sdl.py:{preset}").config
  assert module.get_config(preset).to_dict() == by_name.to_dict() == by_file.to_dict()


def test_config_flag_takes_overrides_and_rejects_bad_names(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  fv = _parse(monkeypatch, "--config=flickr_ldl", "--config.lam=0.5", "--config.data.path=/d",
              "--mode=predict", "--images=a.jpg,b/")
  assert (fv.config.name, fv.config.lam, fv.config.data.path) == ("flickr_ldl", 0.5, "/d")
  assert fv.images == ["a.jpg", "b/"] and fv.mode == "predict"
  assert _parse(monkeypatch).config is None  # evaluate / predict: the workdir's saved config
  with pytest.raises(flags.IllegalFlagValueError, match="'nope'.*presets"):
    _parse(monkeypatch, "--config=nope")


def test_modes_check_their_flags_before_loading_anything(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(app.UsageError, match="--images is required"):
    cli.main(["sdl-jax"], _parse(monkeypatch, "--mode=predict", f"--workdir={tmp_path}"))
  with pytest.raises(app.UsageError, match="--workdir is required for --mode=evaluate"):
    cli.main(["sdl-jax"], _parse(monkeypatch, "--mode=evaluate"))
  with pytest.raises(app.UsageError, match="unexpected arguments: extra"):
    cli.main(["sdl-jax", "extra"], _parse(monkeypatch))


def test_help_and_import_load_neither_jax_nor_tensorflow():
  code = ("import sys; from sdl_jax import cli, configs; "
          "sys.argv = ['sdl-jax', '--help']\n"
          "try:\n  cli.run()\nexcept SystemExit:\n  pass\n"
          "print(sorted(m for m in ('jax', 'tensorflow', 'torch') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, timeout=120)
  assert "--config" in out.stdout and "--mode" in out.stdout
  assert out.stdout.strip().splitlines()[-1] == "[]"


def _scaled_reference(c, n, b):
  """scale_to_devices, field by field, the plain way."""
  k = n * b / c.batch_size
  steps = lambda s: s if not s else max(1, math.ceil(s / k))  # pylint: disable=g-long-lambda
  return {"batch_size": n * b, "learning_rate": c.learning_rate * k,
          "warmup_steps": steps(c.warmup_steps), "step_size_steps": steps(c.step_size_steps),
          "num_train_steps": steps(c.num_train_steps),
          "eval_every_steps": steps(c.eval_every_steps),
          "checkpoint_every_steps": steps(c.checkpoint_every_steps),
          "log_every_steps": steps(c.log_every_steps), "num_epochs": c.num_epochs,
          "probe_learning_rate": c.probe_learning_rate}


@pytest.mark.parametrize("preset,n,b", [("synthetic", 1, None), ("synthetic", 8, None),
                                        ("paper", 8, 32), ("flickr_ldl", 4, 16),
                                        ("synthetic", 2, 8)])
def test_scale_to_devices(preset, n, b):
  before = sdl.get_config(preset)
  expected = _scaled_reference(before, n, before.batch_size if b is None else b)
  scaled = configs.scale_to_devices(sdl.get_config(preset), n, b)
  assert {k: scaled[k] for k in expected} == pytest.approx(expected)
  if n == 1 and b is None:
    assert scaled.to_dict() == before.to_dict()


def test_scale_to_devices_rejects_nonsense():
  with pytest.raises(ValueError, match="num_devices"):
    configs.scale_to_devices(sdl.get_config(), 0)
  with pytest.raises(ValueError, match="per_device_batch"):
    configs.scale_to_devices(sdl.get_config(), 2, 0)
