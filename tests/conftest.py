"""Shared test set-up: float64 is enabled per test where needed; TF never sees a GPU; the
real FER+ set is built once per pytest run for the tests that need it.

The suite runs on the CPU: CUDA devices are hidden from every framework, unless
``$SDL_JAX_TEST_ACCELERATOR=1`` (``benchmarks/device_check.py`` sets it), which leaves them
to JAX (TensorFlow, used for data only, hides them from itself: ``sdl_jax.data.pipeline``)
so that the tests run on JAX's default backend, whichever it is."""

import os
import sys
import time
from pathlib import Path

import pytest

# Keep TensorFlow quiet and off any accelerator in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("SDL_JAX_TEST_ACCELERATOR") != "1":
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


# The repository's root on the path, so that any test file, run alone or with the rest,
# imports ``benchmarks`` (not part of the installed package).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

FERPLUS_ARCHIVE = Path(__file__).resolve().parents[2] / "shared/data/ferplus.tar.gz"


@pytest.fixture(scope="session")
def real_ferplus(tmp_path_factory):
  """The shared FER+ archive built once per pytest run, both protocols:
  ``{protocol: builder}``; skips where the archive is not at ``../shared/data``."""
  if not FERPLUS_ARCHIVE.exists():
    pytest.skip(f"the FER+ archive is not at {FERPLUS_ARCHIVE}")
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sdl_jax.data import ferplus, get_builder  # pylint: disable=g-import-not-at-top
  cache = tmp_path_factory.mktemp("ferplus_cache")
  built, seconds = {}, {}
  for protocol in ferplus.PROTOCOLS:
    t = time.time()
    cfg = ml_collections.ConfigDict(
        {"name": "ferplus", "path": str(FERPLUS_ARCHIVE), "protocol": protocol})
    built[protocol] = get_builder(cfg, data_dir=str(cache))
    seconds[protocol] = round(time.time() - t, 1)
  print(f"FER+ build seconds: {seconds}")
  return built
