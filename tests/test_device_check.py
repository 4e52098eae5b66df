"""benchmarks/device_check.py: its fast mode runs every part on the CPU at the smallest
settings and writes the results JSON and the summary; torch.compile's failure is a note,
not an error."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fast_mode_writes_every_part_and_the_summary(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "check"
  one_test = "tests/test_losses.py::test_lam_gets_no_gradient"
  cmd = [sys.executable, "-m", "benchmarks.device_check", "--fast", f"--out={out}",
         "--parts=tests,train,bench_float32", f"--tests={one_test}", "--train_steps=3",
         "--models=small_cnn", "--commit=given",
         '--bench_flags=--batch=4 --small_cnn_size=16 --model_kwargs={"widths":[8]} '
         "--peak_n=128 --steps=1"]
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(REPO))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  info = json.loads((out / "device_check.json").read_text())

  assert info["fast"] is True and info["commit"]
  assert info["env"]["backend"] == "cpu" and info["env"]["jax"] and info["env"]["devices"] >= 1
  assert list(info["parts"]) == ["tests", "train", "bench_float32"]
  for name, part in info["parts"].items():
    assert part["ok"], (name, part)
    assert (out / part["log"]).exists() and 0 < part["seconds"] <= part["limit_s"]

  tests = info["parts"]["tests"]
  assert (tests["tests"], tests["passed"], tests["failed"]) == (1, 1, 0)
  assert tests["selection"] == [one_test] and tests["matmul_precision"] == "highest"
  assert (out / "tests.xml").exists()

  train = info["parts"]["train"]
  if train["how"].startswith("run.py"):
    assert train["steps"] == 3 and 0 <= train["test"]["accuracy"] <= 1
    assert (out / "train" / "results.json").exists()

  bench = info["parts"]["bench_float32"]
  (row,) = bench["train"]
  assert (row["model"], row["dtype"], row["batch"], row["image_size"]) == (
      "small_cnn", "float32", 4, 16)
  assert bench["env"]["torch_compile"] == "default"
  compiled = row["torch_compile"]
  if "skipped" in compiled:  # no C compiler here: a note, the other sides measured
    assert compiled["skipped"].startswith("torch.compile failed")
  else:
    assert row["ratio_compile"] > 0 and compiled["params"] == row["jax"]["params"]
    assert len(compiled["images_per_s"]["all"]) == row["repeats"]
  assert row["ratio"] > 0 and (out / "bench_float32.json").exists()

  summary = (out / "summary.md").read_text()
  assert summary.startswith("# Device check: ") and "commit " in summary
  assert "1 passed, 0 failed" in summary
  assert "## Against PyTorch eager and torch.compile" in summary
  assert "| small_cnn | 16 | 4 | float32 |" in summary
  assert summary.strip() in proc.stdout


def test_torch_compile_failure_is_a_skip_with_its_reason(monkeypatch):
  """A model torch.compile cannot compile (here: a stand-in that raises as inductor does
  without a C compiler) leaves the side out with the reason; the eager side is untouched."""
  torch = pytest.importorskip("torch")
  from benchmarks import jax_train, train_bench  # pylint: disable=g-import-not-at-top

  def fails(model, mode=None):
    def call(*a, **k):
      raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    return call

  monkeypatch.setattr(torch, "compile", fails)
  args = SimpleNamespace(num_classes=3, model_kwargs={"widths": [4]}, torch_dtype="",
                         dtype="float32", torch_layout="channels_last", torch_process="same",
                         torch_threads=1, torch_malloc="default", torch_compile=True,
                         torch_compile_mode="default")
  config = jax_train.bench_config("small_cnn", batch=2)
  batch = train_bench.synthetic_batch(2, 8, 3)
  notes = []
  trainer, info = train_bench._torch_compile_trainer(  # pylint: disable=protected-access
      "small_cnn", args, "cpu", config, batch, notes.append)
  assert trainer is None
  assert info == {"skipped": "torch.compile failed: RuntimeError: InvalidCxxCompiler: "
                             "No working C++ compiler found"}
  assert notes == ["  torch_compile skipped: " + info["skipped"]]


def test_summary_reports_cut_and_failed_parts():
  from benchmarks import device_summary  # pylint: disable=g-import-not-at-top
  info = {"env": {"device": "NVIDIA H100 80GB HBM3", "backend": "gpu", "jax": "0.10.2",
                  "torch": "2.13.0", "torch_cuda": "NVIDIA H100 80GB HBM3", "devices": 1},
          "date": "2026-12-06 00:00 UTC", "command": "python -m benchmarks.device_check",
          "commit": "abc", "fast": False, "wall_s": 470.0,
          "parts": {"tests": {"rc": 1, "ok": False, "timed_out": False, "seconds": 100.0,
                              "limit_s": 170, "tests": 3, "passed": 1, "failed": 1,
                              "errors": 0, "skipped": 1, "failed_ids": ["t::a"],
                              "selection": ["t"], "deselected": []},
                    "train": {"rc": -9, "ok": False, "timed_out": True, "seconds": 80.0,
                              "limit_s": 80, "how": "run.py, synthetic preset"},
                    "bench_bfloat16": {"not_run": "the time limit was spent", "seconds": 0}}}
  text = device_summary.summary(info)
  assert text.startswith("# Device check: NVIDIA H100 80GB HBM3 (gpu), 2026-12-06")
  assert "tests failed (exit 1), train cut at its limit (80 s), bench_bfloat16 not run" in text
  assert "1 passed, 1 failed, 0 errors, 1 skipped" in text and "- failed: `t::a`" in text
