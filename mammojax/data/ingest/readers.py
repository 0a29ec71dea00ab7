"""Readers for the image files users bring: DICOM, 8/16-bit PNG and NIfTI.

Every reader returns float32 pixels and, for mammograms, only the two header facts the
preprocessing needs (laterality and view). No other header field (names, dates, identifiers,
free text) leaves this module, and error messages name the file and the reason, never a header
value.

DICOM pixels go through the modality LUT (rescale slope / intercept), then the VOI LUT or window
when the file carries one, then MONOCHROME1 images are inverted so that larger values are always
brighter (denser) tissue. Compressed transfer syntaxes decode with whatever pydicom plugin is
installed: RLE Lossless natively; JPEG baseline and JPEG 2000 through Pillow or
pylibjpeg-openjpeg; JPEG Lossless (process 14, common in mammography) and JPEG-LS through
pylibjpeg-libjpeg.

A DICOM file cut short (an interrupted copy) is reported as truncated, whether it ends in the
header, inside an element or inside the pixel data.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import warnings

import numpy as np

from mammojax.data.constants import DICOM_SUFFIXES, NIFTI_SUFFIXES, PNG_SUFFIXES


class ImageReadError(Exception):
  """A file that could not be read or decoded. ``str()`` is ``'<path>: <reason>'``."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Image2D:
  """A decoded 2-D image.

  Attributes:
    pixels: ``[H, W]`` float32, larger = brighter; in the file's stored (post-LUT) units.
    laterality: 'L', 'R' or None when the file does not say (PNG never does).
    view: view position such as 'CC' or 'MLO', or None.
  """

  pixels: np.ndarray
  laterality: str | None = None
  view: str | None = None


@dataclasses.dataclass(frozen=True)
class Volume:
  """A decoded 3-D volume.

  Attributes:
    voxels: ``[D, H, W]`` float32 in the closest canonical (RAS+) orientation, axes ordered
      (superior, anterior, right) reversed to (z, y, x) so that D indexes axial slices.
    spacing: ``(dz, dy, dx)`` voxel size in millimetres.
    affine: ``[4, 4]`` voxel-to-world (RAS+ mm) matrix of the canonical image, whose voxel axes
      are (x, y, z), i.e. ``voxels`` transposed.
  """

  voxels: np.ndarray
  spacing: tuple[float, float, float]
  affine: np.ndarray


def read_image(path: str) -> Image2D:
  """Reads a 2-D image, choosing the reader from the suffix (or the DICOM preamble)."""
  _check_exists(path)
  lower = path.lower()
  if lower.endswith(PNG_SUFFIXES):
    return read_png(path)
  if lower.endswith(DICOM_SUFFIXES) or _has_dicom_preamble(path):
    return read_dicom(path)
  if lower.endswith(NIFTI_SUFFIXES):
    return read_nifti_slice(path)
  raise ImageReadError(
    path,
    "unknown image format: expected a .png, a 2-D .nii/.nii.gz or a DICOM file "
    f"({', '.join(DICOM_SUFFIXES)} or a file with the DICM preamble)",
  )


def read_dicom(path: str, apply_voi: bool = True) -> Image2D:
  """Reads a single-frame DICOM image; see the module docstring for the pixel pipeline."""
  import pydicom
  from pydicom import pixels as dcm_pixels

  _check_exists(path)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      ds = pydicom.dcmread(path)
  except Exception as e:  # pydicom raises several exception types for damaged files.
    if _looks_cut_short(path, e):
      raise ImageReadError(path, _truncated("it ends inside a header element")) from None
    raise ImageReadError(path, f"not a readable DICOM file ({type(e).__name__})") from None
  truncated = _truncation(ds, os.path.getsize(path), caught)
  if truncated:
    raise ImageReadError(path, _truncated(truncated))
  if "PixelData" not in ds:
    if "Rows" in ds and "Columns" in ds:
      # Cut exactly between two elements: nothing but the missing pixels tells.
      raise ImageReadError(
        path,
        "DICOM file has no PixelData element though its header describes an image: probably "
        "truncated (cut short); copy it again",
      )
    raise ImageReadError(path, "DICOM file has no PixelData element (not an image)")
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames != 1:
    raise ImageReadError(
      path,
      f"DICOM has {frames} frames; mammogram ingestion expects a "
      "single 2-D frame (export one frame per file)",
    )
  syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
  try:
    raw = ds.pixel_array
  except Exception as e:
    name = getattr(syntax, "name", str(syntax))
    raise ImageReadError(
      path,
      f"cannot decode pixel data with transfer syntax {name!r} "
      f"({type(e).__name__}); for JPEG Lossless / JPEG-LS install "
      "pylibjpeg and pylibjpeg-libjpeg, for JPEG 2000 pylibjpeg-openjpeg",
    ) from None
  if raw.ndim != 2:
    raise ImageReadError(
      path,
      f"decoded pixel array has shape {raw.shape}; expected a 2-D "
      "grayscale image (SamplesPerPixel 1)",
    )
  pixels = np.asarray(dcm_pixels.apply_modality_lut(raw, ds), np.float32)
  if apply_voi and ("VOILUTSequence" in ds or "WindowCenter" in ds):
    pixels = np.asarray(dcm_pixels.apply_voi_lut(pixels, ds, index=0), np.float32)
  if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
    pixels = pixels.max() + pixels.min() - pixels
  if not np.all(np.isfinite(pixels)):
    raise ImageReadError(path, "decoded pixels contain NaN or infinity")
  laterality = _laterality(ds.get("ImageLaterality") or ds.get("Laterality"))
  view = str(ds.get("ViewPosition") or "").strip().upper()
  return Image2D(pixels=pixels, laterality=laterality, view=view or None)


def read_png(path: str) -> Image2D:
  """Reads an 8- or 16-bit grayscale PNG (colour PNGs are converted to luminance)."""
  from PIL import Image, UnidentifiedImageError

  _check_exists(path)
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ("I;16", "I;16B", "I;16L", "I", "L", "F"):
        pixels = np.asarray(img)
      elif img.mode in ("RGB", "RGBA", "LA", "P", "1"):
        pixels = np.asarray(img.convert("L"))
      else:
        raise ImageReadError(path, f"unsupported PNG mode {img.mode!r}")
  except ImageReadError:
    raise
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise ImageReadError(path, f"cannot decode PNG ({type(e).__name__}: {e})") from None
  return Image2D(pixels=pixels.astype(np.float32))


def read_nifti_slice(path: str) -> Image2D:
  """Reads a 2-D NIfTI image (e.g. OASIS slices; singleton axes dropped) as its array is stored,
  axis 0 as rows, without reorientation: as ``nibabel.load(path).get_fdata()`` gives it."""
  import nibabel as nib

  _check_exists(path)
  try:
    data = np.asarray(nib.load(path).get_fdata(dtype=np.float32))
  except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib errors, ...
    raise ImageReadError(path, f"cannot read NIfTI ({type(e).__name__})") from None
  data = np.squeeze(data)
  if data.ndim != 2:
    raise ImageReadError(path, f"NIfTI has shape {data.shape}; expected a 2-D slice")
  if not np.all(np.isfinite(data)):
    raise ImageReadError(path, "NIfTI pixels contain NaN or infinity")
  return Image2D(pixels=data)


def read_nifti(path: str) -> Volume:
  """Reads a 3-D NIfTI volume (a 4-D file with one time point is accepted)."""
  import nibabel as nib

  _check_exists(path)
  try:
    img = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
  except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib errors, ...
    raise ImageReadError(path, f"cannot read NIfTI ({type(e).__name__})") from None
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise ImageReadError(path, f"NIfTI has shape {data.shape}; expected a 3-D volume")
  if not np.all(np.isfinite(data)):
    raise ImageReadError(path, "NIfTI voxels contain NaN or infinity")
  zooms = [float(z) for z in img.header.get_zooms()[:3]]
  # RAS+ array axes are (x, y, z); store (z, y, x) so axial slices lead.
  return Volume(
    voxels=np.ascontiguousarray(data.transpose(2, 1, 0)),
    spacing=(zooms[2], zooms[1], zooms[0]),
    affine=np.asarray(img.affine),
  )


_UNDEFINED_LENGTH = 0xFFFFFFFF


def _truncated(where: str) -> str:
  return f"DICOM file is truncated ({where}); copy it again"


def _looks_cut_short(path: str, error: Exception) -> bool:
  """Whether pydicom failed because the file ends early: it has the DICM preamble and the
  parser ran out of bytes (a short struct read, an end of file, a value of odd length)."""
  if not _has_dicom_preamble(path):
    return False
  name = type(error).__name__
  return isinstance(error, (struct.error, EOFError)) or name == "BytesLengthException"


def _truncation(ds, size: int, caught: list) -> str:
  """Where a parsed DICOM file was cut short, or '' when it is complete.

  pydicom stops quietly at the end of the file: an element whose value is shorter than its
  declared length, a few bytes of an element header after the last whole element, an undefined
  length sequence or pixel data without its delimiter (a warning), or a file meta header without
  its transfer syntax or shorter than its group length.
  """
  from pydicom.dataelem import RawDataElement

  if any("End of file reached" in str(w.message) for w in caught):
    return "it ends before the delimiter of an encapsulated or sequence element"
  meta = getattr(ds, "file_meta", None)
  if meta is None or "TransferSyntaxUID" not in meta:
    return "it ends inside the file meta header"
  group_length = meta.get("FileMetaInformationGroupLength")  # the value, not the element
  # Preamble (128), 'DICM' (4), the group length element itself (12), then the group.
  if group_length is not None and size < 144 + int(group_length):
    return "it ends inside the file meta header"
  if not len(ds):
    return "it ends after the file meta header, before any data element"
  end = 0
  for tag in list(ds.keys()):
    raw = ds.get_item(tag)
    if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
      continue
    if raw.value is not None and len(raw.value) < raw.length:
      return (
        f"element ({raw.tag.group:04X},{raw.tag.element:04X}) declares {raw.length} bytes, "
        f"the file holds {len(raw.value)} of them"
      )
    end = max(end, raw.value_tell + raw.length)
  if 0 < size - end < 8:
    return "it ends inside an element header"
  return ""


def _check_exists(path: str) -> None:
  if not os.path.isfile(path):
    raise ImageReadError(path, "file does not exist")


def _has_dicom_preamble(path: str) -> bool:
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return head[128:132] == b"DICM"


def _laterality(value: object) -> str | None:
  text = str(value or "").strip().upper()
  return text if text in ("L", "R") else None
