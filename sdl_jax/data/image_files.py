"""Image files: listing them, finding their folder, decoding them exactly, and the rows
whose image is missing.

A label row whose image file does not exist stops the build (``MissingImagesError``)
unless ``config.data.allow_missing_images``; an image that does not decode is skipped as
``unreadable_image`` when its example is written (``sdl_jax.data.source_builder``).
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

from absl import logging
import numpy as np

from sdl_jax.data.buildlog import (BuildLog, IMAGE_WITHOUT_ROW, LOG_FILE, NON_IMAGE_FILE,
                                   SUMMARY_FILE)
from sdl_jax.data.label_files import LabelFileError


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
  """An image file that cannot be decoded; the message says why."""


class MissingImagesError(LabelFileError):
  """Label rows name image files that do not exist (and missing images are not allowed)."""


ALLOW_MISSING_OPTION = "config.data.allow_missing_images"


def list_images(root: str, exclude_dirs: Iterable[str] = ()) -> tuple[list[str], list[str]]:
  """Image files under ``root`` (by extension) and other files, as sorted relative names."""
  exclude = {os.path.abspath(d) for d in exclude_dirs}
  images, others = [], []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if os.path.abspath(os.path.join(dirpath, d)) not in exclude
                         and not d.startswith("."))
    rel = os.path.relpath(dirpath, root)
    for fn in filenames:
      name = fn if rel == "." else f"{rel.replace(os.sep, '/')}/{fn}"
      if fn.lower().endswith(IMAGE_EXTENSIONS):
        images.append(name)
      elif not fn.startswith("."):
        others.append(name)
  return sorted(images), sorted(others)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIF_ORIENTATION = 0x0112

# PIL modes whose files TensorFlow's decoders read as they are (8-bit samples); any other
# file, a 16-bit PNG, or one with an EXIF orientation is decoded by ``decode_image``.
_KEEP = {"JPEG": {"L", "RGB"}, "PNG": {"L", "LA", "RGB", "RGBA", "P"}}
# 16-bit grey (PIL keeps every bit of these); 'I' is how older PIL opens 16-bit PNGs.
_GREY_16 = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# 8-bit modes PIL converts without loss of what is shown (palette expanded, 1-bit to 0/255).
_CONVERT = {"1": "L", "P": "RGBA", "PA": "RGBA", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB",
            "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
# How an EXIF orientation is undone on an [H, W, C] array (as PIL's ImageOps.exif_transpose).
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}


def hide_gpus_from_tf() -> None:
  """Keeps TensorFlow (used here only for data) off any GPU, which belongs to JAX."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # Already initialised; nothing to do then.
    pass


def to_uint8(samples, bits: int) -> np.ndarray:
  """The nearest 8-bit level of unsigned ``bits``-bit samples: ``round(v * 255 / m)``,
  ``m = 2**bits - 1``, halves up, in exact integer arithmetic ``(510 v + m) // (2 m)``.

  Args:
    samples: integer array, values in ``[0, m]``.
    bits: bits per sample (16 for 16-bit images).

  Returns:
    uint8 array of the same shape.
  """
  m = (1 << bits) - 1
  v = np.asarray(samples, np.int64)
  return ((510 * v + m) // (2 * m)).astype(np.uint8)


def png_bit_depth(data: bytes) -> int | None:
  """Bits per sample of a PNG (its IHDR chunk's bit depth); ``None`` for other data."""
  if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 24:
    return data[24]
  return None


def _samples(im, data: bytes) -> np.ndarray:
  """The stored samples of an opened (loaded) PIL image as uint8 ``[H, W, 1|2|3|4]``."""
  if png_bit_depth(data) == 16:
    # PIL keeps only the high byte of 16-bit colour PNGs; TensorFlow reads all 16 bits.
    hide_gpus_from_tf()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return to_uint8(tf.io.decode_png(data, channels=0, dtype=tf.uint16).numpy(), 16)
  mode = im.mode
  if mode in _GREY_16:
    a = np.asarray(im)
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise ImageError(f"mode {mode!r} samples outside 0..65535: not a 16-bit image")
    return to_uint8(a, 16)[..., None]
  if mode in _CONVERT:
    im = im.convert(_CONVERT[mode])
  if im.mode not in ("L", "LA", "RGB", "RGBA"):
    raise ImageError(f"image mode {mode!r} ({im.format}) is not supported; convert the "
                     "file to 8- or 16-bit grey or RGB")
  a = np.asarray(im)
  return a[..., None] if a.ndim == 2 else a


def _orientation(im) -> int:
  """The EXIF orientation (1..8; 1 when absent or invalid)."""
  value = im.getexif().get(EXIF_ORIENTATION, 1)
  return value if value in _ORIENT else 1


def _open_checked(data: bytes):
  """``PIL.Image`` of ``data``, fully decoded (truncated or corrupt data raises)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not data:
    raise ImageError("empty file")
  im = Image.open(io.BytesIO(data))
  im.load()
  if im.width < 1 or im.height < 1:
    raise ImageError(f"image has size {im.size}")
  return im


def _pil_errors(fn):
  """Runs ``fn`` turning PIL's many exception types into ``ImageError`` with the reason."""
  try:
    return fn()
  except ImageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
    raise ImageError(f"{type(e).__name__}: {e}") from None


def decode_image(data: bytes) -> np.ndarray:
  """An encoded image as it is shown: uint8 ``[H, W, 1]`` (grey) or ``[H, W, 3]``.

  Exact for every format PIL reads: 8-bit samples as stored; 16-bit samples (PNG, TIFF)
  to the nearest 8-bit level (``to_uint8``); palettes expanded; 1-bit to 0/255; alpha
  dropped (the colour samples are kept as stored, as TensorFlow's decoders do); the EXIF
  orientation applied (a photo taken upright is upright).

  Raises:
    ImageError: empty, truncated or corrupt data, or an unsupported mode (e.g. 32-bit
      float), naming the reason.
  """
  def run():
    with _open_checked(data) as im:
      a = _ORIENT.get(_orientation(im), lambda x: x)(_samples(im, data))
    return np.ascontiguousarray(a[..., :1] if a.shape[-1] <= 2 else a[..., :3])
  return _pil_errors(run)


def encode_image_bytes(data: bytes, channels: int) -> tuple[bytes, bool]:
  """Fully decodes an encoded image; returns bytes for ``tfds.features.Image``.

  JPEG and PNG files that TensorFlow's decoders read exactly (8-bit modes, no EXIF
  orientation) are kept byte for byte. Other files (GIF, BMP, TIFF, WebP, CMYK JPEG,
  16-bit or 1-bit images, rotated photos, ...) are decoded by ``decode_image`` and
  re-encoded as PNG at their (oriented) size: grey, or RGB (``channels == 3``) / grey by
  PIL's ITU-R 601-2 luma (``channels == 1``).

  Returns:
    ``(encoded bytes, re-encoded?)``.

  Raises:
    ImageError: the data is truncated, empty or not an image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def keep() -> bool:
    with _open_checked(data) as im:
      return (im.mode in _KEEP.get(im.format, ()) and png_bit_depth(data) != 16
              and _orientation(im) == 1)

  if _pil_errors(keep):
    return data, False
  a = decode_image(data)
  im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
  if channels == 1 and im.mode == "RGB":
    im = im.convert("L")
  out = io.BytesIO()
  im.save(out, format="PNG")
  return out.getvalue(), True


def encode_image(path: str, channels: int) -> tuple[bytes, bool]:
  """``encode_image_bytes`` of a file; ``ImageError`` also when it cannot be read."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ImageError(f"cannot read file: {e.strerror or e}") from None
  return encode_image_bytes(data, channels)


def check_missing_images(missing: Sequence[tuple[str, str, str]], num_rows: int,
                         allow: bool) -> None:
  """Stops the build, or warns, when label rows name image files that do not exist.

  Args:
    missing: ``(name, origin 'file:line', path looked for)`` of each such row, in order.
    num_rows: the good label rows looked at (for the message's "k of n").
    allow: ``config.data.allow_missing_images``: warn (the rows are skipped as
      ``no_image`` and logged) instead of raising.

  Raises:
    MissingImagesError: naming the label files, the count and the first names.
  """
  if not missing:
    return
  files = sorted({origin.rsplit(":", 1)[0] for _, origin, _ in missing})
  first = ", ".join(repr(name) for name, _, _ in missing[:5])
  what = (f"{len(missing)} of {num_rows} label rows of {', '.join(files)} name no image "
          f"file (first: {first}; looked for {missing[0][2]})")
  if not allow:
    raise MissingImagesError(
        f"{what}. Add the images (or set config.data.image_dir to their folder), or pass "
        f"--{ALLOW_MISSING_OPTION}=True to skip those rows: they are then counted in "
        f"{SUMMARY_FILE}, listed in {LOG_FILE} and reported in report.md")
  logging.warning("%s: skipped (%s=True); they are listed in %s", what,
                  ALLOW_MISSING_OPTION, LOG_FILE)


def note_unlisted_images(log: BuildLog, image_root: str, row_names: Iterable[str],
                         split: str | None = None, exclude_dirs: Iterable[str] = (),
                         exclude_files: Iterable[str] = ()) -> dict[str, int]:
  """Notes images under ``image_root`` that no label row names, and non-image files.

  ``exclude_files`` (absolute paths: the label files themselves) are not reported.
  """
  images, others = list_images(image_root, exclude_dirs)
  skip = {os.path.abspath(f) for f in exclude_files}
  others = [n for n in others if os.path.abspath(os.path.join(image_root, n)) not in skip]
  wanted = set(row_names)
  unlisted = [n for n in images if n not in wanted]
  for name in unlisted:
    log.note(IMAGE_WITHOUT_ROW, name, "image file without a label row", split)
  for name in others:
    log.note(NON_IMAGE_FILE, name, "ignored: not an image file by its extension", split)
  return {"images_found": len(images), "images_without_row": len(unlisted),
          "non_image_files": len(others)}


def find_image_root(base: str, names: Sequence[str], label_file: str,
                    image_dir: str | None = None) -> str:
  """The directory the label file's image names are relative to.

  ``image_dir`` (absolute, or relative to ``base``) if given; else the first of
  ``base/images``, ``base/image``, ``base/Images``, ``base/imgs``, ``base`` holding one of
  the first 20 named images.
  """
  if image_dir:
    root = os.path.join(base, os.path.expanduser(str(image_dir)))
    if not os.path.isdir(root):
      raise FileNotFoundError(f"config.data.image_dir {root!r} is not a directory")
    return root
  candidates = [os.path.join(base, d) for d in ("images", "image", "Images", "imgs")]
  candidates.append(base)
  probe = list(names[:20])
  if not probe:
    return base
  for c in candidates:
    if os.path.isdir(c) and any(os.path.isfile(os.path.join(c, n)) for n in probe):
      return c
  raise FileNotFoundError(
      f"none of the images named in {label_file} (e.g. {probe[:3]}) exists in any of "
      f"{candidates}; set config.data.image_dir to the folder the names are relative to")
