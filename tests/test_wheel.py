"""The built package: its sdist and wheel hold what the runtime needs, and the wheel,
installed in a fresh virtual environment, trains and predicts from a folder outside the
repository.

The environment is a plain ``python -m venv`` (no system or test-venv packages) and the
wheel is installed with its dependencies by pip: the only honest check that the declared
requirements suffice. Reusing this venv's packages instead would save the install (about
1.5 minutes with pip's cache warm, 2026-12-06, epyc-zen4) but not work: its editable
``sdl_jax`` import hook shadows whatever the wheel installs.
"""

import json
import subprocess
import tarfile
import zipfile

import numpy as np
from PIL import Image
import pytest

from sdl_jax import emotions
import wheel_fixture as wf


def _run(python, args, cwd, env, timeout=600):
  proc = subprocess.run([str(python.parent / args[0]), *args[1:]], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)
  return proc


@pytest.mark.slow
def test_sdist_and_wheel_hold_the_package_data(tmp_path):
  src = wf.copy_sources(tmp_path / "src")
  sdist, wheel = wf.build(src, tmp_path / "dist")
  with zipfile.ZipFile(wheel) as z:
    in_wheel = set(z.namelist())
    entry_points, metadata = (
        next(z.read(n).decode() for n in in_wheel if n.endswith(f".dist-info/{name}"))
        for name in ("entry_points.txt", "METADATA"))
  with tarfile.open(sdist) as t:
    root = t.getnames()[0].split("/")[0]
    in_sdist = {n[len(root) + 1:] for n in t.getnames()}
  for name in ("sdl_jax/cpu/csrc/dnnl_conv.cc", "sdl_jax/configs/sdl.py",
               "sdl_jax/configs/__init__.py", "sdl_jax/cli.py", "sdl_jax/__main__.py",
               "sdl_jax/pretrained/ferplus.json", "sdl_jax/pretrained/ferplus.msgpack",
               "sdl_jax/pretrained/flickr_ldl.json", "sdl_jax/pretrained/flickr_ldl.msgpack"):
    assert name in in_wheel, name
    assert name in in_sdist, name
  assert "sdl-jax = sdl_jax.cli:run" in entry_points
  _check_requirements(metadata)
  assert {"run.py", "configs/sdl.py", "setup.cfg", "MANIFEST.in"} <= in_sdist
  # The checkout's shells stay out of the installed package.
  assert not any(n.startswith(("configs/", "run.py", "tests/")) for n in in_wheel)


def _check_requirements(metadata: str):
  """An environment's own tensorflow and torch (Colab's) satisfy what the wheel asks."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  reqs = [Requirement(l.split(":", 1)[1].strip()) for l in metadata.splitlines()
          if l.startswith("Requires-Dist:")]
  by_extra = {}
  for r in reqs:
    extra = next((e for e in ("torch", "test", "tpu", "cuda")
                  if r.marker and r.marker.evaluate({"extra": e})), None)
    by_extra.setdefault((r.name, extra), r)
  # The full tensorflow everywhere: tensorflow-cpu would overwrite an installed one.
  assert not any(r.name == "tensorflow-cpu" for r in reqs)
  assert by_extra[("tensorflow", None)].marker is None
  # The torch extra takes the torch that is there (a CUDA build, say); the tests pin theirs.
  torch = by_extra[("torch", "torch")].specifier
  assert torch.contains("2.8.0+cu126") and torch.contains("2.13.0+cpu")
  assert str(by_extra[("torch", "test")].specifier) == "==2.13.0"


@pytest.mark.slow
def test_wheel_trains_and_predicts_from_any_folder(tmp_path, tmp_path_factory):
  wheel = wf.built_wheel(tmp_path_factory)
  with wf.fresh_venv(tmp_path / "venv") as python:
    wf.pip_install(python, str(wheel))
    _train_and_predict(python, tmp_path)


def _train_and_predict(python, tmp_path):
  """The tiny default job and a prediction, from a folder without the repository."""
  elsewhere = tmp_path / "elsewhere"  # no configs/, no sdl_jax/ here
  elsewhere.mkdir()
  env = wf.venv_env(python, SDL_JAX_CACHE=str(tmp_path / "cache"))
  where = subprocess.run([str(python), "-c", "import sdl_jax; print(sdl_jax.__file__)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout

  # The default job (the packaged sdl.py's default preset), tiny.
  train = _run(python, ["sdl-jax", "--config=sdl.py", *wf.TINY_SYNTHETIC,
                        f"--config.data.cache_dir={tmp_path / 'data'}", "--workdir=w"],
               elsewhere, env)
  assert train.returncode == 0, train.stderr[-4000:]
  results = json.loads((elsewhere / "w" / "results.json").read_text())
  assert results["num_train_steps"] == 4 and "test" in results
  assert json.loads((elsewhere / "w" / "config.json").read_text())["name"] == "synthetic"

  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
      elsewhere / "photo.png")
  predict = _run(python, ["sdl-jax", "--mode=predict", "--workdir=w", "--images=photo.png"],
                 elsewhere, env)
  assert predict.returncode == 0, predict.stderr[-4000:]
  (row,) = [json.loads(l) for l in predict.stdout.splitlines() if l.startswith("{")]
  assert row["file"] == "photo.png"
  assert list(row["distribution"]) == list(emotions.MIKELS8.names)
  assert sum(row["distribution"].values()) == pytest.approx(1.0, abs=1e-5)
  assert row["dominant"] == max(row["distribution"], key=row["distribution"].get)

  # A shipped model, installed with the wheel: no workdir, no training, no download.
  face = _run(python, ["sdl-jax", "--mode=predict", "--pretrained=ferplus",
                       "--images=photo.png"], elsewhere, env)
  assert face.returncode == 0, face.stderr[-4000:]
  (row,) = [json.loads(l) for l in face.stdout.splitlines() if l.startswith("{")]
  assert list(row["distribution"]) == list(emotions.FERPLUS.names)
  assert sum(row["distribution"].values()) == pytest.approx(1.0, abs=1e-5)
