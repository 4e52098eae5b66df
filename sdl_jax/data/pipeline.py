r"""The tf.data input pipeline: TFDS split -> batches shaped for ``jax.pmap``.

Every batch is a dict of numpy arrays with two leading axes ``[D, B/D, ...]`` (``D`` the
local devices, ``B`` the per-process batch):

* ``image``: float32 ``[D, B/D, S, S, 3]``, normalised with the backbone's own mean/std
  (``sdl_jax.models.get_spec(config.model)``, in pixel units 0..255);
* ``label``: int32 ``[D, B/D]`` dominant label (``-1`` on padded rows);
* ``distribution``: float32 ``[D, B/D, C]`` (all zero on padded rows);
* ``mask``: float32 ``[D, B/D]``, 1 for real examples and 0 for padding.

Training (``train_dataset``): each process reads its own shard (``tfds.even_splits`` of the
split, remainder dropped so every process runs the same number of steps). An epoch is a
shuffle of that shard seeded by ``(seed, epoch, process)`` and cut to whole batches (the
remainder is dropped); random crop (``resize_size`` squash-resize then a random
``image_size`` crop, the released Caffe recipe) or an Inception-style random-resized crop;
random horizontal flip. Every random choice is a stateless function of ``(seed, process,
position in the stream)``, so the stream is deterministic for a seed whatever the
parallelism, and ``start_step`` resumes it exactly where a run stopped.

Evaluation (``eval_dataset``): resize to ``resize_size`` and take the centre ``image_size``
crop; each process reads its shard without dropping anything, and pads it with masked rows
up to a step count shared by all processes, so every example is seen exactly once and
the pmapped evaluation runs the same number of collective steps on every process.

Images are decoded with three channels (grey images are replicated to RGB).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from sdl_jax import models

_SHUFFLE_SEED_STRIDE = 1_000_003


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    # The data pipeline runs on the host; TF must not grab an accelerator JAX needs.
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass  # Already initialised; nothing to do.
  return tf


def _process(process_index, process_count):
  import jax  # pylint: disable=g-import-not-at-top
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  return pi, pc


def _local_devices(local_device_count):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.local_device_count() if local_device_count is None else local_device_count


def per_process_batch(global_batch: int, process_count: int, local_device_count: int,
                      what: str = "config.batch_size") -> int:
  """The batch each process reads: ``global_batch / process_count``.

  Raises:
    ValueError: naming ``what`` if the global batch does not divide over all devices.
  """
  devices = process_count * local_device_count
  if global_batch <= 0 or global_batch % devices:
    suggestion = max(devices, global_batch // devices * devices)
    raise ValueError(
        f"{what}={global_batch} must be a positive multiple of the number of devices "
        f"({process_count} process(es) x {local_device_count} local device(s) = {devices}), "
        f"e.g. --{what}={suggestion}")
  return global_batch // process_count


def shard_split(split: str, process_index: int, process_count: int, drop_remainder: bool):
  """This process's part of ``split`` (a TFDS split, e.g. ``'train[:50%]'`` or an even split)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]


def num_examples(builder, split) -> int:
  """Number of examples of ``split`` (any TFDS split spec, including even splits)."""
  return int(builder.info.splits[split].num_examples)


def _read(builder, split, cache: bool):
  """Encoded examples ``{'image': bytes, 'label': int32, 'distribution': float32 [C]}``."""
  tf = _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = builder.as_dataset(
      split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False))
  ds = _map(ds, lambda ex: {"image": ex["image"],
                            "label": tf.cast(ex["label"], tf.int32),
                            "distribution": tf.cast(ex["distribution"], tf.float32)})
  if cache:
    ds = ds.cache()
  return ds


def decode(encoded):
  """Encoded PNG/JPEG/... bytes -> uint8 ``[H, W, 3]`` (grey replicated to RGB)."""
  tf = _tf()
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _resize(image, size):
  tf = _tf()
  # Squash to size x size, as Caffe's data layer does (aspect ratio not kept).
  return tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear",
                         antialias=True)


def train_transform(image, seed, *, image_size: int, resize_size: int, crop: str,
                    flip: bool):
  """Random crop + flip of one decoded image, stateless in ``seed`` (int ``[2]``).

  Returns float32 ``[image_size, image_size, 3]`` in pixel units [0, 255].
  """
  tf = _tf()
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if crop == "random":
    image = _resize(image, resize_size)
    if resize_size != image_size:
      image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], crop_seed)
  elif crop == "random_resized":
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([1, 0, 4], tf.float32), seed=crop_seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = _resize(tf.slice(image, begin, size), image_size)
  else:
    raise ValueError(f"config.crop must be 'random' or 'random_resized', got {crop!r}")
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return image


def eval_transform(image, *, image_size: int, resize_size: int):
  """Resize to ``resize_size`` and take the centre ``image_size`` crop; float32 [0, 255]."""
  tf = _tf()
  image = _resize(image, resize_size)
  off = (resize_size - image_size) // 2
  return image[off:off + image_size, off:off + image_size]


def _normaliser(model_name):
  """``image -> (image - mean) / std`` with the backbone's constants (looked up once)."""
  spec = models.get_spec(model_name)
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)
  return lambda image: (image - mean) / std


def _map(ds, fn):
  """``ds.map`` in parallel, without AutoGraph (the functions are plain TF ops; converting
  them only costs seconds of tracing)."""
  tf = _tf()
  return ds.map(tf.autograph.experimental.do_not_convert(fn),
                num_parallel_calls=tf.data.AUTOTUNE)


def _check_sizes(config):
  if config.resize_size < config.image_size:
    raise ValueError(f"config.resize_size={config.resize_size} must be >= "
                     f"config.image_size={config.image_size}")


def _to_devices(batch, devices):
  tf = _tf()
  return {k: tf.reshape(v, tf.concat([[devices, -1], tf.shape(v)[1:]], 0))
          for k, v in batch.items()}


def train_dataset(builder, config, *, start_step: int = 0, split: str = "train",
                  process_index: int | None = None, process_count: int | None = None,
                  local_device_count: int | None = None):
  """The endless, deterministic training stream from ``start_step`` on.

  Args:
    builder: a prepared TFDS builder with the common features.
    config: the run config (``seed``, ``batch_size`` (global), ``image_size``,
      ``resize_size``, ``crop``, ``flip``, ``cache``, ``shuffle_buffer``, ``model``).
    start_step: number of steps already taken; the stream starts at the batch that step
      would have read in a run that started from 0.
    split: the TFDS split to train on.
    process_index, process_count, local_device_count: default to JAX's.

  Returns:
    (``tf.data.Dataset`` of batches ``[D, B/D, ...]`` as in the module docstring,
    ``steps_per_epoch``).
  """
  tf = _tf()
  _check_sizes(config)
  pi, pc = _process(process_index, process_count)
  devices = _local_devices(local_device_count)
  batch = per_process_batch(config.batch_size, pc, devices)
  sub = shard_split(split, pi, pc, drop_remainder=True)
  n = num_examples(builder, sub)
  steps_per_epoch = n // batch
  if steps_per_epoch == 0:
    raise ValueError(f"split {split!r} gives {n} examples to each of {pc} process(es), "
                     f"fewer than one batch of {batch}; lower config.batch_size")
  epoch_len = steps_per_epoch * batch
  base = _read(builder, sub, config.get("cache", False))
  buffer = n if config.get("cache", False) else min(n, config.get("shuffle_buffer", 16_384))
  seed = int(config.seed)

  normalise = _normaliser(config.model)

  @tf.autograph.experimental.do_not_convert
  def one_epoch(epoch):
    shuffle_seed = (seed * _SHUFFLE_SEED_STRIDE + pi) * _SHUFFLE_SEED_STRIDE + epoch
    ds = base.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return ds.take(epoch_len).enumerate(start=epoch * epoch_len)

  start_epoch, offset = divmod(int(start_step), steps_per_epoch)
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(one_epoch)
  # Skipping happens before decoding, so resuming costs a pass over encoded bytes at most.
  ds = ds.skip(offset * batch)

  def transform(position, ex):
    ex_seed = tf.stack([tf.constant(seed, tf.int64) * _SHUFFLE_SEED_STRIDE + pi, position])
    image = train_transform(decode(ex["image"]), ex_seed, image_size=config.image_size,
                            resize_size=config.resize_size, crop=config.crop,
                            flip=config.flip)
    return {"image": normalise(image), "label": ex["label"],
            "distribution": ex["distribution"], "mask": tf.constant(1.0, tf.float32)}

  ds = _map(ds, transform)
  ds = ds.batch(batch, drop_remainder=True)
  ds = _map(ds, lambda b: _to_devices(b, devices))
  return ds.prefetch(tf.data.AUTOTUNE), steps_per_epoch


def eval_dataset(builder, config, split: str, *, process_index: int | None = None,
                 process_count: int | None = None, local_device_count: int | None = None,
                 cache: bool | None = None):
  """One exact pass over ``split``, padded and masked.

  Returns:
    (``tf.data.Dataset`` of batches ``[D, B/D, ...]``, ``num_steps``, ``num_examples`` of
    the whole split). The per-process batch is ``config.eval_batch_size`` (default
    ``config.batch_size``) divided by the process count; every process runs
    ``num_steps`` steps; padded rows have ``mask = 0``, ``label = -1`` and a zero
    distribution and image.
  """
  tf = _tf()
  _check_sizes(config)
  pi, pc = _process(process_index, process_count)
  devices = _local_devices(local_device_count)
  global_batch = config.get("eval_batch_size") or config.batch_size
  batch = per_process_batch(global_batch, pc, devices, what="config.eval_batch_size")
  total = num_examples(builder, split)
  # Even splits differ by at most one example; every process pads to the largest.
  largest = max(num_examples(builder, shard_split(split, i, pc, drop_remainder=False))
                for i in range(pc)) if pc > 1 else total
  num_steps = max(1, math.ceil(largest / batch))
  sub = shard_split(split, pi, pc, drop_remainder=False)
  if cache is None:
    cache = config.get("cache", False)
  ds = _read(builder, sub, cache)
  normalise = _normaliser(config.model)

  def transform(ex):
    image = eval_transform(decode(ex["image"]), image_size=config.image_size,
                           resize_size=config.resize_size)
    return {"image": normalise(image), "label": ex["label"],
            "distribution": ex["distribution"], "mask": tf.constant(1.0, tf.float32)}

  ds = _map(ds, transform)
  spec = ds.element_spec
  s = config.image_size
  pad = tf.data.Dataset.from_tensors({
      "image": tf.zeros([s, s, 3], tf.float32),
      "label": tf.constant(-1, tf.int32),
      "distribution": tf.zeros(spec["distribution"].shape, tf.float32),
      "mask": tf.constant(0.0, tf.float32)}).repeat()
  ds = ds.concatenate(pad).take(num_steps * batch).batch(batch, drop_remainder=True)
  ds = _map(ds, lambda b: _to_devices(b, devices))
  return ds.prefetch(tf.data.AUTOTUNE), num_steps, total


def read_targets(builder, split: str, keys=("label", "distribution")) -> dict[str, np.ndarray]:
  """All of ``split``'s non-image features ``keys`` as numpy arrays (for baselines)."""
  _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = _map(ds, lambda ex: {k: ex[k] for k in keys}).batch(4096)
  parts = list(tfds.as_numpy(ds))
  return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def as_numpy(ds) -> Iterator[dict]:
  """Iterates a batched dataset as dicts of numpy arrays."""
  return ds.as_numpy_iterator()


def prefetch_to_device(iterator, size: int = 2):
  """Puts ``size`` batches ahead onto the local devices (``flax.jax_utils``), so the
  training loop never waits for a host-to-device copy."""
  from flax import jax_utils  # pylint: disable=g-import-not-at-top
  return jax_utils.prefetch_to_device(iterator, size)
