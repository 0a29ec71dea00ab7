"""Values every data module shares: the split names, the no-cancer sentinel, the image file
suffixes, and where generated datasets are cached."""

from __future__ import annotations

import os

SPLITS = ("train", "val", "test")

# ``years_to_cancer`` of an exam with no cancer diagnosed: beyond any risk horizon.
NO_CANCER_YEARS = 100.0

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
PNG_SUFFIXES = (".png",)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The 2-D image files :func:`mammojax.data.ingest.readers.read_image` reads, in lookup order.
IMAGE_SUFFIXES = PNG_SUFFIXES + DICOM_SUFFIXES


def default_data_root() -> str:
  """Where synthetic datasets are cached: $MAMMOJAX_DATA or ~/.cache/mammojax/datasets."""
  return os.environ.get(
    "MAMMOJAX_DATA", os.path.join(os.path.expanduser("~"), ".cache", "mammojax", "datasets")
  )
