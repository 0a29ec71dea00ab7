"""AMAE: the adaptive masked autoencoder over a variable set of 3-D contrasts and the
segmentation networks that take its encoder (adaptive UNETR, plain UNETR)."""
