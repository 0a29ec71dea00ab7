"""Readers (DICOM, PNG, NIfTI) and mammogram preprocessing on small real-format files."""

import numpy as np
import pytest
from image_files import phantom, write_dicom, write_nifti, write_png

from mammojax.data.ingest import readers
from mammojax.data.ingest.mammo_preprocess import (
  MammoPreprocessConfig,
  breast_mask,
  preprocess_mammogram,
)


@pytest.fixture
def image():
  return phantom(40, 32, "L", seed=0)


@pytest.mark.parametrize("compress", [None, "rle", "jpeg2000"])
def test_dicom_lossless_roundtrip(tmp_path, image, compress):
  if compress == "jpeg2000":
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg encodes JPEG 2000")
  path = str(tmp_path / "a.dcm")
  write_dicom(path, image, laterality="R", view="MLO", compress=compress)
  out = readers.read_image(path)
  np.testing.assert_array_equal(out.pixels, image.astype(np.float32))
  assert (out.laterality, out.view) == ("R", "MLO")
  assert out.pixels.dtype == np.float32


def test_dicom_monochrome1_is_inverted_and_rescaled(tmp_path, image):
  path = str(tmp_path / "m1.dcm")
  write_dicom(path, image, photometric="MONOCHROME1", rescale=(2.0, -10.0))
  out = readers.read_dicom(path).pixels
  rescaled = image.astype(np.float32) * 2 - 10
  np.testing.assert_allclose(out, rescaled.max() + rescaled.min() - rescaled)


def test_dicom_window_is_applied(tmp_path, image):
  path = str(tmp_path / "w.dcm")
  center, width = 20000.0, 10000.0
  write_dicom(path, image, window=(center, width))
  out = readers.read_dicom(path).pixels
  lo, hi = out.min(), out.max()
  raw = image.astype(np.float32)
  assert np.all(out[raw <= center - width / 2 - 1] == lo)
  assert np.all(out[raw >= center + width / 2] == hi)
  inside = (raw > center - width / 2 + 1) & (raw < center + width / 2 - 1)
  expected = ((raw[inside] - (center - 0.5)) / (width - 1) + 0.5) * (hi - lo) + lo
  np.testing.assert_allclose(out[inside], expected, rtol=1e-4)
  raw_out = readers.read_dicom(path, apply_voi=False).pixels
  np.testing.assert_array_equal(raw_out, raw)


def test_png_8_16_bit_and_rgb(tmp_path, image):
  write_png(str(tmp_path / "16.png"), image)
  np.testing.assert_array_equal(readers.read_image(str(tmp_path / "16.png")).pixels, image)
  small = (image // 256).astype(np.uint8)
  write_png(str(tmp_path / "8.png"), small)
  np.testing.assert_array_equal(readers.read_png(str(tmp_path / "8.png")).pixels, small)
  write_png(str(tmp_path / "rgb.png"), np.repeat(small[..., None], 3, axis=2))
  np.testing.assert_array_equal(readers.read_png(str(tmp_path / "rgb.png")).pixels, small)
  assert readers.read_png(str(tmp_path / "16.png")).laterality is None


def test_nifti_axes_and_spacing(tmp_path):
  volume = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
  write_nifti(str(tmp_path / "v.nii.gz"), volume, spacing=(0.5, 1.0, 3.0))
  out = readers.read_nifti(str(tmp_path / "v.nii.gz"))
  np.testing.assert_allclose(out.voxels, volume.transpose(2, 1, 0))
  assert out.spacing == (3.0, 1.0, 0.5)
  write_nifti(str(tmp_path / "t.nii"), volume[..., None])
  assert readers.read_nifti(str(tmp_path / "t.nii")).voxels.shape == (3, 4, 5)


@pytest.mark.parametrize(
  "name,content,reason",
  [
    ("bad.dcm", b"\x00" * 300, "not a readable DICOM"),
    ("bad.png", b"\x89PNG\r\n\x1a\ngarbage", "cannot decode PNG"),
    ("bad.nii.gz", b"garbage", "cannot read NIfTI"),
    ("bad.jpg", b"x", "unknown image format"),
  ],
)
def test_errors_name_file_and_reason(tmp_path, name, content, reason):
  path = tmp_path / name
  path.write_bytes(content)
  reader = readers.read_nifti if name.endswith(".nii.gz") else readers.read_image
  with pytest.raises(readers.ImageReadError, match=reason) as info:
    reader(str(path))
  assert str(info.value).startswith(str(path))
  with pytest.raises(readers.ImageReadError, match="does not exist"):
    reader(str(tmp_path / ("missing" + name)))


def test_dicom_without_pixels(tmp_path, image):
  import pydicom

  path = str(tmp_path / "a.dcm")
  write_dicom(path, image)
  ds = pydicom.dcmread(path)
  del ds.PixelData
  ds.save_as(path)
  with pytest.raises(readers.ImageReadError, match="no PixelData"):
    readers.read_dicom(path)


def test_segmentation_removes_burned_in_label(image):
  mask = breast_mask(image.astype(np.float32))
  assert not mask[1:5, -9:-2].any()  # the label block
  assert mask[20, 2] and not mask[20, -1]


def test_preprocess_orientation_crop_and_padding():
  config = MammoPreprocessConfig(height=32, width=32)
  left, geo_l = preprocess_mammogram(phantom(40, 32, "L").astype(np.float32), "L", config)
  right, geo_r = preprocess_mammogram(phantom(40, 32, "R").astype(np.float32), "R", config)
  assert left.dtype == np.uint16 and left.shape == (32, 32)
  assert not geo_l.flipped and geo_r.flipped
  # Both face the same way: chest wall (widest breast) on the left, padding on the right.
  for out in (left, right):
    assert out[:, :2].astype(float).mean() > out[:, -2:].astype(float).mean()
    assert not out[:, -3:].any()
    assert out.max() > 60000  # intensities stretched to the uint16 range
  auto, geo = preprocess_mammogram(
    phantom(40, 32, "R").astype(np.float32),
    None,
    MammoPreprocessConfig(height=32, width=32, orientation="auto"),
  )
  assert geo.flipped
  np.testing.assert_array_equal(auto, right)
  # Aspect ratio kept: the crop (about 34 x 23) is scaled by one factor.
  height = geo_l.crop[2] - geo_l.crop[0]
  width = geo_l.crop[3] - geo_l.crop[1]
  rows = np.flatnonzero(left.any(axis=1))
  cols = np.flatnonzero(left.any(axis=0))
  assert abs((rows[-1] - rows[0] + 1) / (cols[-1] - cols[0] + 1) - height / width) < 0.15


def test_preprocess_errors():
  config = MammoPreprocessConfig(height=8, width=8)
  with pytest.raises(ValueError, match="blank"):
    preprocess_mammogram(np.zeros((10, 10), np.float32), "L", config)
  with pytest.raises(ValueError, match="laterality unknown"):
    preprocess_mammogram(phantom().astype(np.float32), None, config)
  with pytest.raises(ValueError, match="orientation must be"):
    MammoPreprocessConfig(orientation="sideways")


def test_geometry_maps_boxes_through_mirror():
  from mammojax.data.ingest.mammo_preprocess import Geometry

  geo = Geometry(crop=(10, 20, 50, 60), flipped=True, scale=0.5, offset=(3, 0))
  box = geo.map_boxes(np.array([[25, 15, 35, 25]]))
  # x: crop-relative 5..15 of width 40 -> mirrored 25..35 -> *0.5; y: 5..15 -> *0.5 + 3.
  np.testing.assert_allclose(box, [[12.5, 5.5, 17.5, 10.5]])
