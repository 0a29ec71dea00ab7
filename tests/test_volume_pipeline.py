"""The 3-D volume pipeline: decoding, positive / negative crops (ratio, bounds, fallbacks,
padding), flips and quarter turns shared by volume and label, intensity jitter that keeps
missing contrasts zero, seeded replay, and padding to a multiple."""

import grain
import numpy as np
import pytest

from mammojax.data import records
from mammojax.data.pipelines import batching
from mammojax.data.pipelines import volume as vp
from mammojax.data.synthetic import brain_volumes

CROP = (8, 8, 8)


def _element(shape=(48, 48, 48), channels=3, seed=0):
  """A head (non-zero) in the central two thirds of ``shape`` (32^3 of 48^3), a 4^3 lesion at
  its centre; the last contrast is missing."""
  rng = np.random.default_rng(seed)
  volume = np.zeros(shape + (channels,), np.float32)
  inner = tuple(slice(s // 6, s - s // 6) for s in shape)
  volume[inner] = rng.uniform(0.5, 2.0, volume[inner].shape)
  volume[..., -1] = 0
  label = np.zeros(shape, np.int32)
  label[tuple(slice(s // 2 - 2, s // 2 + 2) for s in shape)] = 1
  present = np.ones(channels, np.int32)
  present[-1] = 0
  return {"volume": volume, "label": label, "contrast_present": present, "has_mask": np.int32(1)}


def _window(array, origin, size=CROP):
  return array[tuple(slice(o, o + s) for o, s in zip(origin, size))]


def test_crop_positive_fraction_follows_pos_neg_and_crops_lie_in_the_volume():
  element = _element()
  crop = vp.RandomCropByPosNeg(CROP, pos=1, neg=3)
  positives = 0
  for i in range(400):
    out = crop.random_map(element, np.random.default_rng([0, i]))
    origin = out["crop_origin"]
    assert out["volume"].shape == CROP + (3,) and out["label"].shape == CROP
    assert out["volume"].dtype == np.float32 and out["label"].dtype == np.int32
    assert (origin >= 0).all() and (origin + CROP <= 48).all()
    np.testing.assert_array_equal(out["volume"], _window(element["volume"], origin))
    np.testing.assert_array_equal(out["label"], _window(element["label"], origin))
    # Centres here are far from the faces, so the centre voxel is the one drawn.
    centre = tuple(origin + np.asarray(CROP) // 2)
    if element["label"][centre]:
      positives += 1
      assert out["label"].any()  # a positive crop holds foreground
    else:
      assert element["volume"][centre].any()  # a negative centre lies inside the head
  # Binomial(400, 0.25): mean 100, std 8.7.
  assert 70 < positives < 130, positives


def test_crop_is_clipped_at_the_faces_and_falls_back_without_foreground():
  element = _element()
  element["label"][:] = 0
  element["label"][0, 0, 0] = 1
  element["volume"][0, 0, 0] = 1.0
  only_positive = vp.RandomCropByPosNeg(CROP, pos=1, neg=0)
  out = only_positive.random_map(element, np.random.default_rng(0))
  np.testing.assert_array_equal(out["crop_origin"], [0, 0, 0])
  assert out["label"][0, 0, 0] == 1
  element["label"][:] = 0  # an empty mask: negative crops inside the head
  for i in range(20):
    out = only_positive.random_map(element, np.random.default_rng(i))
    assert not out["label"].any()
    assert element["volume"][tuple(out["crop_origin"] + np.asarray(CROP) // 2)].any()
  # A one-voxel head (rejection sampling misses it; the listed candidates find it).
  element["volume"][:] = 0
  element["volume"][20, 21, 22, 0] = 1.0
  out = vp.RandomCropByPosNeg(CROP, pos=0, neg=1).random_map(element, np.random.default_rng(0))
  np.testing.assert_array_equal(out["crop_origin"], [16, 17, 18])
  element["label"][:] = 1  # no background at all: positive crops
  out = vp.RandomCropByPosNeg(CROP, pos=0, neg=1).random_map(element, np.random.default_rng(0))
  assert out["label"].all()


def test_small_volumes_are_padded_and_num_samples_stacks_crops():
  rng = np.random.default_rng(0)
  element = {"volume": rng.uniform(1, 2, (6, 10, 12, 3)).astype(np.float32)}
  element["label"] = np.zeros((6, 10, 12), np.int32)
  out = vp.RandomCropByPosNeg(CROP).random_map(element, np.random.default_rng(0))
  assert out["volume"].shape == CROP + (3,) and out["label"].shape == CROP
  d, h, w = out["crop_origin"]
  assert d == -1 and 0 <= h <= 2 and 0 <= w <= 4  # 6 -> 8: one zero slice before, one after
  np.testing.assert_array_equal(out["volume"][1:7], element["volume"][:, h : h + 8, w : w + 8])
  assert not out["volume"][0].any() and not out["volume"][7].any()
  with pytest.raises(ValueError, match="'volume'"):
    vp.RandomCropByPosNeg(CROP, allow_pad=False).random_map(element, np.random.default_rng(0))
  many = vp.RandomCropByPosNeg(CROP, num_samples=3).random_map(_element(), np.random.default_rng(0))
  assert many["volume"].shape == (3,) + CROP + (3,) and many["crop_origin"].shape == (3, 3)
  for crop, origin in zip(many["volume"], many["crop_origin"]):
    np.testing.assert_array_equal(crop, _window(_element()["volume"], origin))
  flipped = vp.RandomFlip3D(p=1.0).random_map(many, np.random.default_rng(0))
  np.testing.assert_array_equal(flipped["label"], many["label"][:, ::-1, ::-1, ::-1])
  np.testing.assert_array_equal(flipped["volume"], many["volume"][:, ::-1, ::-1, ::-1])


def test_missing_fields_are_named():
  element = _element()
  del element["label"]
  for transform in (vp.RandomCropByPosNeg(CROP), vp.RandomFlip3D(), vp.RandomRotate90()):
    with pytest.raises(ValueError, match="'label'"):
      transform.random_map(element, np.random.default_rng(0))
  with pytest.raises(ValueError, match="'label'"):
    vp.PadToMultiple(16).map(element)
  with pytest.raises(ValueError, match="'contrast_present'"):
    vp.RandomIntensityScaleShift().random_map({"volume": element["volume"]}, None)
  with pytest.raises(ValueError, match="'volume'"):
    vp.volume_example({"contrast_present": np.ones(2, np.int32)})


def _labelled(seed=0):
  """Volume and label with label = (channel 0 > 1), so any mismatch shows."""
  rng = np.random.default_rng(seed)
  volume = rng.uniform(0, 2, (6, 8, 8, 2)).astype(np.float32)
  present = np.ones(2, np.int32)
  return {
    "volume": volume,
    "label": (volume[..., 0] > 1).astype(np.int32),
    "contrast_present": present,
  }


def test_flips_and_quarter_turns_move_volume_and_label_together_and_invert():
  element = _labelled()
  seen_k, seen_flips = set(), set()
  for i in range(40):
    rng = np.random.default_rng(i)
    flipped = vp.RandomFlip3D(p=0.5).random_map(element, rng)
    rotated = vp.RandomRotate90(p=0.75, plane=(1, 2)).random_map(flipped, rng)
    for out in (flipped, rotated):
      np.testing.assert_array_equal(out["label"], (out["volume"][..., 0] > 1).astype(np.int32))
      assert out["volume"].shape == element["volume"].shape
      assert out["label"].dtype == np.int32 and out["volume"].dtype == np.float32
    # Exactly one flip set and one turn explain the output; undoing them restores the input.
    flips = [
      axes
      for axes in ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))
      if np.array_equal(np.flip(element["volume"], axes), flipped["volume"])
    ]
    turns = [
      k
      for k in range(4)
      if np.array_equal(np.rot90(flipped["volume"], k, (1, 2)), rotated["volume"])
    ]
    assert len(flips) == 1 and len(turns) == 1
    seen_flips.add(flips[0])
    seen_k.add(turns[0])
    for key in ("volume", "label"):
      undone = np.flip(np.rot90(rotated[key], -turns[0], (1, 2)), flips[0])
      np.testing.assert_array_equal(undone, element[key])
  assert seen_k == {0, 1, 2, 3} and len(seen_flips) >= 6
  with pytest.raises(ValueError, match="sides 6 and 8"):
    vp.RandomRotate90(p=1.0, plane=(0, 1)).random_map(element, np.random.default_rng(0))


def test_intensity_jitter_is_per_contrast_and_leaves_missing_contrasts_zero():
  element = _element(shape=(12, 12, 12))
  transform = vp.RandomIntensityScaleShift(factors=0.1, offsets=0.1)
  factors = []
  for i in range(10):
    out = transform.random_map(element, np.random.default_rng(i))
    assert out["volume"].dtype == np.float32
    assert not out["volume"][..., -1].any()  # the missing contrast
    for c in range(2):
      x, y = element["volume"][..., c].ravel(), out["volume"][..., c].ravel()
      slope, intercept = np.polyfit(x, y, 1)
      assert 0.9 - 1e-4 <= slope <= 1.1 + 1e-4 and abs(intercept) <= 0.1 + 1e-4
      factors.append(slope)
  assert np.std(factors) > 0.01  # drawn per contrast and per example


def test_same_seed_replays_and_positions_differ_in_a_grain_pipeline():
  elements = [_element(shape=(16, 16, 16), seed=s) for s in range(4)]
  transforms = vp.train_transforms(CROP)

  def pipeline():
    ds = grain.MapDataset.source(elements).seed(5)
    for t in transforms:
      ds = ds.random_map(t)
    return ds

  first, second = pipeline(), pipeline()
  for i in range(4):
    for key in ("volume", "label", "crop_origin"):
      np.testing.assert_array_equal(first[i][key], second[i][key])
  same = [_element(shape=(16, 16, 16))] * 2
  ds = grain.MapDataset.source(same).seed(5).random_map(transforms[0]).random_map(transforms[1])
  assert not np.array_equal(ds[0]["volume"], ds[1]["volume"])  # same volume, another draw

  def batches(state=None, count=3):
    it = batching.train_iterator(
      grain.MapDataset.source(elements),
      seed=1,
      global_batch_size=2,
      process_index=0,
      process_count=1,
      read_threads=1,
      augmentations=transforms,
    )
    if state is not None:
      it.set_state(state)
    return it, [next(it) for _ in range(count)]

  it, _ = batches(count=1)
  state = it.get_state()
  _, expected = batches(count=3)
  _, resumed = batches(state, count=2)
  for a, b in zip(expected[1:], resumed):
    assert a["volume"].shape == (2,) + CROP + (3,) and a["label"].dtype == np.int32
    np.testing.assert_array_equal(a["volume"], b["volume"])


def test_pad_to_multiple_records_the_original_shape():
  element = _element(shape=(17, 32, 33))
  out = vp.PadToMultiple(16).map(element)
  assert out["volume"].shape == (32, 32, 48, 3) and out["label"].shape == (32, 32, 48)
  np.testing.assert_array_equal(out["original_shape"], [17, 32, 33])
  assert out["original_shape"].dtype == np.int32
  np.testing.assert_array_equal(
    vp.crop_to_original(out["volume"], out["original_shape"]), element["volume"]
  )
  assert not out["label"][17:].any() and not out["volume"][:, :, 33:].any()
  assert vp.PadToMultiple((1, 1, 8)).map(element)["volume"].shape == (17, 32, 40, 3)


def test_volume_example_and_dataset_from_synthetic_records(tmp_path):
  spec = brain_volumes.SyntheticVolumeSpec(num_train=2, num_val=1, num_test=1, size=(16, 16, 16))
  record = brain_volumes.generate_example(spec, "train", 0)
  example = vp.volume_example(records.encode_example(record))
  assert set(example) == {"volume", "label", "contrast_present", "has_mask"}
  assert example["volume"].dtype == np.float32 and example["volume"].shape == (16, 16, 16, 7)
  assert example["label"].dtype == np.int32 and example["has_mask"] == 1
  np.testing.assert_array_equal(example["label"], record["mask"])
  unlabelled = vp.volume_example({k: v for k, v in record.items() if k not in ("mask", "has_mask")})
  assert unlabelled["has_mask"] == 0 and not unlabelled["label"].any()
  ds = vp.volume_dataset(brain_volumes.write_dataset(str(tmp_path), spec), "train")
  assert len(ds) == 2
  np.testing.assert_array_equal(ds[0]["volume"], example["volume"])
  padded = ds.map(vp.PadToMultiple(16))[1]
  assert padded["volume"].shape == (16, 16, 16, 7)
