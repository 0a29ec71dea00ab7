"""Whole-volume segmentation of files by a trained run or a converted MONAI network (the engine
of ``python -m mammojax.segment``).

Two sources of a network:

* a training run (:func:`from_run`): its task, best or latest checkpoint, contrasts
  (``data.contrasts``, one input file each, in that order; an empty entry is a missing optional
  contrast) and the record grid of its data. NIfTI inputs go through the volume ingest's own
  preprocessing (:func:`mammojax.data.ingest.volume_csv.preprocess_contrasts`: crop to the
  non-zero box, resample to the record grid, z-score per contrast), the network runs over the
  record grid by sliding windows of the training crop, and the logits are resampled back
  (trilinear) onto the input grid before the argmax;
* a converted checkpoint (:func:`from_converted`, ``python -m mammojax.convert unetr|unet3d``):
  NIfTI inputs are z-scored per contrast over their non-zero voxels on their own grid (MONAI
  networks come with no record of their preprocessing: bring the volumes at the spacing the
  network was trained on); windows of the network's ``img_size`` (UNETR) or of ``roi``.

A ``.npy`` input ``[D, H, W, C]`` is the network's input as it is, with no preprocessing, and
the outputs are on its grid, so results compare with other tools. NIfTI outputs keep the first
input file's affine and array orientation (the canonical reorientation the ingest applies is
undone).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mammojax.data.ingest import volume_csv
from mammojax.data.ingest.readers import read_nifti
from mammojax.models.segmentation.basic_unet import BasicUNet
from mammojax.models.segmentation.unetr import UNETR
from mammojax.tasks.segmentation import volume_logits

CONVERTED_KINDS = {"unetr": UNETR, "unet3d": BasicUNet}


@dataclasses.dataclass
class Segmenter:
  """A network ready to segment volumes.

  Attributes:
    model: the Flax network, ``[B, *roi, C] -> [B, *roi, K]``.
    variables: its variables.
    roi: the sliding-window sides.
    contrasts: names of the ``C`` input channels, in order.
    required: the channels an input must have (index into ``contrasts``).
    record_size: the grid the run's records were resampled to (None: the input's own grid).
    class_names: ``K`` names.
    source: where the weights came from (for the summary).
    overlap: the default window overlap (a run's ``eval.overlap``).
    blend: the default window blending (a run's ``eval.blend``).
  """

  model: Any
  variables: Any
  roi: tuple[int, ...]
  contrasts: tuple[str, ...]
  required: tuple[int, ...]
  record_size: tuple[int, int, int] | None
  class_names: tuple[str, ...]
  source: str
  overlap: float = 0.5
  blend: str = "gaussian"

  def logits(
    self,
    volume: np.ndarray,
    present: np.ndarray,
    *,
    overlap: float,
    blend: str,
    sw_batch_size: int,
  ) -> np.ndarray:
    """Float32 logits ``[D, H, W, K]`` of one network input ``[D, H, W, C]`` on its grid, whose
    contrasts ``present`` ``[C]`` were given."""
    out = volume_logits(
      self.model,
      self.variables,
      jnp.asarray(volume, jnp.float32)[None],
      self.roi,
      overlap=overlap,
      blend=blend,
      sw_batch_size=sw_batch_size,
      present=jnp.asarray(present, jnp.int32)[None],
    )
    return np.asarray(jax.device_get(out[0]), np.float32)


def from_run(workdir: str, checkpoint: str = "best") -> Segmenter:
  """The network of a ``segmentation`` training run."""
  from mammojax.runs.config_files import load_run_config  # pylint: disable=import-outside-toplevel
  from mammojax.runs.restore import restore_run  # pylint: disable=import-outside-toplevel

  config = load_run_config(workdir)
  if config.task != "segmentation":
    raise ValueError(
      f"--workdir {workdir} is a {config.task!r} run; segment takes segmentation runs "
      "(configs/unetr.py, configs/unet3d.py) or --model=unetr:DIR / unet3d:DIR"
    )
  run = restore_run(workdir, config, checkpoint=checkpoint, example_split="val")
  task = run.task
  contrasts = tuple(run.config.data.contrasts)
  required = tuple(contrasts.index(c) for c in run.config.data.required_contrasts)
  return Segmenter(
    model=task.model,
    variables=run.variables,
    roi=task.crop,
    contrasts=contrasts,
    required=required,
    record_size=tuple(int(s) for s in task.manifest["size"]),
    class_names=task.class_names,
    source=run.source,
    overlap=float(config.eval.overlap),
    blend=str(config.eval.blend),
  )


def from_converted(kind: str, directory: str, roi: Sequence[int] | None = None) -> Segmenter:
  """The network of a converted MONAI checkpoint (``source.json`` + ``variables/``)."""
  from mammojax.train.variable_store import load_variables, read_source  # pylint: disable=import-outside-toplevel

  if kind not in CONVERTED_KINDS:
    raise ValueError(f"--model={kind}:{directory}: KIND must be one of {sorted(CONVERTED_KINDS)}")
  source = read_source(directory, kind)
  fields = dict(source["model_fields"])
  if kind == "unetr":
    fields["img_size"] = tuple(fields["img_size"])
    window = tuple(fields["img_size"])
    if roi and tuple(roi) != window:
      raise ValueError(
        f"--roi={','.join(map(str, roi))}: a UNETR runs on windows of its img_size {window}"
      )
  else:
    fields["features"] = tuple(fields["features"])
    window = tuple(int(s) for s in (roi or (96, 96, 96)))
    if len(window) != 3 or any(s % 16 for s in window):
      raise ValueError(f"--roi={window}: give three sides, each a multiple of 16")
  channels = int(source["in_channels"])
  return Segmenter(
    model=CONVERTED_KINDS[kind](**fields),
    variables=load_variables(directory),
    roi=window,
    contrasts=tuple(f"channel_{i}" for i in range(channels)),
    required=(),
    record_size=None,
    class_names=tuple(f"class_{k}" for k in range(int(fields["out_channels"]))),
    source=f"{directory} (converted {kind})",
  )


@dataclasses.dataclass
class Inputs:
  """A subject's network input and the geometry to map outputs back.

  Attributes:
    volume: ``[D, H, W, C]`` float32 network input.
    fit: the ingest geometry (record-grid inputs) or None (the input's own grid).
    reference: the first NIfTI file (its affine and orientation for the outputs), or None.
    present: ``[C]`` which contrasts were given.
    spacing: the input grid's voxel spacing (mm), None for a ``.npy``.
  """

  volume: np.ndarray
  fit: volume_csv.VolumeFit | None
  reference: str | None
  present: np.ndarray
  spacing: tuple[float, float, float] | None = None


def read_inputs(segmenter: Segmenter, paths: Sequence[str]) -> Inputs:
  """The network input from ``--images``: one ``.npy`` ``[D, H, W, C]`` used as it is, or one
  NIfTI per contrast of ``segmenter.contrasts`` (empty = missing)."""
  channels = len(segmenter.contrasts)
  if len(paths) == 1 and paths[0].endswith(".npy"):
    return _read_array(paths[0], channels)
  if len(paths) != channels:
    raise ValueError(
      f"--images: give {channels} files, one per contrast {list(segmenter.contrasts)} in that "
      f"order (an empty entry for a missing one), or one .npy [D, H, W, {channels}]; got "
      f"{len(paths)}"
    )
  lacking = [segmenter.contrasts[i] for i in segmenter.required if not paths[i]]
  if lacking:
    raise ValueError(f"--images: the required contrast(s) {lacking} have no file")
  if not any(paths):
    raise ValueError("--images: every entry is empty")
  volumes = {i: read_nifti(p) for i, p in enumerate(paths) if p}
  first_index = min(volumes)
  first = volumes[first_index]
  for i, vol in volumes.items():
    if vol.voxels.shape != first.voxels.shape or not np.allclose(
      vol.affine, first.affine, atol=volume_csv.GRID_TOLERANCE_MM
    ):
      raise ValueError(
        f"--images[{i}] ({segmenter.contrasts[i]}) is on another voxel grid than "
        f"--images[{first_index}] (shape {vol.voxels.shape} vs {first.voxels.shape}); "
        "co-register the contrasts"
      )
  voxels = [volumes[i].voxels if i in volumes else None for i in range(channels)]
  present = np.asarray([v is not None for v in voxels], np.int32)
  if segmenter.record_size is not None:
    volume, fit = volume_csv.preprocess_contrasts(voxels, first.spacing, segmenter.record_size)
    return Inputs(volume.astype(np.float32), fit, paths[first_index], present, first.spacing)
  stack = np.zeros(first.voxels.shape + (channels,), np.float32)
  for i, v in enumerate(voxels):
    if v is not None:
      stack[..., i] = volume_csv.zscore_nonzero(v)
  return Inputs(stack, None, paths[first_index], present, first.spacing)


def _read_array(path: str, channels: int) -> Inputs:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--images: {path} does not exist")
  try:
    volume = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f"--images: {path} is not a readable .npy array ({e})") from None
  if volume.ndim != 4 or volume.shape[-1] != channels:
    raise ValueError(f"--images: {path} holds {volume.shape}; the network takes [D, H, W, {channels}]")
  if not np.all(np.isfinite(volume)):
    raise ValueError(f"--images: {path} holds NaN or infinite values")
  return Inputs(volume.astype(np.float32), None, None, np.ones(channels, np.int32))


def on_input_grid(logits: np.ndarray, inputs: Inputs) -> np.ndarray:
  """Logits ``[*grid, K]`` of the network's grid -> the input's grid ``[D, H, W, K]``."""
  if inputs.fit is None:
    return logits
  return volume_csv.restore_to_grid(logits, inputs.fit, order=1)


def to_file_orientation(array: np.ndarray, reference: str) -> np.ndarray:
  """``[D, H, W, ...]`` in the ingest's orientation (canonical RAS, axes z, y, x) -> the array
  orientation of the NIfTI file ``reference`` (``[X, Y, Z, ...]`` as its voxels are stored)."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel

  image = nib.load(reference)
  ras = np.moveaxis(array, (0, 1, 2), (2, 1, 0))  # (z, y, x) -> (x, y, z)
  to_file = nib.orientations.ornt_transform(
    nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.io_orientation(image.affine)
  )
  return nib.orientations.apply_orientation(ras, to_file)


def write_nifti_like(path: str, array: np.ndarray, reference: str) -> None:
  """Writes ``array`` (the reference file's array layout) with the reference's affine, under a
  temporary name first."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel

  image = nib.load(reference)
  # A new header, not a copy: the input's may hold free text (descrip, aux_file, db_name).
  out = nib.Nifti1Image(array, image.affine)
  out.set_qform(image.affine, code=int(image.header["qform_code"]) or 1)
  out.set_sform(image.affine, code=int(image.header["sform_code"]) or 1)
  out.header.set_xyzt_units(*image.header.get_xyzt_units())
  directory, name = os.path.split(path)
  temporary = os.path.join(directory, f".tmp-{os.getpid()}-{name}")
  try:
    nib.save(out, temporary)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
