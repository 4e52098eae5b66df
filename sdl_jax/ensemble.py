r"""An ensemble of trained work directories: the mean of their predicted distributions.

    python -m sdl_jax.ensemble --workdirs=W1,W2,W3 [--split=test] [--out=DIR]

restores each work directory's best checkpoint (on validation; the latest if there is
none), predicts every image of ``split`` with it (``sdl_jax.evaluate.predict_split``, so
test-time mirroring follows each run's ``eval_flip``) and scores the arithmetic mean of the
members' distributions,

    p_ens(x) = (1 / M) sum_m p_m(x),

with accuracy and the LDL measures, beside each member's own. The members must have been
trained on the same data split (the same data settings, so the same images in the same
order) and emotions; their models may differ. With ``--out``, ``ensemble.json`` (members,
their measures, the ensemble's) is written there. Nothing is written into the members'
work directories.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from sdl_jax import evaluate


def mean_distribution(probs: Sequence[np.ndarray]) -> np.ndarray:
  """``(1 / M) sum_m probs[m]``: ``M`` arrays float ``[N, C]`` -> float32 ``[N, C]``."""
  if not probs:
    raise ValueError("an ensemble needs at least one member")
  shapes = {np.shape(p) for p in probs}
  if len(shapes) != 1:
    raise ValueError(f"ensemble members predict differently shaped arrays: {sorted(shapes)}")
  return np.mean(np.stack([np.asarray(p, np.float64) for p in probs]), axis=0).astype(
      np.float32)


def _data_key(config) -> str:
  """The data settings that decide which images a split holds, in which order (where the
  files are is left out: the targets are compared too)."""
  d = config.data.to_dict()
  for where in ("cache_dir", "path"):
    d.pop(where, None)
  return json.dumps(d, sort_keys=True, default=str)


def evaluate_ensemble(workdirs: Sequence[str], split: str = "test",
                      which: str = "best") -> dict[str, Any]:
  """Scores each member of ``workdirs`` and their mean distribution on ``split``.

  Returns:
    ``{'split', 'count', 'names', 'members': [{'workdir', 'step', 'which', 'model'}],
    'ensemble': measures}``; ``model`` and ``ensemble`` hold accuracy and the LDL
    measures (``sdl_jax.evaluate.model_measures``).

  Raises:
    ValueError: fewer than two work directories, or members trained on different data
      settings or emotions, or whose targets for ``split`` differ.
  """
  from sdl_jax import data  # pylint: disable=g-import-not-at-top
  if len(workdirs) < 2:
    raise ValueError(f"--workdirs: an ensemble needs at least two work directories, got "
                     f"{len(workdirs)}")
  members, probs, targets, first = [], [], None, None
  for workdir in workdirs:
    trained = evaluate.load_trained(workdir, which=which)
    if first is None:
      first = (workdir, trained)
    elif _data_key(trained.config) != _data_key(first[1].config):
      raise ValueError(f"{workdir} was trained on other data settings than {first[0]} "
                       "(an ensemble's members need the same data split)")
    elif trained.names != first[1].names:
      raise ValueError(f"{workdir} predicts the emotions {trained.names}, {first[0]} "
                       f"{first[1].names}")
    builder = data.get_builder(trained.config.data)
    pred = evaluate.predict_split(trained, builder, split)
    if targets is None:
      targets = pred
    elif not (np.array_equal(pred["label"], targets["label"])
              and np.allclose(pred["distribution"], targets["distribution"])):
      raise ValueError(f"{workdir}: the {split} split's targets differ from {first[0]}'s")
    probs.append(pred["probs"])
    members.append({"workdir": workdir, "step": trained.step, "which": trained.which,
                    "model": evaluate.model_measures(pred["probs"], pred["label"],
                                                     pred["distribution"])})
  ens = mean_distribution(probs)
  return {"split": split, "count": int(len(targets["label"])), "names": list(first[1].names),
          "members": members,
          "ensemble": evaluate.model_measures(ens, targets["label"], targets["distribution"])}


def format_table(result: dict[str, Any]) -> str:
  """A markdown table: one row per member, then the ensemble's."""
  keys = ("accuracy", "kl", "chebyshev", "clark", "canberra", "cosine", "intersection")
  lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  rows = [(m["workdir"], m["model"]) for m in result["members"]]
  rows.append((f"ensemble of {len(result['members'])}", result["ensemble"]))
  for name, m in rows:
    lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
  return "\n".join(lines)


def main(workdirs: Sequence[str], split: str = "test", which: str = "best",
         out: str | None = None) -> int:
  """Prints the table (and writes ``out/ensemble.json``); returns 0, or 1 after one line
  on stderr for members that cannot go together, a broken checkpoint or a missing run."""
  from sdl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    result = evaluate_ensemble(workdirs, split, which)
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
    return evaluate.refuse("ensemble", e)
  print(f"{split}: {result['count']} images")
  print(format_table(result))
  if out:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ensemble.json")
    with open(path, "w") as f:
      json.dump(result, f, indent=2)
    print(f"written: {path}")
  return 0


def _app_main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from sdl_jax import cpu  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  workdirs = [w.strip() for w in f.workdirs.split(",") if w.strip()]
  missing = [w for w in workdirs if not os.path.isdir(w)]
  if missing:
    raise app.UsageError(f"--workdirs: not a directory: {', '.join(missing)}")
  if len(workdirs) < 2:
    raise app.UsageError("--workdirs: give at least two work directories, comma-separated")
  cpu.configure(evaluate.load_config(workdirs[0]))  # before JAX starts
  return main(workdirs, f.split, f.which, f.out)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdirs", None, "Comma-separated training work directories.")
  flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "The split to score.")
  flags.DEFINE_enum("which", "best", ["best", "latest"], "Each member's checkpoint.")
  flags.DEFINE_string("out", None, "Directory for ensemble.json (optional).")
  flags.mark_flags_as_required(["workdirs"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_app_main)
