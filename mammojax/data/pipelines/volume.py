"""Volume records (``mammojax.ingest --task=volume`` or the synthetic brain volumes) as 3-D
segmentation examples, and the host-side crops and augmentations of a training pipeline.

Examples are channels-last: ``volume`` float32 [D, H, W, C] (one channel per contrast, zeros for
a missing one), ``label`` int32 [D, H, W] (0 background, 1.. classes), ``contrast_present``
int32 [C], ``has_mask`` int32. Every transform keeps an example's keys and dtypes and gives
every example of a dataset the same shapes (so batches stack); it raises ``ValueError`` naming
the field when one is missing.

Random transforms are top-level, picklable ``grain.transforms.RandomMap`` s that draw only from
the generator Grain passes per element (seeded by the pipeline seed and the element's position
in the endless stream), so a pipeline is reproducible and replays exactly on resume:

- :class:`RandomCropByPosNeg`: MONAI's ``RandCropByPosNegLabel``: a crop centred on a
  foreground voxel with probability ``pos / (pos + neg)``, else on a background voxel inside
  the head (a non-zero voxel of any contrast, MONAI's ``image_threshold=0`` with the image
  given); the centre is moved so the crop lies in the volume;
- :class:`RandomFlip3D`, :class:`RandomRotate90`: volume and label together;
- :class:`RandomIntensityScaleShift`: MONAI's ``RandScaleIntensity`` + ``RandShiftIntensity``
  per contrast, on the acquired contrasts only (a missing contrast stays zero).

:class:`PadToMultiple` (deterministic) pads to a multiple of the network's stride for whole-volume
evaluation and records the original shape for :func:`crop_to_original`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from mammojax.data import records

VOLUME, LABEL, PRESENT, HAS_MASK = "volume", "label", "contrast_present", "has_mask"
CROP_ORIGIN, ORIGINAL_SHAPE = "crop_origin", "original_shape"
SPATIAL_KEYS = (VOLUME, LABEL)


def volume_example(record: bytes | dict[str, Any]) -> dict[str, Any]:
  """A volume record (encoded or decoded) -> ``volume`` float32 [D, H, W, C], ``label`` int32
  [D, H, W] (the record's ``mask``; zeros without one), ``contrast_present`` int32 [C],
  ``has_mask`` int32 (0 when the record has no mask: its label is not ground truth)."""
  record = records.decode_example(record) if isinstance(record, bytes) else record
  _require(record, (VOLUME, PRESENT), "volume record")
  volume = np.asarray(record[VOLUME], np.float32)
  present = np.asarray(record[PRESENT], np.int32)
  if volume.ndim != 4 or present.shape != volume.shape[-1:]:
    raise ValueError(
      f"volume record: 'volume' {volume.shape} must be [D, H, W, C] and 'contrast_present' "
      f"{present.shape} [C]"
    )
  if "mask" in record:
    label = np.asarray(record["mask"], np.int32)
    if label.shape != volume.shape[:3]:
      raise ValueError(f"volume record: 'mask' {label.shape} is not [D, H, W] {volume.shape[:3]}")
    has_mask = np.int32(record.get(HAS_MASK, 1))
  else:
    label, has_mask = np.zeros(volume.shape[:3], np.int32), np.int32(0)
  return {VOLUME: volume, LABEL: label, PRESENT: present, HAS_MASK: has_mask}


def volume_dataset(directory: str, split: str) -> grain.MapDataset:
  """The decoded examples (:func:`volume_example`) of one stored split of a volume dataset."""
  manifest = records.read_manifest(directory)
  if manifest["config"].get("task") != "volume":
    raise ValueError(
      f"{directory} holds {manifest['config'].get('task')!r} records, not volume records "
      "(python -m mammojax.ingest --task=volume, or the synthetic brain volumes)"
    )
  paths = records.shard_paths(directory, split)
  source = grain.sources.ArrayRecordDataSource(paths) if paths else []
  return grain.MapDataset.source(source).map(volume_example)


def train_transforms(
  crop_size: Sequence[int],
  *,
  pos: float = 1.0,
  neg: float = 1.0,
  flip_p: float = 0.5,
  rotate_p: float = 0.5,
  rotate_plane: tuple[int, int] = (1, 2),
  scale: float = 0.1,
  shift: float = 0.1,
) -> list[grain.transforms.RandomMap]:
  """Crop, flips, in-plane quarter turns and intensity jitter, in that order (a strength of 0
  leaves that transform out)."""
  out: list[grain.transforms.RandomMap] = [RandomCropByPosNeg(crop_size, pos=pos, neg=neg)]
  if flip_p > 0:
    out.append(RandomFlip3D(flip_p))
  if rotate_p > 0:
    out.append(RandomRotate90(rotate_p, plane=rotate_plane))
  if scale > 0 or shift > 0:
    out.append(RandomIntensityScaleShift(scale, shift))
  return out


class RandomCropByPosNeg(grain.transforms.RandomMap):
  """``num_samples`` crops of ``crop_size`` (d, h, w) centred on foreground / background voxels.

  As MONAI's ``RandCropByPosNegLabel(spatial_size, pos, neg, num_samples, image,
  image_threshold=0)``: each crop is positive with probability ``pos / (pos + neg)`` (its centre
  a uniformly drawn voxel with ``label > 0``) or negative (a voxel with ``label == 0`` and any
  contrast non-zero, i.e. inside the head); a subject without foreground gets negative crops,
  one without such background positive ones (MONAI's fallbacks). The centre is then moved so the
  crop lies inside the volume (crop start ``clip(centre - size // 2, 0, dim - size)``). A volume
  smaller than the crop along an axis is first padded with zeros at both ends, unless
  ``allow_pad`` is False (then it is a ``ValueError``).

  Output: ``volume`` [d, h, w, C], ``label`` [d, h, w] and ``crop_origin`` int32 [3] (the crop's
  first voxel in the input volume's coordinates; negative where padded). With
  ``num_samples > 1`` each becomes [N, ...]; batching then stacks them to [B, N, ...], which a
  task merges to [B * N, ...]; the later transforms act on the trailing axes and apply one draw
  to all N crops of a volume.
  """

  def __init__(
    self,
    crop_size: Sequence[int],
    pos: float = 1.0,
    neg: float = 1.0,
    num_samples: int = 1,
    allow_pad: bool = True,
  ):
    size = tuple(int(s) for s in crop_size)
    if len(size) != 3 or min(size) < 1:
      raise ValueError(f"crop_size {tuple(crop_size)!r} must be three positive sizes (d, h, w)")
    if pos < 0 or neg < 0 or pos + neg <= 0:
      raise ValueError(f"pos {pos} and neg {neg} must be >= 0 with a positive sum")
    if num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    self.crop_size = size
    self.pos_ratio = float(pos) / float(pos + neg)
    self.num_samples = int(num_samples)
    self.allow_pad = allow_pad

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    _require(element, SPATIAL_KEYS, type(self).__name__)
    volume, label = _spatial(element)
    if volume.ndim != 4 or volume.shape[:3] != label.shape:
      raise ValueError(
        f"{type(self).__name__} needs one 'volume' [D, H, W, C] and 'label' [D, H, W], got "
        f"{volume.shape} and {label.shape}"
      )
    before = [max(0, s - d) // 2 for s, d in zip(self.crop_size, label.shape)]
    if any(s > d for s, d in zip(self.crop_size, label.shape)):
      if not self.allow_pad:
        raise ValueError(
          f"crop_size {self.crop_size} is larger than the 'volume' {label.shape[:3]} and "
          "allow_pad is False"
        )
      pads = [(b, max(0, s - d) - b) for b, s, d in zip(before, self.crop_size, label.shape)]
      volume = np.pad(volume, pads + [(0, 0)])
      label = np.pad(label, pads)
    foreground = np.flatnonzero(label > 0)
    head = _Background(volume, label)
    volumes, labels, origins = [], [], []
    for _ in range(self.num_samples):
      positive = rng.random() < self.pos_ratio
      if positive and not foreground.size:
        positive = False
      centre = None if positive else head.draw(rng)
      if centre is None:  # positive, or the label covers the volume (MONAI's fallbacks)
        centre = np.unravel_index(foreground[rng.integers(foreground.size)], label.shape)
      start = [
        int(np.clip(c - s // 2, 0, d - s)) for c, s, d in zip(centre, self.crop_size, label.shape)
      ]
      window = tuple(slice(a, a + s) for a, s in zip(start, self.crop_size))
      volumes.append(volume[window])
      labels.append(label[window])
      origins.append(np.asarray(start, np.int32) - np.asarray(before, np.int32))
    out = dict(element)
    if self.num_samples == 1:
      out[VOLUME], out[LABEL], out[CROP_ORIGIN] = volumes[0].copy(), labels[0].copy(), origins[0]
    else:
      out[VOLUME], out[LABEL], out[CROP_ORIGIN] = map(np.stack, (volumes, labels, origins))
    return out


class RandomFlip3D(grain.transforms.RandomMap):
  """Mirrors ``volume`` and ``label`` along each spatial axis of ``axes`` (0 = D, 1 = H, 2 = W)
  independently with probability ``p`` (MONAI's ``RandFlip`` per axis)."""

  def __init__(self, p: float = 0.5, axes: Sequence[int] = (0, 1, 2)):
    if any(a not in (0, 1, 2) for a in axes):
      raise ValueError(f"axes {tuple(axes)!r} must be spatial axes among 0 (D), 1 (H), 2 (W)")
    self.p = float(p)
    self.axes = tuple(int(a) for a in axes)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    _require(element, SPATIAL_KEYS, type(self).__name__)
    flipped = tuple(a for a in self.axes if rng.random() < self.p)
    if not flipped:
      return element
    volume, label = _spatial(element)
    out = dict(element)
    out[VOLUME] = np.ascontiguousarray(np.flip(volume, [a - 4 for a in flipped]))
    out[LABEL] = np.ascontiguousarray(np.flip(label, [a - 3 for a in flipped]))
    return out


class RandomRotate90(grain.transforms.RandomMap):
  """With probability ``p`` turns ``volume`` and ``label`` by ``k`` quarter turns, ``k`` uniform in
  1..``max_k``, in ``plane`` (two spatial axes; MONAI's ``RandRotate90``). The two sides of the
  plane must be equal (a turn would otherwise change the shape and batches would not stack)."""

  def __init__(self, p: float = 0.5, plane: tuple[int, int] = (1, 2), max_k: int = 3):
    if len(plane) != 2 or plane[0] == plane[1] or any(a not in (0, 1, 2) for a in plane):
      raise ValueError(f"plane {tuple(plane)!r} must be two different spatial axes among 0, 1, 2")
    if not 1 <= max_k <= 3:
      raise ValueError(f"max_k must be 1, 2 or 3, got {max_k}")
    self.p = float(p)
    self.plane = (int(plane[0]), int(plane[1]))
    self.max_k = int(max_k)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    _require(element, SPATIAL_KEYS, type(self).__name__)
    turn = rng.random() < self.p
    k = int(rng.integers(1, self.max_k + 1))  # drawn always: one draw count per element
    volume, label = _spatial(element)
    a, b = (label.shape[x - 3] for x in self.plane)
    if a != b:
      raise ValueError(
        f"RandomRotate90 in plane {self.plane}: 'label' sides {a} and {b} differ; a quarter "
        "turn would change the shape (crop to equal sides first)"
      )
    if not turn:
      return element
    out = dict(element)
    out[VOLUME] = np.ascontiguousarray(np.rot90(volume, k, [x - 4 for x in self.plane]))
    out[LABEL] = np.ascontiguousarray(np.rot90(label, k, [x - 3 for x in self.plane]))
    return out


class RandomIntensityScaleShift(grain.transforms.RandomMap):
  """Per acquired contrast ``x * (1 + f) + o`` with ``f ~ U(-factors, factors)`` and
  ``o ~ U(-offsets, offsets)``, each applied with probability ``p`` (MONAI's
  ``RandScaleIntensity(factors)`` then ``RandShiftIntensity(offsets)``, drawn per channel). The
  whole channel changes (background too, as in MONAI); a contrast with ``contrast_present == 0``
  stays zero."""

  def __init__(self, factors: float = 0.1, offsets: float = 0.1, p: float = 1.0):
    self.factors = float(factors)
    self.offsets = float(offsets)
    self.p = float(p)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    _require(element, (VOLUME, PRESENT), type(self).__name__)
    volume = np.asarray(element[VOLUME])
    present = np.asarray(element[PRESENT]).astype(bool)
    if volume.dtype.kind != "f":
      raise ValueError(f"'volume' must be float for intensity jitter, got {volume.dtype}")
    if present.shape != volume.shape[-1:]:
      raise ValueError(f"'contrast_present' {present.shape} does not match 'volume' {volume.shape}")
    channels = present.size
    scale = np.where(rng.random(channels) < self.p, rng.uniform(-1, 1, channels), 0.0)
    shift = np.where(rng.random(channels) < self.p, rng.uniform(-1, 1, channels), 0.0)
    factor = np.where(present, 1.0 + self.factors * scale, 1.0).astype(volume.dtype)
    offset = np.where(present, self.offsets * shift, 0.0).astype(volume.dtype)
    out = dict(element)
    jittered = volume * factor
    jittered += offset
    out[VOLUME] = jittered
    return out


class PadToMultiple(grain.transforms.Map):
  """Pads ``volume`` and ``label`` with zeros at the end of D, H and W to a multiple of
  ``multiple`` and records ``original_shape`` int32 [3] for :func:`crop_to_original`."""

  def __init__(self, multiple: int | Sequence[int] = 16):
    multiples = (multiple,) * 3 if isinstance(multiple, int) else tuple(multiple)
    if len(multiples) != 3 or min(multiples) < 1:
      raise ValueError(f"multiple {multiple!r} must be a positive int or three of them")
    self.multiples = tuple(int(m) for m in multiples)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    _require(element, SPATIAL_KEYS, type(self).__name__)
    volume, label = _spatial(element)
    if volume.ndim != 4 or label.ndim != 3:
      raise ValueError(f"PadToMultiple needs one volume [D, H, W, C], got {volume.shape}")
    pads = [(0, -s % m) for s, m in zip(label.shape, self.multiples)]
    out = dict(element)
    out[VOLUME] = np.pad(volume, pads + [(0, 0)])
    out[LABEL] = np.pad(label, pads)
    out[ORIGINAL_SHAPE] = np.asarray(label.shape, np.int32)
    return out


class CenterCrop(grain.transforms.Map):
  """The central ``crop_size`` (d, h, w) of ``volume`` and ``label`` (zero-padded at both ends
  where the volume is smaller), for evaluating a model built for crops on whole records."""

  def __init__(self, crop_size: Sequence[int]):
    size = tuple(int(s) for s in crop_size)
    if len(size) != 3 or min(size) < 1:
      raise ValueError(f"crop_size {tuple(crop_size)!r} must be three positive sizes (d, h, w)")
    self.crop_size = size

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    _require(element, SPATIAL_KEYS, type(self).__name__)
    volume, label = _spatial(element)
    if volume.ndim != 4:
      raise ValueError(f"CenterCrop needs one volume [D, H, W, C], got {volume.shape}")
    pads = [
      (max(0, c - d) // 2, max(0, c - d) - max(0, c - d) // 2)
      for c, d in zip(self.crop_size, label.shape)
    ]
    volume, label = np.pad(volume, pads + [(0, 0)]), np.pad(label, pads)
    window = tuple(
      slice((d - c) // 2, (d - c) // 2 + c) for c, d in zip(self.crop_size, label.shape)
    )
    out = dict(element)
    out[VOLUME], out[LABEL] = volume[window].copy(), label[window].copy()
    return out


def crop_to_original(array: np.ndarray, original_shape: Sequence[int]) -> np.ndarray:
  """Undoes :class:`PadToMultiple` on an output ``[D', H', W', ...]`` (e.g. a probability map)."""
  d, h, w = (int(s) for s in original_shape)
  return array[:d, :h, :w]


class _Background:
  """Uniform draws among the background voxels inside the head (``label == 0`` and any contrast
  non-zero), or anywhere with ``label == 0`` when the head has none.

  Rejection sampling first: the head fills a good part of the volume, so a few uniform voxel
  draws find one without scanning all ``D * H * W * C`` values (a 96^3 x 7 scan costs ~15 ms);
  after ``TRIES`` misses the candidates are listed once. Both give the uniform distribution.
  """

  TRIES = 32

  def __init__(self, volume: np.ndarray, label: np.ndarray):
    self.volume, self.label = volume, label
    self.candidates: np.ndarray | None = None

  def draw(self, rng: np.random.Generator) -> tuple[int, ...] | None:
    """A voxel index, or None when every voxel is foreground."""
    if self.candidates is None:
      for _ in range(self.TRIES):
        voxel = np.unravel_index(int(rng.integers(self.label.size)), self.label.shape)
        if self.label[voxel] == 0 and np.any(self.volume[voxel] != 0):
          return voxel
      inside = np.any(self.volume != 0, axis=-1)
      self.candidates = np.flatnonzero((self.label == 0) & inside)
      if not self.candidates.size:
        self.candidates = np.flatnonzero(self.label == 0)
    if not self.candidates.size:
      return None
    return np.unravel_index(self.candidates[rng.integers(self.candidates.size)], self.label.shape)


def _require(element: dict[str, Any], keys: Sequence[str], where: str) -> None:
  missing = [k for k in keys if k not in element]
  if missing:
    raise ValueError(
      f"{where}: the example has no field {', '.join(map(repr, missing))} (it has "
      f"{sorted(element)}); decode records with volume_example first"
    )


def _spatial(element: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  volume, label = np.asarray(element[VOLUME]), np.asarray(element[LABEL])
  if volume.ndim < 4 or label.ndim != volume.ndim - 1:
    raise ValueError(
      f"'volume' {volume.shape} must be [..., D, H, W, C] and 'label' {label.shape} [..., D, H, W]"
    )
  return volume, label
