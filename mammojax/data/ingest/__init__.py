"""Reading and preparing the files users bring: image readers (DICOM, PNG, NIfTI), mammogram
preprocessing, and the CSV layouts ``python -m mammojax.ingest`` turns into records."""
