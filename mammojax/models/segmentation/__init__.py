"""Volumetric (and 2D) segmentation networks in MONAI's layouts: :mod:`.basic_unet` (MONAI's
``BasicUNet``) and :mod:`.unetr` (MONAI's ``UNETR``); :mod:`mammojax.convert` imports their
MONAI state dicts."""
