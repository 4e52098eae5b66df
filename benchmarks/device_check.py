r"""The device check: the library's accelerator-relevant tests, a short default training
run, and the train-step benchmark against PyTorch eager and ``torch.compile``, in one
command that stays under 8 minutes on one H100 and writes everything to one folder.

Run it from the repository root, in the project's environment (no internet needed):

    python -m benchmarks.device_check --out=device_check            # on a GPU / TPU host
    python -m benchmarks.device_check --fast --out=device_check     # CPU smoke, ~4 min (2 cores)

On a fresh GPU host without the environment: ``pip install --no-index
--find-links=WHEELS -e ".[test,cuda]"`` from a local wheel folder (JAX's CUDA plugin comes
with the ``cuda`` extra; PyTorch must be a CUDA build for the PyTorch comparisons, else
they are left out with a note).

Parts, in this order, each a child process with its own time limit (``--limit_s`` caps
them all together; a part cut short keeps what it wrote, and says so):

1. ``tests``: pytest on ``DEVICE_TESTS`` (losses and their custom gradient, metrics, the
   models against their PyTorch twins, BatchNorm, the train step, checkpoints) on JAX's
   default backend (``$SDL_JAX_TEST_ACCELERATOR=1``: ``tests/conftest.py`` then leaves the
   GPUs to JAX), minus ``CPU_ONLY_TESTS`` (they run the XLA:CPU hand paths and their
   oneDNN custom calls). The tests keep their CPU tolerances, with
   ``JAX_DEFAULT_MATMUL_PRECISION=highest``: on NVIDIA GPUs float32 matrix products and
   convolutions otherwise use TF32 (10-bit mantissa), which the references' 1e-4 to 1e-6
   tolerances were never meant for. The training run and the benchmark keep JAX's default
   precision (TF32 on GPUs, as users train).
2. ``train``: the default job, ``run.py --config=configs/sdl.py`` (the synthetic preset),
   cut to ``--train_steps`` steps, where TensorFlow is installed; else the library's
   train step fed from arrays (``benchmarks.train_arrays``).
3. ``bench_float32``, ``bench_bfloat16``: ``benchmarks.run --sections=train
   --torch_compile`` for ``--models`` at batch 32 (224 px; small_cnn at its 64): JAX
   against PyTorch eager and ``torch.compile``, medians, ratios, and peak memory (device
   peak bytes on accelerators).

Output folder (``--out``): ``device_check.json`` (the environment, each part's status,
wall time and figures), ``summary.md`` (to paste into ``docs/performance.md``: device,
versions, date, commit, test counts, the training run, the benchmark table), and per part
its log (``<part>.log``), ``tests.xml`` (JUnit), ``train/`` (the run's workdir) and
``bench_<dtype>.{json,md}`` (``benchmarks.run``'s full report). Progress goes to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from xml.etree import ElementTree

from benchmarks import device_summary

REPO = Path(__file__).resolve().parents[1]

# What makes sense on an accelerator: numerics against references, the step, checkpoints.
DEVICE_TESTS = ("tests/test_losses.py", "tests/test_metrics.py", "tests/test_models.py",
                "tests/test_norm.py", "tests/test_train.py")
# The XLA:CPU hand paths (sdl_jax.cpu, oneDNN custom calls), forced on by these tests.
CPU_ONLY_TESTS = ("tests/test_models.py::test_resnet_train_mode_gradients_equal_torch[cpu]",
                  "tests/test_models.py::test_hand_paths_and_xla_paths_compute_the_same")
# Whole training runs the other parts cover (run.py), too long for the time box.
LONG_TESTS = ("tests/test_train.py::test_sigterm_saves_a_checkpoint_and_exits_cleanly",
              "tests/test_train.py::test_default_config_learns_on_a_reduced_synthetic_set")
# Runs through the tf.data pipeline: without TensorFlow they are left out.
TF_TESTS = ("tests/test_train.py::test_resume_gives_the_same_parameters_as_a_straight_run",
            "tests/test_train.py::test_corrupt_or_incompatible_checkpoint_is_a_clear_error")
# (full, --fast) settings; the fast ones run on 2 CPU cores.
LIMITS_S = {"probe": (60, 120), "tests": (150, 240), "train": (70, 150),
            "bench_float32": (130, 300), "bench_bfloat16": (110, 300)}
TOTAL_LIMIT_S = (460, 1100)
# One or two tests of each kind (the whole files take ~6 minutes on 2 CPU cores).
FAST_TESTS = ("tests/test_losses.py::test_check_grads_all_float_arguments",
              "tests/test_losses.py::test_one_hot_normalised_case_is_p_minus_targets",
              "tests/test_losses.py::test_all_zero_rows_contribute_nothing",
              "tests/test_metrics.py::test_random_against_numpy_definitions",
              "tests/test_metrics.py::test_accuracy_and_masked_sums_merge_exactly",
              "tests/test_norm.py::test_module_equals_flax_batch_norm",
              "tests/test_train.py::test_optimizer_is_caffe_sgd",
              "tests/test_train.py::test_train_step_matches_plain_autodiff_and_sgd",
              "tests/test_train.py::test_checkpoints_accept_a_relative_workdir_with_dotdot",
              "tests/test_models.py::test_equals_torch_reference_small")
PROBE = r"""
import json, jax
d = jax.local_devices()[0]
out = {"jax": jax.__version__, "backend": jax.default_backend(), "device": d.device_kind,
       "devices": jax.local_device_count()}
try:
  import torch
  out["torch"] = torch.__version__
  out["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except ImportError:
  out["torch"] = None
print("PROBE " + json.dumps(out))
"""


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.device_check",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="device_check", help="output folder (created)")
  p.add_argument("--fast", action="store_true",
                 help="CPU smoke settings: fewer tests, steps and repeats, smaller images")
  p.add_argument("--parts", default="tests,train,bench_float32,bench_bfloat16")
  p.add_argument("--limit_s", type=float, default=0,
                 help="seconds for all parts together, each also having its own limit "
                      f"(0: {TOTAL_LIMIT_S[0]}, fast: {TOTAL_LIMIT_S[1]})")
  p.add_argument("--tests", default="",
                 help="pytest node ids, comma-separated (default: the mode's list)")
  p.add_argument("--train_steps", type=int, default=0, help="0: 300 (fast: 20)")
  p.add_argument("--models", default="",
                 help="benchmarked models (default small_cnn,efficientnet_lite0; fast: "
                      "small_cnn, as torch.compile takes minutes for EfficientNet on 2 "
                      "CPU cores)")
  p.add_argument("--bench_flags", default="",
                 help="extra flags for benchmarks.run, space-separated (they win)")
  p.add_argument("--commit", default="", help="recorded if git cannot tell")
  args = p.parse_args(argv)
  args.parts = [s for s in args.parts.split(",") if s]
  bad = set(args.parts) - (set(LIMITS_S) - {"probe"})
  if bad:
    p.error(f"--parts: unknown {sorted(bad)}; known: tests, train, bench_float32, "
            "bench_bfloat16")
  args.train_steps = args.train_steps or (20 if args.fast else 300)
  args.limit_s = args.limit_s or TOTAL_LIMIT_S[args.fast]
  args.models = args.models or ("small_cnn" if args.fast else "small_cnn,efficientnet_lite0")
  return args


def _run(part: str, cmd: list, out: Path, limit_s: float, env: dict | None = None) -> dict:
  """Runs ``cmd`` in the repo root as a process group, its output echoed and logged to
  ``out/<part>.log``; killed after ``limit_s``. Returns rc, seconds, timed_out, and the
  output's ``PROBE`` line's JSON if any."""
  t0 = time.perf_counter()
  log = open(out / f"{part}.log", "w", encoding="utf-8")
  log.write("$ " + " ".join(cmd) + "\n")
  proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, **(env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  found = {}

  def pump():
    for line in proc.stdout:
      log.write(line)
      log.flush()
      if line.startswith("PROBE "):
        found["probe"] = json.loads(line[6:])
      else:
        print(f"  {part} | {line.rstrip()[:160]}", flush=True)

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  try:
    rc, timed_out = proc.wait(timeout=max(1.0, limit_s)), False
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the part and its children (PyTorch's processes)
    rc, timed_out = proc.wait(), True
  reader.join(timeout=10)
  log.close()
  res = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "timed_out": timed_out,
         "limit_s": round(limit_s, 1), "log": f"{part}.log"}
  if "probe" in found:
    res["probe"] = found["probe"]
  return res


def _junit(path: Path) -> dict:
  """Counts from pytest's JUnit XML: tests, passed, failed, errors, skipped, and the
  failed tests' ids."""
  if not path.exists():
    return {}
  root = ElementTree.parse(path).getroot()
  suite = root if root.tag == "testsuite" else root.find("testsuite")
  counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
  failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None]
  return {"tests": counts["tests"], "failed": counts["failures"], "errors": counts["errors"],
          "skipped": counts["skipped"], "passed": counts["tests"] - counts["failures"]
          - counts["errors"] - counts["skipped"], "failed_ids": failed}


def _counted(log: Path) -> dict:
  """The outcomes pytest -v printed before it was stopped (no JUnit XML then)."""
  found = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", log.read_text(),
                     re.MULTILINE)
  n = lambda what: sum(1 for _, o in found if o == what)
  return {"tests": len(found), "passed": n("PASSED"), "failed": n("FAILED"),
          "errors": n("ERROR"), "skipped": n("SKIPPED"),
          "failed_ids": [t for t, o in found if o in ("FAILED", "ERROR")]}


def _has(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


def tests_part(args, out: Path, limit_s: float) -> dict:
  if args.tests:
    selection = [s for s in args.tests.split(",") if s]
  else:
    selection = list(FAST_TESTS if args.fast else DEVICE_TESTS)
  skip = list(CPU_ONLY_TESTS + LONG_TESTS + (() if _has("tensorflow") else TF_TESTS))
  # -v: a line per test, so that a run cut at its limit is still counted from its log.
  cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE",
         f"--junitxml={out / 'tests.xml'}", *selection] + [f"--deselect={t}" for t in skip]
  env = {"SDL_JAX_TEST_ACCELERATOR": "1", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
  (out / "tests.xml").unlink(missing_ok=True)  # an earlier run's
  res = _run("tests", cmd, out, limit_s, env)
  res.update(_junit(out / "tests.xml") or _counted(out / "tests.log"), selection=selection,
             deselected=skip, matmul_precision="highest")
  res["ok"] = res["rc"] == 0 and not res["timed_out"]
  return res


def train_part(args, out: Path, limit_s: float) -> dict:
  """The default job through run.py (TensorFlow there), else the step from arrays."""
  wd = out / "train"
  shutil.rmtree(wd, ignore_errors=True)  # run.py would resume an earlier run's workdir
  if _has("tensorflow") and _has("tensorflow_datasets"):
    n = 300 if args.fast else 4000
    cmd = [sys.executable, "run.py", "--config=configs/sdl.py", f"--workdir={wd}",
           f"--config.num_train_steps={args.train_steps}",
           f"--config.data.num_examples={n}", f"--config.data.cache_dir={out / 'tfds'}",
           f"--config.eval_every_steps={args.train_steps}",
           f"--config.checkpoint_every_steps={args.train_steps}",
           f"--config.log_every_steps={max(1, args.train_steps // 6)}"]
    res = _run("train", cmd, out, limit_s)
    res["how"] = "run.py, synthetic preset"
    results = wd / "results.json"
    if results.exists():
      r = json.loads(results.read_text())
      res.update(steps=r["num_train_steps"], test=r["test"], examples=n,
                 run_wall_s=r["wall_time_s"], train_loss=_train_losses(wd))
      # results.json is written when the run has finished: were the process stopped at
      # the limit while shutting down, the figures still stand.
      res["finished"] = True
  else:
    npz = out / "synthetic.npz"
    _write_arrays(npz, 2000 if not args.fast else 300)
    cmd = [sys.executable, "-m", "benchmarks.train_arrays", f"--npz={npz}", "--epochs=3"]
    res = _run("train", cmd, out, limit_s)
    res["how"] = "benchmarks.train_arrays (no TensorFlow here), random arrays"
  res["ok"] = (res["rc"] == 0 and not res["timed_out"]) or res.get("finished", False)
  return res


def _train_losses(workdir: Path) -> list:
  """The training loss at each logged step of ``workdir/metrics.jsonl``: [[step, loss]]."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return [[r["step"], r["loss"]] for r in rows if r.get("split") == "train" and "loss" in r]


def _write_arrays(npz: Path, n: int) -> None:
  """Random images, votes-like distributions and their arg-max labels: the step's input
  where the synthetic set cannot be drawn (no TensorFlow Datasets)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  dist = rng.dirichlet(np.ones(8), n).astype(np.float32)
  np.savez(npz, image=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
           label=dist.argmax(1).astype(np.int32), distribution=dist)


def bench_part(dtype: str, args, out: Path, limit_s: float) -> dict:
  """``benchmarks.run``'s train section with ``torch.compile`` for one dtype."""
  stem = f"bench_{dtype}"
  flags = ["--sections=train", f"--models={args.models}", f"--dtype={dtype}",
           "--torch_compile", f"--out={out / (stem + '.json')}",
           f"--markdown={out / (stem + '.md')}"]
  if args.fast:
    flags += ["--batch=8", "--image_size=64", "--small_cnn_size=32", "--repeats=2",
              "--min_repeats=1", "--steps=2", "--peak_n=1024"]
  else:
    flags += ["--batch=32", "--repeats=5", "--min_repeats=3", "--min_repeat_s=0.5",
              "--budget_s=12"]
  flags += [f for f in args.bench_flags.split() if f]
  path = out / (stem + ".json")
  path.unlink(missing_ok=True)  # an earlier run's
  res = _run(stem, [sys.executable, "-m", "benchmarks.run", *flags], out, limit_s)
  if path.exists():
    bench = json.loads(path.read_text())
    res["env"] = {k: bench["env"].get(k) for k in ("devices", "device_kind", "torch",
                                                   "torch_device", "torch_compile")}
    res["peak"] = bench.get("peak")
    res["train"] = bench.get("train", [])
  rows = res.get("train") or []
  res["ok"] = (res["rc"] == 0 and not res["timed_out"] and bool(rows)
               and all("error" not in r for r in rows))
  return res


def _commit(given: str) -> str:
  """This checkout's commit (with ``+local changes`` if files differ from it), else
  ``given`` or ``unknown``."""
  try:
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, text=True,
                          capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=REPO, text=True, capture_output=True).stdout.strip()
    return head + (" +local changes" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return given or "unknown"


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  info = {"command": "python -m benchmarks.device_check " + " ".join(argv or sys.argv[1:]),
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "commit": _commit(args.commit), "fast": args.fast, "parts": {}}
  say = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)
  limit = lambda part: min(LIMITS_S[part][args.fast],
                           args.limit_s - (time.perf_counter() - start))
  say(f"device check into {out}")
  probe = _run("probe", [sys.executable, "-c", PROBE], out, limit("probe"),
               {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
  info["env"] = probe.pop("probe", {})
  info["probe"] = probe  # its exit status; the environment is also in each bench JSON
  say(f"devices: {info['env']}")

  def save():
    info["wall_s"] = time.perf_counter() - start
    (out / "device_check.json").write_text(json.dumps(info, indent=1))
    (out / "summary.md").write_text(device_summary.summary(info) + "\n")

  for part in args.parts:
    left = limit(part)
    if left < 10:
      say(f"{part}: skipped, the time limit is spent")
      info["parts"][part] = {"not_run": "the time limit was spent", "seconds": 0}
      continue
    say(f"{part}: starting (limit {left:.0f} s)")
    if part == "tests":
      res = tests_part(args, out, left)
    elif part == "train":
      res = train_part(args, out, left)
    else:
      res = bench_part(part.split("_", 1)[1], args, out, left)
    info["parts"][part] = res
    say(f"{part}: {device_summary.status(res)} in {res['seconds']:.0f} s")
    save()
  save()
  say(f"done: {out / 'summary.md'}")
  print((out / "summary.md").read_text(), flush=True)
  return info


if __name__ == "__main__":
  main()
