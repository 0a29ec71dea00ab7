"""Ingestion throughput: images/s per worker for DICOM and PNG, read + preprocess.

  python -m benchmarks.ingest            # 2048x1664 -> 1024x832
  python -m benchmarks.ingest --small    # 256x208 -> 128x104 (smoke run)

One worker process decodes and preprocesses one image at a time, so the per-image time here is
the per-worker rate; ``mammojax.ingest --workers=N`` scales it by about N up to the core count.
Each case times the full path (read file, modality / VOI LUT, segment, crop, orient, resize to
uint16) and, separately, decoding alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

from benchmarks import harness
from mammojax.data import readers
from mammojax.data.mammo_preprocess import MammoPreprocessConfig, load_mammogram


def _phantom(height: int, width: int) -> np.ndarray:
  """A breast-like uint16 image with texture and a burned-in label (left breast)."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  inside = ((yy - height / 2) / (0.42 * height)) ** 2 + (xx / (0.7 * width)) ** 2 <= 1.0
  texture = 20000 + 12000 * np.sin(yy / 17.0) * np.cos(xx / 23.0)
  image = np.where(inside, texture + rng.normal(0, 800, inside.shape), 150.0)
  image[height // 40 : height // 12, -width // 6 : -width // 40] = 60000.0
  return np.clip(image, 0, 65535).astype(np.uint16)


def _write_files(directory: str, image: np.ndarray) -> dict[str, str]:
  from PIL import Image
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
  )

  paths = {"png16": os.path.join(directory, "image.png")}
  Image.fromarray(image).save(paths["png16"])
  for name, syntax in (
    ("dicom", None),
    ("dicom_rle", RLELossless),
    ("dicom_jpeg2000", JPEG2000Lossless),
  ):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Modality, ds.ImageLaterality, ds.ViewPosition = "MG", "L", "CC"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.WindowCenter, ds.WindowWidth = 30000.0, 60000.0
    ds.PixelData = image.tobytes()
    if syntax is not None:
      try:
        ds.compress(syntax)
      except (RuntimeError, NotImplementedError):  # No encoder plugin installed.
        continue
    paths[name] = os.path.join(directory, f"{name}.dcm")
    ds.save_as(paths[name], enforce_file_format=True)
  return paths


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--small", action="store_true", help="tiny sizes for a smoke run")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  source, target = ((256, 208), (128, 104)) if args.small else ((2048, 1664), (1024, 832))
  config = MammoPreprocessConfig(height=target[0], width=target[1])
  with tempfile.TemporaryDirectory() as directory:
    paths = _write_files(directory, _phantom(*source))
    cases = []
    for name, path in paths.items():
      cases.append(
        harness.Case(f"{name}/full", "numpy", lambda p=path: load_mammogram(p, "L", config))
      )
      cases.append(harness.Case(f"{name}/decode", "numpy", lambda p=path: readers.read_image(p)))
    results = harness.time_cases(cases, warmup=1, repeats=args.repeats)
  for row in results:
    row["images_per_s_per_worker"] = 1000.0 / row["median_ms"]
  harness.report("ingest", results, source_size=list(source), target_size=list(target))


if __name__ == "__main__":
  main(sys.argv[1:])
