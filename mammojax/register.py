r"""Register one image pair by instance optimisation: ``python -m mammojax.register``.

  python -m mammojax.register --fixed current.png --moving prior.png --out /tmp/reg
  python -m mammojax.register --fixed a.nii.gz --moving b.nii.gz --out /tmp/reg --steps 300 \
      --similarity lncc --lambda 1.0
  python -m mammojax.register --fixed a.dcm --moving b.dcm --out /tmp/reg --model RUN_OR_CKPT

Inputs: PNG or DICOM (2D) or NIfTI (3D), same shape and dimensionality. Intensities are
min-max scaled to [0, 1] per image. A dense displacement ``u`` (pixels, 'ij') is optimised with
Adam to minimise ``similarity(moving(x + u(x)), fixed(x)) + lambda * regularity(u)``, starting
from zero or from a trained network's field (``--model``: a training run's workdir, or a
converted checkpoint directory from ``python -m mammojax.convert icon``).

Writes to ``--out``:

* ``displacement.npy``: ``[H, W, 2]`` or ``[D, H, W, 3]`` float32, pixels, 'ij' order, such that
  ``warped(x) = moving(x + u(x))``; volumes also get ``displacement.nii.gz`` (the same field on
  the NIfTI's (x, y, z) voxel axes, components (x, y, z) in voxels, RAS+ canonical orientation,
  with the fixed volume's affine so it overlays the input in world coordinates);
* ``warped.npy`` and ``warped.png`` (2D) or ``warped.nii.gz`` (3D), in [0, 1] units;
* ``grid.png``: moving, fixed, warped and the deformed grid (the middle slice of a volume).

Prints one JSON object: similarity before and after, the fold count (negative Jacobian
determinants), the steps and the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

SIMILARITIES = ("lncc", "ncc", "ssd", "mind", "mi")
REGULARIZERS = ("diffusion", "bending")


class RegistrationInputError(ValueError):
  """Inputs that cannot be registered together; the message says why and what to do."""


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
  return _unit_range(fixed), _unit_range(moving), geometry


def _read_any(path: str, flag: str) -> tuple[np.ndarray, dict]:
  from mammojax.data import readers  # pylint: disable=import-outside-toplevel

  try:
    if path.lower().endswith(readers.NIFTI_SUFFIXES):
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


# ----------------------------------------------------------------------------- similarity


def similarity_fn(name: str, sigma: float) -> Callable:
  from mammojax.losses import registration as losses  # pylint: disable=import-outside-toplevel

  if name == "lncc":
    return lambda a, b: losses.lncc_loss(a, b, sigma=sigma)
  if name == "ncc":
    return losses.ncc_loss
  if name == "ssd":
    return losses.ssd_loss
  if name == "mind":
    return losses.mind_loss
  if name == "mi":
    return losses.mutual_information_loss
  raise ValueError(f"--similarity must be one of {SIMILARITIES}, got {name!r}")


# ----------------------------------------------------------------------------- optimisation


def register(
  fixed: np.ndarray,
  moving: np.ndarray,
  *,
  steps: int = 200,
  similarity: str = "lncc",
  lmbda: float = 1.0,
  regularizer: str = "diffusion",
  learning_rate: float = 0.1,
  sigma: float = 2.0,
  initial_displacement: np.ndarray | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Optimises a dense displacement registering ``moving`` to ``fixed``.

  Args:
    fixed, moving: ``[H, W]`` or ``[D, H, W]`` float32, same shape.
    steps: Adam iterations.
    similarity: one of ``SIMILARITIES`` (``'mi'`` is mutual information).
    lmbda: weight of the regulariser.
    regularizer: ``'diffusion'`` or ``'bending'``.
    learning_rate: Adam step size in pixels.
    sigma: LNCC window std in pixels.
    initial_displacement: ``[*S, n]`` pixels, 'ij' (e.g. a network's prediction).
  Returns:
    ``{'displacement': [*S, n] pixels, 'warped': [*S], 'similarity_before',
    'similarity_after', 'folds'}``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  from mammojax.losses import registration as losses  # pylint: disable=import-outside-toplevel
  from mammojax.nn import warp as warp_lib  # pylint: disable=import-outside-toplevel

  if regularizer not in REGULARIZERS:
    raise ValueError(f"--regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
  num_axes = fixed.ndim
  fixed_b = jnp.asarray(fixed)[None, ..., None]
  moving_b = jnp.asarray(moving)[None, ..., None]
  sim = similarity_fn(similarity, sigma)
  regularity = losses.diffusion_regularity if regularizer == "diffusion" else losses.bending_energy
  if initial_displacement is None:
    displacement = jnp.zeros((1, *fixed.shape, num_axes), jnp.float32)
  else:
    expected = (*fixed.shape, num_axes)
    if tuple(initial_displacement.shape) != expected:
      raise ValueError(
        f"initial displacement has shape {initial_displacement.shape}, expected {expected}"
      )
    displacement = jnp.asarray(initial_displacement, jnp.float32)[None]

  def warped_of(u):
    return warp_lib.warp(moving_b, u, padding="border")

  def objective(u):
    return sim(warped_of(u), fixed_b) + lmbda * regularity(u)

  tx = optax.adam(learning_rate)

  @jax.jit
  def step(u, opt_state):
    value, grad = jax.value_and_grad(objective)(u)
    updates, opt_state = tx.update(grad, opt_state, u)
    return optax.apply_updates(u, updates), opt_state, value

  evaluate_similarity = jax.jit(lambda u: sim(warped_of(u), fixed_b))
  before = float(sim(moving_b, fixed_b))
  opt_state = tx.init(displacement)
  bar = tqdm(
    range(steps),
    disable=not progress,
    unit="step",
    desc="register",
    file=sys.stderr,
    dynamic_ncols=True,
  )
  for i in bar:
    displacement, opt_state, value = step(displacement, opt_state)
    if progress and (i % 10 == 0 or i == steps - 1):
      bar.set_postfix(objective=f"{float(value):.4f}")
  bar.close()
  after = float(evaluate_similarity(displacement))
  folds = int(warp_lib.count_folds(displacement)[0])
  return {
    "displacement": np.asarray(displacement[0]),
    "warped": np.asarray(warped_of(displacement)[0, ..., 0]),
    "similarity_before": before,
    "similarity_after": after,
    "folds": folds,
  }


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
  images = [
    jax.image.resize(jnp.asarray(x), input_shape, "linear")[None, ..., None]
    for x in (moving, fixed)
  ]
  field = field_fn(variables, *images)  # [1, *input_shape, n] pixels of the input grid
  return np.asarray(warp_lib.resize_displacement(field, fixed.shape, align_corners=True)[0])


def _network_for(model_dir: str) -> tuple[Callable, tuple[int, ...]]:
  config_path = os.path.join(model_dir, "config.json")
  source_path = os.path.join(model_dir, "source.json")
  if os.path.exists(config_path):
    import ml_collections  # pylint: disable=import-outside-toplevel

    from mammojax import tasks  # pylint: disable=import-outside-toplevel

    with open(config_path) as f:
      config = ml_collections.ConfigDict(json.load(f))
    task = tasks.build_task(config)
    if hasattr(task, "displacement"):
      return task.displacement, tuple(task.input_shape())
    from mammojax.models.registration.mammoregnet import MammoRegNet  # pylint: disable=import-outside-toplevel

    if isinstance(task.model, MammoRegNet):

      def mammoregnet_field(variables, moving, fixed):
        return task.model.apply(variables, fixed, moving)["flow"]

      return mammoregnet_field, tuple(config.data.image_size)
    raise RegistrationInputError(
      f"the run in {model_dir} (task {config.task!r}) is not a registration network"
    )
  if os.path.exists(source_path):
    with open(source_path) as f:
      source = json.load(f)
    if source.get("kind") == "icon":
      from mammojax.convert.icon import build_icon_network  # pylint: disable=import-outside-toplevel

      network = build_icon_network(source["model_fields"])

      def icon_field(variables, moving, fixed):
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
  np.save(os.path.join(out_dir, "displacement.npy"), displacement)
  np.save(os.path.join(out_dir, "warped.npy"), warped)
  if fixed.ndim == 2:
    from PIL import Image  # pylint: disable=import-outside-toplevel

    Image.fromarray(np.round(np.clip(warped, 0, 1) * 255).astype(np.uint8)).save(
      os.path.join(out_dir, "warped.png")
    )
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
  nib.save(nib.Nifti1Image(data.astype(np.float32), geometry["affine"]), path)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
    prog="python -m mammojax.register",
    description="Register --moving to --fixed (PNG, DICOM or NIfTI) by instance optimisation.",
  )
  parser.add_argument("--fixed", required=True, help="fixed image (PNG, DICOM or NIfTI)")
  parser.add_argument("--moving", required=True, help="moving image, same shape as --fixed")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument(
    "--model",
    default="",
    help="start from this trained network's field: a training workdir or a "
    "converted checkpoint directory",
  )
  parser.add_argument(
    "--steps", type=int, default=200, help="optimisation steps (0: only the network's field)"
  )
  parser.add_argument("--similarity", choices=SIMILARITIES, default="lncc")
  parser.add_argument("--lambda", dest="lmbda", type=float, default=1.0, help="regulariser weight")
  parser.add_argument("--regularizer", choices=REGULARIZERS, default="diffusion")
  parser.add_argument("--lr", type=float, default=0.1, help="Adam step size (pixels)")
  parser.add_argument("--sigma", type=float, default=2.0, help="LNCC window std (pixels)")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  if args.steps < 0:
    parser.error(f"--steps must be >= 0, got {args.steps}")
  try:
    fixed, moving, geometry = read_pair(args.fixed, args.moving)
    initial = predict_displacement(args.model, fixed, moving) if args.model else None
  except RegistrationInputError as e:
    parser.exit(2, f"error: {e}\n")
  result = register(
    fixed,
    moving,
    steps=args.steps,
    similarity=args.similarity,
    lmbda=args.lmbda,
    regularizer=args.regularizer,
    learning_rate=args.lr,
    sigma=args.sigma,
    initial_displacement=initial,
    progress=not args.no_progress,
  )
  write_outputs(args.out, result, fixed, moving, geometry)
  summary = {
    "similarity": args.similarity,
    "similarity_before": result["similarity_before"],
    "similarity_after": result["similarity_after"],
    "folds": result["folds"],
    "steps": args.steps,
    "shape": list(fixed.shape),
    "out": args.out,
  }
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
