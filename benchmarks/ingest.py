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
from mammojax.data.ingest import readers
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig, load_mammogram
from mammojax.data.synthetic.image_files import phantom, write_dicom, write_png


def _write_files(directory: str, image: np.ndarray) -> dict[str, str]:
  """The image as a 16-bit PNG and as DICOM, plain and with each lossless codec installed."""
  paths = {"png16": os.path.join(directory, "image.png")}
  write_png(paths["png16"], image)
  for name, compress in (("dicom", None), ("dicom_rle", "rle"), ("dicom_jpeg2000", "jpeg2000")):
    path = os.path.join(directory, f"{name}.dcm")
    try:
      write_dicom(path, image, window=(30000.0, 60000.0), compress=compress)
    except (RuntimeError, NotImplementedError):  # No encoder plugin installed.
      continue
    paths[name] = path
  return paths


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--small", action="store_true", help="tiny sizes for a smoke run")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  source, target = ((256, 208), (128, 104)) if args.small else ((2048, 1664), (1024, 832))
  config = MammoPreprocessConfig(height=target[0], width=target[1])
  with tempfile.TemporaryDirectory() as directory:
    paths = _write_files(directory, phantom(*source, texture_period=(17.0, 23.0)))
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
