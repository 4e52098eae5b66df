r"""Linear probe: a frozen pretrained backbone and a linear head on cached features.

    python run.py --config=configs/sdl.py:flickr_ldl --config.probe=True \
        --config.data.path=/data/Flickr_LDL --workdir=workdirs/flickr_probe

The cheap, strong baseline of the LDL literature. The preset's backbone (``config.model``
with ``config.pretrained``'s weights, in inference mode: BatchNorm on its running
statistics, no dropout) maps every image of every split, resized and centre-cropped as in
evaluation (``pipeline.eval_dataset``), to its pooled feature vector ``h`` (the input of
the model's classifier layer ``ModelSpec.head``), once; with ``config.probe_flip`` its
left-right mirror too. The features are cached in ``<feature dir>/<split>.npz`` (and
``<split>_mirrored.npz``); a later run whose backbone, preprocessing and data settings
match reads them instead of running the backbone again.

A linear head ``a = W z + b`` on the standardised features ``z = (h - mu) / sigma``
(``mu``, ``sigma``: per-dimension mean and standard deviation over the training split) is
then trained full-batch with Adam (all weight decays of the grid at once) on

    L(W, b) = sdl_loss(a, y, l; lam) + wd / 2 * ||W||^2

(``sdl_jax.losses.sdl_loss``: ``(1 - lam) L_cls + lam L_sdl``), once per weight decay
``wd`` in ``config.probe_weight_decays``; the head best on the validation split by
``config.best_metric`` is tested. With mirrored features the training set holds both
copies of each image and a prediction is the mean of the two distributions.

The workdir gets what training writes, with the same keys where they mean the same
(``results.json``: ``test``, ``baselines``, ``lam``, ``name``, ``model``, ...) plus
``"method": "probe"`` and a ``probe`` section (the grid and the chosen weight decay), and
``report.md``; ``config.json`` is the config.
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sdl_jax import baselines
from sdl_jax import losses
from sdl_jax.data import buildlog
from sdl_jax import metrics as metrics_lib
from sdl_jax import models
from sdl_jax import run_io
from sdl_jax import train_state
from sdl_jax import validation
from sdl_jax import workdir_lock

SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------------------------
# Features.


def feature_apply(apply_fn, head: str):
  """``(variables, images) -> features``: ``apply_fn`` in inference mode, stopped at the
  top-level module ``head`` (whose input, float32 ``[N, F]``, is returned instead of its
  output). Works for every model whose classifier is one top-level layer."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and module.name == head
        and len(module.scope.path) == 1):
      return args[0]
    return next_fun(*args, **kwargs)

  def apply(variables, images):
    with flax.linen.intercept_methods(intercept):
      out = apply_fn(variables, images, train=False)
    return out.astype(jnp.float32)

  return apply


def backbone_variables(config, model, seed: int = 0) -> dict:
  """The model's variables with the body from ``config.pretrained`` (when set)."""
  params, batch_stats = train_state.initialized(train_state.prng_key(seed), config.image_size,
                                                model)
  variables = {"params": params, "batch_stats": batch_stats}
  if config.get("pretrained"):
    from sdl_jax import weights  # pylint: disable=g-import-not-at-top
    kwargs = config.get("model_kwargs") or {}
    if isinstance(kwargs, ml_collections.ConfigDict):
      kwargs = kwargs.to_dict()
    variables = weights.init_from_pretrained(
        variables, weights.load_pretrained(config.pretrained, arch=config.model,
                                           model_kwargs=kwargs),
        head=models.get_spec(config.model).head)
  else:
    logging.warning("probe: config.pretrained is not set; the frozen %s body keeps its "
                    "random initialisation", config.model)
  return {k: v for k, v in flax.core.unfreeze(variables).items() if v}


def fingerprint(config, builder, split: str) -> str:
  """What the cached features of ``split`` depend on, as a JSON string."""
  data = json.loads(config.data.to_json_best_effort())
  data.pop("cache_dir", None)  # where TFDS keeps the prepared set does not change it
  kwargs = config.get("model_kwargs") or {}
  if isinstance(kwargs, ml_collections.ConfigDict):
    kwargs = kwargs.to_dict()
  return json.dumps({
      "model": config.model, "pretrained": config.get("pretrained"),
      # Without pretrained weights the frozen body is the seed's random initialisation.
      "init_seed": None if config.get("pretrained") else int(config.seed),
      "model_kwargs": kwargs, "dtype": config.dtype, "image_size": config.image_size,
      "resize_size": config.resize_size, "data": data, "dataset": builder.info.full_name,
      "split": split, "count": int(builder.info.splits[split].num_examples)},
      sort_keys=True, default=str)


def extract_features(config, builder, split: str, feature_fn, mirrored: bool) -> dict:
  """One pass of the backbone over ``split``.

  Returns:
    ``{'features': float32 [N, F], 'label': int32 [N], 'distribution': float32 [N, C]}``
    in the split's order (padding dropped); ``mirrored``: of the left-right mirrors.
  """
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ds, num_steps, total = pipeline.eval_dataset(builder, config, split, process_index=0,
                                               process_count=1, local_device_count=1)
  parts = {"features": [], "label": [], "distribution": []}
  t0 = time.time()
  for i, batch in enumerate(pipeline.as_numpy(ds)):
    images = batch["image"][0]
    if mirrored:
      images = images[:, :, ::-1]
    keep = batch["mask"][0] > 0
    parts["features"].append(np.asarray(feature_fn(images))[keep])
    parts["label"].append(batch["label"][0][keep])
    parts["distribution"].append(batch["distribution"][0][keep])
    if (i + 1) % 20 == 0 or i + 1 == num_steps:
      print(f"probe: {split}{' (mirrored)' if mirrored else ''} features "
            f"{sum(len(p) for p in parts['label'])}/{total} "
            f"({time.time() - t0:.0f} s)", flush=True)
  out = {k: np.concatenate(v) for k, v in parts.items()}
  if len(out["label"]) != total:
    raise RuntimeError(f"probe: read {len(out['label'])} examples of split {split!r}, "
                       f"expected {total}")
  return out


def cached_features(config, builder, split: str, feature_dir: str, make_feature_fn,
                    mirrored: bool = False) -> dict:
  """``extract_features``, read from ``feature_dir/<split>[_mirrored].npz`` when that
  file was written for the same backbone, preprocessing and data (``fingerprint``),
  computed with ``make_feature_fn()`` (called only then) and written there otherwise.
  Adds ``'cached': bool``."""
  path = os.path.join(feature_dir, f"{split}{'_mirrored' if mirrored else ''}.npz")
  want = fingerprint(config, builder, split)
  if os.path.exists(path):
    with np.load(path) as f:
      if "fingerprint" in f and str(f["fingerprint"]) == want:
        return {k: f[k] for k in ("features", "label", "distribution")} | {"cached": True}
    logging.warning("probe: %s was computed with other settings; computing again", path)
  out = extract_features(config, builder, split, make_feature_fn(), mirrored)
  os.makedirs(feature_dir, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, fingerprint=np.asarray(want), **out)
  os.replace(tmp, path)  # a killed run leaves no half-written cache behind
  return out | {"cached": False}


# ---------------------------------------------------------------------------------------
# The linear head (pure functions of arrays).


def standardizer(features):
  """``(mu, sigma)`` float32 ``[F]`` of ``features`` ``[N, F]``; a constant dimension
  gets ``sigma = 1`` (it stays constant, at 0, rather than dividing by 0)."""
  f = np.asarray(features, np.float64)
  mu, sigma = f.mean(0), f.std(0)
  return mu.astype(np.float32), np.where(sigma > 1e-6, sigma, 1.0).astype(np.float32)


def head_logits(head, z):
  """``z @ W + b``: logits float32 ``[N, C]`` of features ``z`` ``[N, F]``."""
  return z @ head["w"] + head["b"]


def objective(head, z, labels, distributions, lam, weight_decay):
  """``sdl_loss(z W + b, y, l; lam) + weight_decay / 2 * ||W||^2`` (bias not decayed)."""
  return (losses.sdl_loss(head_logits(head, z), labels, distributions, lam)
          + 0.5 * weight_decay * jnp.sum(head["w"]**2))


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_head(z, labels, distributions, lam, weight_decay, learning_rate, *, steps: int):
  """Full-batch Adam on ``objective`` from a zero head (the uniform prediction), with a
  cosine-decayed rate.

  Args:
    z: float32 ``[N, F]`` standardised features; labels int32 ``[N]``; distributions
      float32 ``[N, C]``.
    lam, weight_decay, learning_rate: scalars (traced: one compilation serves a grid).
    steps: number of Adam steps.

  Returns:
    (head ``{'w': [F, C], 'b': [C]}``, objective float32 ``[steps]`` along the way).
  """
  c = distributions.shape[1]
  head = {"w": jnp.zeros((z.shape[1], c), jnp.float32), "b": jnp.zeros((c,), jnp.float32)}
  tx = optax.adam(optax.cosine_decay_schedule(1.0, steps))
  grad_fn = jax.value_and_grad(objective)

  def step(carry, _):
    h, opt = carry
    value, grads = grad_fn(h, z, labels, distributions, lam, weight_decay)
    updates, opt = tx.update(grads, opt, h)
    updates = jax.tree_util.tree_map(lambda u: learning_rate * u, updates)
    return (optax.apply_updates(h, updates), opt), value

  (head, _), trace = jax.lax.scan(step, (head, tx.init(head)), None, length=steps)
  return head, trace


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_heads(z, labels, distributions, lam, weight_decays, learning_rate, *, steps: int):
  """``fit_head`` for each of ``weight_decays`` float32 ``[K]`` at once (vmapped: one
  ``[F, K C]`` product per step instead of K thin ones, ~4x faster on CPU).

  Returns:
    (heads ``{'w': [K, F, C], 'b': [K, C]}``, objectives ``[K, steps]``).
  """
  fit = functools.partial(fit_head, steps=steps)
  return jax.vmap(fit, in_axes=(None, None, None, None, 0, None))(
      z, labels, distributions, lam, weight_decays, learning_rate)


def predict(head, z_views):
  """Mean predicted distribution float32 ``[N, C]`` over the views ``[V, N, F]``."""
  return jnp.mean(jax.nn.softmax(head_logits(head, z_views), axis=-1), axis=0)


def measures(head, z_views, labels, distributions, lam) -> dict:
  """Accuracy, every measure of ``metrics.ALL_MEASURES`` and the loss (means)."""
  p = predict(head, jnp.asarray(z_views))
  logp = jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny))
  loss = losses.per_example_loss(logp, labels, distributions, lam)
  return metrics_lib.finalize(metrics_lib.batch_sums(p, labels, distributions, loss=loss))


# ---------------------------------------------------------------------------------------
# The run.


def select_head(z, data, config) -> tuple[dict, list[dict], int]:
  """Fits one head per weight decay of the grid; returns (best head, grid rows, best
  index). ``z``: split -> standardised views ``[V, N, F]``; ``data``: split -> targets."""
  key = config.best_metric
  higher = metrics_lib.HIGHER_IS_BETTER[key]
  train_z = z["train"].reshape(-1, z["train"].shape[-1])
  views = z["train"].shape[0]
  labels = np.tile(data["train"]["label"], views)
  dists = np.tile(data["train"]["distribution"], (views, 1))
  decays = np.asarray(config.probe_weight_decays, np.float32)
  stacked, traces = jax.device_get(fit_heads(
      train_z, labels, dists, float(config.lam), decays, float(config.probe_learning_rate),
      steps=int(config.probe_steps)))
  rows, heads = [], []
  for k, wd in enumerate(config.probe_weight_decays):
    head = {name: v[k] for name, v in stacked.items()}
    val = measures(head, z["validation"], data["validation"]["label"],
                   data["validation"]["distribution"], float(config.lam))
    rows.append({"weight_decay": float(wd), "objective_first": float(traces[k, 0]),
                 "objective_last": float(traces[k, -1]), "validation": val})
    heads.append(head)
    print(f"probe: weight decay {wd:g}: objective {traces[k, 0]:.4f} -> "
          f"{traces[k, -1]:.4f}, validation {key} {val[key]:.4f}", flush=True)
  values = [r["validation"][key] for r in rows]
  best = int(np.argmax(values) if higher else np.argmin(values))
  if len(rows) > 1 and best in (0, len(rows) - 1):
    msg = (f"probe: the best weight decay on validation, {rows[best]['weight_decay']:g}, is "
           "at an end of config.probe_weight_decays: consider widening the grid")
    logging.warning(msg)
    print(msg, flush=True)
  return heads[best], rows, best


def probe_features(config, builder, feature_dir: str, make_variables, make_model) -> dict:
  """Every split's cached backbone features (``cached_features``), as
  ``{split: {'views': float32 [V, N, F], 'label', 'distribution'}, 'computed': int}``
  (V = 2 with ``config.probe_flip``, the second view mirrored). ``make_variables()`` and
  ``make_model()`` give the frozen backbone; they are called only if a split's features
  must be computed."""

  @functools.cache
  def make_feature_fn():
    model = make_model()
    apply = jax.jit(feature_apply(model.apply, models.get_spec(config.model).head))
    variables = make_variables()
    return lambda images: apply(variables, images)

  view_flags = (False, True) if config.get("probe_flip") else (False,)
  data, computed = {}, 0
  for split in SPLITS:
    views = []
    for mirrored in view_flags:
      got = cached_features(config, builder, split, feature_dir, make_feature_fn, mirrored)
      computed += not got["cached"]
      views.append(got["features"])
    data[split] = {"label": got["label"], "distribution": got["distribution"],
                   "views": np.stack(views)}
  data["computed"] = computed
  return data


def fit_probe(config, data):
  """Standardises ``probe_features``'s output and selects the head on validation.

  Returns:
    (head ``{'w', 'b'}`` on standardised features, grid rows, best index, ``(mu, sigma)``,
    the standardised views per split).
  """
  train_views = data["train"]["views"]
  mu, sigma = standardizer(train_views.reshape(-1, train_views.shape[-1]))
  z = {s: (data[s]["views"] - mu) / sigma for s in SPLITS}
  head, grid, best = select_head(z, data, config)
  return head, grid, best, (mu, sigma), z


def head_for_raw_features(head, mu, sigma) -> dict:
  """The probe's head as a dense layer on raw features ``h``: since
  ``z = (h - mu) / sigma``, ``z W + b = h (W / sigma[:, None]) + (b - (mu / sigma) W)``.
  Returns flax Dense params ``{'kernel': float32 [F, C], 'bias': float32 [C]}``."""
  w = np.asarray(head["w"], np.float64)
  scaled = w / np.asarray(sigma, np.float64)[:, None]
  bias = np.asarray(head["b"], np.float64) - (np.asarray(mu, np.float64)
                                               / np.asarray(sigma, np.float64)) @ w
  return {"kernel": scaled.astype(np.float32), "bias": bias.astype(np.float32)}


def probe_initialised_head(config, builder, model, variables, feature_dir: str) -> dict:
  """Linear-probe-then-fine-tune (LP-FT, Kumar et al. 2022): the head, as flax Dense
  params of ``model``'s classifier, that the probe fits on the frozen features of
  ``variables`` (the pretrained body about to be fine-tuned)."""
  data = probe_features(config, builder, feature_dir, lambda: variables, lambda: model)
  head, grid, best, (mu, sigma), _ = fit_probe(config, data)
  print(f"head initialised from the linear probe (weight decay "
        f"{grid[best]['weight_decay']:g}, validation {config.best_metric} "
        f"{grid[best]['validation'][config.best_metric]:.4f})", flush=True)
  return head_for_raw_features(head, mu, sigma)


def probe_and_evaluate(config, workdir: str | None = None) -> dict:
  """Caches the backbone's features, fits and selects the linear head, tests it.

  Returns the dict also written to ``workdir/results.json`` (default workdir
  ``./workdirs/<config.name>_probe``).
  """
  t_start = time.time()
  run_io.quiet_library_logs()
  validation.validate_config(config)
  if not config.probe_weight_decays:
    raise ValueError("config.probe_weight_decays is empty: give at least one weight decay")
  workdir = workdir or os.path.join("workdirs", f"{config.get('name', 'run')}_probe")
  # One run per workdir at a time, as for training (sdl_jax.workdir_lock).
  lock = workdir_lock.WorkdirLock(workdir, "linear probe", active=jax.process_index() == 0)
  try:
    builder = run_io.load_data(config, workdir, lock)
    return _probe_and_evaluate(config, workdir, builder, t_start)
  finally:
    lock.release()


def _probe_and_evaluate(config, workdir: str, builder, t_start: float) -> dict:
  """``probe_and_evaluate`` once the data is ready and the workdir locked."""
  feature_dir = config.get("probe_feature_dir") or os.path.join(workdir, "features")
  num_classes = builder.info.features["label"].num_classes
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  model = functools.cache(lambda: train_state.create_model(config, num_classes))
  data = probe_features(config, builder, feature_dir,
                        lambda: backbone_variables(config, model(), int(config.seed)),
                        model)
  t_features = time.time() - t_start
  head, grid, best, (mu, _), z = fit_probe(config, data)
  num_views = data["train"]["views"].shape[0]
  computed = data["computed"]
  test = measures(head, z["test"], data["test"]["label"], data["test"]["distribution"],
                  float(config.lam))
  results = {
      "method": "probe", "name": config.get("name"), "model": config.model,
      "pretrained": config.get("pretrained"), "data": builder.info.full_name,
      "lam": float(config.lam), "seed": int(config.seed),
      "split_seed": int(config.data.get("split_seed", 0)),
      "best_metric": config.best_metric, "best_step": None,
      "validation_best": grid[best]["validation"], "test": test,
      "baselines": baselines.compute_baselines(builder, "test"),
      "data_build": buildlog.build_counts(builder),
      "probe": {"weight_decay": grid[best]["weight_decay"], "grid": grid,
                "steps": int(config.probe_steps),
                "learning_rate": float(config.probe_learning_rate),
                "feature_dim": int(mu.shape[0]), "mirrored": num_views == 2,
                "feature_dir": feature_dir, "feature_splits_computed": computed,
                "feature_time_s": t_features},
      "wall_time_s": time.time() - t_start,
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  results["extra_measures"] = bool(config.get("extra_measures"))
  from sdl_jax import report  # pylint: disable=g-import-not-at-top
  text = report.write_report(workdir, results)
  print(text, flush=True)
  return results

