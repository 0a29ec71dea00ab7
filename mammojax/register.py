r"""Register one image pair by instance optimisation: ``python -m mammojax.register``.

  python -m mammojax.register --fixed=current.png --moving=prior.png --out=/tmp/reg
  python -m mammojax.register --fixed=a.nii.gz --moving=b.nii.gz --out=/tmp/reg --steps=300 \
      --similarity=lncc --lambda=1.0
  python -m mammojax.register --fixed=a.dcm --moving=b.dcm --out=/tmp/reg --model=RUN_OR_CKPT

Inputs: PNG or DICOM (2D) or NIfTI (3D), same shape and dimensionality. Intensities are
min-max scaled to [0, 1] per image. A transformation is optimised with Adam, coarse to fine
(``--levels``), to minimise ``similarity(moving(phi(x)), fixed(x)) + lambda * regularity``
(:mod:`mammojax.models.registration.instance`). By default ``phi`` is the exponential of a
stationary velocity field (``--transform=velocity``, scaling and squaring), so a smooth
deformation comes back without folds; ``--transform=displacement`` optimises ``u`` in
``phi(x) = x + u(x)`` directly. The optimisation starts from the identity or refines a trained
network's field (``--model``: a training run's workdir, or a converted checkpoint directory from
``python -m mammojax.convert icon``).

Writes to ``--out``:

* ``displacement.npy``: ``[H, W, 2]`` or ``[D, H, W, 3]`` float32, pixels, 'ij' order, such that
  ``warped(x) = moving(x + u(x))``; volumes also get ``displacement.nii.gz`` (the same field on
  the NIfTI's (x, y, z) voxel axes, components (x, y, z) in voxels, RAS+ canonical orientation,
  with the fixed volume's affine so it overlays the input in world coordinates);
* ``warped.npy`` and ``warped.png`` (2D) or ``warped.nii.gz`` (3D), in [0, 1] units;
* ``grid.png``: moving, fixed, warped and the deformed grid (the middle slice of a volume).

Prints one JSON object: similarity before and after, the fold count (negative Jacobian
determinants), the minimum Jacobian determinant, the steps and the output directory.

Refused before optimising, with one line on stderr and exit code 2: a non-finite or out-of-range
``--lambda``, ``--sigma`` or ``--lr``; ``--levels`` under 1 or ``--squaring_steps`` outside 0..20;
an image with fewer than 2 pixels along an axis, with
NaN or infinite values or with a single intensity (constant); ``--out`` that is (or lies under)
a file.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

from mammojax.atomic_files import atomic_write, write_npy_atomic
from mammojax.console import command_flags, fail, refuse_positional, run_program
from mammojax.models.registration.inputs import (
  RegistrationInputError,
  check_image,
  check_options,
)
from mammojax.models.registration.instance import (
  REGULARIZERS,
  SIMILARITIES,
  TRANSFORMS,
  register,
)

__all__ = ["predict_displacement", "read_pair", "register", "run", "write_outputs"]


# ----------------------------------------------------------------------------- inputs


def read_pair(fixed_path: str, moving_path: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """Both images as float32 in [0, 1] (``[H, W]`` or ``[D, H, W]``) and the fixed's geometry.

  Raises:
    RegistrationInputError: unreadable file, mismatched dimensionality or shape.
  """
  fixed, geometry = _read_any(fixed_path, "--fixed")
  moving, moving_geometry = _read_any(moving_path, "--moving")
  if fixed.ndim != moving.ndim:
    raise RegistrationInputError(
      f"--fixed {fixed_path} is {fixed.ndim}D {fixed.shape} but --moving {moving_path} is "
      f"{moving.ndim}D {moving.shape}: register a 2D image (PNG/DICOM) with a 2D image or a "
      "NIfTI volume with a NIfTI volume"
    )
  if fixed.shape != moving.shape:
    raise RegistrationInputError(
      f"--fixed has shape {fixed.shape} and --moving {moving.shape}: resample the moving "
      "image onto the fixed image's grid first (same pixel/voxel counts)"
    )
  if "spacing" in geometry and not np.allclose(
    geometry["spacing"], moving_geometry["spacing"], rtol=1e-3
  ):
    print(
      f"warning: voxel spacings differ (fixed {geometry['spacing']}, moving "
      f"{moving_geometry['spacing']}); displacements are in fixed voxels",
      file=sys.stderr,
    )
  check_image(fixed, f"--fixed {fixed_path}")
  check_image(moving, f"--moving {moving_path}")
  return _unit_range(fixed), _unit_range(moving), geometry


def check_out(out_dir: str) -> None:
  """Refuses an output directory that is, or lies under, an existing file (before any work)."""
  path = os.path.abspath(out_dir)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return
    path = parent
  if not os.path.isdir(path):
    where = "is a file" if path == os.path.abspath(out_dir) else f"lies under the file {path}"
    raise RegistrationInputError(
      f"--out {out_dir} {where}: give a new or existing directory for the outputs"
    )


def _read_any(path: str, flag: str) -> tuple[np.ndarray, dict]:
  from mammojax.data.constants import NIFTI_SUFFIXES  # pylint: disable=import-outside-toplevel
  from mammojax.data.ingest import readers  # pylint: disable=import-outside-toplevel

  try:
    if path.lower().endswith(NIFTI_SUFFIXES):
      volume = readers.read_nifti(path)
      if min(volume.voxels.shape) < 2:
        raise RegistrationInputError(
          f"{flag} {path}: NIfTI volume of shape {volume.voxels.shape} (z, y, x) has a single "
          "slice; register it as a 2D image (save the slice as PNG) or give a volume with at "
          "least 2 voxels along every axis"
        )
      return volume.voxels, {"spacing": volume.spacing, "affine": volume.affine}
    return readers.read_image(path).pixels, {}
  except readers.ImageReadError as e:
    raise RegistrationInputError(f"{flag}: {e}") from None


def _unit_range(image: np.ndarray) -> np.ndarray:
  low, high = float(image.min()), float(image.max())
  return ((image - low) / (high - low if high > low else 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------- trained networks


def predict_displacement(model_dir: str, fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
  """A trained network's displacement ``[*S, n]`` (pixels of the input grid) for this pair.

  ``model_dir`` is a training workdir (its ``config.json`` names the task; its ``best`` or
  latest checkpoint is loaded) or a converted ICON checkpoint
  (``python -m mammojax.convert icon``). The images are resized to the network's input size and
  the field back to theirs.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from mammojax.nn import warp as warp_lib  # pylint: disable=import-outside-toplevel
  from mammojax.train.init_state import load_pretrained  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(model_dir):
    raise RegistrationInputError(
      f"--model {model_dir} is not a directory (give a training "
      "workdir or a converted checkpoint directory)"
    )
  field_fn, input_shape = _network_for(model_dir)
  try:
    variables = load_pretrained(model_dir)
  except (FileNotFoundError, ValueError) as e:
    raise RegistrationInputError(f"--model: {e}") from None
  if len(input_shape) != fixed.ndim:
    raise RegistrationInputError(
      f"--model {model_dir} registers {len(input_shape)}D images; the inputs are {fixed.ndim}D"
    )
  moving_image, fixed_image = (
    jax.image.resize(jnp.asarray(x), input_shape, "linear")[None, ..., None]
    for x in (moving, fixed)
  )
  # [1, *input_shape, n] pixels of the input grid
  field = field_fn(variables, moving=moving_image, fixed=fixed_image)
  return np.asarray(warp_lib.resize_displacement(field, fixed.shape, align_corners=True)[0])


def _network_for(model_dir: str) -> tuple[Callable, tuple[int, ...]]:
  """``(field_fn(variables, moving=, fixed=), input_shape)`` of a registration run or of a
  converted ICON checkpoint."""
  from mammojax.runs import restore  # pylint: disable=import-outside-toplevel
  from mammojax.train.task import RegistrationTask  # pylint: disable=import-outside-toplevel

  if restore.is_workdir(model_dir):
    from mammojax import tasks  # pylint: disable=import-outside-toplevel
    from mammojax.runs.config_files import load_run_config  # pylint: disable=import-outside-toplevel

    try:
      config = load_run_config(model_dir)
    except ValueError as e:
      raise RegistrationInputError(f"--model: {e}") from None
    task = tasks.build_task(config)
    if not isinstance(task, RegistrationTask):
      raise RegistrationInputError(
        f"the run in {model_dir} (task {config.task!r}) is not a registration network"
      )
    return task.displacement, tuple(task.input_shape())
  source_path = os.path.join(model_dir, "source.json")
  if os.path.exists(source_path):
    with open(source_path) as f:
      source = json.load(f)
    if source.get("kind") == "icon":
      from mammojax.convert.icon import build_icon_network  # pylint: disable=import-outside-toplevel

      network = build_icon_network(source["model_fields"])

      def icon_field(variables, *, moving, fixed):
        return network.apply(variables, moving, fixed)

      return icon_field, tuple(source["input_shape"])
    raise RegistrationInputError(
      f"{source_path} describes a {source.get('kind')!r} checkpoint; "
      "--model takes registration networks (training runs of "
      "registration tasks, or `python -m mammojax.convert icon` output)"
    )
  raise RegistrationInputError(
    f"--model {model_dir} has neither config.json (a training run) "
    "nor source.json (a converted checkpoint)"
  )


# ----------------------------------------------------------------------------- outputs


def write_outputs(
  out_dir: str, result: dict[str, Any], fixed: np.ndarray, moving: np.ndarray, geometry: dict
) -> None:
  """Writes the files listed in the module docstring."""
  from mammojax.viz.registration import save_registration_figure  # pylint: disable=import-outside-toplevel

  os.makedirs(out_dir, exist_ok=True)
  displacement = result["displacement"].astype(np.float32)
  warped = result["warped"].astype(np.float32)
  write_npy_atomic(os.path.join(out_dir, "displacement.npy"), displacement)
  write_npy_atomic(os.path.join(out_dir, "warped.npy"), warped)
  if fixed.ndim == 2:
    from PIL import Image  # pylint: disable=import-outside-toplevel

    with atomic_write(os.path.join(out_dir, "warped.png"), "wb") as f:
      Image.fromarray(np.round(np.clip(warped, 0, 1) * 255).astype(np.uint8)).save(f, "PNG")
    save_registration_figure(os.path.join(out_dir, "grid.png"), moving, fixed, warped, displacement)
    return
  _write_nifti(os.path.join(out_dir, "warped.nii.gz"), warped, geometry)
  # (z, y, x) arrays and 'ij' components -> NIfTI (x, y, z) axes and (x, y, z) components.
  _write_nifti(os.path.join(out_dir, "displacement.nii.gz"), displacement[..., ::-1], geometry)
  middle = fixed.shape[0] // 2
  save_registration_figure(
    os.path.join(out_dir, "grid.png"),
    moving[middle],
    fixed[middle],
    warped[middle],
    displacement[middle, :, :, 1:],
  )


def _write_nifti(path: str, array_zyx: np.ndarray, geometry: dict) -> None:
  """Writes a (z, y, x) array on the fixed volume's canonical grid, with the fixed volume's
  affine, so the output overlays the input in world coordinates."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel

  data = np.ascontiguousarray(np.moveaxis(array_zyx, (0, 1, 2), (2, 1, 0)))
  image = nib.Nifti1Image(data.astype(np.float32), geometry["affine"])
  # nibabel picks the format from the file name, so the atomic temporary gets the bytes.
  with atomic_write(path, "wb") as f:
    f.write(gzip.compress(image.to_bytes()) if path.endswith(".gz") else image.to_bytes())


# ----------------------------------------------------------------------------- CLI

PROGRAM = "mammojax.register"


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``values`` (the global flags when run as a program)."""
  define = {"flag_values": values}
  flags.DEFINE_string("fixed", None, "Fixed image (PNG, DICOM or NIfTI).", **define)
  flags.DEFINE_string("moving", None, "Moving image, same shape as --fixed.", **define)
  flags.DEFINE_string("out", None, "Output directory.", **define)
  flags.DEFINE_string(
    "model",
    "",
    "Start from this trained network's field: a training workdir of a registration task or a "
    "converted checkpoint directory (python -m mammojax.convert icon).",
    **define,
  )
  flags.DEFINE_integer(
    "steps",
    200,
    "Optimisation steps per resolution level (0: only the network's field).",
    lower_bound=0,
    **define,
  )
  flags.DEFINE_enum(
    "transform",
    "velocity",
    TRANSFORMS,
    "'velocity': a stationary velocity field exponentiated by scaling and squaring "
    "(diffeomorphic: no folds under smooth motion); 'displacement': u in x + u(x), optimised "
    "directly (may fold).",
    **define,
  )
  flags.DEFINE_integer(
    "levels",
    3,
    "Resolution levels, coarse to fine, halving per level (1: full size only).",
    **define,
  )
  flags.DEFINE_integer(
    "squaring_steps", 7, "Scaling-and-squaring steps of --transform=velocity.", **define
  )
  flags.DEFINE_enum("similarity", "lncc", SIMILARITIES, "Similarity ('mi': mutual info).", **define)
  flags.DEFINE_float("lambda", 1.0, "Weight of the regulariser.", **define)
  flags.DEFINE_enum("regularizer", "diffusion", REGULARIZERS, "Regulariser of the field.", **define)
  flags.DEFINE_float("lr", 0.1, "Adam step size (pixels).", **define)
  flags.DEFINE_float("sigma", 2.0, "LNCC window standard deviation (pixels).", **define)
  flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.", **define)
  flags.mark_flags_as_required(["fixed", "moving", "out"], flag_values=values)


def run_from_flags(f: flags.FlagValues) -> dict[str, Any]:
  """Registers, writes the outputs and prints the JSON summary; a user error ends the command
  with one line on stderr and exit code 2."""
  options = {
    "steps": f.steps,
    "lmbda": f["lambda"].value,
    "learning_rate": f.lr,
    "sigma": f.sigma,
    "levels": f.levels,
    "squaring_steps": f.squaring_steps,
  }
  try:
    check_options(**options)
    check_out(f.out)
    fixed, moving, geometry = read_pair(f.fixed, f.moving)
    initial = predict_displacement(f.model, fixed, moving) if f.model else None
  except RegistrationInputError as e:
    fail(str(e))
  result = register(
    fixed,
    moving,
    similarity=f.similarity,
    regularizer=f.regularizer,
    transform=f.transform,
    initial_displacement=initial,
    progress=f.progress,
    **options,
  )
  write_outputs(f.out, result, fixed, moving, geometry)
  summary = {
    "similarity": f.similarity,
    "similarity_before": result["similarity_before"],
    "similarity_after": result["similarity_after"],
    "folds": result["folds"],
    "min_jacobian": result["min_jacobian"],
    "steps": f.steps,
    "transform": f.transform,
    "levels": f.levels,
    "shape": list(fixed.shape),
    "out": f.out,
  }
  print(json.dumps(summary))
  return summary


def run(argv: Sequence[str]) -> dict[str, Any]:
  """The command in-process: ``run(["--fixed=a.png", "--moving=b.png", "--out=/tmp/r"])``."""
  values, positional = command_flags(define_flags, argv, PROGRAM)
  refuse_positional(positional)
  return run_from_flags(values)


def main(argv: list[str]) -> None:
  run_from_flags(flags.FLAGS)


if __name__ == "__main__":
  run_program(main, define_flags)
