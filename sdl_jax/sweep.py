r"""Sweeps: one preset trained for several lambdas, seeds, data splits and methods.

    python -m sdl_jax.sweep --config=configs/sdl.py --lams=0,0.5,0.8,1 --seeds=0,1 \
        --workdir=workdirs/sweep
    python -m sdl_jax.sweep --config=configs/sdl.py:flickr_ldl --config.data.path=P \
        --lams=0,0.8 --split_seeds=0,1,2 --methods=probe,finetune --workdir=S

runs the config once per ``(method, lam, split seed, seed)`` into sibling work directories
``<workdir>/lam=0.8_seed=0``, ``<workdir>/probe_lam=0.8_split=1_seed=0`` etc.
(``config.lam``, ``config.seed``, ``config.data.split_seed`` and ``config.probe`` set,
everything else as given, ``--config.*`` overrides included; the split seed appears in
the names only when ``--split_seeds`` is given, the method only for the probe). Probe
runs of one split share their cached backbone features
(``<workdir>/probe_features/split=<s>``). Then it writes

* ``<workdir>/sweep.json``: every run's test measures (fine-tuning: of its best
  checkpoint on validation; probe: of the head whose weight decay was best on
  validation; as in its ``results.json``) and, per method and lambda, their mean, sample
  standard deviation (``ddof=1``; 0 for a single run) and number of runs (seeds x split
  seeds): the spread over repeated splits;
* ``<workdir>/sweep.md``: the same as tables (rows method x lambda; accuracy and the six
  LDL measures, ``--extra_measures`` adds the five of ``metrics.EXTRA_MEASURES``), with
  the command that produced it;
* ``<workdir>/sweep.png``: test accuracy and KL against lambda, one line per method with
  error bars of one standard deviation, the single runs as dots (the paper's lambda
  figure).

A run whose ``results.json`` holds test measures is finished and skipped; an unfinished
one resumes from its latest checkpoint (``train.train_and_evaluate`` does that), so the
same command continues an interrupted sweep, and with every run finished only
re-summarises. ``--summarize_only`` trains nothing and summarises every finished run
directory found in ``--workdir`` (method, lambda and seeds read from each run's
``results.json`` / ``config.json``), e.g. runs gathered from several machines.
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
METHODS = ("finetune", "probe")
# Fixed predictions every run's results.json scores on its test split (train.compute_baselines).
BASELINES = {"train_mean": "baseline: training-set mean", "uniform": "baseline: uniform"}


def run_name(lam: float, seed: int, split_seed: int | None = None,
             method: str = "finetune") -> str:
  """``'lam=0.8_seed=0'``: the sub-directory of one run (``lam`` as Python writes it);
  ``'probe_lam=0.8_split=1_seed=0'`` for a probe run whose data split seed is swept."""
  prefix = "" if method == "finetune" else f"{method}_"
  split = "" if split_seed is None else f"_split={int(split_seed)}"
  return f"{prefix}lam={float(lam):g}{split}_seed={int(seed)}"


def config_method(config) -> str:
  """``'probe'`` if ``config.probe`` is set, else ``'finetune'``."""
  return "probe" if config.get("probe") else "finetune"


def parse_methods(text: str, what: str = "--methods") -> list[str]:
  """``'probe,finetune'`` -> ``['probe', 'finetune']``; ValueError naming ``what``."""
  out = [m.strip() for m in str(text).split(",") if m.strip()]
  for m in out:
    if m not in METHODS:
      raise ValueError(f"{what}: {m!r} is not a method (expected {', '.join(METHODS)})")
  if not out:
    raise ValueError(f"{what} is empty")
  if len(set(out)) != len(out):
    raise ValueError(f"{what} {out} must not repeat values")
  return out


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


def check_grid(lams: Sequence[float], seeds: Sequence[int],
               split_seeds: Sequence[int] | None = None) -> None:
  """ValueError unless every lambda is in [0, 1] and no lambda, seed or split seed
  repeats."""
  for lam in lams:
    if math.isnan(float(lam)) or not 0.0 <= float(lam) <= 1.0:
      raise ValueError(f"--lams: every lambda must be in [0, 1], got {lam}")
  if len(set(run_name(l, 0) for l in lams)) != len(lams) or len(set(seeds)) != len(seeds):
    raise ValueError(f"--lams {list(lams)} and --seeds {list(seeds)} must not repeat values")
  if split_seeds is not None and len(set(split_seeds)) != len(split_seeds):
    raise ValueError(f"--split_seeds {list(split_seeds)} must not repeat values")


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
      v = np.asarray([p[m] for p in group if p.get(m) is not None], np.float64)
      row[f"{m}_mean"] = float(v.mean()) if v.size else None
      row[f"{m}_std"] = (float(v.std(ddof=1)) if v.size > 1 else 0.0) if v.size else None
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
      v = np.asarray([b[m] for b in per_split.values() if b.get(m) is not None], np.float64)
      row[f"{m}_mean"] = float(v.mean()) if v.size else None
      row[f"{m}_std"] = (float(v.std(ddof=1)) if v.size > 1 else 0.0) if v.size else None
    out.append(row)
  return out


def _pm(mean, std) -> str:
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
      row[m] = _pm(s[m + "_mean"], s[m + "_std"])
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
  report.plot_sweep(points, os.path.join(workdir, "sweep.png"),
                    title=f"{preset or 'sweep'}: test measures against lambda",
                    group_key="method")
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(_markdown(points, summary + baselines, command, preset, measures))
  return out


def _run_config(config, workdir, method, lam, seed, split_seed):
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.lam = float(lam)
    cfg.seed = int(seed)
    cfg.probe = method == "probe"
    if split_seed is not None:
      cfg.data.split_seed = int(split_seed)
    if cfg.probe and not cfg.get("probe_feature_dir"):
      # The features depend on the split, not on lambda: runs of a split share them.
      split = cfg.data.get("split_seed", 0)
      cfg.probe_feature_dir = os.path.join(workdir, "probe_features", f"split={split}")
  return cfg


def run_sweep(config, workdir: str, lams: Sequence[float], seeds: Sequence[int],
              train_fn: Callable[[Any, str], Any] | None = None,
              command: str | None = None, split_seeds: Sequence[int] | None = None,
              methods: Sequence[str] | None = None,
              extra_measures: bool = False) -> dict[str, Any]:
  """Trains every ``(method, lam, split_seed, seed)`` not finished yet, then writes the
  sweep summary.

  Args:
    config: the run config (a ConfigDict); it is copied, not changed.
    workdir: the sweep's directory; a run goes to ``workdir/run_name(...)``.
    lams: lambda values in [0, 1].
    seeds: values of ``config.seed``.
    train_fn: ``(config, workdir) -> results``; default ``train.train_and_evaluate``
      (which runs the probe when ``config.probe``).
    command: the command line, for ``sweep.md``.
    split_seeds: values of ``config.data.split_seed``; ``None``: the config's, not swept
      (and not in the run names).
    methods: ``'finetune'`` and/or ``'probe'`` (sets ``config.probe``); default the
      config's.
    extra_measures: also summarise ``metrics.EXTRA_MEASURES``.

  Returns:
    the dict written to ``sweep.json``.
  """
  check_grid(lams, seeds, split_seeds)
  methods = list(methods or [config_method(config)])
  parse_methods(",".join(methods))
  measures = SUMMARY_MEASURES + (metrics_lib.EXTRA_MEASURES if extra_measures else ())
  if train_fn is None:
    from sdl_jax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  os.makedirs(workdir, exist_ok=True)
  points = []
  for method in methods:
    for lam in lams:
      for split_seed in (split_seeds if split_seeds is not None else [None]):
        for seed in seeds:
          name = run_name(lam, seed, split_seed, method)
          run_dir = os.path.join(workdir, name)
          results = finished_results(run_dir)
          if results is None:
            logging.info("sweep: training %s", run_dir)
            print(f"sweep: training {name}", flush=True)
            returned = train_fn(_run_config(config, workdir, method, lam, seed, split_seed),
                                run_dir)
            if isinstance(returned, dict) and returned.get("interrupted"):
              raise KeyboardInterrupt(
                  f"sweep stopped: run {run_dir} was interrupted "
                  f"({returned.get('signal')}); run the same command to resume")
            results = finished_results(run_dir)
            if results is None:
              raise RuntimeError(f"{run_dir}/results.json holds no test measures after "
                                 "training")
          else:
            print(f"sweep: {name} finished before, skipped", flush=True)
          split = split_seed if split_seed is not None else config.data.get("split_seed")
          points.append(make_point(name, results, method=method, lam=lam, seed=seed,
                                   split_seed=split, measures=measures))
  grid = {"methods": methods, "lams": [float(l) for l in lams],
          "split_seeds": None if split_seeds is None else [int(s) for s in split_seeds],
          "seeds": [int(s) for s in seeds]}
  return write_summary(workdir, points, preset=config.get("name"), command=command,
                       measures=measures, grid=grid)


def _print_summary(out, workdir):
  for s in out["summary"]:
    print(f"{s['method']} lam={s['lam']:g}: accuracy {_pm(s['accuracy_mean'], s['accuracy_std'])}, "
          f"KL {_pm(s['kl_mean'], s['kl_std'])} ({s['n']} run(s))", flush=True)
  print(f"sweep written to {os.path.join(workdir, 'sweep.md')}", flush=True)


def main(config, workdir: str, lams: str, seeds: str, split_seeds: str = "",
         methods: str = "", extra_measures: bool = False,
         summarize_only: bool = False) -> int:
  """``--mode=sweep`` / ``python -m sdl_jax.sweep``."""
  if not workdir:
    raise ValueError("--workdir is required for a sweep (the runs go into sub-directories)")
  argv = list(sys.argv)
  if argv and os.path.basename(argv[0]) == "sweep.py":
    argv[0] = "-m sdl_jax.sweep"  # as it was typed, not the module's path on this disk
  command = " ".join(["python"] + argv) if argv else None
  measures = SUMMARY_MEASURES + (metrics_lib.EXTRA_MEASURES if extra_measures else ())
  if summarize_only:
    out = write_summary(workdir, collect_points(workdir, measures),
                        preset=config.get("name") if config is not None else None,
                        command=command, measures=measures)
  else:
    out = run_sweep(config, workdir, parse_floats(lams, "--lams"),
                    parse_ints(seeds, "--seeds"), command=command,
                    split_seeds=parse_ints(split_seeds, "--split_seeds")
                    if str(split_seeds).strip() else None,
                    methods=parse_methods(methods) if str(methods).strip() else None,
                    extra_measures=extra_measures)
  _print_summary(out, workdir)
  return 0


def _app_main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  try:  # Argument errors before any training, as usage errors.
    if not f.summarize_only:
      if f.config is None:
        raise ValueError("--config is required (unless --summarize_only)")
      check_grid(parse_floats(f.lams, "--lams"), parse_ints(f.seeds, "--seeds"),
                 parse_ints(f.split_seeds, "--split_seeds") if f.split_seeds.strip()
                 else None)
      if f.methods.strip():
        parse_methods(f.methods)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  return main(f.config, f.workdir, f.lams, f.seeds, f.split_seeds, f.methods,
              f.extra_measures, f.summarize_only)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Config file, optionally with a preset: configs/sdl.py:<preset>.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "The sweep's directory (one sub-directory per run).")
  flags.DEFINE_string("lams", "0,0.2,0.4,0.6,0.8,1", "Comma-separated lambda values.")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds (config.seed).")
  flags.DEFINE_string("split_seeds", "",
                      "Comma-separated data split seeds (config.data.split_seed); empty: "
                      "the config's, not swept.")
  flags.DEFINE_string("methods", "",
                      "Comma-separated methods: finetune, probe (config.probe); empty: the "
                      "config's.")
  flags.DEFINE_bool("extra_measures", False,
                    "Also summarise Euclidean, Sorensen, squared chi2, fidelity and "
                    "Jensen-Shannon.")
  flags.DEFINE_bool("summarize_only", False,
                    "Train nothing: summarise every finished run directory in --workdir.")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_app_main)
