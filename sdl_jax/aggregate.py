"""Sweep results: run directories -> points -> mean +/- sd tables, sweep.json/md/png.

A *point* is one finished run: its identity (work directory name, method, lambda, seed,
data split seed) and its test measures, read from the ``results.json`` that training
(``sdl_jax.train``) or the linear probe (``sdl_jax.probe``) wrote, plus the baselines
that file holds. ``summarize`` groups points by method and lambda and gives the mean and
sample standard deviation of each measure (the spread over seeds and data splits);
``write_summary`` writes them as ``sweep.json``, ``sweep.md`` and ``sweep.png``.
``sdl_jax.sweep`` runs the grid and calls these.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from sdl_jax import figures
from sdl_jax import metrics as metrics_lib
from sdl_jax import report

SUMMARY_MEASURES = ("accuracy",) + metrics_lib.LDL_MEASURES
METHODS = ("finetune", "probe")
# Fixed predictions every run's results.json scores on its test split
# (baselines.compute_baselines), by key, and their row names.
BASELINES = {"train_mean": "baseline: training-set mean", "uniform": "baseline: uniform"}


def finished_results(run_dir: str) -> dict | None:
  """The run's ``results.json`` if it holds test measures, else ``None``."""
  path = os.path.join(run_dir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    results = json.load(f)
  return results if isinstance(results.get("test"), dict) else None


def make_point(name: str, results: dict, *, method: str, lam: float, seed: int,
               split_seed: int | None,
               measures: Sequence[str] = SUMMARY_MEASURES) -> dict[str, Any]:
  """One row of the runs table: the run's identity and its test ``measures`` (``None``
  where its ``results.json`` lacks one, e.g. an extra measure of an older run)."""
  test = results["test"]
  point = {"run": name, "method": method, "lam": float(lam), "seed": int(seed),
           "split_seed": None if split_seed is None else int(split_seed),
           "best_step": results.get("best_step")}
  point.update({m: (float(test[m]) if test.get(m) is not None else None) for m in measures})
  baselines = results.get("baselines") or {}
  point["baselines"] = {b: {m: baselines[b].get(m) for m in measures}
                        for b in BASELINES if isinstance(baselines.get(b), dict)}
  return point


def collect_points(workdir: str,
                   measures: Sequence[str] = SUMMARY_MEASURES) -> list[dict[str, Any]]:
  """The points of every finished run directory directly under ``workdir`` (sorted by
  name): method, lambda, seed and split seed from its ``results.json`` and
  ``config.json``. Unfinished directories are skipped."""
  points = []
  for name in sorted(os.listdir(workdir)):
    run_dir = os.path.join(workdir, name)
    results = finished_results(run_dir) if os.path.isdir(run_dir) else None
    if results is None:
      continue
    cfg = {}
    if os.path.exists(os.path.join(run_dir, "config.json")):
      with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    method = results.get("method") or ("probe" if cfg.get("probe") else "finetune")
    split_seed = results.get("split_seed", (cfg.get("data") or {}).get("split_seed"))
    seed = results.get("seed", cfg.get("seed", 0))
    points.append(make_point(name, results, method=method, lam=results["lam"], seed=seed,
                             split_seed=split_seed, measures=measures))
  return points


def summarize(points: Sequence[dict[str, Any]],
              measures: Sequence[str] = SUMMARY_MEASURES) -> list[dict[str, Any]]:
  """Per method and lambda (methods in ``METHODS`` order, lambda ascending):
  ``{'method', 'lam', 'n', 'seeds', 'split_seeds', <m>_mean, <m>_std}`` for each measure.

  ``n`` runs (one per seed and split seed); ``std`` is their sample standard deviation
  (``ddof=1``), 0 for a single run. A measure some run lacks is summarised over the runs
  that have it (``None`` if none has).
  """
  out = []
  order = {m: i for i, m in enumerate(METHODS)}
  keys = sorted({(p.get("method", "finetune"), float(p["lam"])) for p in points},
                key=lambda k: (order.get(k[0], len(order)), k[0], k[1]))
  for method, lam in keys:
    group = [p for p in points
             if p.get("method", "finetune") == method and float(p["lam"]) == lam]
    row: dict[str, Any] = {
        "method": method, "lam": lam, "n": len(group),
        "seeds": sorted(int(p["seed"]) for p in group),
        "split_seeds": sorted({p["split_seed"] for p in group
                               if p.get("split_seed") is not None})}
    for m in measures:
      row[f"{m}_mean"], row[f"{m}_std"] = report.mean_std(
          [p[m] for p in group if p.get(m) is not None])
    out.append(row)
  return out


def summarize_baselines(points: Sequence[dict[str, Any]],
                        measures: Sequence[str] = SUMMARY_MEASURES) -> list[dict[str, Any]]:
  """Per baseline of ``BASELINES``: mean and sample sd over the data splits (one value
  per split seed: every run of a split scores the same baseline), as ``summarize``
  rows with ``method`` the baseline's name and ``lam`` ``None``."""
  out = []
  for key, label in BASELINES.items():
    per_split = {}
    for p in points:
      if key in p.get("baselines", {}):
        per_split.setdefault(p.get("split_seed"), p["baselines"][key])
    if not per_split:
      continue
    row: dict[str, Any] = {"method": label, "lam": None, "n": len(per_split), "seeds": [],
                           "split_seeds": sorted(k for k in per_split if k is not None)}
    for m in measures:
      row[f"{m}_mean"], row[f"{m}_std"] = report.mean_std(
          [b[m] for b in per_split.values() if b.get(m) is not None])
    out.append(row)
  return out


def pm(mean, std) -> str:
  return "-" if mean is None else f"{mean:.4f} +/- {std:.4f}"


def _markdown(points, summary, command, preset, measures=SUMMARY_MEASURES) -> str:
  lines = [f"# Sweep{f' ({preset})' if preset else ''}\n\n",
           f"Produced by `{command}`.\n\n" if command else "",
           "Test measures of each run (fine-tuning: its best checkpoint on validation; "
           "probe: its head with the weight decay best on validation); mean +/- sample "
           "standard deviation over the runs of a row (seeds x data split seeds); the "
           "baselines predict one fixed distribution for every test image, their spread "
           "is over the data splits.\n\n"]
  rows = []
  for s in summary:
    row = {"method": s["method"], "lam": "-" if s["lam"] is None else f"{s['lam']:g}",
           "n": s["n"]}
    for m in measures:
      row[m] = pm(s[m + "_mean"], s[m + "_std"])
    rows.append(row)
  lines.append(report.markdown_table(
      rows, ("method", "lam", "n") + tuple(measures),
      ["method", "lambda", "runs"] + [report.measure_header(m) for m in measures]))
  lines.append("\n![accuracy and KL against lambda](sweep.png)\n\n## Runs\n\n")
  lines.append(report.markdown_table(
      [dict(p, lam=f"{p['lam']:g}") for p in points],
      ("run", "method", "lam", "split_seed", "seed", "best_step") + tuple(measures),
      ["work directory", "method", "lambda", "split seed", "seed", "best step"]
      + [report.measure_header(m) for m in measures]))
  return "".join(lines)


def write_summary(workdir: str, points, *, preset=None, command=None,
                  measures: Sequence[str] = SUMMARY_MEASURES,
                  grid: dict | None = None) -> dict[str, Any]:
  """Writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` for ``points``; returns the
  ``sweep.json`` dict."""
  if not points:
    raise ValueError(f"no finished runs to summarise in {workdir}")
  summary = summarize(points, measures)
  baselines = summarize_baselines(points, measures)
  out = {"preset": preset, **(grid or {}), "command": command, "measures": list(measures),
         "runs": points, "summary": summary, "baselines": baselines}
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(out, f, indent=2)
  figures.plot_sweep(points, os.path.join(workdir, "sweep.png"),
                     title=f"{preset or 'sweep'}: test measures against lambda",
                     group_key="method")
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(_markdown(points, summary + baselines, command, preset, measures))
  return out
