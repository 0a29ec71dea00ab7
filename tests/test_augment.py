"""Host-side augmentations: consistency between current and prior, seeding, Grain use."""

import pickle

import grain
import numpy as np
import pytest
from scipy import ndimage

from mammojax.data.pipelines import augment


def _pair(shift=(1.5, -2.0), size=(40, 36)):
  """A smooth prior, the current image it maps to, and their constant displacement."""
  rng = np.random.default_rng(0)
  prior = ndimage.gaussian_filter(rng.normal(size=size), 3).astype(np.float32)
  grid = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)
  displacement = np.broadcast_to(np.asarray(shift, np.float32), size + (2,)).copy()
  current = ndimage.map_coordinates(prior, grid + displacement.transpose(2, 0, 1), order=1)
  return {
    "current_image": current[..., None],
    "previous_image": prior[..., None],
    "displacement": displacement,
    "has_prior": np.int32(1),
  }


def _alignment_error(example, margin=8):
  """Mean |prior(y + u(y)) - current(y)| over the interior."""
  prior = example["previous_image"][..., 0]
  grid = np.mgrid[0 : prior.shape[0], 0 : prior.shape[1]].astype(np.float32)
  warped = ndimage.map_coordinates(
    prior, grid + example["displacement"].transpose(2, 0, 1), order=1
  )
  diff = np.abs(warped - example["current_image"][..., 0])
  return float(diff[margin:-margin, margin:-margin].mean())


def test_pair_fixture_is_aligned_and_misalignment_is_detected():
  example = _pair()
  assert _alignment_error(example) < 1e-5
  broken = dict(example, displacement=example["displacement"] * -1)
  assert _alignment_error(broken) > 1e-2


def test_flip_keeps_images_and_displacement_consistent():
  example = _pair()
  out = augment.RandomFlip(p=1.0).random_map(example, np.random.default_rng(0))
  np.testing.assert_array_equal(out["current_image"], example["current_image"][:, ::-1])
  np.testing.assert_array_equal(out["previous_image"], example["previous_image"][:, ::-1])
  assert _alignment_error(out) < 1e-5
  same = augment.RandomFlip(p=0.0).random_map(example, np.random.default_rng(0))
  assert same is example


def test_affine_keeps_alignment_and_fills_background():
  example = _pair()
  transform = augment.RandomAffine(rotation_deg=10.0, scale=0.1, shift=0.05)
  out = transform.random_map(example, np.random.default_rng(3))
  assert not np.allclose(out["current_image"], example["current_image"])
  assert out["current_image"].shape == (40, 36, 1)
  assert out["current_image"].dtype == np.float32
  assert _alignment_error(out, margin=10) < 0.05 * np.abs(example["current_image"]).mean()
  assert out["current_image"].min() >= example["current_image"].min() - 1e-6
  # Without the displacement correction the pair would be misaligned.
  naive = dict(out, displacement=example["displacement"])
  assert _alignment_error(naive, margin=10) > 2 * _alignment_error(out, margin=10)


def test_intensity_jitter_independent_float_only_and_skips_absent_prior():
  example = _pair()
  jitter = augment.IntensityJitter(contrast=0.2, brightness=0.2)
  out = jitter.random_map(example, np.random.default_rng(1))
  a = out["current_image"] - example["current_image"]
  b = out["previous_image"] - example["previous_image"]
  assert np.abs(a).max() > 0 and np.abs(b).max() > 0
  absent = dict(example, previous_image=np.zeros_like(example["previous_image"]))
  assert not jitter.random_map(absent, np.random.default_rng(1))["previous_image"].any()
  with pytest.raises(TypeError, match="float images"):
    jitter.random_map(
      {"current_image": np.ones((4, 4), np.uint16), "previous_image": np.ones((4, 4), np.uint16)},
      np.random.default_rng(0),
    )


def test_seeded_grain_pipeline_is_reproducible_and_transforms_pickle():
  transforms = augment.train_augmentations(augment.AugmentConfig())
  assert [type(t).__name__ for t in transforms] == ["RandomFlip", "RandomAffine", "IntensityJitter"]
  assert all(type(pickle.loads(pickle.dumps(t))) is type(t) for t in transforms)
  examples = [_pair(shift=(float(i), 0.0)) for i in range(4)]

  def run(seed):
    ds = grain.MapDataset.source(examples).seed(seed)
    for t in transforms:
      ds = ds.random_map(t)
    return [ds[i]["current_image"] for i in range(len(examples))]

  first, again, other = run(0), run(0), run(1)
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(first, other))
  assert (
    augment.train_augmentations(
      augment.AugmentConfig(flip_p=0, rotation_deg=0, scale=0, shift=0, contrast=0, brightness=0)
    )
    == []
  )
