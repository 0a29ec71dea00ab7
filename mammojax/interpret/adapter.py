"""A model seen by the attribution methods: images in, one logit per class out, layers by name.

:class:`ModelAdapter` binds a Flax module to its variables and to the keyword arguments of its
evaluation call (``use_running_average=True`` for a ResNet, ``train=False`` for a ViT). It is a
pytree: the variables are its leaves and everything else is static, so that one jitted method
serves every adapter of the same model and new weights do not recompile it.

A layer is any value the module both sows into ``'intermediates'`` and passes through
``perturb`` (``mammojax.nn.resnet.ResNet`` and ``mammojax.nn.vit.VisionTransformer`` do this for
every stage they sow); see :mod:`mammojax.interpret.layers`. A model joins by doing the same
and, when it has token layers, by naming its patch size; guided backpropagation also needs the
name of the module attribute that holds its ReLU (:attr:`ModelAdapter.activation_field`).

Build one with :func:`resnet_adapter`, :func:`vit_adapter` or, for any other module,
:func:`module_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from mammojax.models.sequence_classifier import ImageClassifier
from mammojax.nn.resnet import ResNet
from mammojax.nn.vit import VisionTransformer, vit_intermediate_names

Activation = Callable[[jax.Array], jax.Array]
# Collections an adapter never keeps: they are produced by the calls themselves.
_TRANSIENT = ("intermediates", "perturbations")


@struct.dataclass
class ModelAdapter:
  """A Flax module with its variables, called for evaluation.

  Attributes:
    variables: the module's variables (``params``, ``batch_stats``, ...), the pytree leaves.
    module: the Flax module.
    apply_kwargs: ``(name, value)`` keyword arguments of every call after the images, e.g.
      ``(("use_running_average", True),)``.
    patch_size: for token models, the patch side: a ``[B, T, D]`` layer is then a patch grid of
      ``image side // patch_size`` per spatial axis (after the class token, if any).
    class_token: whether the first token of a token layer is a class token (dropped from maps).
    zero_gradient_layers: layers whose maps are known to be zero (e.g. the patch tokens of a
      ViT's last block, which never reach the class token); a warning names them when used.
    activation_field: the module attribute holding every ReLU of the model (``'activation'``
      for ResNet), or None; guided backpropagation replaces it when it holds ``nn.relu``.
  """

  variables: Any
  module: nn.Module = struct.field(pytree_node=False)
  apply_kwargs: tuple[tuple[str, Any], ...] = struct.field(pytree_node=False, default=())
  patch_size: int | None = struct.field(pytree_node=False, default=None)
  class_token: bool = struct.field(pytree_node=False, default=False)
  zero_gradient_layers: tuple[str, ...] = struct.field(pytree_node=False, default=())
  activation_field: str | None = struct.field(pytree_node=False, default=None)

  def apply(
    self,
    images: jax.Array,
    perturbations: Any = None,
    mutable: tuple[str, ...] = (),
  ) -> Any:
    """``module.apply`` on ``images`` ``[B, H, W, C]`` with the adapter's variables, plus
    ``perturbations`` when given; returns ``(logits, state)`` when ``mutable`` is non-empty."""
    variables = dict(self.variables)
    if perturbations is not None:
      variables["perturbations"] = perturbations
    kwargs = dict(self.apply_kwargs)
    if mutable:
      return self.module.apply(variables, images, mutable=list(mutable), **kwargs)
    return self.module.apply(variables, images, **kwargs)

  def logits(self, images: jax.Array) -> jax.Array:
    """``[B, H, W, C] -> [B, K]``, pure (not jitted; :meth:`forward` is)."""
    return self.apply(images)

  def forward(self, images: jax.Array) -> jax.Array:
    """Jitted logits ``[B, K]`` of ``images`` ``[B, H, W, C]``."""
    return _forward(self, jnp.asarray(images))

  @property
  def rectifiable(self) -> bool:
    """Whether guided backpropagation can rectify this model's ReLUs (it has ``nn.relu`` in
    :attr:`activation_field`)."""
    field = self.activation_field
    return field is not None and getattr(self.module, field, None) is jax.nn.relu

  def with_activation(self, activation: Activation) -> ModelAdapter:
    """The same adapter with :attr:`activation_field` set to ``activation`` (same variables)."""
    if self.activation_field is None:
      raise ValueError(f"{type(self.module).__name__} adapter has no activation_field to replace")
    return self.replace(module=self.module.clone(**{self.activation_field: activation}))


@jax.jit
def _forward(adapter: ModelAdapter, images: jax.Array) -> jax.Array:
  return adapter.logits(images)


def _plain_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in nn.meta.unbox(dict(variables)).items() if k not in _TRANSIENT}


def module_adapter(
  module: nn.Module,
  variables: Mapping[str, Any],
  *,
  apply_kwargs: Mapping[str, Any] | None = None,
  patch_size: int | None = None,
  class_token: bool = False,
  zero_gradient_layers: tuple[str, ...] = (),
  activation_field: str | None = None,
) -> ModelAdapter:
  """An adapter for any module called as ``module.apply(variables, images, **apply_kwargs)``
  that returns logits ``[B, K]`` (see :class:`ModelAdapter` for the other arguments)."""
  if activation_field is not None and not hasattr(module, activation_field):
    raise ValueError(f"{type(module).__name__} has no attribute {activation_field!r}")
  return ModelAdapter(
    variables=_plain_variables(variables),
    module=module,
    apply_kwargs=tuple(sorted((apply_kwargs or {}).items())),
    patch_size=patch_size,
    class_token=class_token,
    zero_gradient_layers=tuple(zero_gradient_layers),
    activation_field=activation_field,
  )


def resnet_adapter(model: ResNet, variables: Mapping[str, Any]) -> ModelAdapter:
  """torchvision-layout :class:`~mammojax.nn.resnet.ResNet` (BatchNorm on running statistics);
  layers ``relu``, ``maxpool``, ``layer1`` .. ``layer4``, ``avgpool``; every ReLU replaceable."""
  return module_adapter(
    model, variables, apply_kwargs={"use_running_average": True}, activation_field="activation"
  )


def vit_adapter(model: VisionTransformer, variables: Mapping[str, Any]) -> ModelAdapter:
  """:class:`~mammojax.nn.vit.VisionTransformer` in evaluation mode; token layers become patch
  grids. With a class token, the last block's output and ``encoder_norm_out`` are flagged: their
  patch tokens never reach the class token, so their maps are zero."""
  names = vit_intermediate_names(model.depth)
  return module_adapter(
    model,
    variables,
    apply_kwargs={"train": False},
    patch_size=model.patch_size,
    class_token=model.class_token,
    zero_gradient_layers=names[-2:] if model.class_token else (),
    activation_field="activation",
  )


def hashable_fields(fields: Mapping[str, Any]) -> flax.core.FrozenDict:
  """A module's field mapping in a hashable form (lists as tuples): an adapter's module is a
  static argument of the jitted methods, so it is hashed."""

  def frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
      return flax.core.FrozenDict({k: frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
      return tuple(frozen(v) for v in value)
    return value

  return frozen(fields)


def backbone_adapter_options(backbone: Mapping[str, Any]) -> dict[str, Any]:
  """:func:`module_adapter` options of a module whose backbone is
  :func:`~mammojax.models.backbones.build_backbone`'s ``backbone`` fields, and which passes a
  ``backbone_activation`` to it: a ResNet's ReLUs are replaceable; a ViT's tokens are a patch
  grid (class token first) whose last two layers get no gradient."""
  if backbone["kind"] == "resnet":
    return {"activation_field": "backbone_activation"}
  names = vit_intermediate_names(backbone["depth"])
  return {
    "patch_size": backbone["patch_size"],
    "class_token": True,
    "zero_gradient_layers": names[-2:],
  }


def classifier_adapter(model: ImageClassifier, variables: Mapping[str, Any]) -> ModelAdapter:
  """Temporal-GradCam's :class:`~mammojax.models.sequence_classifier.ImageClassifier` on its
  pipeline images ``[B, H, W, 1]`` (maps at that resolution, through the model's own resizing
  and channel repeat); layers ``backbone/layer4`` etc., named ``layer4`` for short."""
  options = backbone_adapter_options(model.backbone)
  activation = {"backbone_activation": jax.nn.relu} if "activation_field" in options else {}
  module = model.clone(backbone=hashable_fields(model.backbone), **activation)
  return module_adapter(module, variables, apply_kwargs={"train": False}, **options)


def as_float(images: Any) -> jax.Array:
  """``images`` as a JAX array of a floating dtype: float32 unless already floating (float64
  under ``jax.enable_x64`` stays float64)."""
  images = jnp.asarray(images)
  return images if jnp.issubdtype(images.dtype, jnp.floating) else images.astype(jnp.float32)


def targets(target: int | jax.Array | None, batch: int) -> jax.Array | None:
  """``target`` as ``[B]`` int32 class indices (an int is used for every example)."""
  if target is None:
    return None
  if np.ndim(target) not in (0, 1) or np.ndim(target) == 1 and np.shape(target) != (batch,):
    raise ValueError(f"target must be an int or [B] = [{batch}] ints, got shape {np.shape(target)}")
  if isinstance(target, jax.core.Tracer):
    return jnp.broadcast_to(jnp.asarray(target, jnp.int32), (batch,))
  return jnp.asarray(np.broadcast_to(np.asarray(target, np.int32), (batch,)))


def target_logits(logits: jax.Array, target: jax.Array | None) -> jax.Array:
  """Each example's target logit ``[B]`` of ``logits`` ``[B, K]`` (``target`` None: ``[B]`` or
  ``[B, 1]`` outputs, taken as they are)."""
  if target is None:
    if logits.ndim == 2 and logits.shape[1] == 1:
      return logits[:, 0]
    if logits.ndim == 1:
      return logits
    raise ValueError(f"a target class is needed for outputs of shape {logits.shape}")
  if logits.ndim != 2:
    raise ValueError(f"expected logits [B, K], got shape {logits.shape}")
  return jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]


def summed_target(adapter: ModelAdapter, target: jax.Array | None) -> Callable[..., jax.Array]:
  """``images -> sum over examples of each one's target logit``.

  Its gradient is every example's own gradient at once: in evaluation mode the models treat the
  examples of a batch independently, so this equals a per-example gradient under ``vmap``.
  """

  def total(images: jax.Array) -> jax.Array:
    return jnp.sum(target_logits(adapter.logits(images), target))

  return total
