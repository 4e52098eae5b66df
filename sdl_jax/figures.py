"""Figures of an evaluation, a prediction or a sweep, as PNG files.

The ``plot_*`` functions draw with Matplotlib's Agg canvas (through
``matplotlib.figure.Figure``, never ``pyplot``, so they neither need a display nor change
the backend of a notebook that imports them); the numbers they draw come from
``sdl_jax.report``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from sdl_jax import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
      stats = [report.mean_std([p[name] for p in members if float(p[x_key]) == x])
               for x in xs]
      colour = colours[g % len(colours)]
      label = "mean +/- 1 sd" if group is None else f"{group}: mean +/- 1 sd"
      ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                  capsize=3, color=colour, label=label)
      ax.scatter([float(p[x_key]) for p in members], [p[name] for p in members], s=10,
                 color=colour, alpha=0.5)
    ax.set_xlabel("lambda" if x_key == "lam" else x_key)
    ax.set_ylabel(report.measure_header(name))
    ax.grid(alpha=0.3)
    if i == 0:
      ax.legend(fontsize=7, title="dots: single runs", title_fontsize=7)
  if title:
    fig.suptitle(title)
  return _save(fig, path)

