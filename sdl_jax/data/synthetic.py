r"""``sdl_synthetic``: a procedurally drawn emotion-vote data set, built offline in seconds.

Each image (``image_size`` px, RGB, PNG) is one coloured shape on a textured grey
background. How it is drawn fixes a hidden **oracle** distribution over the 8 Mikels
emotions (``sdl_jax.emotions.MIKELS8``, dataset order); 11 simulated annotators then vote,
each drawing one emotion from the oracle. So the labels carry real ambiguity, and the best
any model can do is predict the oracle.

Drawing parameters of image ``i`` (all from ``numpy.random.default_rng(seed)``):

* ``hue`` ``h`` ~ U[0, 1): the shape's colour, HSV ``(h, 0.85, 0.95)``;
* ``brightness`` ``b`` ~ U[0, 1]: the background's grey level ``30 + 190 b``;
* ``shape`` ~ uniform over circle, square, diamond, triangle;
* nuisance (no effect on the oracle): the shape's centre and radius, the background
  stripes' orientation, frequency and amplitude, and pixel noise.

The oracle, a fixed function of ``(h, b, shape)``: with ``w_j`` the position of emotion ``j``
on Mikels' wheel (0..7), ``mu = 8 h`` a point on the same circle, the circular distance
``d(w, mu) = min(|w - mu|, 8 - |w - mu|)`` and ``pol_j`` = +1 / -1 for positive / negative
emotions,

    z_j = -d(w_j, mu)^2 / (2 sigma_shape^2) + beta (2 b - 1) pol_j,   oracle = softmax(z)

with ``beta = 1.5`` (bright images lean positive, dark ones negative) and the shape
setting how sharp the feeling is: ``sigma`` = 1.6 (circle), 1.1 (square), 0.8 (diamond),
0.55 (triangle).

Targets: ``votes`` ~ Multinomial(11, oracle) (float32 ``[8]`` counts), ``distribution =
votes / 11``, ``label`` = the dominant vote (first index on ties). The ``oracle`` feature
(float32 ``[8]``) lets a report show the *oracle floor*: the measures of predicting the
oracle itself against the vote distributions, i.e. the best a model can expect.

The examples are i.i.d., so the splits are contiguous: the first 80% ``train``, the next
5% ``validation``, the last 15% ``test``. The whole set is a deterministic function of
``(num_examples, seed, image_size)``, which also name the builder config (e.g.
``n10000_s0_px32``), so different settings never share a cache.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sdl_jax.distributions import dominant_label
from sdl_jax.emotions import MIKELS8

NUM_ANNOTATORS = 11
SHAPES = ("circle", "square", "diamond", "triangle")
SHAPE_SIGMA = np.asarray([1.6, 1.1, 0.8, 0.55])
POLARITY_BETA = 1.5
SPLIT_FRACTIONS = (("train", 0.80), ("validation", 0.05), ("test", 0.15))


def oracle_distribution(hue, brightness, shape):
  """The oracle distribution of the module docstring.

  Args:
    hue: float ``[N]`` in [0, 1).
    brightness: float ``[N]`` in [0, 1].
    shape: int ``[N]``, index into ``SHAPES``.

  Returns:
    float64 ``[N, 8]`` rows summing to 1, in MIKELS8 dataset order.
  """
  hue = np.asarray(hue, np.float64)
  brightness = np.asarray(brightness, np.float64)
  wheel = np.asarray(MIKELS8.wheel, np.float64)               # [8]
  polarity = np.asarray(MIKELS8.polarity, np.float64)         # [8]
  c = MIKELS8.num_classes
  diff = np.abs(wheel[None, :] - c * hue[:, None])            # [N, 8]
  d = np.minimum(diff, c - diff)
  sigma = SHAPE_SIGMA[np.asarray(shape)][:, None]
  z = -d**2 / (2 * sigma**2) + POLARITY_BETA * (2 * brightness[:, None] - 1) * polarity
  z -= z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def _hsv_to_rgb(h, s, v):
  """Vectorised HSV -> RGB, each ``[N]`` in [0, 1]; returns ``[N, 3]`` in [0, 1]."""
  i = np.floor(h * 6).astype(int) % 6
  f = h * 6 - np.floor(h * 6)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  table = np.stack([np.stack([v, t, p], -1), np.stack([q, v, p], -1),
                    np.stack([p, v, t], -1), np.stack([p, q, v], -1),
                    np.stack([t, p, v], -1), np.stack([v, p, q], -1)], 1)  # [N, 6, 3]
  return table[np.arange(len(h)), i]


def draw(num_examples: int, seed: int = 0, image_size: int = 32):
  """Draws the whole set, vectorised.

  Returns:
    dict of numpy arrays: ``image`` uint8 ``[N, S, S, 3]``, ``hue``, ``brightness``
    float32 ``[N]``, ``shape`` int64 ``[N]``, ``oracle`` float32 ``[N, 8]``, ``votes``
    float32 ``[N, 8]`` (sum 11), ``distribution`` float32 ``[N, 8]``, ``label`` int64 ``[N]``.
  """
  if num_examples < 20:
    raise ValueError(f"data.num_examples must be at least 20, got {num_examples}")
  if image_size < 8:
    raise ValueError(f"data.image_size must be at least 8, got {image_size}")
  rng = np.random.default_rng(seed)
  n, s = num_examples, image_size
  hue = rng.uniform(0, 1, n)
  brightness = rng.uniform(0, 1, n)
  shape = rng.integers(0, len(SHAPES), n)
  cx, cy = rng.uniform(0.35 * s, 0.65 * s, (2, n))
  radius = rng.uniform(0.22 * s, 0.34 * s, n)
  theta = rng.uniform(0, np.pi, n)
  freq = rng.uniform(0.08, 0.3, n)
  amp = rng.uniform(0, 40, n)

  yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5
  dx = xx[None] - cx[:, None, None]                            # [N, S, S]
  dy = yy[None] - cy[:, None, None]
  r = radius[:, None, None]
  # Triangle pointing up: apex at cy - r, base at cy + 0.7 r, half-width 1.1 r there.
  tri = (dy <= 0.7 * r) & (np.abs(dx) <= (dy + r) / (1.7 * r) * 1.1 * r)
  masks = np.stack([dx**2 + dy**2 <= r**2,
                    np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r,
                    np.abs(dx) + np.abs(dy) <= 1.2 * r,
                    tri], 1)                                    # [N, 4, S, S]
  mask = masks[np.arange(n), shape]                             # [N, S, S]

  stripes = np.sin(2 * np.pi * freq[:, None, None] *
                   (xx[None] * np.cos(theta)[:, None, None]
                    + yy[None] * np.sin(theta)[:, None, None]))
  background = 30 + 190 * brightness[:, None, None] + amp[:, None, None] * stripes
  colour = 255 * _hsv_to_rgb(hue, np.full(n, 0.85), np.full(n, 0.95))  # [N, 3]
  image = np.where(mask[..., None], colour[:, None, None, :], background[..., None])
  image = image + rng.normal(0, 6, image.shape)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)

  oracle = oracle_distribution(hue, brightness, shape)
  votes = rng.multinomial(NUM_ANNOTATORS, oracle).astype(np.float32)
  distribution = votes / np.float32(NUM_ANNOTATORS)
  label = np.asarray(dominant_label(distribution)).astype(np.int64)
  return {"image": image, "hue": hue.astype(np.float32),
          "brightness": brightness.astype(np.float32), "shape": shape.astype(np.int64),
          "oracle": oracle.astype(np.float32), "votes": votes,
          "distribution": distribution.astype(np.float32), "label": label}


def split_ranges(num_examples: int) -> dict[str, tuple[int, int]]:
  """``{split: (start, stop)}``: contiguous 80 / 5 / 15 % slices of ``range(num_examples)``."""
  out, start = {}, 0
  for i, (name, frac) in enumerate(SPLIT_FRACTIONS):
    stop = num_examples if i == len(SPLIT_FRACTIONS) - 1 else start + int(round(frac * num_examples))
    out[name] = (start, stop)
    start = stop
  return out


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  num_examples: int = 10_000
  seed: int = 0
  image_size: int = 32


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


class SdlSynthetic(tfds.core.GeneratorBasedBuilder):
  """The synthetic emotion-vote set of this module's docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    c = MIKELS8.num_classes
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(MIKELS8.names)),
            "distribution": tfds.features.Tensor(shape=(c,), dtype=np.float32),
            "votes": tfds.features.Tensor(shape=(c,), dtype=np.float32),
            "oracle": tfds.features.Tensor(shape=(c,), dtype=np.float32),
            "hue": tfds.features.Scalar(dtype=np.float32),
            "brightness": tfds.features.Scalar(dtype=np.float32),
            "shape": tfds.features.ClassLabel(names=list(SHAPES)),
            "file_name": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: everything is drawn here.
    cfg = self.builder_config
    data = draw(cfg.num_examples, cfg.seed, cfg.image_size)
    return {name: self._generate_examples(data, start, stop)
            for name, (start, stop) in split_ranges(cfg.num_examples).items()}

  def _generate_examples(self, data, start, stop):
    for i in range(start, stop):
      yield i, {
          "image": _png(data["image"][i]),
          "label": int(data["label"][i]),
          "distribution": data["distribution"][i],
          "votes": data["votes"][i],
          "oracle": data["oracle"][i],
          "hue": data["hue"][i],
          "brightness": data["brightness"][i],
          "shape": int(data["shape"][i]),
          "file_name": f"{i:06d}.png",
      }


def make_builder(data_config, data_dir):
  """The (unprepared) builder for ``data_config.num_examples``, ``seed`` and ``image_size``."""
  n = int(data_config.get("num_examples", 10_000))
  seed = int(data_config.get("seed", 0))
  size = int(data_config.get("image_size", 32))
  config = SyntheticConfig(name=f"n{n}_s{seed}_px{size}", num_examples=n, seed=seed,
                           image_size=size,
                           description=f"{n} images of {size}px drawn with seed {seed}")
  return SdlSynthetic(config=config, data_dir=data_dir)
