r"""Attribution maps of a trained model or of a converted backbone: ``python -m mammojax.explain``.

A training run (Temporal-GradCam's ``image_classifier`` or ``temporal_end_to_end`` task,
``imgfeatalign``, or ``fpn_mil`` in its online mode), its best checkpoint (or
``--checkpoint=latest``), the first ``--num_examples`` of a split:

  python -m mammojax.explain --workdir=/tmp/temporal/backbone_resnet --split=test \
      --num_examples=8 --out=/tmp/explain
  python -m mammojax.explain --workdir=/tmp/temporal_e2e --methods=gradcam,integrated_gradients \
      --layer=layer3 --out=/tmp/explain_e2e
  python -m mammojax.explain --workdir=/tmp/imgfeatalign --target=4 --out=/tmp/explain_risk
  python -m mammojax.explain --workdir=/tmp/fpn_mil --layer=fpn/stride_16 --out=/tmp/explain_mil

ImgFeatAlign (:mod:`mammojax.interpret.risk`): the fused risk of year ``--target + 1``
(``--target`` is the year index, default the last year), attributed to the pixels of the current
and the prior image together (GradCAM at ``--layer`` of the encoder, in each image's call;
default its last stage wider than one position), and split over the current features, the prior
features and the alignment's change to them (integrated gradients; ``risk_split`` per example,
its shares adding up to the logit's change from zero features within ``delta``). Gradients pass
through a frozen encoder (the model's ``stop_gradient`` there is for training); the alignment is
held at the example's (MammoRegNet's flow, computed once). FPN-MIL
(:mod:`mammojax.interpret.mil`): its one logit attributed to the pixels of the whole image (GradCAM at an EfficientNet / FPN ``--layer``, default the FPN level of
the finest scale, over the image's patches), beside the model's attention heatmaps
(``attention_<scale>``, ``attention_aggregated``); guided backpropagation is the plain gradient
there (SiLU, no ReLU to rectify), and ``guided_rectified`` is false.

A converted backbone (``python -m mammojax.convert resnet|vit FILE --out=DIR``) and image files:
a ``.npy`` is the model input as it is (``[H, W, 3]`` float32, so results can be compared with
other tools); a PNG, DICOM or NIfTI slice is scaled to [0, 1], repeated to 3 channels and
normalised with ImageNet's mean and std (what torchvision's weights were trained on):

  python -m mammojax.explain --model=resnet:/w/resnet18 --images=a.png,b.npy --target=281 \
      --out=/tmp/explain_files

Methods (``--methods``, comma-separated): gradcam, guided_backprop, guided_gradcam,
gradient_shap, integrated_gradients (Captum's definitions and defaults; gradient SHAP is not run
over the visits of a sequence). ``--layer`` is GradCAM's (default: the last spatial layer that
gets a gradient, ``layer4`` for a ResNet); ``--target`` the class (default: each example's
predicted class).

Writes, under ``--out``: ``<example>/<method>.npy`` at the input's resolution (GradCAM
``[H, W]``, the others ``[H, W, C]``; for a sequence a leading visit axis over its real visits,
oldest first; for ImgFeatAlign a leading axis (prior, current)), ``<example>/methods.png``
(sample | method maps, for FPN-MIL with its attention heatmaps, also written as
``attention_<scale>.npy``) and, for sequences, ``<example>/visits.png`` (every visit, its maps,
and its integrated-gradients share of the prediction), for ImgFeatAlign ``<example>/pair.png``
(current | prior | warped prior, each method's maps of both images, and the bars of the
current / prior / alignment shares); ``attributions.json``: what was run, each example's target
and probability, the per-visit attributions or the risk split, and where the data marks the
region that carries the label (the synthetic cohort's ventricles, the synthetic lesions' boxes
of ImgFeatAlign, in both images, and of FPN-MIL) the pointing-game hit rate and the fraction of
positive attribution inside it per method (ImgFeatAlign's as ``current/<method>`` and
``prior/<method>``; FPN-MIL's attention heatmaps beside the methods); with ``--sanity_check``
(not for ImgFeatAlign and FPN-MIL), the rank correlation of each method's maps with those of the
same model with randomised weights (Adebayo et al. 2018). Examples are named by split and
position (``test_0003``) or input position (``image_001``), never by a file name or patient id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from absl import flags

from mammojax.atomic_files import atomic_write
from mammojax.console import command_flags, refuse_positional, run_program
from mammojax.interpret.methods import METHODS, SEQUENCE_METHODS, check_methods

PROGRAM = "mammojax.explain"


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``values`` (the global flags when run as a program)."""
  define = {"flag_values": values}
  flags.DEFINE_string(
    "workdir", "", "A training run to explain (its config and checkpoint).", **define
  )
  flags.DEFINE_enum(
    "checkpoint", "best", ["best", "latest"], "Which checkpoint of --workdir.", **define
  )
  flags.DEFINE_string("split", "test", "The split of --workdir's data to explain.", **define)
  flags.DEFINE_integer(
    "num_examples", 8, "Examples of --split to explain.", lower_bound=1, **define
  )
  flags.DEFINE_string(
    "model", "", "KIND:DIR, a converted backbone (KIND resnet or vit), with --images.", **define
  )
  flags.DEFINE_list("images", [], "Image files for --model: .npy [H, W, 3], PNG, DICOM.", **define)
  flags.DEFINE_list("methods", list(METHODS), "Attribution methods, comma-separated.", **define)
  flags.DEFINE_string(
    "layer",
    "",
    "GradCAM's layer (default: the last spatial one; ImgFeatAlign: an encoder stage, default the "
    "last wider than one position; FPN-MIL: fpn/stride_<finest scale>).",
    **define,
  )
  flags.DEFINE_integer(
    "target",
    -1,
    "Class to explain (-1: each example's prediction). ImgFeatAlign: the risk year index "
    "0..N-1 (-1: the last year, N). FPN-MIL: its one logit (-1 or 0).",
    **define,
  )
  flags.DEFINE_string("out", None, "Output directory.", **define)
  flags.DEFINE_integer("n_steps", 50, "Integrated gradients' steps.", lower_bound=1, **define)
  flags.DEFINE_integer("n_samples", 5, "Gradient SHAP's samples.", lower_bound=1, **define)
  flags.DEFINE_float("stdevs", 0.0, "Gradient SHAP's input noise std.", lower_bound=0, **define)
  flags.DEFINE_integer(
    "internal_batch_size", 32, "Rows per forward pass of the sampling methods.", **define
  )
  flags.DEFINE_integer(
    "batch_size",
    8,
    "Images explained together (sequences, ImgFeatAlign and FPN-MIL: one example at a time).",
    lower_bound=1,
    **define,
  )
  flags.DEFINE_integer("seed", 0, "Gradient SHAP's and the sanity check's draws.", **define)
  flags.DEFINE_bool("sanity_check", False, "Also run the model-randomisation check.", **define)
  flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.", **define)
  flags.mark_flags_as_required(["out"], flag_values=values)


def run_from_flags(f: flags.FlagValues) -> dict[str, Any]:
  """Explains what the flags name, writes ``--out`` and returns ``attributions.json``'s dict."""
  from mammojax.interpret import explainer  # pylint: disable=import-outside-toplevel

  if bool(f.workdir) == bool(f.model):
    raise ValueError("give either --workdir=RUN or --model=KIND:DIR with --images (not both)")
  if f.model and not f.images:
    raise ValueError("--model needs --images=FILE[,FILE...] to explain")
  if f.out and os.path.isfile(f.out):
    raise ValueError(f"--out {f.out} is a file: give a new or existing directory")
  methods = check_methods(f.methods)
  options = {
    "methods": methods,
    "layer": f.layer,
    "target": None if f.target < 0 else f.target,
    "n_steps": f.n_steps,
    "n_samples": f.n_samples,
    "stdevs": f.stdevs,
    "internal_batch_size": f.internal_batch_size,
    "batch_size": f.batch_size,
    "seed": f.seed,
    "sanity_check": f.sanity_check,
    "progress": f.progress,
  }
  if f.workdir:
    subject = _run_subject(f.workdir, f.checkpoint, f.split, f.num_examples)
  else:
    subject = _file_subject(f.model, f.images)
  if subject.sequences and "gradient_shap" in methods:
    raise ValueError(
      f"--methods: gradient_shap is not run over the visits of a sequence; choose from "
      f"{','.join(SEQUENCE_METHODS)}"
    )
  summary = explainer.explain(subject, f.out, **options)
  with atomic_write(os.path.join(f.out, "attributions.json"), "w") as out:
    json.dump(summary, out, indent=2, allow_nan=False)
  print(json.dumps({"out": f.out, "examples": len(summary["examples"])}))
  return summary


def _run_subject(workdir: str, checkpoint: str, split: str, count: int):
  from mammojax.interpret import explainer  # pylint: disable=import-outside-toplevel
  from mammojax.runs.restore import restore_run  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir {workdir} is not a directory (give a training run)")
  from mammojax.train.task import AttributionTask  # pylint: disable=import-outside-toplevel

  run = restore_run(workdir, checkpoint=checkpoint, example_split=split)
  task = run.task
  if not isinstance(task, AttributionTask):
    raise ValueError(
      f"--workdir {workdir}: task {run.config.task!r} has no image attribution yet; explain "
      "takes image_classifier and temporal_end_to_end runs, imgfeatalign runs, online fpn_mil "
      "runs, or --model=KIND:DIR with --images"
    )
  try:
    examples = task.explain_dataset(split)
  except (KeyError, FileNotFoundError) as e:
    raise ValueError(f"--split={split}: {e}") from None
  return explainer.subject_of_run(
    task.model, run.variables, examples, split, count, task.explain_options()
  )


def _file_subject(model: str, paths: Sequence[str]):
  from mammojax.interpret import explainer  # pylint: disable=import-outside-toplevel
  from mammojax.train.init_state import load_pretrained  # pylint: disable=import-outside-toplevel
  from mammojax.train.variable_store import read_source  # pylint: disable=import-outside-toplevel

  kind, _, directory = model.partition(":")
  if kind not in ("resnet", "vit") or not directory:
    raise ValueError(f"--model={model}: give KIND:DIR with KIND resnet or vit")
  source = read_source(directory, kind)
  variables = load_pretrained(directory)
  images = [explainer.read_model_input(path, f"--images[{i}]") for i, path in enumerate(paths)]
  return explainer.subject_of_backbone(kind, source["model_fields"], variables, images)


def run(argv: Sequence[str]) -> dict[str, Any]:
  """The command in-process: ``run(["--workdir=RUN", "--out=/tmp/x", "--noprogress"])``."""
  values, positional = command_flags(define_flags, argv, PROGRAM)
  refuse_positional(positional)
  return run_from_flags(values)


def main(argv: list[str]) -> None:
  run_from_flags(flags.FLAGS)


if __name__ == "__main__":
  run_program(main, define_flags)
