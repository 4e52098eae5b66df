"""Builds the package as a user gets it and makes fresh virtual environments to install it.

Shared by test_wheel.py and test_notebook.py. The sources are copied to a temporary folder
first, so the build leaves nothing in the checkout and sees only what a clean clone has.
"""

import contextlib
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

REPO = Path(__file__).resolve().parents[1]
# What `python -m build` reads; everything else in the checkout is not part of the package.
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "run.py", "configs",
           "sdl_jax")
# The tiny default job: a few steps of a small network on 240 drawn 16 px images.
TINY_SYNTHETIC = ("--config.data.num_examples=240", "--config.data.image_size=16",
                  "--config.image_size=16", "--config.resize_size=18",
                  "--config.model_kwargs.widths=(8,16)", "--config.batch_size=8",
                  "--config.num_train_steps=4", "--config.warmup_steps=1",
                  "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
                  "--config.log_every_steps=2")

_BUILT = {}


def copy_sources(dest: Path) -> Path:
  """Copies the package's sources (no caches, no build outputs) into ``dest``."""
  dest.mkdir(parents=True, exist_ok=True)
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "build", "dist")
  for name in SOURCES:
    src = REPO / name
    if src.is_dir():
      shutil.copytree(src, dest / name, ignore=ignore)
    else:
      shutil.copy2(src, dest / name)
  return dest


def build(src: Path, outdir: Path) -> tuple[Path, Path]:
  """``python -m build`` (isolated, as a user runs it): returns (sdist, wheel)."""
  subprocess.run([sys.executable, "-m", "build", "--outdir", str(outdir), str(src)],
                 check=True, capture_output=True, text=True, timeout=600)
  return next(outdir.glob("*.tar.gz")), next(outdir.glob("*.whl"))


def built_wheel(tmp_path_factory) -> Path:
  """The wheel of a clean copy of the sources, built once per test run."""
  if "wheel" not in _BUILT:
    root = tmp_path_factory.mktemp("wheel_build")
    src = copy_sources(root / "src")
    _BUILT["wheel"] = build(src, root / "dist")[1]
  return _BUILT["wheel"]


@contextlib.contextmanager
def fresh_venv(path: Path):
  """A new virtual environment without the system's or this one's packages; yields its
  python and removes it afterwards (several GB once tensorflow is in).

  Packages come from pip's usual sources (its cache when warm), so what installs there is
  what a user's ``pip install`` resolves.
  """
  subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
  try:
    yield path / "bin" / "python"
  finally:
    shutil.rmtree(path, ignore_errors=True)


def pip_install(python: Path, *args: str, timeout: int = 900) -> None:
  """``python -m pip install -q ARGS`` in that environment; fails with pip's output."""
  # --no-compile: no .pyc for the thousands of modules never imported here (tensorflow's);
  # halves the install (tensorflow 2.21: 23 instead of 52 s, 2026-12-06, epyc-zen4).
  proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile",
                         "--disable-pip-version-check", *args],
                        capture_output=True, text=True, timeout=timeout, env=venv_env(python))
  assert proc.returncode == 0, f"pip install {' '.join(args)} failed:\n{proc.stderr[-4000:]}"


def venv_env(python: Path, **extra: str) -> dict:
  """This process's environment as a shell in that venv sees it: its bin first on PATH,
  nothing pointing at this checkout or this venv; TF quiet."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
  env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
  env["VIRTUAL_ENV"] = str(python.parent.parent)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.update(extra)
  return env


def versions(python: Path, *dists: str) -> dict:
  """The installed versions of ``dists`` in that environment (None where absent)."""
  code = ("import importlib.metadata as m, json, sys\n"
          "def v(d):\n"
          "  try:\n    return m.version(d)\n"
          "  except m.PackageNotFoundError:\n    return None\n"
          "print(json.dumps({d: v(d) for d in sys.argv[1:]}))")
  out = subprocess.run([str(python), "-c", code, *dists], check=True, capture_output=True,
                       text=True, timeout=120, env=venv_env(python))
  return json.loads(out.stdout)
