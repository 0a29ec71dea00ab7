"""The ingestion tests' image files: the package's phantom writers, with patient data and free
text in every DICOM header, which the privacy checks look for in the outputs."""

from __future__ import annotations

import numpy as np

from mammojax.data.synthetic import image_files
from mammojax.data.synthetic.image_files import phantom, write_nifti, write_png

__all__ = ["PHI", "phantom", "write_dicom", "write_nifti", "write_png"]

PHI = {
  "PatientName": "Doe^Janet",
  "PatientBirthDate": "19580214",
  "AccessionNumber": "ACC98765Z",
  "PatientID": "MRN-555-0199",
}


def write_dicom(path: str, pixels: np.ndarray, **options) -> None:
  """``image_files.write_dicom`` with :data:`PHI` and a free-text description in the header."""
  header = {**PHI, "StudyDescription": "free text that must not leak"}
  image_files.write_dicom(path, pixels, header=header, **options)
