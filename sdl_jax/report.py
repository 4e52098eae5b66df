"""Tables, figures and the markdown report of an evaluation, a prediction or a sweep.

Numbers first, pictures second: ``confusion_matrix`` and ``per_emotion`` are pure NumPy
functions of labels and distributions; the ``plot_*`` functions draw PNG files with
Matplotlib's Agg canvas (through ``matplotlib.figure.Figure``, never ``pyplot``, so they
neither need a display nor change the backend of a notebook that imports them);
``markdown_table`` and ``evaluation_markdown`` write GitHub-flavoured markdown.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from sdl_jax import metrics as metrics_lib

# Columns of the measures table, in the order the paper reports them.
MEASURE_COLUMNS = ("accuracy",) + metrics_lib.LDL_MEASURES
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


# --------------------------------------------------------------------------------------
# Figures.


def _figure(width: float, height: float):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format="png")
  return path


def is_png(path: str) -> bool:
  """Whether ``path`` is a PNG file that decodes completely."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    if f.read(8) != PNG_SIGNATURE:
      return False
  try:
    with Image.open(path) as im:
      im.load()
      return im.format == "PNG" and im.width > 0 and im.height > 0
  except Exception:  # pylint: disable=broad-except
    return False


def plot_confusion_matrix(cm, names: Sequence[str], path: str, title: str | None = None
                          ) -> str:
  """Row-normalised confusion matrix (share of each true class), with the counts written
  in the cells. ``cm``: int ``[C, C]`` from ``confusion_matrix``. Returns ``path``."""
  cm = np.asarray(cm)
  c = len(names)
  rows = cm.sum(axis=1, keepdims=True)
  share = np.where(rows > 0, cm / np.maximum(rows, 1), 0.0)
  side = 1.2 + 0.6 * c
  fig = _figure(side + 1.2, side)
  ax = fig.add_subplot()
  im = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
  ax.set_xticks(range(c), names, rotation=45, ha="right")
  ax.set_yticks(range(c), names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true (dominant emotion)")
  for i in range(c):
    for j in range(c):
      ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
              color="white" if share[i, j] > 0.5 else "black")
  fig.colorbar(im, ax=ax, label="share of the true class")
  ax.set_title(title or f"Confusion matrix ({int(cm.sum())} images)")
  return _save(fig, path)


def _bars(ax, names, dists, labels, colours):
  """Horizontal grouped bars: one group per emotion, one bar per distribution."""
  c = len(names)
  k = len(dists)
  height = 0.8 / k
  y = np.arange(c)
  for i, (d, lab, col) in enumerate(zip(dists, labels, colours)):
    ax.barh(y - 0.4 + height * (i + 0.5), np.asarray(d, np.float64), height=height,
            label=lab, color=col)
  ax.set_yticks(y, names, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlim(0, 1)
  ax.tick_params(axis="x", labelsize=7)


def _show_image(ax, image):
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255,
            interpolation="nearest")
  ax.set_axis_off()


def plot_gallery(images, targets, preds, names: Sequence[str], path: str,
                 captions: Sequence[str] | None = None, title: str | None = None) -> str:
  """Images with their true and predicted distributions as bar charts.

  Args:
    images: ``K`` uint8 images ``[H, W, 3]`` (or ``[H, W]``), any sizes.
    targets: float ``[K, C]`` true distributions.
    preds: float ``[K, C]`` predicted distributions.
    names: the ``C`` emotion names.
    path: the PNG to write.
    captions: one line per image (e.g. its KL and file name).
    title: figure title.

  Returns:
    ``path``.
  """
  k = len(images)
  if k == 0:
    raise ValueError("plot_gallery needs at least one image")
  fig = _figure(2.4 * k + 0.6, 5.2)
  grid = fig.add_gridspec(2, k, height_ratios=(1.0, 1.15))
  for i in range(k):
    ax = fig.add_subplot(grid[0, i])
    _show_image(ax, images[i])
    if captions is not None:
      ax.set_title(captions[i], fontsize=8)
    ax = fig.add_subplot(grid[1, i])
    _bars(ax, names, [targets[i], preds[i]], ["true", "predicted"],
          ["tab:gray", "tab:orange"])
    if i:
      ax.set_yticklabels([])
    if i == k - 1:
      ax.legend(fontsize=7, loc="lower right")
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def plot_prediction(image, distribution, names: Sequence[str], path: str,
                    title: str | None = None) -> str:
  """One image next to its predicted distribution (a bar per emotion). Returns ``path``."""
  fig = _figure(6.4, 3.0)
  ax = fig.add_subplot(1, 2, 1)
  _show_image(ax, image)
  ax = fig.add_subplot(1, 2, 2)
  d = np.asarray(distribution, np.float64)
  top = int(np.argmax(d))
  colours = ["tab:orange" if j == top else "tab:blue" for j in range(len(names))]
  ax.barh(np.arange(len(names)), d, color=colours)
  ax.set_yticks(np.arange(len(names)), names, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlim(0, 1)
  ax.set_xlabel("probability")
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str,
                keys: Sequence[str] | None = None, step_key: str = "step") -> str:
  """Training curves: one panel per metric key, value against ``step_key``.

  Args:
    rows: records such as the lines of ``metrics.jsonl``; each has ``step_key`` and some
      numeric keys (a row may hold only some of them).
    path: the PNG to write.
    keys: the metrics to draw (default: every numeric key except ``step_key``). Keys of
      the form ``<prefix>/<name>`` (e.g. ``train/loss``, ``validation/loss``) that share
      a ``<name>`` go into the same panel.

  Returns:
    ``path``.
  """
  if keys is None:
    keys = sorted({k for r in rows for k, v in r.items()
                   if k != step_key and isinstance(v, (int, float))
                   and not isinstance(v, bool)})
  if not keys:
    raise ValueError("plot_curves: no numeric metrics in the rows")
  panels: dict[str, list[str]] = {}
  for key in keys:
    panels.setdefault(key.split("/")[-1], []).append(key)
  n = len(panels)
  cols = min(3, n)
  nrows = math.ceil(n / cols)
  fig = _figure(4.0 * cols, 2.8 * nrows)
  for i, (panel, members) in enumerate(panels.items()):
    ax = fig.add_subplot(nrows, cols, i + 1)
    for key in members:
      pts = [(r[step_key], r[key]) for r in rows if key in r and step_key in r
             and r[key] is not None]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=key)
    ax.set_title(panel, fontsize=9)
    ax.set_xlabel(step_key, fontsize=8)
    ax.tick_params(labelsize=7)
    if len(members) > 1:
      ax.legend(fontsize=7)
  return _save(fig, path)


def plot_sweep(points: Sequence[Mapping[str, Any]], path: str,
               metrics: Sequence[str] = ("accuracy", "kl"), x_key: str = "lam",
               title: str | None = None, group_key: str | None = None) -> str:
  """Metrics against lambda: per group (e.g. method), the mean over runs with error bars
  of one sample standard deviation, and the single runs as dots (as in the paper's
  lambda figure).

  Args:
    points: one dict per run with ``x_key`` and each of ``metrics`` (and ``group_key``).
    path: the PNG to write.
    metrics: one panel each.
    group_key: one line per value of this key (``None``: one line for all runs).

  Returns:
    ``path``.
  """
  fig = _figure(4.2 * len(metrics), 3.2)
  groups = sorted({str(p.get(group_key)) for p in points}) if group_key else [None]
  colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
  for i, name in enumerate(metrics):
    ax = fig.add_subplot(1, len(metrics), i + 1)
    for g, group in enumerate(groups):
      members = [p for p in points if p.get(name) is not None
                 and (group is None or str(p.get(group_key)) == group)]
      xs = sorted({float(p[x_key]) for p in members})
      if not xs:
        continue
      stats = [mean_std([p[name] for p in members if float(p[x_key]) == x]) for x in xs]
      colour = colours[g % len(colours)]
      label = "mean +/- 1 sd" if group is None else f"{group}: mean +/- 1 sd"
      ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                  capsize=3, color=colour, label=label)
      ax.scatter([float(p[x_key]) for p in members], [p[name] for p in members], s=10,
                 color=colour, alpha=0.5)
    ax.set_xlabel("lambda" if x_key == "lam" else x_key)
    ax.set_ylabel(measure_header(name))
    ax.grid(alpha=0.3)
    if i == 0:
      ax.legend(fontsize=7, title="dots: single runs", title_fontsize=7)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def mean_std(values) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (``ddof=1``; 0 for one value) of ``values``,
  ``(None, None)`` when there are none."""
  v = np.asarray(values, np.float64)
  if not v.size:
    return None, None
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
