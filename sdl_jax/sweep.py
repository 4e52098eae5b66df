r"""The lambda sweep: one preset trained for several ``lam`` values and seeds.

    python -m sdl_jax.sweep --config=configs/sdl.py --lams=0,0.5,0.8,1 --seeds=0,1 \
        --workdir=workdirs/sweep

trains the config once per ``(lam, seed)`` into sibling work directories
``<workdir>/lam=0.8_seed=0`` etc. (``config.lam`` and ``config.seed`` set, everything else
as given, ``--config.*`` overrides included), then writes

* ``<workdir>/sweep.json``: every run's test measures (of its best checkpoint on
  validation, as in its ``results.json``) and, per lambda, their mean, standard deviation
  (``ddof=1``; 0 for a single seed) and number of seeds;
* ``<workdir>/sweep.md``: the same as tables, with the command that produced it;
* ``<workdir>/sweep.png``: test accuracy and KL against lambda, mean over seeds with a
  band of one standard deviation and the single runs as dots (the paper's lambda
  figure).

A run whose ``results.json`` holds test measures is finished and skipped; an unfinished
one resumes from its latest checkpoint (``train.train_and_evaluate`` does that), so the
same command continues an interrupted sweep.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

from sdl_jax import metrics as metrics_lib
from sdl_jax import report

SUMMARY_MEASURES = ("accuracy",) + metrics_lib.LDL_MEASURES


def run_name(lam: float, seed: int) -> str:
  """``'lam=0.8_seed=0'``: the sub-directory of one run (``lam`` as Python writes it)."""
  return f"lam={float(lam):g}_seed={int(seed)}"


def parse_floats(text: str, what: str) -> list[float]:
  """``'0,0.5,1'`` -> ``[0.0, 0.5, 1.0]``; ValueError naming ``what`` otherwise."""
  out = []
  for part in str(text).split(","):
    part = part.strip()
    if not part:
      continue
    try:
      out.append(float(part))
    except ValueError:
      raise ValueError(f"{what}: {part!r} is not a number (expected e.g. 0,0.5,0.8,1)"
                       ) from None
  if not out:
    raise ValueError(f"{what} is empty")
  return out


def parse_ints(text: str, what: str) -> list[int]:
  out = []
  for part in str(text).split(","):
    part = part.strip()
    if not part:
      continue
    try:
      out.append(int(part))
    except ValueError:
      raise ValueError(f"{what}: {part!r} is not an integer (expected e.g. 0,1,2)") from None
  if not out:
    raise ValueError(f"{what} is empty")
  return out


def check_grid(lams: Sequence[float], seeds: Sequence[int]) -> None:
  """ValueError unless every lambda is in [0, 1] and no lambda or seed repeats."""
  for lam in lams:
    if math.isnan(float(lam)) or not 0.0 <= float(lam) <= 1.0:
      raise ValueError(f"--lams: every lambda must be in [0, 1], got {lam}")
  if len(set(run_name(l, 0) for l in lams)) != len(lams) or len(set(seeds)) != len(seeds):
    raise ValueError(f"--lams {list(lams)} and --seeds {list(seeds)} must not repeat values")


def finished_results(run_dir: str) -> dict | None:
  """The run's ``results.json`` if it holds test measures, else ``None``."""
  path = os.path.join(run_dir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    results = json.load(f)
  return results if isinstance(results.get("test"), dict) else None


def summarize(points: Sequence[dict[str, Any]],
              measures: Sequence[str] = SUMMARY_MEASURES) -> list[dict[str, Any]]:
  """Per lambda (ascending): ``{'lam', 'n', 'seeds', <m>_mean, <m>_std}`` for each measure.

  ``std`` is the sample standard deviation over seeds (``ddof=1``), 0 for one seed.
  """
  out = []
  for lam in sorted({float(p["lam"]) for p in points}):
    group = [p for p in points if float(p["lam"]) == lam]
    row: dict[str, Any] = {"lam": lam, "n": len(group),
                           "seeds": sorted(int(p["seed"]) for p in group)}
    for m in measures:
      v = np.asarray([p[m] for p in group], np.float64)
      row[f"{m}_mean"] = float(v.mean())
      row[f"{m}_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
    out.append(row)
  return out


def _markdown(points, summary, command, preset) -> str:
  lines = [f"# Lambda sweep{f' ({preset})' if preset else ''}\n",
           f"Produced by `{command}`.\n" if command else "",
           "Test measures of each run's best checkpoint on validation; mean +/- standard "
           "deviation over seeds.\n\n"]
  rows = []
  for s in summary:
    row = {"lam": f"{s['lam']:g}", "n": s["n"]}
    for m in SUMMARY_MEASURES:
      row[m] = f"{s[m + '_mean']:.4f} +/- {s[m + '_std']:.4f}"
    rows.append(row)
  lines.append(report.markdown_table(
      rows, ("lam", "n") + SUMMARY_MEASURES,
      ["lambda", "seeds"] + [report.measure_header(m) for m in SUMMARY_MEASURES]))
  lines.append("\n![accuracy and KL against lambda](sweep.png)\n\n## Runs\n\n")
  lines.append(report.markdown_table(
      points, ("run", "lam", "seed", "best_step") + SUMMARY_MEASURES,
      ["work directory", "lambda", "seed", "best step"]
      + [report.measure_header(m) for m in SUMMARY_MEASURES]))
  return "".join(lines)


def run_sweep(config, workdir: str, lams: Sequence[float], seeds: Sequence[int],
              train_fn: Callable[[Any, str], Any] | None = None,
              command: str | None = None) -> dict[str, Any]:
  """Trains every ``(lam, seed)`` not finished yet, then writes the sweep summary.

  Args:
    config: the run config (a ConfigDict); it is copied, not changed.
    workdir: the sweep's directory; run ``r`` goes to ``workdir/run_name(lam, seed)``.
    lams: lambda values in [0, 1].
    seeds: values of ``config.seed``.
    train_fn: ``(config, workdir) -> results``; default ``train.train_and_evaluate``.
    command: the command line, for ``sweep.md``.

  Returns:
    the dict written to ``sweep.json``.
  """
  check_grid(lams, seeds)
  if train_fn is None:
    from sdl_jax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  os.makedirs(workdir, exist_ok=True)
  points = []
  for lam in lams:
    for seed in seeds:
      name = run_name(lam, seed)
      run_dir = os.path.join(workdir, name)
      results = finished_results(run_dir)
      if results is None:
        cfg = copy.deepcopy(config)
        with cfg.unlocked():
          cfg.lam = float(lam)
          cfg.seed = int(seed)
        logging.info("sweep: training %s", run_dir)
        print(f"sweep: training {name}", flush=True)
        returned = train_fn(cfg, run_dir)
        if isinstance(returned, dict) and returned.get("interrupted"):
          raise KeyboardInterrupt(
              f"sweep stopped: run {run_dir} was interrupted ({returned.get('signal')}); "
              "run the same command to resume")
        results = finished_results(run_dir)
        if results is None:
          raise RuntimeError(f"{run_dir}/results.json holds no test measures after training")
      else:
        print(f"sweep: {name} finished before, skipped", flush=True)
      test = results["test"]
      point = {"run": name, "lam": float(lam), "seed": int(seed),
               "best_step": results.get("best_step")}
      point.update({m: float(test[m]) for m in SUMMARY_MEASURES})
      points.append(point)

  summary = summarize(points)
  out = {"preset": config.get("name"), "lams": [float(l) for l in lams],
         "seeds": [int(s) for s in seeds], "command": command, "runs": points,
         "summary": summary}
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(out, f, indent=2)
  report.plot_sweep(points, os.path.join(workdir, "sweep.png"),
                    title=f"{config.get('name') or 'sweep'}: test measures against lambda")
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(_markdown(points, summary, command, config.get("name")))
  return out


def main(config, workdir: str, lams: str, seeds: str) -> int:
  """``--mode=sweep`` / ``python -m sdl_jax.sweep``."""
  if not workdir:
    raise ValueError("--workdir is required for a sweep (the runs go into sub-directories)")
  argv = list(sys.argv)
  command = " ".join(["python"] + argv) if argv else None
  out = run_sweep(config, workdir, parse_floats(lams, "--lams"), parse_ints(seeds, "--seeds"),
                  command=command)
  for s in out["summary"]:
    print(f"lam={s['lam']:g}: accuracy {s['accuracy_mean']:.4f} +/- {s['accuracy_std']:.4f}, "
          f"KL {s['kl_mean']:.4f} +/- {s['kl_std']:.4f} ({s['n']} seed(s))", flush=True)
  print(f"sweep written to {os.path.join(workdir, 'sweep.md')}", flush=True)
  return 0


def _app_main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  flags_ = flags.FLAGS
  try:  # Argument errors before any training, as usage errors.
    check_grid(parse_floats(flags_.lams, "--lams"), parse_ints(flags_.seeds, "--seeds"))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from sdl_jax import cpu  # pylint: disable=g-import-not-at-top
  cpu.configure(flags_.config)  # before JAX starts: XLA flags, allocator
  return main(flags_.config, flags_.workdir, flags_.lams, flags_.seeds)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Config file, optionally with a preset: configs/sdl.py:<preset>.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "The sweep's directory (one sub-directory per run).")
  flags.DEFINE_string("lams", "0,0.2,0.4,0.6,0.8,1", "Comma-separated lambda values.")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds (config.seed).")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_app_main)
