"""Sliding-window inference (mammojax/nn/sliding_window.py) against MONAI's
sliding_window_inference, with one deterministic predictor written in torch and in jax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.nn import sliding_window as sw

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")
from monai.data.utils import dense_patch_slices  # noqa: E402
from monai.inferers.utils import _get_scan_interval  # noqa: E402

TOLERANCE = 1e-5
CHANNELS, CLASSES = 2, 3


def _kernel(ndim: int) -> np.ndarray:
  """A fixed 3^ndim convolution, torch layout ``[K, C, 3, ...]``."""
  rng = np.random.default_rng(ndim)
  return (rng.normal(size=(CLASSES, CHANNELS) + (3,) * ndim) * 0.3).astype(np.float32)


def _position_gain(roi) -> np.ndarray:
  """``[*roi]``: a gain that depends on the position inside the window, so that a voxel seen by
  several windows gets different predictions and the blending matters."""
  grids = np.meshgrid(*[np.linspace(0.0, 1.0, r) for r in roi], indexing="ij")
  return (1.0 + 0.5 * np.sin(3.0 * sum(grids))).astype(np.float32)


def _torch_predictor(kernel, gain):
  weight, gain = torch.from_numpy(kernel), torch.from_numpy(gain)
  conv = torch.nn.functional.conv3d if kernel.ndim == 5 else torch.nn.functional.conv2d

  def predict(windows):  # [n, C, *roi] -> [n, K, *roi]
    return torch.tanh(conv(windows, weight, padding=1)) * gain

  return predict


def _jax_predictor(windows, kernel, gain):  # [n, *roi, C] -> [n, *roi, K]
  ndim = windows.ndim - 2
  spatial = "DHW"[-ndim:]
  rhs = jnp.moveaxis(jnp.moveaxis(kernel, 0, -1), 0, -2)  # [*3, C, K]
  out = jax.lax.conv_general_dilated(
    windows,
    rhs,
    (1,) * ndim,
    "SAME",
    dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
    precision=jax.lax.Precision.HIGHEST,
  )
  return jnp.tanh(out) * gain[..., None]


CASES = {
  # A 3D volume shorter than the roi on its last axis (padded, then cropped).
  "3d": dict(shape=(2, 20, 17, 9), roi=(8, 8, 12)),
  # 2D, shorter than the roi on its second axis.
  "2d": dict(shape=(2, 30, 11), roi=(12, 16)),
}


@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_monai(case, mode, overlap):
  shape, roi = CASES[case]["shape"], CASES[case]["roi"]
  ndim = len(roi)
  kernel, gain = _kernel(ndim), _position_gain(roi)
  x = np.random.default_rng(0).normal(size=shape + (CHANNELS,)).astype(np.float32)
  num_windows = len(sw.window_starts(shape[1:], roi, overlap)) * shape[0]
  sw_batch_size = 5
  assert num_windows % sw_batch_size  # the last predictor call is a partial one
  theirs = monai.inferers.sliding_window_inference(
    torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))),
    roi,
    sw_batch_size,
    _torch_predictor(kernel, gain),
    overlap=overlap,
    mode=mode,
  )
  ours = sw.sliding_window_inference(
    jnp.asarray(x),
    roi,
    sw_batch_size,
    _jax_predictor,
    overlap=overlap,
    mode=mode,
    predictor_args=(jnp.asarray(kernel), jnp.asarray(gain)),
  )
  theirs = np.moveaxis(theirs.numpy(), 1, -1)
  assert ours.shape == shape + (CLASSES,) == theirs.shape
  assert float(np.max(np.abs(np.asarray(ours) - theirs))) <= TOLERANCE


def test_cval_padding_and_sigma_scale_match_monai():
  shape, roi = (1, 10, 7), (6, 9)
  kernel, gain = _kernel(2), _position_gain(roi)
  x = np.random.default_rng(1).normal(size=shape + (CHANNELS,)).astype(np.float32)
  theirs = monai.inferers.sliding_window_inference(
    torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))),
    roi,
    2,
    _torch_predictor(kernel, gain),
    overlap=(0.6, 0.1),
    mode="gaussian",
    sigma_scale=(0.3, 0.2),
    cval=0.7,
  )
  ours = sw.sliding_window_inference(
    x,
    roi,
    2,
    _jax_predictor,
    overlap=(0.6, 0.1),
    mode="gaussian",
    sigma_scale=(0.3, 0.2),
    cval=0.7,
    predictor_args=(kernel, gain),
  )
  assert float(np.max(np.abs(np.asarray(ours) - np.moveaxis(theirs.numpy(), 1, -1)))) <= TOLERANCE


@pytest.mark.parametrize(
  "shape, roi, overlap",
  [
    ((20, 17, 9), (8, 8, 12), 0.25),
    ((33, 7), (8, 7), 0.5),
    ((5, 64), (5, 16), (0.0, 0.9)),
    ((9,), (4,), 0.99),
  ],
)
def test_window_starts_match_monai(shape, roi, overlap):
  padded = tuple(max(s, r) for s, r in zip(shape, roi))
  overlaps = overlap if isinstance(overlap, tuple) else (overlap,) * len(shape)
  interval = _get_scan_interval(padded, roi, len(shape), overlaps)
  theirs = [[s.start for s in window] for window in dense_patch_slices(padded, roi, interval)]
  np.testing.assert_array_equal(sw.window_starts(shape, roi, overlap), theirs)


def test_importance_map_matches_monai():
  from monai.data.utils import compute_importance_map

  for roi, scale in (((8, 7, 12), 0.125), ((16, 5), (0.3, 0.05))):
    theirs = compute_importance_map(roi, mode="gaussian", sigma_scale=scale).numpy()
    np.testing.assert_allclose(sw.importance_map(roi, "gaussian", scale), theirs, rtol=1e-6)
  assert sw.importance_map((4, 5, 3), "gaussian", 0.05).min() == pytest.approx(1e-3)


def test_grid_shape_puts_every_window_on_the_grid():
  shape, roi, overlap = (21, 17, 5), (8, 8, 8), 0.25
  bucket = sw.grid_shape(shape, roi, overlap)
  assert bucket == (26, 20, 8)  # roi + k * 6 along the first two axes, the roi along the last
  starts = sw.window_starts(bucket, roi, overlap)
  assert np.all(starts % 6 == 0) and starts.max(0).tolist() == [18, 12, 0]


def test_one_program_per_shape_and_identity_is_exact():
  traces = []

  def predictor(windows, scale):
    traces.append(windows.shape)  # runs only while jax traces
    return windows * scale

  rng = np.random.default_rng(2)
  first = rng.normal(size=(1, 13, 10, 11, 1)).astype(np.float32)
  second = rng.normal(size=first.shape).astype(np.float32)
  kwargs = dict(roi_size=(6, 6, 6), sw_batch_size=4, predictor=predictor, mode="gaussian")
  out = sw.sliding_window_inference(first, predictor_args=(jnp.float32(1.0),), **kwargs)
  traced_once = len(traces)
  assert traced_once > 0
  # Blending identical predictions returns them: the weights are normalised per voxel.
  np.testing.assert_allclose(out, first, atol=1e-6)
  out = sw.sliding_window_inference(second, predictor_args=(jnp.float32(2.0),), **kwargs)
  assert len(traces) == traced_once  # new values and parameters: no new trace
  np.testing.assert_allclose(out, 2 * second, atol=1e-5)
  sw.sliding_window_inference(first[:, :12], predictor_args=(jnp.float32(1.0),), **kwargs)
  assert len(traces) > traced_once  # a new shape is a new program


def test_runs_under_jit_and_casts_the_output():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 9, 9, 1)), jnp.float32)

  def predictor(windows):
    return jnp.concatenate([windows, -windows], axis=-1)

  run = jax.jit(
    lambda v: sw.sliding_window_inference(
      v, 4, 3, predictor, overlap=0.5, output_dtype=jnp.bfloat16
    )
  )
  out = run(x)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 9, 9, 2)
  np.testing.assert_allclose(np.asarray(out, np.float32)[..., 1], -x[..., 0], atol=2e-2)


def test_bad_arguments_raise_clear_errors():
  x = jnp.zeros((1, 8, 8, 1))
  identity = lambda w: w
  with pytest.raises(ValueError, match="overlap"):
    sw.sliding_window_inference(x, 4, 1, identity, overlap=1.0)
  with pytest.raises(ValueError, match="channels-last"):
    sw.sliding_window_inference(x, (4, 4, 4), 1, identity)
  with pytest.raises(ValueError, match="sw_batch_size"):
    sw.sliding_window_inference(x, 4, 0, identity)
  with pytest.raises(ValueError, match="mode"):
    sw.sliding_window_inference(x, 4, 1, identity, mode="linear")
  with pytest.raises(ValueError, match="predictor must map"):
    sw.sliding_window_inference(x, 4, 2, lambda w: w[:, :2])
