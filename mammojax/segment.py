r"""Segment a volume with a trained run or a converted MONAI network: ``python -m mammojax.segment``.

A segmentation run (configs/unetr.py, configs/unet3d.py) and one NIfTI file per contrast of its
``data.contrasts``, in that order (TRACE, ADC, T2 by default; an empty entry for a missing
optional contrast). The files go through the volume ingest's preprocessing, the network runs over
the whole volume by sliding windows of the training crop, and the label map comes back on the
input's grid:

  python -m mammojax.segment --workdir=/tmp/unetr --images=trace.nii.gz,adc.nii.gz,t2.nii.gz \
      --out=/tmp/seg
  python -m mammojax.segment --workdir=/tmp/unetr --images=trace.nii.gz,adc.nii.gz, --out=/tmp/seg

A MONAI UNETR or BasicUNet converted with ``python -m mammojax.convert unetr|unet3d FILE
--out=DIR``: NIfTI contrasts are z-scored over their non-zero voxels on their own grid (bring
them at the spacing the network was trained on); a single ``.npy`` ``[D, H, W, C]`` is the
network's input as it is, with no preprocessing, so results compare with other tools:

  python -m mammojax.segment --model=unetr:/w/unetr --images=volume.npy --out=/tmp/seg \
      --save_logits

Writes under ``--out``: ``labels.nii.gz`` (uint8, the first input file's affine and array
orientation; ``labels.npy`` ``[D, H, W]`` for a ``.npy`` input), with ``--save_logits``
``logits.npy`` (float32 ``[D, H, W, K]`` on the input's grid), with ``--save_probabilities``
``probabilities.npy`` (the softmax), ``figure.png`` (slices with the labels' outlines) and
``segment.json`` (the settings, the class names and each class's voxel count and volume). No file
name or header text of the inputs reaches the outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from absl import flags

from mammojax.console import command_flags, refuse_positional, run_program

PROGRAM = "mammojax.segment"


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``values`` (the global flags when run as a program)."""
  define = {"flag_values": values}
  flags.DEFINE_string(
    "workdir", "", "A segmentation training run (its config and weights).", **define
  )
  flags.DEFINE_enum(
    "checkpoint", "best", ["best", "latest"], "Which checkpoint of --workdir.", **define
  )
  flags.DEFINE_string(
    "model", "", "KIND:DIR, a converted MONAI network (KIND unetr or unet3d).", **define
  )
  flags.DEFINE_list(
    "images",
    None,
    "One NIfTI per input contrast, in the network's order (empty entry = missing contrast), or "
    "one .npy [D, H, W, C] used as the input as it is.",
    **define,
  )
  flags.DEFINE_string("out", None, "Output directory.", **define)
  flags.DEFINE_float(
    "overlap",
    -1.0,
    "Window overlap in [0, 1) (default: the run's eval.overlap, else 0.5).",
    **define,
  )
  flags.DEFINE_enum(
    "blend", "", ["", "gaussian", "constant"], "Window blending (default: the run's).", **define
  )
  flags.DEFINE_integer("sw_batch_size", 4, "Windows per network call.", lower_bound=1, **define)
  flags.DEFINE_list("roi", [], "unet3d: the window sides D,H,W (default 96,96,96).", **define)
  flags.DEFINE_bool("save_logits", False, "Also write logits.npy [D, H, W, K].", **define)
  flags.DEFINE_bool("save_probabilities", False, "Also write probabilities.npy.", **define)
  flags.mark_flags_as_required(["out", "images"], flag_values=values)


def run_from_flags(f: flags.FlagValues) -> dict[str, Any]:
  """Segments what the flags name, writes ``--out`` and returns ``segment.json``'s dict."""
  from mammojax.runs import segmenter as engine  # pylint: disable=import-outside-toplevel

  if bool(f.workdir) == bool(f.model):
    raise ValueError("give either --workdir=RUN or --model=KIND:DIR (not both)")
  if os.path.isfile(f.out):
    raise ValueError(f"--out {f.out} is a file: give a new or existing directory")
  if f.overlap >= 1.0:
    raise ValueError(f"--overlap={f.overlap} must be in [0, 1)")
  if f.workdir:
    if not os.path.isdir(f.workdir):
      raise FileNotFoundError(f"--workdir {f.workdir} is not a directory (give a training run)")
    segmenter = engine.from_run(f.workdir, f.checkpoint)
  else:
    kind, _, directory = f.model.partition(":")
    roi = tuple(_side(s) for s in f.roi) if f.roi else None
    segmenter = engine.from_converted(kind, directory, roi)
  inputs = engine.read_inputs(segmenter, f.images)
  settings = _window_settings(f, segmenter)
  network_logits = segmenter.logits(inputs.volume, inputs.present, **settings)
  return _write_outputs(f, segmenter, inputs, network_logits, settings)


def _side(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"--roi: {text!r} is not a whole number of voxels") from None


def _window_settings(f: flags.FlagValues, segmenter) -> dict[str, Any]:
  """The flags' window settings, else the segmenter's defaults (a run's own)."""
  return {
    "overlap": f.overlap if f.overlap >= 0 else segmenter.overlap,
    "blend": f.blend or segmenter.blend,
    "sw_batch_size": f.sw_batch_size,
  }


def _write_outputs(f, segmenter, inputs, network_logits, settings) -> dict[str, Any]:
  """Labels (and logits, probabilities) on the input's grid, a figure on the network's grid
  (the first contrast as the network saw it), and ``segment.json``."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from mammojax.atomic_files import atomic_write, write_json_atomic  # pylint: disable=import-outside-toplevel
  from mammojax.runs import segmenter as engine  # pylint: disable=import-outside-toplevel
  from mammojax.viz.segmentation import save_segmentation_figure  # pylint: disable=import-outside-toplevel

  os.makedirs(f.out, exist_ok=True)
  logits = engine.on_input_grid(network_logits, inputs)
  labels = np.argmax(logits, axis=-1).astype(np.uint8)
  written = {}

  def save_array(name: str, array) -> None:
    with atomic_write(os.path.join(f.out, name), "wb") as out:
      np.save(out, array)
    written[name.split(".")[0]] = name

  if inputs.reference is not None:
    engine.write_nifti_like(
      os.path.join(f.out, "labels.nii.gz"),
      engine.to_file_orientation(labels, inputs.reference),
      inputs.reference,
    )
    written["labels"] = "labels.nii.gz"
  else:
    save_array("labels.npy", labels)
  if f.save_logits:
    save_array("logits.npy", logits)
  if f.save_probabilities:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    save_array(
      "probabilities.npy", (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
    )
  save_segmentation_figure(
    os.path.join(f.out, "figure.png"),
    inputs.volume[..., 0],
    np.argmax(network_logits, axis=-1),
    class_names=segmenter.class_names,
    title=f"{segmenter.contrasts[0]} as the network sees it",
  )
  written["figure"] = "figure.png"
  voxel_ml = float(np.prod(inputs.spacing)) / 1000.0 if inputs.spacing is not None else None
  classes = {}
  for k, name in enumerate(segmenter.class_names):
    count = int(np.sum(labels == k))
    classes[name] = {"voxels": count, "ml": None if voxel_ml is None else count * voxel_ml}
  summary = {
    "model": segmenter.source,
    "contrasts": list(segmenter.contrasts),
    "contrasts_given": [c for c, p in zip(segmenter.contrasts, inputs.present) if p],
    "grid": list(labels.shape),
    "preprocessing": "volume ingest"
    if inputs.fit is not None
    else "z-score per contrast"
    if inputs.reference is not None
    else "none (.npy used as the input)",
    "window": list(segmenter.roi),
    **settings,
    "classes": classes,
    "files": written,
  }
  write_json_atomic(os.path.join(f.out, "segment.json"), summary, indent=2)
  print(json.dumps({"out": f.out, "grid": summary["grid"], "classes": classes}))
  return summary


def run(argv: Sequence[str]) -> dict[str, Any]:
  """The command in-process: ``run(["--workdir=RUN", "--images=a.nii.gz,b.nii.gz", "--out=D"])``."""
  values, positional = command_flags(define_flags, argv, PROGRAM)
  refuse_positional(positional)
  return run_from_flags(values)


def main(argv: list[str]) -> None:
  run_from_flags(flags.FLAGS)


if __name__ == "__main__":
  run_program(main, define_flags)
