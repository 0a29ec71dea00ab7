"""Attribution for ImgFeatAlign (:class:`~mammojax.models.imgfeatalign.ImgFeatAlign`): the year-k
risk attributed to the current and the prior mammogram, and through the aligned prior.

The explained output is the fused head's logit of year ``k + 1`` (``pred_fused[:, k]``, whose
sigmoid is the probability of cancer within ``k + 1`` years). Two views of it:

* **Pixels** (:class:`ImagePair`, :func:`pair_adapter`, :func:`pair_maps`): the two images are
  the two channels of one input ``[B, H, W, 2]``, the prior first (oldest first, as a sequence's
  visits), so every image method runs unchanged; integrated gradients and gradient SHAP move
  both images along one path, and their attributions of both images together add up to the
  logit's change (the alignment held, see below). GradCAM takes a layer of each image's
  encoder call: the model encodes both images with one shared encoder, which
  :class:`ImagePair` calls under two names (``prior_encoder``, ``current_encoder``) with the
  same weights, so each call's layer (``prior_encoder/layer3``) is a layer of its own.
* **Features** (:func:`risk_split`): integrated gradients of the fusion over the current
  features ``C``, the prior features ``P`` and the alignment's change to them
  ``D = aligned prior - P``, each from zero, with the time gap held fixed. The fused head reads
  the prior only through the aligned prior ``A = P + D`` (the unaligned ``P`` feeds the prior
  head alone), so integrated gradients over ``[C, P, A]`` would give ``P`` exactly 0. Over
  ``[C, P, D]`` the gradients with respect to ``P`` and ``D`` are both the gradient with respect
  to ``A`` at every point of the path, so ``prior + alignment`` is exactly ``A``'s integrated
  gradient, split feature by feature into the part the prior's own values carry and the part
  the warp moved; ``current + prior + alignment`` is the logit's change from zero features
  (completeness, within the returned ``delta``).

Frozen parts. The model wraps a frozen encoder's features (``finetune_all=False``) in
``stop_gradient``, which keeps the optimizer off them but would make every pixel gradient zero;
:class:`ImagePair` runs the model in its ``attribution_mode``, the same outputs without that
stop (BatchNorm on the running statistics, as in evaluation). The alignment is held fixed: the
model computes the example's registration flow once and :class:`ImagePair` warps with it, as
the model itself treats the frozen MammoRegNet (its flow is ``stop_gradient``-ed: a fixed
preprocessing of the pair, never differentiated). A pixel's attribution therefore counts its
effect through the features and their warp, not through MammoRegNet's estimate of the
alignment, whose own share of the risk is the feature split's ``alignment``; and no attribution
program differentiates, or even runs, MammoRegNet. Guided backpropagation rectifies the
encoder's ReLUs (the fusion's feed-forward ReLUs are left as they are).

:class:`PairRunner` explains one example for ``python -m mammojax.explain``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mammojax.interpret import report
from mammojax.interpret.adapter import (
  ModelAdapter,
  hashable_fields,
  module_adapter,
  target_logits,
)
from mammojax.interpret.integrated import quadrature
from mammojax.interpret.interpolate import interpolate
from mammojax.interpret.layers import layer_shapes, layers_activation_and_gradient
from mammojax.interpret.methods import LAYER_METHODS, MethodSettings, attribution_maps
from mammojax.models.imgfeatalign import (
  AttentionRiskFusion,
  ImgFeatAlign,
  fusion_fields,
)
from mammojax.nn.warp import warp

# The fewest integration steps of the feature split: the fusion's LayerNorms make its logit
# change steeply near zero features, which a few steps miss (measured on the smoke run: the
# completeness gap is 80% of the logit's change at 8 steps, 4% at 32, 2% at 128), and the
# fusion alone is cheap.
SPLIT_MIN_STEPS = 128
# The leading axis of every map and region: the order of ImagePair's channels.
IMAGES = ("prior", "current")
ENCODERS = {"prior": "prior_encoder", "current": "current_encoder"}


# ----------------------------------------------------------------------------- pixels


class ImagePair(ImgFeatAlign):
  """ImgFeatAlign on a prior and a current image stacked as channels, for the image methods.

  ``images [B, H, W, 2]`` (channel 0 the prior, 1 the current) -> the fused risk logits
  ``[B, Y]``; the example's time gap ``[]`` years and, when the model aligns, its registration
  flow ``[H, W, 2]`` come from the ``context`` collection (data, not weights, so a new example
  does not recompile). The model's own forward pass in its ``attribution_mode`` with the flow
  given (see the module docstring), so the maps are of the same function.
  """

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 2:
      raise ValueError(f"images must be [B, H, W, 2] (prior, current), got {images.shape}")
    batch = images.shape[:1]
    time_gap = jnp.broadcast_to(self.get_variable("context", "time_gap"), batch)
    flow = None
    if self.has_variable("context", "flow"):
      flow = self.get_variable("context", "flow")
      flow = jnp.broadcast_to(flow, batch + flow.shape)
    outputs = super().__call__(images[..., 1:], images[..., :1], time_gap, train, flow)
    return outputs["risk_prediction"]["pred_fused"]


def hashable_model(model: ImgFeatAlign) -> ImgFeatAlign:
  """``model`` with its registration network's list fields (a config read back from JSON) as
  tuples: the model is a static argument of the jitted programs, so it is hashed."""
  registration = model.registration
  lists = {
    field.name: getattr(registration, field.name)
    for field in dataclasses.fields(registration)
    if isinstance(getattr(registration, field.name, None), list)
  }
  if not lists:
    return model
  return model.clone(registration=registration.clone(**hashable_fields(lists)))


def pair_adapter(
  model: ImgFeatAlign,
  variables: Mapping[str, Any],
  time_gap: float | jax.Array,
  flow: jax.Array | None = None,
) -> ModelAdapter:
  """An adapter over one example's image pair (:class:`ImagePair`).

  Args:
    model: the trained ImgFeatAlign.
    variables: its variables (``params``, ``batch_stats``).
    time_gap: the example's years between the exams.
    flow: the example's registration flow ``[H, W, 2]`` (the model's ``deformation_field``,
      :func:`model_outputs`), held fixed; required when the model aligns the prior.
  Returns:
    A :class:`ModelAdapter` whose images are ``[B, H, W, 2]`` (prior, current) and whose
    logits are the fused head's ``[B, Y]``; layers ``prior_encoder/layer3``,
    ``current_encoder/layer3``, ...; the encoder's ReLUs replaceable.
  """
  model = hashable_model(model)
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init}
  fields.update(attribution_mode=True, encoder_activation=jax.nn.relu, parent=None, name=None)
  module = ImagePair(**fields)
  nested: dict[str, Any] = {}
  for collection in ("params", "batch_stats"):
    if collection in variables:
      tree = dict(variables[collection])
      encoder = tree.pop("encoder", None)
      if encoder is not None:  # the one encoder's weights, under both of its calls' names
        tree.update({name: encoder for name in ENCODERS.values()})
      nested[collection] = tree
  nested["context"] = {"time_gap": jnp.asarray(time_gap, jnp.float32)}
  if model.use_prior and model.align:
    if flow is None:
      raise ValueError("this ImgFeatAlign aligns the prior: give the example's flow [H, W, 2]")
    nested["context"]["flow"] = jnp.asarray(flow, jnp.float32)
  return module_adapter(
    module, nested, apply_kwargs={"train": False}, activation_field="encoder_activation"
  )


def encoder_layer(adapter: ModelAdapter, images: jax.Array, requested: str = "") -> str:
  """GradCAM's encoder layer: ``requested`` (checked), else the last encoder stage whose map
  has more than one position (``layer4`` unless both sides of the images are at most 32
  pixels)."""
  prefix = f"{ENCODERS['current']}/"
  stages = {
    name.removeprefix(prefix): shape
    for name, shape in layer_shapes(adapter, images).items()
    if name.startswith(prefix) and len(shape) == 4
  }
  if requested:
    if requested not in stages:
      raise ValueError(
        f"--layer={requested}: ImgFeatAlign's GradCAM layers are the encoder's "
        f"{', '.join(stages)} (taken in the prior's and in the current image's encoder call)"
      )
    return requested
  wide = [name for name, shape in stages.items() if shape[1] * shape[2] > 1]
  return (wide or list(stages))[-1]


@functools.partial(jax.jit, static_argnames="layers")
def _pair_cams(
  adapter: ModelAdapter, images: jax.Array, target: jax.Array, layers: tuple[str, ...]
) -> list[jax.Array]:
  """Signed GradCAM ``[B, h, w]`` at each of ``layers`` (Captum's ``LayerGradCam``: the
  gradient's spatial mean weights the channels), from one backward pass."""
  maps = []
  for activation, gradient in layers_activation_and_gradient(adapter, images, target, layers):
    weights = jnp.mean(gradient, axis=(1, 2), keepdims=True)
    maps.append(jnp.sum(weights * activation, axis=-1))
  return maps


def pair_maps(
  adapter: ModelAdapter,
  images: jax.Array,
  target: jax.Array,
  methods: Sequence[str],
  settings: MethodSettings,
) -> dict[str, np.ndarray]:
  """Each method's maps of one image pair, prior first: GradCAM ``[2, H, W]`` (at
  ``settings.layer`` of each image's encoder call, both from one backward pass, resized with
  ``settings.upsample``), the pixel methods ``[2, H, W, 1]`` (guided GradCAM: the guided
  gradient of each image times its own call's ReLU'd GradCAM, as Captum's ``GuidedGradCam``).

  Args:
    adapter: :func:`pair_adapter`'s.
    images: ``[1, H, W, 2]`` (prior, current).
    target: ``[1]``, the year index.
    methods: names of :data:`mammojax.interpret.methods.METHODS`.
    settings: the methods' settings; ``layer`` is an encoder stage (``layer3``).
  """
  pixel = [m for m in methods if m not in LAYER_METHODS]
  if "guided_gradcam" in methods and "guided_backprop" not in pixel:
    pixel.append("guided_backprop")
  joint = attribution_maps(adapter, images, target, pixel, settings)
  out = {name: np.moveaxis(values[0], -1, 0)[..., None] for name, values in joint.items()}
  if any(m in LAYER_METHODS for m in methods):
    # The model ignores the prior without use_prior, and its encoder call does not exist.
    used = IMAGES if adapter.module.use_prior else ("current",)
    layers = tuple(f"{ENCODERS[image]}/{settings.layer}" for image in used)
    cams = dict(zip(used, _pair_cams(adapter, images, target, layers)))
    size = tuple(images.shape[1:3])

    def resized(image: str, relu: bool) -> np.ndarray:  # [H, W]
      if image not in cams:
        return np.zeros(size, np.float32)
      cam = jax.nn.relu(cams[image]) if relu else cams[image]  # Captum: ReLU, then resize
      return np.asarray(interpolate(cam, size, settings.upsample))[0]

    out["gradcam"] = np.stack([resized(image, relu=False) for image in IMAGES])
    if "guided_gradcam" in methods:
      relu_cams = np.stack([resized(image, relu=True) for image in IMAGES])
      out["guided_gradcam"] = out["guided_backprop"] * relu_cams[..., None]
  return {name: np.asarray(out[name], np.float32) for name in methods}


# ----------------------------------------------------------------------------- features


def integrated_gradients_over(
  fn: Callable[..., jax.Array],
  inputs: Sequence[jax.Array],
  *,
  n_steps: int = 50,
  method: str = "gausslegendre",
) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Integrated gradients of ``fn`` over several inputs together, each from zeros.

  ``attribution_i = x_i * sum_k w_k * d fn / d x_i (alpha_k x)`` over the quadrature
  ``(alpha_k, w_k)`` of :func:`~mammojax.interpret.integrated.quadrature`, every input on the
  same straight path; all ``n_steps * B`` points go through ``fn`` in one batch.

  Args:
    fn: ``(*inputs) -> [N]``, one value per row, rows independent. It is called with
      ``N = n * B`` rows (the ``B`` examples repeated ``n`` times, row ``r`` being example
      ``r % B``): tile any per-example constant with ``jnp.tile(x, N // B)``.
    inputs: arrays ``[B, ...]``.
    n_steps: integration points.
    method: a rule of :data:`mammojax.interpret.integrated.METHODS`.
  Returns:
    ``(attributions, delta)``: one array per input, shaped as it, and ``delta`` ``[B]``, the
    sum of all attributions minus ``fn(inputs) - fn(zeros)`` (completeness: near 0 when the
    quadrature is accurate).
  """
  inputs = tuple(jnp.asarray(x) for x in inputs)
  batch = inputs[0].shape[0]
  alphas, weights = quadrature(method, n_steps)
  alphas = jnp.asarray(alphas, inputs[0].dtype)
  weights = jnp.asarray(weights, inputs[0].dtype)

  def along(x: jax.Array) -> jax.Array:  # [B, ...] -> the path's points [S * B, ...]
    points = alphas.reshape((-1,) + (1,) * x.ndim) * x[None]
    return points.reshape((n_steps * batch,) + x.shape[1:])

  def total(*points: jax.Array) -> jax.Array:
    return jnp.sum(fn(*points))

  gradients = jax.grad(total, argnums=tuple(range(len(inputs))))(*map(along, inputs))
  attributions = tuple(
    x * jnp.tensordot(weights, g.reshape((n_steps, batch) + x.shape[1:]), axes=1)
    for x, g in zip(inputs, gradients)
  )
  ends = fn(*(jnp.concatenate([x, jnp.zeros_like(x)]) for x in inputs))
  summed = sum(jnp.sum(a.reshape(batch, -1), axis=1) for a in attributions)
  return attributions, summed - (ends[:batch] - ends[batch:])


class RiskSplit(NamedTuple):
  """The fused logit of one year split over its feature inputs (each ``[B]``, logit units).

  Attributes:
    current: the current features' share.
    prior: the prior features' own share (through the aligned prior).
    alignment: the share of the warp's change to the prior features.
    logit: the fused logit of the example.
    baseline_logit: the fused logit of zero features (the same time gap).
    delta: ``current + prior + alignment - (logit - baseline_logit)``.
  """

  current: jax.Array
  prior: jax.Array
  alignment: jax.Array
  logit: jax.Array
  baseline_logit: jax.Array
  delta: jax.Array


@functools.partial(jax.jit, static_argnames=("fusion", "n_steps"))
def _risk_split(
  fusion: AttentionRiskFusion,
  variables: Mapping[str, Any],
  features: tuple[jax.Array, jax.Array, jax.Array],
  time_gap: jax.Array,
  target: jax.Array,
  n_steps: int,
) -> RiskSplit:
  current, prior, aligned = features
  batch = current.shape[0]

  def logit(c: jax.Array, p: jax.Array, d: jax.Array) -> jax.Array:
    reps = c.shape[0] // batch
    a = p + d
    out = fusion.apply(
      variables, c, p, a, jnp.abs(c - a), jnp.tile(time_gap, reps), deterministic=True
    )
    return target_logits(out["pred_fused"], jnp.tile(target, reps))

  inputs = (current, prior, aligned - prior)
  attributions, delta = integrated_gradients_over(logit, inputs, n_steps=n_steps)
  shares = [jnp.sum(a.reshape(batch, -1), axis=1) for a in attributions]
  ends = logit(*(jnp.concatenate([x, jnp.zeros_like(x)]) for x in inputs))
  return RiskSplit(*shares, ends[:batch], ends[batch:], delta)


def risk_split(
  model: ImgFeatAlign,
  variables: Mapping[str, Any],
  outputs: Mapping[str, Any],
  time_gap: jax.Array,
  target: int | jax.Array,
  *,
  n_steps: int = 50,
) -> RiskSplit:
  """The fused year-``target`` logit split over the current features, the prior features and
  the alignment's change to them (see the module docstring).

  Args:
    model: the trained ImgFeatAlign.
    variables: its variables.
    outputs: the model's outputs on the examples (``current_feature``, ``prior_feature``,
      ``aligned_prior_feature``, each ``[B, h, w, D]``).
    time_gap: ``[B]`` years.
    target: the year index of each example, ``[B]`` or one int.
    n_steps: integration points.
  """
  current = jnp.asarray(outputs["current_feature"])
  batch = current.shape[0]
  fusion_variables = {c: t["risk_model"] for c, t in variables.items() if "risk_model" in t}
  return _risk_split(
    AttentionRiskFusion(**fusion_fields(model)),
    fusion_variables,
    (current, jnp.asarray(outputs["prior_feature"]), jnp.asarray(outputs["aligned_prior_feature"])),
    jnp.broadcast_to(jnp.asarray(time_gap, jnp.float32), (batch,)),
    jnp.broadcast_to(jnp.asarray(target, jnp.int32), (batch,)),
    n_steps=n_steps,
  )


@functools.partial(jax.jit, static_argnames="model")
def model_outputs(
  model: ImgFeatAlign,
  variables: Mapping[str, Any],
  current_image: jax.Array,
  previous_image: jax.Array,
  time_gap: jax.Array,
) -> dict[str, Any]:
  """The model's evaluation outputs (risk logits, features, deformation field), plus
  ``'warped_prior'`` ``[B, H, W, 1]``: the prior image warped by the deformation field."""
  outputs = model.apply(variables, current_image, previous_image, time_gap, train=False)
  flow = outputs["deformation_field"].astype(previous_image.dtype)
  return {**outputs, "warped_prior": warp(previous_image, flow, impl=model.warp_impl)}


# ----------------------------------------------------------------------------- the command


@dataclasses.dataclass
class PairRunner:
  """``python -m mammojax.explain`` on an ImgFeatAlign run, one example at a time.

  An example's ``images`` are ``[2, H, W, 1]`` (prior, current), its ``context`` holds the
  ``time_gap``, its ``region`` (when known) is ``[2, H, W]`` in the same order.
  """

  model: ImgFeatAlign
  variables: Mapping[str, Any]

  rectified = True  # the Mirai encoder's ReLUs

  def __post_init__(self):
    self.model = hashable_model(self.model)

  notes = (
    "maps and regions carry a leading axis (prior, current); the target is the year index k of "
    "the fused risk (cancer within k + 1 years); risk_split is integrated gradients of that "
    "logit over the current features, the prior features and the alignment's change to them "
    f"(at least {SPLIT_MIN_STEPS} steps)",
  )

  def _outputs(self, example: Any) -> dict[str, Any]:
    prior_image, current_image = (jnp.asarray(image)[None] for image in example.images)
    time_gap = jnp.asarray([example.context["time_gap"]], jnp.float32)
    return model_outputs(self.model, self.variables, current_image, prior_image, time_gap)

  def _adapter(self, example: Any, outputs: Mapping[str, Any]) -> ModelAdapter:
    time_gap = float(example.context["time_gap"])
    flow = outputs["deformation_field"][0]
    return pair_adapter(self.model, self.variables, time_gap, flow)

  @staticmethod
  def _pair(example: Any) -> jax.Array:
    return jnp.asarray(np.concatenate(list(example.images), axis=-1)[None])  # [1, H, W, 2]

  def layer(self, requested: str, example: Any) -> str:
    # The flow's value does not change the layers' shapes: zeros spare the model's forward pass.
    shape = (*np.shape(example.images)[1:3], 2)
    adapter = self._adapter(example, {"deformation_field": np.zeros((1, *shape), np.float32)})
    return encoder_layer(adapter, self._pair(example), requested)

  def year(self, target: int | None) -> int:
    years = self.model.num_years
    if target is None:
      return years - 1
    if not 0 <= target < years:
      raise ValueError(
        f"--target={target}: this ImgFeatAlign run predicts the risk of years 1..{years}; give "
        f"the year index 0..{years - 1} (default: {years - 1}, the last)"
      )
    return target

  def explain(
    self,
    example: Any,
    directory: str,
    methods: Sequence[str],
    settings: MethodSettings,
    target: int | None,
  ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Maps, splits, scores and writes one example; returns its row and scores."""
    year = self.year(target)
    outputs = self._outputs(example)
    time_gap = jnp.asarray([example.context["time_gap"]], jnp.float32)
    logit = float(outputs["risk_prediction"]["pred_fused"][0, year])
    adapter = self._adapter(example, outputs)
    maps = pair_maps(adapter, self._pair(example), jnp.asarray([year]), methods, settings)
    steps = max(settings.n_steps, SPLIT_MIN_STEPS)
    split = risk_split(self.model, self.variables, outputs, time_gap, year, n_steps=steps)
    shares = {name: float(getattr(split, name)[0]) for name in ("current", "prior", "alignment")}
    probability = float(jax.nn.sigmoid(logit))
    aligned = self.model.use_prior and self.model.align
    report.write_pair_example(
      directory,
      example.images,
      np.asarray(outputs["warped_prior"][0]) if aligned else None,
      maps,
      shares,
      f"{example.name}: risk within {year + 1} y (p={probability:.2f})",
    )
    row = {
      "name": example.name,
      "target": year,
      "probability": probability,
      **(example.info or {}),
      "risk_split": {
        **shares,
        "aligned_prior": shares["prior"] + shares["alignment"],
        "logit": float(split.logit[0]),
        "baseline_logit": float(split.baseline_logit[0]),
        "delta": float(split.delta[0]),
        "n_steps": steps,
      },
    }
    scores = {}
    if example.region is not None:
      scores = report.score_per_image(maps, example.region, IMAGES)
    return row, scores
