"""Attribution for FPN-MIL (:class:`~mammojax.models.mil.fpn_mil.FPNMIL`, online mode): image-level
maps of the bag's logit beside the model's own attention heatmaps.

The model classifies a bag of patches ``[B, P, S, S, C]`` cut from one image. :class:`MILImage`
cuts them inside the graph from the whole image ``[B, H, W, C]`` at the example's patch corners
(data in the ``context`` collection, so a new example does not recompile), so every pixel
method gives a map over the image itself: a pixel shared by overlapping patches gets the sum of
its copies' gradients, which is its gradient. Patches the mask leaves out change no output, and
the pixels that only they cover get exactly 0.

* GradCAM (:func:`mil_gradcam`) takes a layer of the patch encoder (EfficientNet's
  ``blocks_<i>/output``, the FPN's ``stride_16``, ...), whose map is ``[P, h, w, D]`` per image:
  the channel weights are the gradient's mean over the real patches and their positions
  together (the image's mosaic of patch maps, one GradCAM for the image), and each patch's map
  is resized to the patch and placed back into the image, overlaps averaged
  (:func:`mammojax.data.pipelines.patching.accumulate_patch_maps`).
* Guided backpropagation is the plain gradient: EfficientNet's activations are SiLU, not ReLU,
  and the MIL head's ReLUs are left as they are (a ReLU-free path has nothing to rectify; Captum
  returns the plain gradient there too). The result says so (``guided_rectified: false``).
* A frozen encoder's features are wrapped in ``stop_gradient`` by the model; the adapter's
  model is the same one with ``gradient_through_frozen_backbone=True`` (same outputs), so the
  maps are not zero.
* The attention heatmaps (:func:`attention_heatmaps`) are the model's own, assembled as
  :mod:`mammojax.models.mil.heatmaps` does for the detection report.

:class:`MILRunner` explains one example for ``python -m mammojax.explain``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mammojax.data.pipelines.patching import accumulate_patch_maps
from mammojax.interpret import report
from mammojax.interpret.adapter import ModelAdapter, module_adapter
from mammojax.interpret.guided import guided_backprop
from mammojax.interpret.interpolate import interpolate
from mammojax.interpret.layers import layer_activation_and_gradient, resolve_layer
from mammojax.interpret.methods import LAYER_METHODS, MethodSettings, attribution_maps
from mammojax.models.mil import heatmaps
from mammojax.models.mil.fpn_mil import FPNMIL

AGGREGATED = "attention_aggregated"


def cut_patches(images: jax.Array, coords: jax.Array, patch_size: int) -> jax.Array:
  """``images [B, H, W, C]`` -> the patches at ``coords [P, 2]`` (row, col corners),
  ``[B, P, S, S, C]``; differentiable with respect to the images."""
  size = (patch_size, patch_size, images.shape[-1])

  def one(image: jax.Array) -> jax.Array:
    return jax.vmap(lambda corner: jax.lax.dynamic_slice(image, (*corner, 0), size))(coords)

  return jax.vmap(one)(images)


class MILImage(nn.Module):
  """FPN-MIL on whole images: ``images [B, H, W, C]`` -> the bag logit ``[B, 1]``, the patches
  cut at ``context['patch_coords']`` ``[P, 2]`` and masked by ``context['patch_mask']`` ``[P]``
  (1 = a real patch), as the example's bag was."""

  mil: FPNMIL
  patch_size: int

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    height, width = images.shape[1:3]
    if min(height, width) < self.patch_size:
      raise ValueError(
        f"images {height}x{width} are smaller than the {self.patch_size}-pixel patches"
      )
    coords = self.get_variable("context", "patch_coords")
    mask = self.get_variable("context", "patch_mask") > 0
    patches = cut_patches(images, coords, self.patch_size)
    out = self.mil(patches, jnp.broadcast_to(mask, patches.shape[:2]), train=train)
    return out["logits"][:, None]


def mil_adapter(
  model: FPNMIL,
  variables: Mapping[str, Any],
  patch_coords: np.ndarray,
  patch_mask: np.ndarray,
  patch_size: int,
) -> ModelAdapter:
  """An adapter over one example's image (:class:`MILImage`).

  Args:
    model: the trained online FPN-MIL (backbone and FPN set).
    variables: its variables (``params``, ``batch_stats``).
    patch_coords: ``[P, 2]`` int, the example's patch corners (row, col).
    patch_mask: ``[P]``, True for its real patches.
    patch_size: the patch side in pixels.
  Returns:
    A :class:`ModelAdapter` whose images are ``[B, H, W, C]`` and whose logits are ``[B, 1]``;
    layers ``mil/backbone/blocks_<i>/output``, ``mil/fpn/stride_16``, ...; nothing to rectify.
  """
  if model.backbone is None or model.fpn is None:
    raise ValueError("FPN-MIL maps pixels only with its online model (EfficientNet + FPN)")
  module = MILImage(mil=model.clone(gradient_through_frozen_backbone=True), patch_size=patch_size)
  nested = {
    collection: {"mil": tree}
    for collection, tree in variables.items()
    if collection in ("params", "batch_stats")
  }
  nested["context"] = {
    "patch_coords": jnp.asarray(patch_coords, jnp.int32),
    "patch_mask": jnp.asarray(patch_mask, jnp.float32),
  }
  return module_adapter(module, nested, apply_kwargs={"train": False})


@functools.partial(jax.jit, static_argnames=("layer", "relu"))
def _patch_maps(adapter: ModelAdapter, images: jax.Array, layer: str, relu: bool) -> jax.Array:
  """GradCAM of every patch ``[B, P, h, w]`` with the image's channel weights."""
  activation, gradient = layer_activation_and_gradient(adapter, images, None, layer)
  if activation.ndim != 4:
    raise ValueError(f"layer {layer!r} is not a patch feature map (shape {activation.shape})")
  batch = images.shape[0]
  activation = activation.reshape(batch, -1, *activation.shape[1:])  # [B, P, h, w, D]
  gradient = gradient.reshape(activation.shape)
  real = (adapter.variables["context"]["patch_mask"] > 0).astype(gradient.dtype)
  real = real[None, :, None, None, None]
  count = jnp.sum(real) * activation.shape[2] * activation.shape[3]
  weights = jnp.sum(gradient * real, axis=(1, 2, 3), keepdims=True) / count  # [B, 1, 1, 1, D]
  maps = jnp.sum(weights * activation, axis=-1)
  return jax.nn.relu(maps) if relu else maps


def mil_gradcam(
  adapter: ModelAdapter,
  images: jax.Array,
  layer: str,
  *,
  relu: bool = False,
  upsample: str = "nearest",
) -> np.ndarray:
  """GradCAM of the bag logit at a patch-encoder ``layer`` over the image (see the module
  docstring), ``[B, H, W]``; signed unless ``relu``; ``upsample`` resizes each patch's map to
  the patch (``'nearest'``, Captum's default, or ``'bilinear'``). Pixels no real patch covers
  get 0."""
  context = adapter.variables["context"]
  real = np.asarray(context["patch_mask"]) > 0
  coords = np.asarray(context["patch_coords"])[real]
  size = (adapter.module.patch_size,) * 2
  out = []
  for maps in np.asarray(_patch_maps(adapter, jnp.asarray(images), layer, relu)):
    patches = np.asarray(interpolate(maps[real], size, upsample))
    out.append(accumulate_patch_maps(patches, coords, tuple(images.shape[1:3]))[0])
  return np.stack(out)


def mil_maps(
  adapter: ModelAdapter,
  images: jax.Array,
  methods: Sequence[str],
  settings: MethodSettings,
) -> dict[str, np.ndarray]:
  """Each method's maps of the bag logit: GradCAM ``[B, H, W]`` (:func:`mil_gradcam` at
  ``settings.layer``), the pixel methods ``[B, H, W, C]``."""
  images = jnp.asarray(images)
  target = jnp.zeros(images.shape[:1], jnp.int32)  # the one logit
  out = attribution_maps(
    adapter, images, target, [m for m in methods if m not in LAYER_METHODS], settings
  )
  if "gradcam" in methods:
    out["gradcam"] = mil_gradcam(adapter, images, settings.layer, upsample=settings.upsample)
  if "guided_gradcam" in methods:  # Captum's: the guided gradient times the ReLU'd GradCAM
    cam = mil_gradcam(adapter, images, settings.layer, relu=True, upsample=settings.upsample)
    guided = np.asarray(guided_backprop(adapter, images, target).attributions)
    out["guided_gradcam"] = (guided * cam[..., None]).astype(np.float32)
  return {name: np.asarray(out[name], np.float32) for name in methods}


def attention_heatmaps(
  model: FPNMIL,
  outputs: Mapping[str, Any],
  patch_coords: np.ndarray,
  patch_mask: np.ndarray,
  image_shape: tuple[int, int],
  patch_size: int,
  *,
  smooth_sigma: float = 0.0,
  patch_normalization: bool = False,
) -> dict[str, np.ndarray]:
  """The model's attention heatmaps ``[H, W]`` in [0, 1] of one image: ``attention_<scale>``
  per scale and :data:`AGGREGATED` (weighted by the scale aggregator, when it has weights);
  empty for a pooling without instance attention.

  Args:
    model: the FPN-MIL.
    outputs: its outputs on the image's bag (``attention`` ``{scale: [1, P, h, w]}``,
      ``scale_weights`` ``[1, S]``).
    patch_coords, patch_mask: ``[P, 2]`` and ``[P]`` of the bag.
    image_shape: ``(H, W)``.
    patch_size: patch side in pixels.
    smooth_sigma, patch_normalization: as :func:`mammojax.models.mil.heatmaps.scale_heatmap`
      (the run's ``eval.detection`` settings).
  """
  attention = outputs.get("attention")
  if not attention:
    return {}
  scales = {
    scale: heatmaps.scale_heatmap(
      np.asarray(attention[scale][0]),
      patch_coords,
      image_shape,
      patch_size,
      patch_mask=patch_mask,
      smooth_sigma=smooth_sigma,
      patch_normalization=patch_normalization,
    )
    for scale in model.head.scales
  }
  weights = outputs.get("scale_weights")
  maps = {f"attention_{scale}": heat for scale, heat in scales.items()}
  maps[AGGREGATED] = heatmaps.aggregate_heatmaps(
    scales, None if weights is None else np.asarray(weights[0])
  )
  return maps


@functools.partial(jax.jit, static_argnames="model")
def _bag_outputs(model: FPNMIL, variables: Any, patches: jax.Array, mask: jax.Array) -> Any:
  return model.apply(variables, patches, mask, train=False)


@dataclasses.dataclass
class MILRunner:
  """``python -m mammojax.explain`` on an online FPN-MIL run, one example at a time.

  An example's ``images`` is the whole normalised image ``[H, W, C]``, its ``context`` holds
  its bag (``patches`` ``[P, S, S, C]``, ``patch_coords``, ``patch_mask``), its ``region`` the
  lesion boxes of the label as a mask ``[H, W]``.
  """

  model: FPNMIL
  variables: Mapping[str, Any]
  smooth_sigma: float = 0.0
  patch_normalization: bool = False

  rectified = False
  notes = (
    "guided_backprop and guided_gradcam use the plain gradient: EfficientNet's activations are "
    "SiLU, not ReLU, so there is nothing to rectify on the pixels' path (as in Captum)",
    "the target is the bag's one logit (the label's presence); attention_<scale> and "
    "attention_aggregated are the model's attention heatmaps, scored beside the methods",
  )

  def _adapter(self, example: Any) -> ModelAdapter:
    context = example.context
    return mil_adapter(
      self.model,
      self.variables,
      context["patch_coords"],
      context["patch_mask"],
      int(np.shape(context["patches"])[1]),
    )

  def layer(self, requested: str, example: Any) -> str:
    """``requested`` (any unambiguous trailing part of a layer path, checked), else the FPN
    level of the head's finest scale, whose positions are that scale's instances."""
    layer = requested or f"fpn/stride_{min(self.model.head.scales)}"
    resolve_layer(self._adapter(example), jnp.asarray(example.images)[None], layer)
    return layer

  def explain(
    self,
    example: Any,
    directory: str,
    methods: Sequence[str],
    settings: MethodSettings,
    target: int | None,
  ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Maps, heatmaps, scores and writes one example; returns its row and scores."""
    if target not in (None, 0):
      raise ValueError(
        f"--target={target}: FPN-MIL has one output, the logit of its label's presence; "
        "leave --target out (or give 0)"
      )
    context = example.context
    outputs = _bag_outputs(
      self.model,
      self.variables,
      jnp.asarray(context["patches"])[None],
      jnp.asarray(context["patch_mask"], bool)[None],
    )
    probability = float(jax.nn.sigmoid(outputs["logits"][0]))
    image = np.asarray(example.images)
    maps = mil_maps(self._adapter(example), image[None], methods, settings)
    own = {name: values[0] for name, values in maps.items()}
    patch_size = int(np.shape(context["patches"])[1])
    attention = attention_heatmaps(
      self.model,
      outputs,
      np.asarray(context["patch_coords"]),
      np.asarray(context["patch_mask"], bool),
      image.shape[:2],
      patch_size,
      smooth_sigma=self.smooth_sigma,
      patch_normalization=self.patch_normalization,
    )
    title = f"{example.name}: p={probability:.2f}"
    report.write_image_example(directory, image, {**own, **attention}, title)
    row = {"name": example.name, "target": 0, "probability": probability}
    if example.label is not None:
      row["label"] = example.label
    row["attention_heatmaps"] = list(attention)
    scores = {}
    if example.region is not None:
      scored = {**own, **attention}
      scores = report.score_maps({k: v[None] for k, v in scored.items()}, example.region[None])
    return row, scores
