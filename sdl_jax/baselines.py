"""Baselines: the measures of fixed predictions (uniform, the training split's mean
distribution, the synthetic set's hidden oracle) that every results table sets a model
against."""

from __future__ import annotations

import jax
import numpy as np

from sdl_jax import metrics as metrics_lib


_jit_batch_sums = jax.jit(metrics_lib.batch_sums)


def baseline_metrics(probs, labels, distributions) -> dict:
  """Metrics of fixed predictions ``probs`` ``[N, C]`` (or ``[C]``) against a split."""
  distributions = np.asarray(distributions, np.float32)
  probs = np.broadcast_to(np.asarray(probs, np.float32), distributions.shape)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    # One jitted program, not one compilation per operation of batch_sums.
    sums = _jit_batch_sums(probs, np.asarray(labels, np.int32), distributions)
    return metrics_lib.finalize(sums)


def compute_baselines(builder, split: str = "test") -> dict:
  """``uniform``, ``train_mean`` and, where the set has an ``oracle`` feature, ``oracle``."""
  from sdl_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  has_oracle = "oracle" in builder.info.features
  keys = ("label", "distribution") + (("oracle",) if has_oracle else ())
  target = pipeline.read_targets(builder, split, keys)
  train = pipeline.read_targets(builder, "train", ("distribution",))
  c = target["distribution"].shape[1]
  out = {
      "uniform": baseline_metrics(np.full((c,), 1.0 / c), target["label"],
                                  target["distribution"]),
      "train_mean": baseline_metrics(train["distribution"].mean(0), target["label"],
                                     target["distribution"]),
  }
  if has_oracle:
    out["oracle"] = baseline_metrics(target["oracle"], target["label"],
                                     target["distribution"])
  return out

