"""Multiple-instance learning models (FPN-MIL)."""

from mammojax.models.mil.fpn_mil import (
  FPNMIL,
  ClassifierHead,
  MultiScaleMILHead,
  reference_num_inducing,
  reference_num_instances,
)

__all__ = [
  "FPNMIL",
  "ClassifierHead",
  "MultiScaleMILHead",
  "reference_num_inducing",
  "reference_num_instances",
]
