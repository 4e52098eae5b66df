"""Every image decodes exactly, as the model sees it, or fails naming the reason.

Each case is a hand-made array saved in one format and mode; the expectation is computed
from the array by a plain formula (16-bit: nearest 8-bit level, palettes looked up, alpha
dropped, grey replicated, EXIF orientation undone by hand).
"""

import io
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageOps

from sdl_jax import predict
from sdl_jax.data import buildlog, image_files, pipeline, votes_csv

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

RNG = np.random.default_rng(7)
H, W = 5, 6


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _nearest_8bit(a16) -> np.ndarray:
  """Reference: round(v * 255 / 65535), halves up, in floating point."""
  return np.floor(np.asarray(a16, np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)


def _rgb(a) -> np.ndarray:
  a = np.asarray(a)
  return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def _seen_by_model(data: bytes, channels: int = 3) -> np.ndarray:
  """The stored bytes for a data set, decoded by the training pipeline."""
  stored, _ = image_files.encode_image_bytes(data, channels)
  return pipeline.decode(tf.constant(stored)).numpy()


def _cases():
  grey = RNG.integers(0, 256, (H, W), dtype=np.uint8)
  rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
  rgba = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
  la = RNG.integers(0, 256, (H, W, 2), dtype=np.uint8)
  g16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
  g16[0, :4] = [0, 128, 257, 65535]  # The ends, and values 8-bit clipping got wrong.
  c16 = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)
  c16a = RNG.integers(0, 65536, (H, W, 4), dtype=np.uint16)
  index = RNG.integers(0, 4, (H, W), dtype=np.uint8)
  palette = RNG.integers(0, 256, (4, 3), dtype=np.uint8)
  paletted = Image.fromarray(index, "L").convert("P")
  paletted.putpalette(palette.reshape(-1).tolist() + [0] * (768 - 12))
  bits = RNG.integers(0, 2, (H, W)).astype(bool)
  return {
      "8-bit grey PNG": (_save(Image.fromarray(grey), "PNG"), _rgb(grey)),
      "8-bit RGB PNG": (_save(Image.fromarray(rgb), "PNG"), rgb),
      "8-bit RGBA PNG": (_save(Image.fromarray(rgba), "PNG"), rgba[..., :3]),
      "8-bit grey+alpha PNG": (_save(Image.fromarray(la, "LA"), "PNG"), _rgb(la[..., 0])),
      "palette PNG": (_save(paletted, "PNG"), palette[index]),
      "palette GIF": (_save(paletted, "GIF"), palette[index]),
      "1-bit PNG": (_save(Image.fromarray(bits), "PNG"), _rgb(bits.astype(np.uint8) * 255)),
      "16-bit grey PNG": (_save(Image.fromarray(g16), "PNG"), _rgb(_nearest_8bit(g16))),
      "16-bit grey TIFF": (_save(Image.fromarray(g16), "TIFF"), _rgb(_nearest_8bit(g16))),
      "16-bit RGB PNG": (tf.io.encode_png(c16).numpy(), _nearest_8bit(c16)),
      "16-bit RGBA PNG": (tf.io.encode_png(c16a).numpy(), _nearest_8bit(c16a[..., :3])),
      "8-bit RGB BMP": (_save(Image.fromarray(rgb), "BMP"), rgb),
      "8-bit RGB TIFF": (_save(Image.fromarray(rgb), "TIFF"), rgb),
  }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_mode_decodes_exactly_as_the_model_sees_it(name):
  data, want = CASES[name]
  np.testing.assert_array_equal(_seen_by_model(data), want)
  got = image_files.decode_image(data)
  np.testing.assert_array_equal(_rgb(got[..., 0]) if got.shape[-1] == 1 else got, want)


def test_16_bit_grey_is_no_longer_clipped_to_white():
  g16 = np.full((4, 4), 20000, np.uint16)  # 8-bit clipping made this 255
  seen = _seen_by_model(_save(Image.fromarray(g16), "PNG"))
  assert (seen == _nearest_8bit(20000)).all() and (seen < 255).all()


def test_to_uint8_matches_the_rounding_reference_at_every_16_bit_value():
  v = np.arange(65536)
  np.testing.assert_array_equal(image_files.to_uint8(v, 16), _nearest_8bit(v))
  np.testing.assert_array_equal(image_files.to_uint8(np.arange(16), 4), np.arange(16) * 17)


# Orientation k applied to the stored 2x3 array [[1, 2, 3], [4, 5, 6]], written out by hand
# from the EXIF definitions (2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90
# clockwise, 7 transverse, 8 rotate 90 counter-clockwise).
SHOWN = {1: [[1, 2, 3], [4, 5, 6]], 2: [[3, 2, 1], [6, 5, 4]], 3: [[6, 5, 4], [3, 2, 1]],
         4: [[4, 5, 6], [1, 2, 3]], 5: [[1, 4], [2, 5], [3, 6]], 6: [[4, 1], [5, 2], [6, 3]],
         7: [[6, 3], [5, 2], [4, 1]], 8: [[3, 6], [2, 5], [1, 4]]}


@pytest.mark.parametrize("orientation", sorted(SHOWN))
def test_exif_orientation_is_applied(orientation):
  stored = np.array([[1, 2, 3], [4, 5, 6]], np.uint8) * 40
  exif = Image.Exif()
  exif[image_files.EXIF_ORIENTATION] = orientation
  data = _save(Image.fromarray(stored), "PNG", exif=exif)
  want = np.asarray(SHOWN[orientation], np.uint8) * 40
  np.testing.assert_array_equal(_seen_by_model(data), _rgb(want))
  with Image.open(io.BytesIO(data)) as im:  # PIL's own reading of the tag agrees.
    np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(im)), want)
  _, reencoded = image_files.encode_image_bytes(data, 3)
  assert reencoded == (orientation != 1)


def test_rotated_jpeg_photo_is_upright():
  shown = np.zeros((32, 48, 3), np.uint8)
  shown[:, :24] = 255  # left half white: lossy compression keeps that
  exif = Image.Exif()
  exif[image_files.EXIF_ORIENTATION] = 6
  data = _save(Image.fromarray(np.rot90(shown, 1).copy()), "JPEG", exif=exif, quality=95)
  seen = _seen_by_model(data)
  assert seen.shape == shown.shape
  assert np.abs(seen.astype(int) - shown).mean() < 3


def test_grey_data_sets_store_one_channel_by_luma():
  rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
  stored, reencoded = image_files.encode_image_bytes(_save(Image.fromarray(rgb), "BMP"), 1)
  assert reencoded
  r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
  luma = (r * 299 + g * 587 + b * 114 + 500) // 1000  # ITU-R 601-2, as PIL's 'L'
  with Image.open(io.BytesIO(stored)) as im:
    assert im.mode == "L"
    assert np.abs(np.asarray(im).astype(int) - luma).max() <= 1


def test_images_that_cannot_be_decoded_exactly_fail_naming_why():
  floats = Image.fromarray(RNG.random((H, W)).astype(np.float32))
  with pytest.raises(image_files.ImageError, match="mode 'F'.*not supported"):
    image_files.encode_image_bytes(_save(floats, "TIFF"), 3)
  negative = Image.fromarray(np.full((H, W), -5, np.int32))
  with pytest.raises(image_files.ImageError, match="outside 0..65535"):
    image_files.decode_image(_save(negative, "TIFF"))
  data = CASES["16-bit RGB PNG"][0]
  with pytest.raises(image_files.ImageError):
    image_files.encode_image_bytes(data[:len(data) // 2], 3)


def test_predict_reads_a_16_bit_png_exactly(tmp_path):
  data, want = CASES["16-bit grey PNG"]
  path = tmp_path / "x.png"
  path.write_bytes(data)
  np.testing.assert_array_equal(pipeline.decode(tf.constant(predict.read_image_file(
      str(path)))).numpy(), want)


def test_a_built_data_set_stores_every_mode_exactly(tmp_path):
  names = sorted(CASES)
  lines = ["file,amusement,awe,contentment,excitement,anger,disgust,fear,sadness"]
  for i, name in enumerate(names):
    ext = {"GIF": "gif", "TIFF": "tif", "BMP": "bmp"}.get(name.split()[-1], "png")
    fn = f"{i}.{ext}"
    (tmp_path / fn).write_bytes(CASES[name][0])
    votes = [0] * 8
    votes[i % 8] = 3
    lines.append(f"{fn}," + ",".join(map(str, votes)))
  (tmp_path / "votes.csv").write_text("\n".join(lines) + "\n")
  cfg = ml_collections.ConfigDict({"name": "votes_csv", "path": str(tmp_path / "votes.csv"),
                                   "split_fractions": (0.6, 0.2, 0.2)})
  b = votes_csv.make_builder(cfg, str(tmp_path / "c"))
  b.download_and_prepare()
  seen = {}
  for split in buildlog.SPLITS:
    ds = b.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    for ex in ds.as_numpy_iterator():
      seen[ex["file_name"].decode()] = pipeline.decode(tf.constant(ex["image"])).numpy()
  assert len(seen) == len(names)
  for fn, image in seen.items():
    np.testing.assert_array_equal(image, CASES[names[int(os.path.splitext(fn)[0])]][1],
                                  err_msg=fn)
