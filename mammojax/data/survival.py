"""Cumulative survival targets and masks from years-to-cancer and years of follow-up.

Follows the convention of Mirai and BCRBench: year index ``k`` (0-based) answers "cancer within
``k + 1`` years". A case with cancer diagnosed ``t`` whole years after the exam (``t <
num_years``) is positive from index ``t`` on and observed up to and including ``t`` (Mirai's
``time_at_event``; later years add nothing the event year does not say). A case without cancer
inside the horizon is negative and observed up to its last follow-up year
(``min(followup, num_years) - 1``); later years are censored (mask 0).
"""

from __future__ import annotations

import numpy as np


def survival_targets(
  years_to_cancer: float, years_to_followup: float, num_years: int
) -> tuple[np.ndarray, np.ndarray]:
  """Target and mask for one exam, both ``[num_years]`` float32.

  Args:
    years_to_cancer: whole years from exam to diagnosis; any value ``>= num_years`` (for
      example a large sentinel such as 100) means no cancer inside the horizon.
    years_to_followup: whole years of cancer-free follow-up after the exam.
    num_years: horizon of the cumulative risk heads.
  """
  for name, value in (
    ("years_to_cancer", years_to_cancer),
    ("years_to_followup", years_to_followup),
  ):
    if not np.isfinite(value) or value < 0:
      raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  target = np.zeros(num_years, np.float32)
  mask = np.zeros(num_years, np.float32)
  years_to_cancer = int(years_to_cancer)
  if years_to_cancer < num_years:
    target[years_to_cancer:] = 1.0
    mask[: years_to_cancer + 1] = 1.0
  else:
    last_observed = min(int(years_to_followup), num_years) - 1
    mask[: last_observed + 1] = 1.0
  return target, mask
