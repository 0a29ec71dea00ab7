"""Attribution methods: which input pixels a trained model's prediction rests on.

Every method is written once against a :class:`ModelAdapter` (a Flax module, its variables and
its evaluation call; :func:`resnet_adapter`, :func:`vit_adapter`, :func:`classifier_adapter`,
:func:`visit_image_adapter`, :func:`module_adapter`), is
jitted, and gives every example of a batch its own attribution for its own target class
(``target``: ``[B]`` ints or one int). Layers are picked by name (:func:`layer_names`; a wrong
name lists the available ones) through Flax's ``perturb``, not hooks
(:mod:`mammojax.interpret.layers` explains why). Definitions follow Captum 0.9.0 and the tests
check them against it:

* :func:`gradcam` (``LayerGradCam`` + ``LayerAttribution.interpolate``), signed unless ``relu``;
* :func:`guided_backprop`, :func:`guided_gradcam` (``GuidedBackprop``, ``GuidedGradCam``);
* :func:`integrated_gradients` (with its convergence delta), :func:`gradient_shap`,
  :func:`noise_tunnel` (SmoothGrad, SmoothGrad-squared, VarGrad);
* :func:`saliency`, :func:`input_x_gradient`, :func:`input_gradient`;
* over the visits of the temporal models (:mod:`mammojax.interpret.temporal`):
  :func:`visit_integrated_gradients`, :func:`visit_occlusion`;
* over ImgFeatAlign's current and prior image (:mod:`mammojax.interpret.risk`):
  :func:`pair_adapter` for the image methods, :func:`risk_split` of a year's risk over the
  current features, the prior features and the alignment;
* over FPN-MIL's whole image (:mod:`mammojax.interpret.mil`): :func:`mil_adapter`,
  :func:`mil_gradcam` over the image's patches, beside its :func:`attention_heatmaps`.

Checked, not only drawn: :mod:`mammojax.interpret.scoring` scores maps against a known region
(:func:`pointing_game`, :func:`positive_fraction_inside`) and :mod:`mammojax.interpret.sanity`
runs the model-randomisation check of Adebayo et al. (:func:`model_randomization_check`).

Maps are channels-last: input attributions ``[B, H, W, C]``, GradCAM ``[B, H, W]``.

MIL attention heatmaps live beside the MIL model (:mod:`mammojax.models.mil.heatmaps`),
detection metrics in :mod:`mammojax.metrics.detection`, overlay pictures in
:mod:`mammojax.viz.overlays`.
"""

from mammojax.interpret.adapter import (
  ModelAdapter,
  classifier_adapter,
  module_adapter,
  resnet_adapter,
  vit_adapter,
)
from mammojax.interpret.gradcam import gradcam
from mammojax.interpret.gradients import input_gradient, input_x_gradient, saliency
from mammojax.interpret.guided import Guided, guided_backprop, guided_gradcam, guided_relu
from mammojax.interpret.integrated import (
  Integrated,
  gradient_shap,
  gradient_shap_draws,
  gradient_shap_from_draws,
  integrated_gradients,
  noise_tunnel,
  quadrature,
)
from mammojax.interpret.interpolate import interpolate
from mammojax.interpret.layers import layer_activation_and_gradient, layer_names
from mammojax.interpret.mil import attention_heatmaps, mil_adapter, mil_gradcam
from mammojax.interpret.risk import integrated_gradients_over, pair_adapter, risk_split
from mammojax.interpret.sanity import (
  cascading_layers,
  model_randomization_check,
  randomize_params,
  rank_correlation,
)
from mammojax.interpret.scoring import pointing_game, positive_fraction_inside
from mammojax.interpret.temporal import (
  VisitAttribution,
  sequence_parts,
  visit_image_adapter,
  visit_integrated_gradients,
  visit_occlusion,
)

__all__ = [
  "Guided",
  "Integrated",
  "ModelAdapter",
  "attention_heatmaps",
  "cascading_layers",
  "classifier_adapter",
  "VisitAttribution",
  "gradcam",
  "gradient_shap",
  "gradient_shap_draws",
  "gradient_shap_from_draws",
  "guided_backprop",
  "guided_gradcam",
  "guided_relu",
  "input_gradient",
  "input_x_gradient",
  "integrated_gradients",
  "integrated_gradients_over",
  "interpolate",
  "layer_activation_and_gradient",
  "layer_names",
  "mil_adapter",
  "mil_gradcam",
  "model_randomization_check",
  "module_adapter",
  "noise_tunnel",
  "pair_adapter",
  "pointing_game",
  "positive_fraction_inside",
  "quadrature",
  "randomize_params",
  "rank_correlation",
  "resnet_adapter",
  "risk_split",
  "saliency",
  "vit_adapter",
  "sequence_parts",
  "visit_image_adapter",
  "visit_integrated_gradients",
  "visit_occlusion",
]
