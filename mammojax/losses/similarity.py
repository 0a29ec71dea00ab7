"""Image similarity losses on plain arrays: SSD, NCC, local NCC, mutual information, MIND.

Images are ``[B, *S, C]`` (2D or 3D, channels last) and each measure maps a pair of images of
the same shape to a scalar loss (lower is better, 0 or its minimum for a perfect match), so any
of them can be the ``similarity`` of the registration losses (``mammojax.losses.registration``).
SSD and NCC compare intensities, local NCC with a Gaussian window; mutual information and MIND
also match images across modalities or intensity inversions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# A similarity loss: two images ``[B, *S, C]`` to a scalar.
Similarity = Callable[[jax.Array, jax.Array], jax.Array]


def ssd_loss(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean squared difference of two images ``[B, *S, C]``; scalar."""
  check_same_shape(a, b)
  return jnp.mean(jnp.square(a - b))


def ncc_loss(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """``1 - NCC``: each ``(example, channel)`` is standardised over its pixels, as ICON's ``NCC``.

  Args:
    a, b: ``[B, *S, C]``.
    eps: added to the standard deviations (a constant image then has NCC 0, not NaN).
  Returns:
    Scalar in ``[0, 2]``; 0 for images equal up to a positive affine intensity change.
  """
  check_same_shape(a, b)
  return 1.0 - jnp.mean(_standardise(a, eps) * _standardise(b, eps))


def lncc_loss(
  a: jax.Array,
  b: jax.Array,
  sigma: float = 2.0,
  *,
  squared: bool = False,
  mask: jax.Array | None = None,
  eps: float = 1e-5,
) -> jax.Array:
  """``1 - mean(local NCC)`` with a Gaussian window (ICON's ``LNCC`` / ``SquaredLNCC``).

  Local moments are Gaussian blurs (std ``sigma`` pixels, radius ``round(2 sigma)``, zero
  padding, kernel normalised to sum 1); the local correlation is
  ``cov / sqrt((relu(var_a) + eps) * (relu(var_b) + eps))`` per pixel and channel.

  Args:
    a, b: ``[B, *S, C]``.
    sigma: window standard deviation in pixels.
    squared: average the squared local correlation (MONAI's convention) instead.
    mask: optional ``[B, *S, C]`` (or broadcastable); non-zero where the correlation counts.
      As ICON, masked pixels contribute 0 but still count in the mean.
  Returns:
    Scalar; 0 for identical non-constant images.
  """
  check_same_shape(a, b)
  blur = lambda x: gaussian_blur(x, sigma)  # noqa: E731
  mean_a, mean_b = blur(a), blur(b)
  cov = blur(a * b) - mean_a * mean_b
  var_a = jax.nn.relu(blur(a * a) - mean_a**2) + eps
  var_b = jax.nn.relu(blur(b * b) - mean_b**2) + eps
  corr = cov / jnp.sqrt(var_a * var_b)
  if squared:
    corr = corr**2
  if mask is not None:
    corr = corr * (mask != 0)
  return 1.0 - jnp.mean(corr)


def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian blur of ``[B, *S, C]`` over the spatial axes, zero padding, same size."""
  radius = max(int(round(2 * sigma)), 1)
  offsets = jnp.arange(-radius, radius + 1, dtype=x.dtype)
  kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  num_spatial = x.ndim - 2
  channels = x.shape[-1]
  for axis in range(num_spatial):
    shape = [1] * num_spatial
    shape[axis] = kernel.shape[0]
    weights = jnp.broadcast_to(kernel.reshape(*shape, 1, 1), (*shape, 1, channels))
    padding = [(0, 0)] * num_spatial
    padding[axis] = (radius, radius)
    spec = ("NHWC", "HWIO", "NHWC") if num_spatial == 2 else ("NDHWC", "DHWIO", "NDHWC")
    x = jax.lax.conv_general_dilated(
      x,
      weights,
      (1,) * num_spatial,
      padding,
      dimension_numbers=spec,
      feature_group_count=channels,
      precision=jax.lax.Precision.HIGHEST,
    )
  return x


def mutual_information_loss(
  a: jax.Array,
  b: jax.Array,
  *,
  num_bins: int = 32,
  value_range: tuple[float, float] = (0.0, 1.0),
  bin_sigma: float | None = None,
) -> jax.Array:
  """Negative mutual information (nats) from a Gaussian Parzen-window joint histogram.

  Intensities are clipped to ``value_range``; each pixel spreads a Gaussian of std
  ``bin_sigma`` (default: half a bin width) over ``num_bins`` evenly spaced bin centres,
  normalised per pixel. Computed per example over all pixels and channels, then averaged.

  Args:
    a, b: ``[B, *S, C]``.
  Returns:
    Scalar ``-mean_b MI(a_b; b_b)``; invariant to invertible intensity maps up to binning,
    hence usable across modalities.
  """
  check_same_shape(a, b)
  low, high = value_range
  if not high > low or num_bins < 2:
    raise ValueError(
      f"need value_range low < high and num_bins >= 2, got {value_range}, {num_bins}"
    )
  centres = jnp.linspace(low, high, num_bins, dtype=a.dtype)
  sigma = bin_sigma if bin_sigma is not None else 0.5 * (high - low) / (num_bins - 1)

  def parzen(x):  # [B, N] -> [B, N, K], rows sum to 1
    x = jnp.clip(x.reshape(x.shape[0], -1), low, high)
    logits = -0.5 * ((x[..., None] - centres) / sigma) ** 2
    return jax.nn.softmax(logits, axis=-1)

  weights_a, weights_b = parzen(a), parzen(b)
  joint = (
    jnp.einsum("bnk,bnl->bkl", weights_a, weights_b, precision=jax.lax.Precision.HIGHEST)
    / weights_a.shape[1]
  )
  marginal_a = jnp.sum(joint, axis=2, keepdims=True)
  marginal_b = jnp.sum(joint, axis=1, keepdims=True)
  tiny = jnp.finfo(joint.dtype).tiny
  ratio = jnp.log(jnp.maximum(joint, tiny)) - jnp.log(jnp.maximum(marginal_a * marginal_b, tiny))
  mutual_information = jnp.sum(joint * ratio, axis=(1, 2))
  return -jnp.mean(mutual_information)


def mind_loss(a: jax.Array, b: jax.Array, *, sigma: float = 0.8, eps: float = 1e-6) -> jax.Array:
  """Mean absolute difference of MIND descriptors (Heinrich et al. 2012), a multimodal measure.

  For each axis-neighbour offset ``r`` (4 in 2D, 6 in 3D), ``D_r(x) = G_sigma * (I - I(. + r))^2``;
  the descriptor is ``exp(-D_r / V)`` with ``V`` the mean of ``D_r`` over ``r``, normalised by
  its maximum over ``r``. Edges replicate the border.

  Args:
    a, b: ``[B, *S, 1]``.
  Returns:
    Scalar; 0 for images with the same local self-similarity (e.g. one an intensity inversion
    of the other).
  """

  def descriptor(image):
    num_axes = image.ndim - 2
    pad = [(0, 0)] + [(1, 1)] * num_axes + [(0, 0)]
    padded = jnp.pad(image, pad, mode="edge")
    centre = tuple([slice(None)] + [slice(1, -1)] * num_axes + [slice(None)])
    distances = []
    for axis in range(num_axes):
      for step in (-1, 1):
        index = list(centre)
        index[1 + axis] = slice(1 + step, padded.shape[1 + axis] - 1 + step)
        distances.append(gaussian_blur((image - padded[tuple(index)]) ** 2, sigma))
    distances = jnp.concatenate(distances, axis=-1)  # [B, *S, 2n]
    variance = jnp.mean(distances, axis=-1, keepdims=True) + eps
    features = jnp.exp(-distances / variance)
    return features / jnp.max(features, axis=-1, keepdims=True)

  return jnp.mean(jnp.abs(descriptor(a) - descriptor(b)))


# ----------------------------------------------------------------------------- helpers


def check_same_shape(a: jax.Array, b: jax.Array) -> None:
  """Raises ``ValueError`` unless the two images have the same shape."""
  if a.shape != b.shape:
    raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")


def _standardise(x, eps):
  axes = tuple(range(1, x.ndim - 1))
  centred = x - jnp.mean(x, axis=axes, keepdims=True)
  return centred / (jnp.sqrt(jnp.mean(jnp.square(centred), axis=axes, keepdims=True)) + eps)
