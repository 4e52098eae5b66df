"""The Colab TPU notebook runs top to bottom on CPU with a tiny configuration.

The notebook reads ``SDL_JAX_NOTEBOOK_SMOKE=1`` (tiny sizes), ``SDL_JAX_NOTEBOOK_WORKDIR``
and ``SDL_JAX_DATA_DIR``; two host devices stand in for the TPU cores, so the
data-parallel path is the one exercised.
"""

import json
import sys
from pathlib import Path

import pytest

from sdl_jax import figures

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sdl_colab_tpu.ipynb"


def _text(cell):
  out = []
  for o in cell.get("outputs", []):
    if o.get("output_type") == "stream":
      out.append(o.get("text", ""))
    elif "data" in o and "text/plain" in o["data"]:
      out.append(o["data"]["text/plain"])
  return "".join(out)


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
  for needle in ("jax.devices()", "train.train_and_evaluate", "Predictor.from_workdir",
                 "evaluate.evaluate_workdir", "plot_curves", "tensorboard"):
    assert needle in source, needle


@pytest.mark.slow
def test_notebook_executes_on_cpu(tmp_path, monkeypatch):
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "workdir"
  monkeypatch.setenv("SDL_JAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("SDL_JAX_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("SDL_JAX_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=900,
      resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()  # Raises CellExecutionError, with the cell and traceback, on failure.

  code = [c for c in nb.cells if c.cell_type == "code"]
  settings = _text(code[0])
  # The kernel is this interpreter (the test venv), not some other python3 on the machine.
  assert f"python {sys.executable}," in settings and "smoke=True" in settings
  # The process settings, before JAX starts: the user's device count kept beside them.
  assert "'xla_flags': ['--xla_cpu" in _text(code[2])
  devices = _text(code[3])
  assert "2 device(s), backend cpu" in devices
  results = json.loads((workdir / "results.json").read_text())
  assert results["devices"] == 2
  assert results["num_train_steps"] == 6
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
