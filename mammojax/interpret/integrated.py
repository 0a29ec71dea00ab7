"""Path and sampling attributions: integrated gradients, gradient SHAP, the noise tunnel.

* **Integrated gradients** (Sundararajan et al. 2017), as Captum's ``IntegratedGradients``:
  ``(x - b) * sum_k w_k * grad f(b + alpha_k (x - b))`` with Captum's nodes and weights
  (:func:`quadrature`), and the convergence delta
  ``sum(attributions) - (f(x) - f(b))`` per example.
* **Gradient SHAP** (Lundberg and Lee 2017), as Captum's ``GradientShap``: for each example and
  sample ``k``, a baseline ``b_k`` drawn with replacement from ``baselines``, Gaussian input noise
  ``x_k = x + N(0, stdevs^2)``, ``alpha_k ~ U(0, 1)``; attribution = mean over ``k`` of
  ``(x_k - b_k) * grad f(b_k + alpha_k (x_k - b_k))``. Random numbers come from a JAX key, so
  results are reproducible but not Captum's draws; :func:`gradient_shap_from_draws` takes given
  draws (the tests replay Captum's).
* **Noise tunnel** (SmoothGrad, Smilkov et al. 2017; VarGrad), as Captum's ``NoiseTunnel``: any
  method applied to ``nt_samples`` noisy copies ``x + N(0, stdevs^2)`` (``stdevs`` absolute, in
  input units), then the mean (``'smoothgrad'``), the mean of squares (``'smoothgrad_sq'``) or
  the variance ``E[a^2] - E[a]^2`` (``'vargrad'``).

Memory: the gradients of many points are never held together. Integrated gradients and gradient
SHAP run their points in chunks of ``internal_batch_size`` rows (examples times steps or
samples), one jitted program per chunk dispatched from a host loop that accumulates the
weighted sum (a ``lax.scan`` over the chunks ran 2x slower on XLA:CPU: a ResNet-18 gradient
inside a while loop, 5.5 s against 2.6 s for 32 rows at 224x224); the noise tunnel calls the
(jitted) method once per chunk of ``nt_samples_batch_size`` samples.

Precision: a ReLU network's gradient jumps where a unit crosses zero, and among many points a
few land within float32 rounding of such a kink, where two implementations may take different
sides (measured: integrated gradients of a random ResNet-18 against Captum, 5e-4 of the map's
range in float32, 5e-9 in float64). Inputs keep their floating dtype, so a float64 model under
``jax.enable_x64`` gives the float64 result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mammojax.interpret.adapter import ModelAdapter, as_float, summed_target, target_logits, targets

METHODS = (
  "gausslegendre",
  "riemann_left",
  "riemann_right",
  "riemann_middle",
  "riemann_trapezoid",
)
NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def quadrature(method: str, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Captum's integration points ``alphas`` in [0, 1] and step sizes, ``[n_steps]`` float64 each.

  ``gausslegendre``: Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1]. Riemann
  (``n_steps > 1``): steps ``1 / n``; ``left`` alphas ``0 .. 1 - 1/n``, ``right`` ``1/n .. 1``,
  ``middle`` ``1/(2n) .. 1 - 1/(2n)``, ``trapezoid`` ``0 .. 1`` with the two end steps halved
  (so Captum's trapezoid weights sum to ``1 - 1/n``).
  """
  if method not in METHODS:
    raise ValueError(f"integration method must be one of {METHODS}, got {method!r}")
  if n_steps < 1 or (method != "gausslegendre" and n_steps < 2):
    raise ValueError(f"{method} needs n_steps >= {1 if method == 'gausslegendre' else 2}")
  if method == "gausslegendre":
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    return 0.5 * (1 + nodes), 0.5 * weights
  n = n_steps
  steps = np.full(n, 1 / n)
  start, stop = {
    "riemann_left": (0.0, 1 - 1 / n),
    "riemann_right": (1 / n, 1.0),
    "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n)),
    "riemann_trapezoid": (0.0, 1.0),
  }[method]
  if method == "riemann_trapezoid":
    steps[0] /= 2
    steps[-1] /= 2
  return np.linspace(start, stop, n), steps


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
  """Standard normal draws of ``shape``, drawn flat (XLA compiles a multi-axis draw several
  times slower on CPU)."""
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def _chunks(count: int, batch: int, internal_batch_size: int | None) -> tuple[int, int]:
  """(points per chunk, number of chunks) for ``count`` points of ``batch`` examples each."""
  if internal_batch_size is not None and internal_batch_size < 1:
    raise ValueError(f"internal_batch_size must be >= 1, got {internal_batch_size}")
  per_chunk = count if internal_batch_size is None else max(1, internal_batch_size // batch)
  per_chunk = min(per_chunk, count)
  return per_chunk, math.ceil(count / per_chunk)


def _padded(values: np.ndarray, per_chunk: int, num_chunks: int) -> np.ndarray:
  """``[count]`` -> ``[num_chunks, per_chunk]``, padded with zeros (zero weight: no effect)."""
  out = np.zeros(per_chunk * num_chunks, values.dtype)
  out[: len(values)] = values
  return out.reshape(num_chunks, per_chunk)


def _points_gradient(
  adapter: ModelAdapter, points: jax.Array, target: jax.Array | None
) -> jax.Array:
  """Gradients at ``points`` ``[P, B, H, W, C]``, every point of example ``b`` for its target."""
  count, batch = points.shape[:2]
  tiled = None if target is None else jnp.tile(target, count)
  flat = points.reshape(count * batch, *points.shape[2:])
  return jax.grad(summed_target(adapter, tiled))(flat).reshape(points.shape)


def _expand(values: jax.Array, ndim: int) -> jax.Array:
  """``[P, B]`` -> ``[P, B, 1, ...]`` with ``ndim`` axes in all."""
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


class Integrated(NamedTuple):
  """Attributions ``[B, H, W, C]`` and the convergence delta ``[B]``:
  ``sum(attributions) - (f(x) - f(baseline))`` of each example's target logit."""

  attributions: jax.Array
  delta: jax.Array


@jax.jit
def _integrated_chunk(
  adapter: ModelAdapter,
  baselines: jax.Array,
  difference: jax.Array,
  target: jax.Array | None,
  alpha: jax.Array,
  weight: jax.Array,
) -> jax.Array:
  """``sum_k w_k * grad f(b + alpha_k (x - b))`` over one chunk's ``[P]`` points."""
  points = baselines[None] + _expand(alpha, baselines.ndim + 1) * difference[None]
  gradients = _points_gradient(adapter, points, target)
  return jnp.sum(_expand(weight, baselines.ndim + 1) * gradients, axis=0)


@jax.jit
def _integrated_finish(
  adapter: ModelAdapter,
  images: jax.Array,
  baselines: jax.Array,
  total: jax.Array,
  target: jax.Array | None,
) -> Integrated:
  attributions = total * (images - baselines)
  batch = images.shape[0]
  ends = target_logits(adapter.logits(jnp.concatenate([images, baselines])), _twice(target))
  delta = jnp.sum(attributions.reshape(batch, -1), axis=1) - (ends[:batch] - ends[batch:])
  return Integrated(attributions, delta)


def _twice(target: jax.Array | None) -> jax.Array | None:
  return None if target is None else jnp.concatenate([target, target])


def integrated_gradients(
  adapter: ModelAdapter,
  images: jax.Array,
  target: int | jax.Array | None,
  baseline: float | jax.Array | None = None,
  *,
  n_steps: int = 50,
  method: str = "gausslegendre",
  internal_batch_size: int | None = None,
) -> Integrated:
  """Captum's ``IntegratedGradients`` (see the module docstring).

  Args:
    adapter: the model.
    images: ``[B, H, W, C]``.
    target: the class of each example, ``[B]`` ints or one int.
    baseline: None (zeros, Captum's default), a number, or an array broadcastable to the images
      (``[H, W, C]``, ``[1, H, W, C]``, ``[B, H, W, C]``).
    n_steps: integration points.
    method: one of :data:`METHODS`.
    internal_batch_size: at most this many rows (examples times points, at least one point)
      per forward pass; None = all ``B * n_steps`` at once.
  Returns:
    :class:`Integrated` (attributions ``[B, H, W, C]``, delta ``[B]``).
  """
  images = as_float(images)
  baseline = np.zeros((), images.dtype) if baseline is None else baseline
  if not np.broadcast_shapes(np.shape(baseline), images.shape) == images.shape:
    raise ValueError(f"baseline of shape {np.shape(baseline)} does not broadcast to the images")
  alphas, weights = quadrature(method, n_steps)
  per_chunk, num_chunks = _chunks(n_steps, images.shape[0], internal_batch_size)
  alphas = _padded(alphas, per_chunk, num_chunks).astype(images.dtype)
  weights = _padded(weights, per_chunk, num_chunks).astype(images.dtype)
  target = targets(target, images.shape[0])
  baselines = jnp.broadcast_to(jnp.asarray(baseline, images.dtype), images.shape)
  difference = images - baselines
  total = jnp.zeros_like(images)
  for alpha, weight in zip(alphas, weights):  # dispatched asynchronously, one program
    total = total + _integrated_chunk(adapter, baselines, difference, target, alpha, weight)
  return _integrated_finish(adapter, images, baselines, total, target)


@jax.jit
def _gradient_shap_chunk(
  adapter: ModelAdapter,
  images: jax.Array,
  baselines: jax.Array,
  target: jax.Array | None,
  index: jax.Array,
  noise: jax.Array,
  alpha: jax.Array,
  weight: jax.Array,
) -> jax.Array:
  """One chunk's ``sum_k w_k (x_k - b_k) * grad f(b_k + alpha_k (x_k - b_k))`` over its
  ``[P]`` samples (``index``, ``alpha``: ``[P, B]``; ``noise``: ``[P, B, H, W, C]``)."""
  starts = baselines[index]
  difference = images[None] + noise - starts
  points = starts + _expand(alpha, images.ndim + 1) * difference
  gradients = _points_gradient(adapter, points, target)
  return jnp.sum(_expand(weight, images.ndim + 1) * difference * gradients, axis=0)


def _gradient_shap_sum(
  adapter: ModelAdapter,
  images: jax.Array,
  baselines: jax.Array,
  target: jax.Array | None,
  index: jax.Array,
  noise: jax.Array | None,
  alpha: jax.Array,
  per_chunk: int,
) -> jax.Array:
  """The mean over samples, ``per_chunk`` samples per pass (the last chunk zero-weighted where
  it runs past ``n_samples``)."""
  n_samples = index.shape[0]
  num_chunks = math.ceil(n_samples / per_chunk)
  dtype = images.dtype
  if noise is None:
    noise = jnp.zeros((n_samples, *images.shape), dtype)
  weight = jnp.full((n_samples,), 1 / n_samples, dtype)

  def split(x: jax.Array) -> jax.Array:  # [n, ...] -> [chunks, P, ...], zero-padded
    x = jnp.pad(x, [(0, num_chunks * per_chunk - n_samples)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(num_chunks, per_chunk, *x.shape[1:])

  draws = [split(x) for x in (index, noise.astype(dtype), alpha.astype(dtype), weight)]
  total = jnp.zeros_like(images)
  for chunk in zip(*draws):  # dispatched asynchronously, one program
    total = total + _gradient_shap_chunk(adapter, images, baselines, target, *chunk)
  return total


@functools.partial(jax.jit, static_argnames=("num_baselines", "n_samples"))
def gradient_shap_draws(
  key: jax.Array, images: jax.Array, num_baselines: int, n_samples: int, stdevs: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The random draws of :func:`gradient_shap`: baseline indices ``[n_samples, B]`` (uniform,
  with replacement), input noise ``[n_samples, B, H, W, C]`` (``N(0, stdevs^2)``), and
  ``alpha ~ U(0, 1)`` ``[n_samples, B]``; from three keys split from ``key``."""
  choice_key, noise_key, alpha_key = jax.random.split(key, 3)
  batch = images.shape[0]
  index = jax.random.randint(choice_key, (n_samples, batch), 0, num_baselines)
  noise = stdevs * _normal(noise_key, (n_samples, *images.shape), images.dtype)
  alpha = jax.random.uniform(alpha_key, (n_samples, batch), images.dtype)
  return index, noise, alpha


def _gradient_shap(
  adapter: ModelAdapter,
  images: jax.Array,
  baselines: jax.Array,
  target: jax.Array | None,
  key: jax.Array,
  stdevs: jax.Array,
  n_samples: int,
  per_chunk: int,
) -> jax.Array:
  draws = gradient_shap_draws(key, images, baselines.shape[0], n_samples, stdevs)
  return _gradient_shap_sum(adapter, images, baselines, target, *draws, per_chunk=per_chunk)


def _check_baselines(images: jax.Array, baselines: jax.Array) -> None:
  if np.ndim(baselines) != images.ndim or np.shape(baselines)[1:] != images.shape[1:]:
    raise ValueError(
      f"baselines must be [N, {', '.join(map(str, images.shape[1:]))}], got {np.shape(baselines)}"
    )


def gradient_shap(
  adapter: ModelAdapter,
  images: jax.Array,
  target: int | jax.Array | None,
  baselines: jax.Array,
  *,
  key: jax.Array,
  n_samples: int = 5,
  stdevs: float = 0.0,
  internal_batch_size: int | None = None,
) -> jax.Array:
  """Captum's ``GradientShap`` (see the module docstring), with chunked samples.

  Args:
    adapter: the model.
    images: ``[B, H, W, C]``.
    target: the class of each example, ``[B]`` ints or one int.
    baselines: ``[N, H, W, C]``, the distribution the baselines are drawn from.
    key: a JAX random key (the draws are :func:`gradient_shap_draws`'s).
    n_samples: samples per example.
    stdevs: standard deviation of the Gaussian input noise (0: none, Captum's default).
    internal_batch_size: at most this many rows (examples times samples, at least one sample)
      per forward pass; None = all ``B * n_samples`` at once.
  Returns:
    ``[B, H, W, C]``.
  """
  if n_samples < 1:
    raise ValueError(f"n_samples must be >= 1, got {n_samples}")
  images = as_float(images)
  _check_baselines(images, baselines)
  per_chunk, _ = _chunks(n_samples, images.shape[0], internal_batch_size)
  return _gradient_shap(
    adapter,
    images,
    jnp.asarray(baselines, images.dtype),
    targets(target, images.shape[0]),
    key,
    np.asarray(stdevs, images.dtype),
    n_samples=n_samples,
    per_chunk=per_chunk,
  )


def gradient_shap_from_draws(
  adapter: ModelAdapter,
  images: jax.Array,
  target: int | jax.Array | None,
  baselines: jax.Array,
  index: jax.Array,
  noise: jax.Array | None,
  alpha: jax.Array,
  *,
  internal_batch_size: int | None = None,
) -> jax.Array:
  """Gradient SHAP on given draws: ``mean over k of (x_k - b_k) * grad f(b_k + alpha_k (x_k -
  b_k))`` with ``x_k = images + noise[k]``, ``b_k = baselines[index[k]]`` (e.g. to replay
  another library's draws).

  Args:
    adapter, images, target, baselines, internal_batch_size: as :func:`gradient_shap`.
    index: ``[n_samples, B]`` baseline rows.
    noise: ``[n_samples, B, H, W, C]`` input noise, or None for none.
    alpha: ``[n_samples, B]`` in [0, 1].
  Returns:
    ``[B, H, W, C]``.
  """
  images = as_float(images)
  _check_baselines(images, baselines)
  n_samples, batch = np.shape(index)
  if np.shape(alpha) != (n_samples, batch) or batch != images.shape[0]:
    raise ValueError(
      f"index and alpha must be [n_samples, B={images.shape[0]}], got {np.shape(index)} and "
      f"{np.shape(alpha)}"
    )
  per_chunk, _ = _chunks(n_samples, batch, internal_batch_size)
  return _gradient_shap_sum(
    adapter,
    images,
    jnp.asarray(baselines, images.dtype),
    targets(target, batch),
    jnp.asarray(index, jnp.int32),
    noise,
    alpha,
    per_chunk=per_chunk,
  )


@functools.partial(jax.jit, static_argnames=("count",))
def _noisy(
  images: jax.Array,
  target: jax.Array | None,
  key: jax.Array,
  first: jax.Array,
  count: int,
  stdevs: jax.Array,
) -> tuple[jax.Array, jax.Array | None]:
  """Samples ``first .. first + count - 1`` of every example, sample-major ``[count * B, H, W,
  C]``, each from its own key (so the chunking does not change them), and their targets."""

  def sample(j: jax.Array) -> jax.Array:
    noise = _normal(jax.random.fold_in(key, first + j), images.shape, images.dtype)
    return images + stdevs * noise

  noisy = jax.vmap(sample)(jnp.arange(count)).reshape(count * images.shape[0], *images.shape[1:])
  return noisy, None if target is None else jnp.tile(target, count)


@functools.partial(jax.jit, static_argnames=("per_chunk", "count"))
def _moments(out: jax.Array, per_chunk: int, count: int) -> tuple[jax.Array, jax.Array]:
  """Sum and sum of squares over the first ``count`` samples of ``[per_chunk * B, ...]``
  attributions (a last, partial chunk is computed whole, so ``method`` never recompiles)."""
  out = out.reshape(per_chunk, out.shape[0] // per_chunk, *out.shape[1:])[:count]
  return jnp.sum(out, axis=0), jnp.sum(out * out, axis=0)


def noise_tunnel(
  method: Callable[..., Any],
  adapter: ModelAdapter,
  images: jax.Array,
  target: int | jax.Array | None,
  *,
  key: jax.Array,
  nt_samples: int = 5,
  stdevs: float = 1.0,
  nt_type: str = "smoothgrad",
  nt_samples_batch_size: int | None = None,
  **method_kwargs: Any,
) -> jax.Array:
  """Captum's ``NoiseTunnel`` around ``method`` (see the module docstring).

  Args:
    method: an attribution function ``method(adapter, images, target, **method_kwargs)``
      returning an array or a tuple whose first entry is the attributions (e.g.
      :func:`mammojax.interpret.gradients.saliency`, :func:`integrated_gradients`).
    adapter: the model.
    images: ``[B, H, W, C]``.
    target: the class of each example, ``[B]`` ints or one int.
    key: a JAX random key for the noise.
    nt_samples: noisy copies per example.
    stdevs: the noise's standard deviation, in input units.
    nt_type: ``'smoothgrad'``, ``'smoothgrad_sq'`` or ``'vargrad'``.
    nt_samples_batch_size: samples per call of ``method`` (None: all at once).
    **method_kwargs: passed to ``method``.
  Returns:
    The combined attributions, shaped as ``method``'s per example.
  """
  if nt_type not in NT_TYPES:
    raise ValueError(f"nt_type must be one of {NT_TYPES}, got {nt_type!r}")
  if nt_samples < 1:
    raise ValueError(f"nt_samples must be >= 1, got {nt_samples}")
  images = as_float(images)
  target = targets(target, images.shape[0])
  stdevs = np.asarray(stdevs, images.dtype)
  per_chunk = nt_samples if nt_samples_batch_size is None else max(1, nt_samples_batch_size)
  per_chunk = min(per_chunk, nt_samples)
  moments = []
  for first in range(0, nt_samples, per_chunk):
    noisy, tiled = _noisy(images, target, key, np.int32(first), per_chunk, stdevs)
    out = method(adapter, noisy, tiled, **method_kwargs)
    out = out[0] if isinstance(out, tuple) else out
    moments.append(_moments(out, per_chunk, min(per_chunk, nt_samples - first)))
  return _combine(moments, nt_samples, nt_type)


@functools.partial(jax.jit, static_argnames=("nt_samples", "nt_type"))
def _combine(
  moments: list[tuple[jax.Array, jax.Array]], nt_samples: int, nt_type: str
) -> jax.Array:
  mean = sum(total for total, _ in moments) / nt_samples
  mean_square = sum(squares for _, squares in moments) / nt_samples
  if nt_type == "smoothgrad":
    return mean
  if nt_type == "smoothgrad_sq":
    return mean_square
  return mean_square - mean * mean
