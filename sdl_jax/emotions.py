"""Emotion taxonomies: class names in dataset order, polarity, Mikels' wheel positions.

The label order of each taxonomy is part of its dataset's on-disk format, so the orders
here are exactly those the publishers use (see DESIGN.md):

* ``MIKELS8`` (FI, Flickr_LDL, Twitter_LDL, ArtPhoto, Abstract):
  amusement, awe, contentment, excitement, anger, disgust, fear, sadness.
  The first four are positive, the last four negative. Going round Mikels' wheel the
  emotions lie in the order amusement, contentment, awe, excitement, fear, sadness,
  disgust, anger.
* ``EMOTION6``: anger, disgust, fear, joy, sadness, surprise, neutral (no wheel).
* ``FERPLUS``: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt
  (no wheel; the vote files carry two more, non-emotion columns ``unknown`` and ``NF``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

POSITIVE = 1
NEGATIVE = -1
NEUTRAL = 0


@dataclasses.dataclass(frozen=True)
class Taxonomy:
  """An immutable emotion taxonomy.

  Attributes:
    name: short identifier, e.g. ``'mikels8'``.
    names: emotion names in dataset order; index ``j`` is class ``j``.
    polarity: per class ``+1`` (positive), ``-1`` (negative) or ``0`` (neutral), or
      ``None`` if the taxonomy defines none.
    wheel: per class its position on an emotion wheel (a circle of ``len(names)``
      positions), or ``None`` if the taxonomy has no wheel.
  """

  name: str
  names: tuple[str, ...]
  polarity: tuple[int, ...] | None = None
  wheel: tuple[int, ...] | None = None

  def __post_init__(self):
    c = len(self.names)
    if len(set(self.names)) != c:
      raise ValueError(f"taxonomy {self.name!r}: duplicate emotion names {self.names}")
    if self.polarity is not None:
      if len(self.polarity) != c or not set(self.polarity) <= {-1, 0, 1}:
        raise ValueError(f"taxonomy {self.name!r}: polarity must be {c} values in -1, 0, 1")
    if self.wheel is not None and sorted(self.wheel) != list(range(c)):
      raise ValueError(f"taxonomy {self.name!r}: wheel must be a permutation of 0..{c - 1}")

  @property
  def num_classes(self) -> int:
    return len(self.names)

  def index(self, emotion: str) -> int:
    """Class index of ``emotion`` (case-insensitive)."""
    lowered = [n.lower() for n in self.names]
    try:
      return lowered.index(emotion.lower())
    except ValueError:
      raise ValueError(
          f"{emotion!r} is not an emotion of taxonomy {self.name!r}; "
          f"expected one of {', '.join(self.names)}") from None

  def wheel_distances(self) -> np.ndarray:
    """Distances on the wheel, int32 ``[C, C]``: ``d = min(|wi - wj|, C - |wi - wj|)``."""
    if self.wheel is None:
      raise ValueError(
          f"taxonomy {self.name!r} has no emotion wheel; the implication strategy needs "
          "one (use a Mikels-8 data set, or the exclusion strategy if polarity is defined)")
    w = np.asarray(self.wheel)
    diff = np.abs(w[:, None] - w[None, :])
    return np.minimum(diff, len(w) - diff).astype(np.int32)

  def same_polarity(self) -> np.ndarray:
    """Bool ``[C, C]``: entry ``[i, j]`` is whether classes i and j share a polarity."""
    if self.polarity is None:
      raise ValueError(
          f"taxonomy {self.name!r} defines no polarity; the exclusion strategy needs one")
    p = np.asarray(self.polarity)
    return p[:, None] == p[None, :]


MIKELS8 = Taxonomy(
    name="mikels8",
    names=("amusement", "awe", "contentment", "excitement",
           "anger", "disgust", "fear", "sadness"),
    polarity=(1, 1, 1, 1, -1, -1, -1, -1),
    # Round the wheel: amusement 0, contentment 1, awe 2, excitement 3, fear 4,
    # sadness 5, disgust 6, anger 7; listed here in dataset order.
    wheel=(0, 2, 1, 3, 7, 6, 4, 5),
)

EMOTION6 = Taxonomy(
    name="emotion6",
    names=("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"),
    # Surprise can be pleasant or not; like neutral it is given no polarity.
    polarity=(-1, -1, -1, 1, -1, 0, 0),
)

FERPLUS = Taxonomy(
    name="ferplus",
    names=("neutral", "happiness", "surprise", "sadness",
           "anger", "disgust", "fear", "contempt"),
    polarity=(0, 1, 0, -1, -1, -1, -1, -1),
)

TAXONOMIES = {t.name: t for t in (MIKELS8, EMOTION6, FERPLUS)}


def get_taxonomy(name: str) -> Taxonomy:
  """Looks a taxonomy up by name (``mikels8``, ``emotion6``, ``ferplus``)."""
  try:
    return TAXONOMIES[name.lower()]
  except KeyError:
    raise ValueError(
        f"unknown taxonomy {name!r}; known: {', '.join(sorted(TAXONOMIES))}") from None
