"""Pairs of handwritten digits for the ICON digits demo (seed 001).

Two sources, neither downloads anything at run time:

* ``'mnist'``: real MNIST read through TFDS from a local ``data_dir`` where it was prepared
  before (``tfds.builder('mnist', data_dir=...)``; ``download=False``). Reading needs the
  prepared files in a format TFDS can serve without TensorFlow (ArrayRecord).
* ``'sklearn'``: scikit-learn's bundled 8x8 digits (about 180 per class), each upsampled with a
  cubic spline to a ``0.7 * size`` square and centred on a ``size x size`` black canvas, the
  way MNIST centres a 20x20 digit in 28x28.

``'auto'`` takes MNIST when it is available locally and falls back to scikit-learn otherwise.

A pair is two different images of the same digit class: ``{'moving', 'fixed'}``, each float32
``[H, W, 1]`` with intensities in ``[0, 1]``. Training pairs come from one class and evaluation
pairs from another, so evaluation measures how the learned registration generalises.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Literal

import grain
import numpy as np
from scipy import ndimage

from mammojax.data.constants import SPLITS

log = logging.getLogger("mammojax")

Source = Literal["auto", "mnist", "sklearn"]


class DigitsUnavailableError(RuntimeError):
  """MNIST was asked for (``source='mnist'``) but is not prepared in the given TFDS dir."""


@dataclasses.dataclass(frozen=True)
class DigitPairsSpec:
  """Which pairs to make.

  Attributes:
    source: ``'auto'``, ``'mnist'`` or ``'sklearn'`` (module docstring).
    size: output height and width in pixels (MNIST is 28).
    train_digit: class of the training pairs (the seed trains on 5s).
    eval_digit: class of the validation and test pairs (the seed evaluates on 7s).
    num_train, num_val, num_test: number of pairs per split.
    tfds_data_dir: TFDS data directory holding a prepared ``mnist`` ('' = TFDS's default).
    seed: the pairing is a deterministic function of it.
  """

  source: Source = "auto"
  size: int = 28
  train_digit: int = 5
  eval_digit: int = 7
  num_train: int = 4096
  num_val: int = 256
  num_test: int = 256
  tfds_data_dir: str = ""
  seed: int = 0

  def count(self, split: str) -> int:
    return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


class DigitPairSource:
  """Random-access pairs (a Grain source): index ``i`` -> ``{'moving', 'fixed'}`` ``[H, W, 1]``."""

  def __init__(self, images: np.ndarray, pairs: np.ndarray):
    self._images = images
    self._pairs = pairs

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    moving, fixed = self._pairs[index]
    return {"moving": self._images[moving][..., None], "fixed": self._images[fixed][..., None]}


def digit_pairs(spec: DigitPairsSpec, split: str) -> grain.MapDataset:
  """The pairs of ``split`` as an unshuffled ``grain.MapDataset``."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  digit = spec.train_digit if split == "train" else spec.eval_digit
  # MNIST has its own test images; scikit-learn's digits have no split, but train and
  # evaluation pairs never share a class, so they never share an image either.
  images, labels, _ = load_digit_images(
    spec.source, spec.size, spec.tfds_data_dir, "train" if split == "train" else "test"
  )
  images = images[labels == digit]
  if len(images) < 2:
    raise ValueError(f"digit {digit} has {len(images)} images in the {split} source; need >= 2")
  rng = np.random.default_rng([spec.seed, SPLITS.index(split), digit])
  count = spec.count(split)
  moving = rng.integers(0, len(images), count)
  # A different partner for each moving image: offset by 1..len-1 modulo len.
  fixed = (moving + rng.integers(1, len(images), count)) % len(images)
  return grain.MapDataset.source(DigitPairSource(images, np.stack([moving, fixed], axis=1)))


def load_digit_images(
  source: Source = "auto", size: int = 28, tfds_data_dir: str = "", mnist_split: str = "train"
) -> tuple[np.ndarray, np.ndarray, str]:
  """Digit images ``[N, size, size]`` float32 in ``[0, 1]``, labels ``[N]`` int, source used."""
  if source not in ("auto", "mnist", "sklearn"):
    raise ValueError(f"digits source must be 'auto', 'mnist' or 'sklearn', got {source!r}")
  if source in ("auto", "mnist"):
    try:
      images, labels = mnist_images(tfds_data_dir, mnist_split)
      return _resize_stack(images, size), labels, "mnist"
    except DigitsUnavailableError as e:
      if source == "mnist":
        raise
      log.info("MNIST not available locally (%s); using scikit-learn's 8x8 digits", e)
  images, labels = sklearn_digit_images(size)
  return images, labels, "sklearn"


def mnist_images(tfds_data_dir: str = "", split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """MNIST ``[N, 28, 28]`` float32 in ``[0, 1]`` and labels, from a locally prepared TFDS copy.

  Raises:
    DigitsUnavailableError: TFDS is missing, MNIST is not prepared under ``tfds_data_dir``, or
      its files cannot be read without TensorFlow. Nothing is downloaded.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DigitsUnavailableError(f"tensorflow_datasets is not installed ({e})") from None
  data_dir = tfds_data_dir or None
  try:
    builder = tfds.builder("mnist", data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown / broken builders.
    raise DigitsUnavailableError(f"no TFDS mnist builder ({type(e).__name__}: {e})") from None
  if not os.path.isdir(str(builder.data_path)) or not builder.info.splits:
    raise DigitsUnavailableError(
      f"mnist is not prepared in {builder.data_dir}; prepare it once "
      "with tfds (download_and_prepare) or use source='sklearn'"
    )
  try:
    records = builder.as_data_source(split=split)
    images = np.stack([np.asarray(records[i]["image"]) for i in range(len(records))])
    labels = np.asarray([int(records[i]["label"]) for i in range(len(records))])
  except Exception as e:  # e.g. tfrecord files, which need TensorFlow to read.
    raise DigitsUnavailableError(
      f"cannot read the prepared mnist at {builder.data_path} "
      f"without TensorFlow ({type(e).__name__}: {e}); re-prepare "
      "it with file_format='array_record'"
    ) from None
  return images.reshape(len(images), 28, 28).astype(np.float32) / 255.0, labels


def sklearn_digit_images(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1797 bundled 8x8 digits as smooth ``[N, size, size]`` float32 in [0, 1].

  Each digit is upsampled (cubic spline, clipped to [0, 1]) to a ``round(0.7 * size)`` square
  and centred on a black canvas, so strokes have MNIST-like width and a margin to move in.
  """
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  if size < 8:
    raise ValueError(f"digit size must be >= 8 pixels, got {size}")
  digits = load_digits()
  small = digits.images.astype(np.float32) / 16.0
  inner = max(int(round(0.7 * size)), 8)
  zoomed = np.clip(ndimage.zoom(small, (1, inner / 8, inner / 8), order=3), 0.0, 1.0)
  start = (size - inner) // 2
  canvas = np.zeros((len(small), size, size), np.float32)
  canvas[:, start : start + inner, start : start + inner] = zoomed
  return canvas, digits.target.astype(np.int64)


def _resize_stack(images: np.ndarray, size: int) -> np.ndarray:
  if images.shape[1:] == (size, size):
    return images
  factor = (1, size / images.shape[1], size / images.shape[2])
  return np.clip(ndimage.zoom(images, factor, order=1), 0.0, 1.0).astype(np.float32)
