"""Real-format image files of a synthetic breast phantom: DICOM, PNG, NIfTI.

What the ingestion tests and ``benchmarks/ingest.py`` read (``pydicom``, ``pillow`` and
``nibabel`` come with the ``dicom`` extra). The phantom is a half-ellipse "breast" against the
chest wall with a smooth texture and a bright burned-in label block far from it, stored the way
mammography DICOMs store it: a left breast has its chest wall on the left edge, a right breast on
the right edge.
"""

from __future__ import annotations

import numpy as np


def phantom(
  height: int = 64,
  width: int = 48,
  side: str = "L",
  label: bool = True,
  seed: int = 0,
  texture_period: tuple[float, float] = (3.0, 4.0),
) -> np.ndarray:
  """uint16 ``[H, W]`` breast phantom (breast values 2000-40000, background ~100); the texture
  varies over ``texture_period`` (rows, columns) pixels (longer for full-size images)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  cy, ry, rx = height / 2, 0.42 * height, 0.7 * width
  inside = ((yy - cy) / ry) ** 2 + (xx / rx) ** 2 <= 1.0
  texture = 20000 + 15000 * np.sin(yy / texture_period[0]) * np.cos(xx / texture_period[1])
  image = np.where(inside, texture + rng.normal(0, 500, inside.shape), 100.0)
  if label:
    image[1:5, width - 9 : width - 2] = 60000.0
  if side == "R":
    image = image[:, ::-1]
  return np.clip(image, 0, 65535).astype(np.uint16)


def write_dicom(
  path: str,
  pixels: np.ndarray,
  *,
  laterality: str | None = "L",
  view: str = "CC",
  photometric: str = "MONOCHROME2",
  window: tuple[float, float] | None = None,
  rescale: tuple[float, float] | None = None,
  compress: str | None = None,
  header: dict[str, str] | None = None,
) -> None:
  """Writes a single-frame 16-bit DICOM (optionally RLE / JPEG 2000 compressed).

  ``header``: extra data elements by keyword (the privacy tests put patient fields here).
  Raises ``RuntimeError`` / ``NotImplementedError`` when no encoder for ``compress`` is installed.
  """
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
  )

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "MG"
  for key, value in (header or {}).items():
    setattr(ds, key, value)
  if laterality:
    ds.ImageLaterality = laterality
  ds.ViewPosition = view
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
  ds.PixelRepresentation = 0
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  if rescale is not None:
    ds.RescaleSlope, ds.RescaleIntercept = rescale
  ds.PixelData = np.ascontiguousarray(pixels, np.uint16).tobytes()
  if compress == "rle":
    ds.compress(RLELossless)
  elif compress == "jpeg2000":
    ds.compress(JPEG2000Lossless)
  ds.save_as(path, enforce_file_format=True)


def write_png(path: str, pixels: np.ndarray) -> None:
  """Writes uint8 or uint16 ``[H, W]`` as an 8- or 16-bit grayscale PNG."""
  from PIL import Image

  Image.fromarray(np.ascontiguousarray(pixels)).save(path)


def write_nifti(path: str, volume: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
  """Writes ``[X, Y, Z]`` float32 with an RAS diagonal affine of the given spacing."""
  import nibabel as nib

  nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag(list(spacing) + [1.0])), path)
