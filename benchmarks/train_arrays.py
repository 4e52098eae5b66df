"""A short training run of the ``synthetic`` preset from in-memory arrays: the library's
TrainState, optimizer and pmapped ``train_step`` / ``eval_step`` over every local device,
with no tf.data. For machines without TensorFlow (the device machine this was run on had
JAX and PyTorch only): the set is drawn where TensorFlow is installed and carried as .npz.

    python -m benchmarks.train_arrays --npz=synth.npz --write   # draw 10k images, save
    python -m benchmarks.train_arrays --npz=synth.npz --epochs=8

Per epoch it prints the seconds, the training loss and accuracy, and the accuracy, KL and
cosine on the last 15% of the set (a held-out split). Images are normalised with the
backbone's mean/std as in ``sdl_jax.data.pipeline``, without its augmentation.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(prog="python -m benchmarks.train_arrays",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--npz", required=True, help="arrays image/label/distribution (.npz)")
  p.add_argument("--write", action="store_true",
                 help="draw the synthetic set (needs tensorflow_datasets) and save it")
  p.add_argument("--examples", type=int, default=10_000)
  p.add_argument("--epochs", type=int, default=8)
  p.add_argument("--preset", default="synthetic")
  args = p.parse_args(argv)

  if args.write:
    from sdl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    z = synthetic.draw(args.examples, seed=0)
    np.savez_compressed(args.npz, image=z["image"], label=z["label"],
                        distribution=z["distribution"])
    print(f"wrote {args.npz}: {len(z['image'])} images", flush=True)
    return []

  from configs import sdl  # pylint: disable=g-import-not-at-top
  from sdl_jax import cpu  # pylint: disable=g-import-not-at-top
  cpu.configure(sdl.get_config(args.preset))  # before JAX starts: XLA flags, allocator
  import jax  # pylint: disable=g-import-not-at-top
  from flax import jax_utils  # pylint: disable=g-import-not-at-top
  from sdl_jax import metrics, models  # pylint: disable=g-import-not-at-top
  from sdl_jax import train, train_state  # pylint: disable=g-import-not-at-top

  with np.load(args.npz) as z:
    image, label, dist = z["image"], z["label"].astype(np.int32), z["distribution"]
  n, n_train = len(image), int(0.85 * len(image))
  config = sdl.get_config(args.preset)
  spec = models.get_spec(config.model)
  x = ((image.astype(np.float32) / 255.0 - np.asarray(spec.mean, np.float32))
       / np.asarray(spec.std, np.float32))
  d, b = jax.local_device_count(), int(config.batch_size)
  print(f"devices {jax.devices()}; {config.model} {dict(config.model_kwargs)}, batch {b}, "
        f"lam {config.lam}, {n_train} train / {n - n_train} held-out images", flush=True)
  steps = n_train // b
  model = train_state.create_model(config, dist.shape[1])
  lr_fn = train_state.create_learning_rate_fn(config, steps, steps * args.epochs)
  state = jax_utils.replicate(train_state.create_train_state(
      train_state.prng_key(config.seed), config, model, x.shape[1], lr_fn))
  p_train, p_eval = train.make_pmapped_steps(config)

  def shard(a):
    return a.reshape((d, -1) + a.shape[1:])

  def batch(idx, pad=0):
    cols = {"image": x[idx], "label": label[idx], "distribution": dist[idx],
            "mask": np.ones(len(idx), np.float32)}
    return {k: shard(np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]))
            for k, v in cols.items()}

  def total(sums):
    out = None
    for s in sums:
      s = jax.tree.map(lambda v: v[0], s)  # psum-med: every device holds the total
      out = s if out is None else metrics.merge(out, s)
    return metrics.finalize(jax.device_get(out))

  rng, history = np.random.default_rng(config.seed), []
  for epoch in range(1, args.epochs + 1):
    t0, perm, sums = time.perf_counter(), rng.permutation(n_train), []
    for s in range(steps):
      state, m = p_train(state, batch(perm[s * b:(s + 1) * b]))
      sums.append(m)
    tr = total(sums)
    held = [p_eval(state, batch(np.arange(i, min(i + 256, n)),
                                pad=(-(min(i + 256, n) - i)) % d))
            for i in range(n_train, n, 256)]  # masked padding keeps the sums exact
    te = total(held)
    row = {"epoch": epoch, "seconds": time.perf_counter() - t0,
           "train_count": tr["count"], "count": te["count"],
           "train_loss": float(tr["loss"]), "train_accuracy": float(tr["accuracy"]),
           "accuracy": float(te["accuracy"]), "kl": float(te["kl"]),
           "cosine": float(te["cosine"])}
    history.append(row)
    print(f"epoch {epoch}: {row['seconds']:.1f} s, train loss {row['train_loss']:.4f} "
          f"accuracy {row['train_accuracy']:.3f} | held-out accuracy {row['accuracy']:.3f} "
          f"KL {row['kl']:.4f} cosine {row['cosine']:.3f}", flush=True)
  return history


if __name__ == "__main__":
  main(sys.argv[1:])
