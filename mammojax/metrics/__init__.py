"""Evaluation metrics (numpy only): risk C-index, per-year AUC, bootstrap, calibration, and
binary classification at a decision threshold."""
