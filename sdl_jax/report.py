"""Numbers and markdown of results: a workdir's ``report.md`` (training run, linear probe,
evaluation) and the tables of sweeps.

``confusion_matrix``, ``per_emotion`` and ``mean_std`` are pure NumPy functions of labels,
distributions and measures; ``markdown_table`` and the ``*_markdown`` functions write
GitHub-flavoured markdown; ``write_report`` is the one writer of ``report.md``. The figures
are drawn by ``sdl_jax.figures``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from sdl_jax import metrics as metrics_lib

# Columns of the measures table, in the order the paper reports them.
MEASURE_COLUMNS = ("accuracy",) + metrics_lib.LDL_MEASURES


# --------------------------------------------------------------------------------------
# Numbers.


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
  """Counts of (true, predicted) pairs.

  Args:
    labels: int ``[N]`` true classes in ``[0, C)``.
    preds: int ``[N]`` predicted classes in ``[0, C)``.
    num_classes: ``C``.

  Returns:
    int64 ``[C, C]``; entry ``[i, j]`` counts examples of class ``i`` predicted as ``j``
    (rows sum to the class supports).
  """
  labels = np.asarray(labels, np.int64).reshape(-1)
  preds = np.asarray(preds, np.int64).reshape(-1)
  if labels.shape != preds.shape:
    raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ in length")
  for what, v in (("labels", labels), ("preds", preds)):
    if v.size and (v.min() < 0 or v.max() >= num_classes):
      raise ValueError(f"{what} must lie in [0, {num_classes}), got [{v.min()}, {v.max()}]")
  flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes)


def per_emotion(labels, probs, distributions, names: Sequence[str]) -> list[dict[str, Any]]:
  """Per-emotion classification and distribution summary.

  For emotion ``c``, with ``y`` the dominant labels, ``yhat = argmax p``:
  ``support = #{y = c}``, ``predicted = #{yhat = c}``,
  ``precision = #{y = c, yhat = c} / predicted`` and ``recall = #{y = c, yhat = c} / support``
  (``None`` when the denominator is 0), ``mean_pred = mean_i p_ic`` and
  ``mean_true = mean_i l_ic`` over all N examples.

  Args:
    labels: int ``[N]`` dominant labels.
    probs: float ``[N, C]`` predicted distributions.
    distributions: float ``[N, C]`` target distributions.
    names: the ``C`` emotion names.

  Returns:
    one dict per emotion with the keys ``emotion``, ``support``, ``predicted``,
    ``precision``, ``recall``, ``mean_pred``, ``mean_true`` (Python scalars).
  """
  probs = np.asarray(probs, np.float64)
  distributions = np.asarray(distributions, np.float64)
  c = len(names)
  if probs.ndim != 2 or probs.shape[1] != c or distributions.shape != probs.shape:
    raise ValueError(f"probs {probs.shape} and distributions {distributions.shape} must "
                     f"both be [N, {c}]")
  cm = confusion_matrix(labels, probs.argmax(axis=1), c)
  support, predicted, hits = cm.sum(1), cm.sum(0), np.diag(cm)
  mean_pred, mean_true = probs.mean(0), distributions.mean(0)
  rows = []
  for j, name in enumerate(names):
    rows.append({
        "emotion": name,
        "support": int(support[j]),
        "predicted": int(predicted[j]),
        "precision": float(hits[j] / predicted[j]) if predicted[j] else None,
        "recall": float(hits[j] / support[j]) if support[j] else None,
        "mean_pred": float(mean_pred[j]),
        "mean_true": float(mean_true[j]),
    })
  return rows


def mean_std(values) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (``ddof=1``; 0 for one value) of ``values``,
  ``(None, None)`` when there are none."""
  v = np.asarray(values, np.float64)
  if not v.size:
    return None, None
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# --------------------------------------------------------------------------------------
# Markdown.


def _fmt(x, digits: int = 4) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
    return str(int(x))
  if isinstance(x, (float, np.floating)):
    return f"{float(x):.{digits}f}"
  return str(x)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   headers: Sequence[str] | None = None, digits: int = 4) -> str:
  """A markdown table of ``rows`` (dicts), one column per key of ``columns``.

  Floats are written with ``digits`` decimals, ``None`` / nan as ``-``.
  """
  headers = list(headers or columns)
  lines = ["| " + " | ".join(headers) + " |",
           "| " + " | ".join("---" for _ in headers) + " |"]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row.get(k), digits) for k in columns) + " |")
  return "\n".join(lines) + "\n"


def measure_header(name: str) -> str:
  """``'kl'`` -> ``'KL (lower)'``: a measures-table header saying which way is better."""
  pretty = {"kl": "KL", "accuracy": "accuracy", "squared_chi2": "Squared chi2",
            "sorensen": "Sorensen", "jensen_shannon": "Jensen-Shannon"
            }.get(name, name.capitalize())
  if name not in metrics_lib.HIGHER_IS_BETTER:
    return pretty
  return f"{pretty} ({'higher' if metrics_lib.HIGHER_IS_BETTER[name] else 'lower'})"


def measures_table(named: Mapping[str, Mapping[str, float]],
                   columns: Sequence[str] = MEASURE_COLUMNS) -> str:
  """Markdown table with one row per ``(row name, measures dict)`` of ``named``."""
  rows = [dict(m, name=name) for name, m in named.items()]
  return markdown_table(rows, ("name",) + tuple(columns),
                        [""] + [measure_header(c) for c in columns])


def evaluation_markdown(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
  """The ``report.md`` of an evaluation.

  Args:
    results: as written to ``results.json`` by ``sdl_jax.evaluate`` (keys ``split``,
      ``count``, ``model``, ``baselines``, ``per_emotion``, ``checkpoint``, ``command``,
      ``names``, ``confusion_matrix``; ``oracle``, ``eval_flip`` and ``training`` (facts
      of the training run: model, data, lam, steps) optional).
    figures: title -> PNG path relative to the report (embedded in that order).
  """
  split, n = results["split"], results["count"]
  ckpt = results.get("checkpoint") or {}
  out = [f"# Evaluation on the {split} split ({n} images)\n"]
  if results.get("command"):
    out.append(f"Produced by `{results['command']}`.\n")
  if ckpt:
    step = ckpt.get("step")
    out.append(f"Checkpoint: {ckpt.get('which', '?')}"
               + (f" (step {step})" if step is not None else "") + ".\n")
  if results.get("eval_flip"):
    out.append("Predictions: the mean of each image's and its mirror image's distributions "
               "(`eval_flip`).\n")
  facts = results.get("training") or {}
  if facts:
    described = ", ".join(f"{k} {facts[k]}" for k in
                          ("model", "data", "lam", "num_train_steps", "batch_size")
                          if k in facts)
    out.append(f"Training run: {described}.\n")
  out.append("\n## Measures\n")
  named = {"model": results["model"]}
  labels = {"uniform": "baseline: uniform", "train_mean": "baseline: training mean"}
  for key, m in results.get("baselines", {}).items():
    named[labels.get(key, f"baseline: {key}")] = m
  if results.get("oracle"):
    named["oracle (best possible)"] = results["oracle"]
  out.append(measures_table(named))
  out.append("\nAccuracy is top-1 against the dominant emotion; the LDL measures compare the "
             "predicted distribution with the annotators' (means over images). The "
             "baselines predict the same distribution for every image: uniform, or the "
             "mean distribution of the training split.\n")
  if results.get("oracle"):
    out.append("The oracle row predicts the synthetic set's hidden generating distribution: "
               "the measures no model can beat on average.\n")
  out.append("\n## Per emotion\n")
  out.append("Support is the number of images whose dominant emotion it is; mean predicted "
             "and mean true are the average probabilities of that emotion over all images.\n\n")
  out.append(markdown_table(
      results["per_emotion"],
      ("emotion", "support", "predicted", "precision", "recall", "mean_pred", "mean_true"),
      ("emotion", "support", "predicted", "precision", "recall", "mean predicted",
       "mean true")))
  for title, path in figures.items():
    out.append(f"\n## {title}\n\n![{title}]({path})\n")
  return "".join(out)


def training_markdown(results: Mapping[str, Any]) -> str:
  """The test table of a finished training run: the best and the last checkpoint next to
  the baselines, and how the run was made.

  Args:
    results: as written to ``results.json`` by ``sdl_jax.train`` (keys ``name``,
      ``test``, ``test_last``, ``baselines``, ``best_metric``, ``best_step``,
      ``num_train_steps``, ``model``, ``lam``, ``batch_size``, ``devices``,
      ``processes``, ``wall_time_s``, ``start_step``).
  """
  named = {f"model, best validation {results['best_metric']} (step {results['best_step']})":
           results["test"],
           f"model, last step ({results['num_train_steps']})": results["test_last"]}
  baselines = results["baselines"]
  for key, title in (("oracle", "oracle floor (predict the oracle)"),
                     ("train_mean", "training set's mean distribution"),
                     ("uniform", "uniform distribution")):
    if key in baselines:
      named[title] = baselines[key]
  out = [f"# {results['name']}: test split ({results['test']['count']} images)\n\n",
         measures_table(named),
         f"\nModel `{results['model']}`, lam = {results['lam']}, "
         f"{results['num_train_steps']} steps of global batch {results['batch_size']} on "
         f"{results['devices']} device(s) x {results['processes']} process(es), "
         f"{results['wall_time_s']:.0f} s wall time for this run "
         f"(from step {results['start_step']}).\n",
         "Accuracy is top-1 against the dominant vote; the six LDL measures compare the "
         "predicted distribution with the vote distribution (Geng 2016).\n"]
  if "oracle" in baselines:
    out.append("The oracle floor is what the hidden distribution that generated the votes "
               "scores against those votes: the best any model can expect.\n")
  return "".join(out)


def data_markdown(counts: Mapping[str, Any]) -> str:
  """One sentence on the data: label rows read, used and skipped (by reason), and the
  options that let rows be skipped (``counts`` as ``sdl_jax.data.buildlog.build_counts``)."""
  skipped = sum(counts["skipped"].values())
  reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts["skipped"].items()))
  text = (f"Data: {counts['rows_read']} label rows read, {counts['written']} used, "
          f"{skipped} skipped" + (f" ({reasons})" if reasons else ""))
  allowed = [k for k in ("allow_missing_images", "lenient") if counts.get(k)]
  if allowed:
    text += " with " + " and ".join(f"`data.{k}=True`" for k in allowed)
  return text + "; see build_summary.json and build_log.jsonl.\n"


_TRAINING_FACTS = ("name", "model", "data", "lam", "batch_size", "num_train_steps",
                   "best_step", "best_metric")



def probe_markdown(results: Mapping[str, Any]) -> str:
  """The test table of a linear-probe run (``sdl_jax.probe``) and its weight-decay grid."""
  columns = MEASURE_COLUMNS + (metrics_lib.EXTRA_MEASURES
                               if results.get("extra_measures") else ())
  p = results["probe"]
  named = {f"linear probe (weight decay {p['weight_decay']:g})": results["test"],
           "training set's mean distribution": results["baselines"]["train_mean"],
           "uniform distribution": results["baselines"]["uniform"]}
  if "oracle" in results["baselines"]:
    named["oracle floor (predict the oracle)"] = results["baselines"]["oracle"]
  grid = [{"weight_decay": r["weight_decay"], "objective_last": r["objective_last"],
           **{k: r["validation"][k] for k in ("accuracy", results["best_metric"])}}
          for r in p["grid"]]
  return "".join([
      f"# {results['name']}: linear probe, test split ({results['test']['count']} images)\n\n",
      measures_table(named, columns),
      f"\nFrozen `{results['model']}` (weights: {results['pretrained']}), "
      f"{p['feature_dim']} pooled features per image"
      f"{' and its mirror' if p['mirrored'] else ''}; a linear head trained full-batch "
      f"with the joint loss at lam = {results['lam']} ({p['steps']} Adam steps, rate "
      f"{p['learning_rate']:g}), weight decay chosen on validation "
      f"{results['best_metric']}. {results['wall_time_s']:.0f} s wall time "
      f"({p['feature_time_s']:.0f} s for the features, "
      f"{p['feature_splits_computed']} feature file(s) computed, the rest cached).\n\n",
      "## Weight decay grid (validation)\n\n",
      markdown_table(grid, ("weight_decay", "objective_last", "accuracy",
                            results["best_metric"]),
                     ["weight decay", "training objective", "accuracy",
                      measure_header(results["best_metric"])])])


def report_markdown(results: Mapping[str, Any]) -> str:
  """A workdir's ``report.md`` from its ``results.json``: the training run's test table
  (once training finished), the evaluation (once ``sdl_jax.evaluate`` ran) and the data's
  row counts (``data_build``; the evaluation's own when it read other data)."""
  parts, counts = [], [results.get("data_build")]
  if results.get("method") == "probe":
    parts.append(probe_markdown(results))
  elif "test" in results:
    parts.append(training_markdown(results))
  evaluation = results.get("evaluation")
  if evaluation:
    facts = {k: results[k] for k in _TRAINING_FACTS if k in results}
    parts.append(evaluation_markdown(dict(evaluation, training=facts),
                                     evaluation.get("figures", {})))
    counts.append(evaluation.get("data_build"))
  counts = [c for i, c in enumerate(counts) if c and c not in counts[:i]]
  if counts:
    parts.append("## Data\n\n" + "".join(data_markdown(c) for c in counts))
  return "\n".join(parts)


def write_report(workdir: str, results: Mapping[str, Any]) -> str:
  """Writes ``workdir/report.md`` (``report_markdown(results)``) and returns its text.

  The one writer of that file: training calls it when it ends, evaluation again with its
  ``evaluation`` entry added to the same results.
  """
  text = report_markdown(results)
  tmp = os.path.join(workdir, "report.md.tmp")
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, os.path.join(workdir, "report.md"))
  return text
