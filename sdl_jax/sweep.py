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
import math
import os
import sys
from typing import Any, Callable, Sequence

from absl import logging

from sdl_jax import aggregate
from sdl_jax import metrics as metrics_lib

SUMMARY_MEASURES = aggregate.SUMMARY_MEASURES
METHODS = aggregate.METHODS


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


def _run_config(config, workdir, method, lam, seed, split_seed):
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.lam = float(lam)
    cfg.seed = int(seed)
    cfg.probe = method == "probe"
    if split_seed is not None:
      cfg.data.split_seed = int(split_seed)
    if ((cfg.probe or cfg.get("head_init") == "probe")
        and not cfg.get("probe_feature_dir")):
      # The features depend on the split, not on lambda or on the method (a fine-tuned
      # run's head may start as the probe's): runs of a split share them.
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
    extra_measures: also summarise ``metrics.EXTRA_MEASURES`` (so does
      ``config.extra_measures``).

  Returns:
    the dict written to ``sweep.json``.
  """
  check_grid(lams, seeds, split_seeds)
  methods = list(methods or [config_method(config)])
  parse_methods(",".join(methods))
  extra_measures = extra_measures or bool(config.get("extra_measures"))
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
          results = aggregate.finished_results(run_dir)
          if results is None:
            logging.info("sweep: training %s", run_dir)
            print(f"sweep: training {name}", flush=True)
            returned = train_fn(_run_config(config, workdir, method, lam, seed, split_seed),
                                run_dir)
            if isinstance(returned, dict) and returned.get("interrupted"):
              raise KeyboardInterrupt(
                  f"sweep stopped: run {run_dir} was interrupted "
                  f"({returned.get('signal')}); run the same command to resume")
            results = aggregate.finished_results(run_dir)
            if results is None:
              raise RuntimeError(f"{run_dir}/results.json holds no test measures after "
                                 "training")
          else:
            print(f"sweep: {name} finished before, skipped", flush=True)
          split = split_seed if split_seed is not None else config.data.get("split_seed")
          points.append(aggregate.make_point(name, results, method=method, lam=lam,
                                             seed=seed, split_seed=split,
                                             measures=measures))
  grid = {"methods": methods, "lams": [float(l) for l in lams],
          "split_seeds": None if split_seeds is None else [int(s) for s in split_seeds],
          "seeds": [int(s) for s in seeds]}
  return aggregate.write_summary(workdir, points, preset=config.get("name"),
                                 command=command, measures=measures, grid=grid)


def _print_summary(out, workdir):
  for s in out["summary"]:
    print(f"{s['method']} lam={s['lam']:g}: accuracy "
          f"{aggregate.pm(s['accuracy_mean'], s['accuracy_std'])}, "
          f"KL {aggregate.pm(s['kl_mean'], s['kl_std'])} ({s['n']} run(s))", flush=True)
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
    out = aggregate.write_summary(
        workdir, aggregate.collect_points(workdir, measures),
        preset=config.get("name") if config is not None else None, command=command,
        measures=measures)
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
  if f.config is not None:
    from sdl_jax import cpu  # pylint: disable=g-import-not-at-top
    cpu.configure(f.config)  # before JAX starts: XLA flags, allocator
  return main(f.config, f.workdir, f.lams, f.seeds, f.split_seeds, f.methods,
              f.extra_measures, f.summarize_only)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from sdl_jax import configs  # pylint: disable=g-import-not-at-top
  configs.define_config_flag("config")  # a preset, sdl.py:<preset> or a config file
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
