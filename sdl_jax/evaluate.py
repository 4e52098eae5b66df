r"""Evaluation of a trained work directory: measures, baselines, tables and figures.

    python run.py --config=configs/sdl.py --workdir=W --mode=evaluate

restores the best checkpoint of ``W`` (on validation; the latest if there is none),
predicts every image of the test split once (the pipeline's evaluation path, padded and
masked, data-parallel over the local devices) and writes into ``W``:

* ``results.json``: the training run's results (if any) with an ``evaluation`` entry:
  accuracy and the six LDL measures of the model, of the baselines (``uniform``: ``1/C``
  for every image; ``train_mean``: the training split's mean distribution for every
  image) and, for the synthetic set, of the ``oracle``; the per-emotion table; the
  confusion matrix; the best and worst images by KL; the figure files;
* ``report.md``: the training run's test table (if any), this evaluation with its
  figures, and the data's row counts (``sdl_jax.report.write_report``);
* ``figures/confusion_matrix.png``, ``figures/best_by_kl.png``,
  ``figures/worst_by_kl.png`` (test images with their true and predicted distributions).

The measures are means over the split's images of the per-image measures of
``sdl_jax.metrics`` (so they agree with the ``test`` numbers the training run logs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Sequence

from absl import logging
import numpy as np

from sdl_jax import figures as figures_lib
from sdl_jax import metrics as metrics_lib
from sdl_jax import report

FIGURES_DIR = "figures"


@dataclasses.dataclass
class Trained:
  """A model restored from a work directory.

  Attributes:
    config: the run's ConfigDict.
    model: the flax module.
    variables: ``{'params': ..., 'batch_stats': ...}`` (host arrays).
    names: the emotion names, in output order.
    step: the training step of the checkpoint.
    which: ``'best'`` or ``'latest'`` (the one actually restored).
  """
  config: Any
  model: Any
  variables: dict
  names: tuple[str, ...]
  step: int
  which: str


def load_config(workdir: str):
  """The ConfigDict saved by training in ``workdir/config.json``."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {workdir!r} is not a training work directory (train first with "
        "python run.py --config=... --workdir=...)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_for_workdir(workdir: str, given=None):
  """The config to evaluate ``workdir`` with: the one saved by training, so the model is
  the one in the checkpoint. From a ``given`` config (``--config`` on the command line)
  only where the data set lives is taken (``data.path``, ``data.cache_dir``, when set),
  e.g. to evaluate on another machine, the FER+ ``data.protocol`` (to measure a model
  trained on one protocol's images on the other's) and ``eval_flip`` (test-time
  mirroring); other differences are logged and ignored."""
  saved = load_config(workdir)
  if given is None:
    return saved
  given_flat = _flatten(json.loads(given.to_json_best_effort()))
  saved_flat = _flatten(json.loads(saved.to_json_best_effort()))
  with saved.unlocked():
    for key in ("path", "cache_dir", "protocol"):
      if given.data.get(key):
        saved.data[key] = given.data[key]
    saved.eval_flip = bool(given.get("eval_flip", False))
  ignored = sorted(k for k in set(given_flat) | set(saved_flat)
                   if k not in ("data.path", "data.cache_dir", "data.protocol", "eval_flip")
                   and given_flat.get(k) != saved_flat.get(k))
  if ignored:
    logging.warning("--config differs from %s/config.json in %s; the saved values (those "
                    "the model was trained with) are used", workdir, ", ".join(ignored))
  return saved


def read_run_info(workdir: str) -> dict:
  """``workdir/run.json`` (classes, steps), written by training."""
  path = os.path.join(workdir, "run.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} holds no finished training start")
  with open(path) as f:
    return json.load(f)


def restore(config, workdir: str, which: str = "best"):
  """The ``which`` checkpoint's TrainState (host arrays) and the kind actually restored.

  The one way to restore a workdir's state (evaluation, prediction, tests). Needs no data
  set: the number of classes and steps come from ``workdir/run.json``. The restore target
  is abstract (``jax.eval_shape`` of ``train_state.create_train_state``): nothing is
  initialised or compiled, which on a CPU saves the compilation of ``model.init`` (a minute
  for some models). ``'best'`` falls back to ``'latest'`` when validation never ran.

  Returns:
    ``(state, 'best' | 'latest')``.

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    sdl_jax.checkpoint.CheckpointError: naming the checkpoint that does not fit the config.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from sdl_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from sdl_jax import train_state  # pylint: disable=g-import-not-at-top
  if which not in ("best", "latest"):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  run = read_run_info(workdir)
  model = train_state.create_model(config, run["num_classes"])
  lr_fn = train_state.create_learning_rate_fn(config, run["steps_per_epoch"],
                                              run["num_train_steps"])
  target = jax.eval_shape(
      lambda key: train_state.create_train_state(key, config, model, config.image_size,
                                                 lr_fn, pretrained=False),
      jax.random.key(0))
  ckpts = ckpt_lib.Checkpoints(workdir, config.keep_checkpoints, config.best_metric,
                               metrics_lib.HIGHER_IS_BETTER[config.best_metric])
  try:
    used = which if which == "latest" or ckpts.best_step() is not None else "latest"
    state = ckpts.restore(target, used)
  finally:
    ckpts.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {workdir} (checkpoints/ or checkpoints_best/)")
  return state, used


def load_trained(workdir: str, which: str = "best", config=None) -> Trained:
  """Restores the ``which`` checkpoint of ``workdir`` (``'best'`` falls back to
  ``'latest'``) with the saved config (or ``config``, which must build the same model)."""
  from sdl_jax import train_state  # pylint: disable=g-import-not-at-top
  config = config if config is not None else load_config(workdir)
  run = read_run_info(workdir)
  state, used = restore(config, workdir, which)
  variables = train_state.model_variables(state)
  names = tuple(run.get("class_names") or ())
  if len(names) != run["num_classes"]:
    raise ValueError(f"{workdir}/run.json: class_names {names} do not match num_classes "
                     f"{run['num_classes']}")
  return Trained(config=config, model=train_state.create_model(config, run["num_classes"]),
                 variables=variables, names=names, step=int(state.step), which=used)


# --------------------------------------------------------------------------------------
# Predicting a split.


def _read_split(builder, split: str, keys: Sequence[str], indices=None) -> dict:
  """Features ``keys`` of ``split`` in the order the evaluation pipeline reads it
  (unshuffled files, one at a time); with ``indices``, only those examples."""
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  pipeline._tf()  # pylint: disable=protected-access  (hides GPUs from TF)
  ds = builder.as_dataset(
      split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False))
  ds = ds.map(lambda ex: {k: ex[k] for k in keys})
  wanted = None if indices is None else set(int(i) for i in indices)
  rows = [ex for i, ex in enumerate(ds.as_numpy_iterator())
          if wanted is None or i in wanted]
  return {k: [r[k] for r in rows] for k in keys}


def predict_split(trained: Trained, builder, split: str = "test") -> dict[str, np.ndarray]:
  """The model's distributions for every image of ``split``, in the pipeline's order.

  Runs ``pipeline.eval_dataset`` (this process reads the whole split) through a pmapped
  forward pass over the local devices; padded rows are dropped by their mask.

  Returns:
    ``probs`` float32 ``[N, C]``, ``label`` int32 ``[N]``, ``distribution`` float32
    ``[N, C]``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import jax_utils  # pylint: disable=g-import-not-at-top
  from sdl_jax import models  # pylint: disable=g-import-not-at-top
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  model = trained.model

  flip = bool(trained.config.get("eval_flip", False))

  @jax.pmap
  def forward(variables, x):
    return jax.numpy.exp(models.log_probs(model.apply, variables, x, flip))

  variables = jax_utils.replicate(trained.variables)
  ds, _, total = pipeline.eval_dataset(builder, trained.config, split, process_index=0,
                                       process_count=1)
  out = {"probs": [], "label": [], "distribution": []}
  for batch in pipeline.as_numpy(ds):
    probs = np.asarray(forward(variables, batch["image"]))
    keep = batch["mask"].reshape(-1) > 0
    out["probs"].append(probs.reshape(-1, probs.shape[-1])[keep])
    out["label"].append(batch["label"].reshape(-1)[keep])
    out["distribution"].append(
        batch["distribution"].reshape(-1, batch["distribution"].shape[-1])[keep])
  result = {k: np.concatenate(v) for k, v in out.items()}
  if result["probs"].shape[0] != total:
    raise RuntimeError(f"evaluated {result['probs'].shape[0]} images of split {split!r}, "
                       f"which has {total}")
  return result


# --------------------------------------------------------------------------------------
# Measures and report.


def model_measures(probs, labels, distributions) -> dict[str, float]:
  """Accuracy and the mean LDL measures of predictions ``probs`` ``[N, C]``."""
  from sdl_jax import baselines  # pylint: disable=g-import-not-at-top
  return baselines.baseline_metrics(probs, labels, distributions)


def rank_by_kl(probs, distributions, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-image ``KL(l || p)`` and the indices of the ``k`` lowest and ``k`` highest.

  Returns:
    (kl float64 ``[N]``, best int ``[min(k, N)]`` ascending KL, worst int ``[min(k, N)]``
    descending KL). Ties go to the lower index.
  """
  kl = np.asarray(metrics_lib.ldl_measures(np.asarray(distributions, np.float32),
                                           np.asarray(probs, np.float32))["kl"], np.float64)
  order = np.argsort(kl, kind="stable")
  k = min(k, kl.shape[0])
  worst = np.argsort(-kl, kind="stable")[:k]
  return kl, order[:k], worst


def _decode_for_display(encoded: bytes) -> np.ndarray:
  """uint8 ``[H, W]`` (grey) or ``[H, W, 3]``, exactly as the data set stores it."""
  from sdl_jax.data import image_files  # pylint: disable=g-import-not-at-top
  image = image_files.decode_image(encoded)
  return image[..., 0] if image.shape[-1] == 1 else image


def _gallery(builder, split, indices, pred, true, kl, names, path, title):
  """Draws the images ``indices`` of ``split`` with true and predicted distributions.

  ``pred`` and ``true`` are the ``[N, C]`` predicted and target distributions of the whole
  split in evaluation order; the images read here are checked to be in that order.
  """
  feats = ("image", "distribution", "file_name")
  rows = _read_split(builder, split, feats, indices)
  # _read_split returns the chosen examples in split order; map back to ``indices``.
  order = sorted(set(int(i) for i in indices))
  pos = {i: j for j, i in enumerate(order)}
  sel = [pos[int(i)] for i in indices]
  images = [_decode_for_display(rows["image"][j]) for j in sel]
  targets = np.stack([rows["distribution"][j] for j in sel])
  if not np.allclose(targets, true[np.asarray(indices)], atol=1e-6):
    raise RuntimeError(f"split {split!r} was read in a different order than it was "
                       "evaluated; cannot match images to predictions")
  files = [rows["file_name"][j].decode() if isinstance(rows["file_name"][j], bytes)
           else str(rows["file_name"][j]) for j in sel]
  captions = [f"{f}\nKL {kl[i]:.3f}\ntrue {names[int(np.argmax(t))]}, "
              f"pred {names[int(np.argmax(pred[i]))]}"
              for f, i, t in zip(files, indices, targets)]
  figures_lib.plot_gallery(images, targets, pred[np.asarray(indices)], names, path,
                           captions, title)
  return [{"index": int(i), "file": f, "kl": float(kl[i])} for i, f in zip(indices, files)]


def evaluate_workdir(workdir: str, config=None, split: str = "test", which: str = "best",
                     num_gallery: int = 6, command: str | None = None) -> dict[str, Any]:
  """Evaluates ``workdir`` on ``split`` and writes ``results.json``, ``report.md`` and the
  figures (see the module docstring).

  Args:
    workdir: a training work directory.
    config: the config to use (default: the one saved in the workdir). Its data settings
      say where the data set is; its model settings must match the checkpoint.
    split: ``'test'`` (or ``'validation'``, ``'train'``).
    which: ``'best'`` or ``'latest'`` checkpoint.
    num_gallery: images in each of the best / worst galleries.
    command: the command line, for the report.

  Returns:
    the ``evaluation`` dict written into ``results.json``.
  """
  from sdl_jax import baselines as baselines_lib  # pylint: disable=g-import-not-at-top
  from sdl_jax import data  # pylint: disable=g-import-not-at-top
  from sdl_jax.data import buildlog  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  trained = load_trained(workdir, which=which, config=config)
  builder = data.get_builder(trained.config.data)
  label_names = tuple(builder.info.features["label"].names)
  if label_names != trained.names:
    raise ValueError(f"the data set's emotions {label_names} differ from the ones the model "
                     f"in {workdir} was trained on {trained.names}")
  names = trained.names
  c = len(names)
  logging.info("evaluating %s (%s checkpoint, step %d) on %s/%s", workdir, trained.which,
               trained.step, builder.info.full_name, split)
  pred = predict_split(trained, builder, split)
  probs, labels, dists = pred["probs"], pred["label"], pred["distribution"]

  baselines = baselines_lib.compute_baselines(builder, split)
  oracle = baselines.pop("oracle", None)
  cm = report.confusion_matrix(labels, probs.argmax(1), c)
  kl, best, worst = rank_by_kl(probs, dists, num_gallery)

  figures_dir = os.path.join(workdir, FIGURES_DIR)
  figures = {}
  figures["Confusion matrix"] = figures_lib.plot_confusion_matrix(
      cm, names, os.path.join(figures_dir, "confusion_matrix.png"),
      title=f"Confusion matrix, {split} split ({len(labels)} images)")
  best_rows = _gallery(builder, split, best, probs, dists, kl, names,
                       os.path.join(figures_dir, "best_by_kl.png"),
                       f"{split}: the {len(best)} images with the lowest KL(true || predicted)")
  figures["Best by KL"] = os.path.join(figures_dir, "best_by_kl.png")
  worst_rows = _gallery(builder, split, worst, probs, dists, kl, names,
                        os.path.join(figures_dir, "worst_by_kl.png"),
                        f"{split}: the {len(worst)} images with the highest KL(true || "
                        "predicted)")
  figures["Worst by KL"] = os.path.join(figures_dir, "worst_by_kl.png")

  evaluation = {
      "split": split, "count": int(len(labels)), "names": list(names),
      "checkpoint": {"which": trained.which, "step": trained.step},
      "eval_flip": bool(trained.config.get("eval_flip", False)),
      "data": builder.info.full_name,
      "data_build": buildlog.build_counts(builder),
      "command": command,
      "model": model_measures(probs, labels, dists),
      "baselines": baselines,
      "oracle": oracle,
      "per_emotion": report.per_emotion(labels, probs, dists, names),
      "confusion_matrix": cm.tolist(),
      "best_by_kl": best_rows, "worst_by_kl": worst_rows,
      "figures": {k: os.path.relpath(v, workdir) for k, v in figures.items()},
  }
  if jax.process_index() == 0:
    save_evaluation(workdir, evaluation)
  return evaluation


def save_evaluation(workdir: str, evaluation: dict[str, Any]) -> dict[str, Any]:
  """Adds ``evaluation`` to ``workdir/results.json`` (kept with the training run's results)
  and rewrites ``report.md`` from the whole; returns the results written."""
  results_path = os.path.join(workdir, "results.json")
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  results["evaluation"] = evaluation
  tmp = results_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, results_path)
  report.write_report(workdir, results)
  logging.info("evaluation written to %s/report.md and results.json", workdir)
  return results


def _command_line() -> str:
  argv = list(sys.argv)
  if argv and argv[0].endswith(".py"):
    argv[0] = os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]
    argv.insert(0, "python")
  return " ".join(argv)


def refuse(mode: str, error: Exception) -> int:
  """Prints ``error`` as one line on stderr, prefixed with ``mode``; returns 1 (the exit
  status). For the errors a user acts on (a broken checkpoint, a workdir in use)."""
  print(f"{mode}: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
  return 1


def main(config, workdir: str, split: str = "test", which: str = "best") -> int:
  """``--mode=evaluate``: the workdir's saved config, with the data location of
  ``config`` (``--config``, may be ``None``); see ``config_for_workdir``. Holds the
  workdir's lock (``sdl_jax.workdir_lock``) while it runs. Returns 0, or 1 after one line
  on stderr if the checkpoint is broken or the workdir in use (nothing is written)."""
  from sdl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sdl_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  if not workdir:
    raise ValueError("--workdir is required for --mode=evaluate")
  config = config_for_workdir(workdir, config)
  try:
    with workdir_lock.WorkdirLock(workdir, "evaluation"):
      evaluation = evaluate_workdir(workdir, config=config, split=split, which=which,
                                    command=_command_line())
  except (checkpoint.CheckpointError, workdir_lock.WorkdirLockedError) as e:
    return refuse("evaluate", e)
  m = evaluation["model"]
  print(f"{split}: {evaluation['count']} images, accuracy {m['accuracy']:.4f}, "
        f"KL {m['kl']:.4f}; report in {os.path.join(workdir, 'report.md')}", flush=True)
  return 0
