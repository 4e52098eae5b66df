"""Image files: listing them, finding their folder, checking that each decodes, and the
rows whose image is missing.

A label row whose image file does not exist stops the build (``MissingImagesError``)
unless ``config.data.allow_missing_images``; an image that does not decode is skipped as
``unreadable_image`` when its example is written (``sdl_jax.data.source_builder``).
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

from absl import logging

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


# PIL modes TensorFlow's decoders handle as they are; anything else is re-encoded as PNG.
_KEEP = {"JPEG": {"L", "RGB"}, "PNG": {"L", "LA", "RGB", "RGBA", "P"}}


def encode_image_bytes(data: bytes, channels: int) -> tuple[bytes, bool]:
  """Fully decodes an encoded image; returns bytes for ``tfds.features.Image``.

  JPEG and PNG files in modes TensorFlow decodes are kept byte for byte; other files
  (GIF, BMP, TIFF, WebP, CMYK JPEG, 16-bit or 1-bit images, ...) are re-encoded as PNG in
  ``'L'`` (``channels == 1``) or ``'RGB'`` mode, at their original size.

  Returns:
    ``(encoded bytes, re-encoded?)``.

  Raises:
    ImageError: the data is truncated, empty or not an image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not data:
    raise ImageError("empty file")
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt, mode = im.format, im.mode
      im.load()  # Full decode: raises on truncated or corrupt data.
      if im.width < 1 or im.height < 1:
        raise ImageError(f"image has size {im.size}")
      if mode in _KEEP.get(fmt, ()):
        return data, False
      target = "L" if channels == 1 else "RGB"
      out = io.BytesIO()
      im.convert(target).save(out, format="PNG")
      return out.getvalue(), True
  except ImageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
    raise ImageError(f"{type(e).__name__}: {e}") from None


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
