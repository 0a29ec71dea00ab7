"""ImgFeatAlign: longitudinal risk from current and feature-aligned prior mammograms.

Pipeline (BCRBench ``ImgFeatAlign``): a shared Mirai ResNet-18 encodes the current and the prior
image; a frozen registration network (MammoRegNet; fixed = current, moving = prior) gives a pixel
displacement at image resolution, which is resized to the feature grid and used to warp the prior
features onto the current ones; ``|current - aligned prior|`` carries the time-gap encoding; the
globally pooled [aligned prior, difference, current] tokens go through one post-norm
self-attention block, are averaged and projected, and three cumulative heads predict risk from the
fused token, the current features alone and the (unaligned) prior features alone.

Flow conventions. The registration network returns ``flow [B, H, W, 2]`` in pixels, 'ij'
(channel 0 = rows), ``warped(x) = moving(x + flow(x))``. By default the flow is resized with
:func:`mammojax.nn.warp.resize_displacement` and applied as 'ij', so rows stay rows.
``bcrbench_flow_compat=True`` instead reproduces BCRBench exactly: ``F.interpolate(bilinear,
align_corners=True)``, then channel 0 scaled by the width ratio and used as the column offset and
channel 1 scaled by the height ratio and used as the row offset (``grid_sample`` with
``align_corners=True`` and zero padding), i.e. the two axes of MammoRegNet's flow swapped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.models.risk_model import RiskHeads, RiskModel
from mammojax.nn import initializers, partitioning
from mammojax.nn.cumulative_risk import CumulativeRiskHead
from mammojax.nn.resize import resize_linear_align_corners
from mammojax.nn.resnet import MiraiResNet18
from mammojax.nn.time_encoding import ContinuousTimeEncoding
from mammojax.nn.transformer import TransformerBlock
from mammojax.nn.warp import resize_displacement, warp


def feature_displacement(
  flow: jax.Array, feature_size: tuple[int, int], bcrbench_flow_compat: bool
) -> jax.Array:
  """Image-resolution flow ``[B, H, W, 2]`` ('ij' pixels) -> feature-grid 'ij' pixels ``[B, h, w, 2]``.

  ``bcrbench_flow_compat`` reproduces BCRBench's resize and its reading of channel 0 as columns.
  """
  if not bcrbench_flow_compat:
    return resize_displacement(flow, feature_size)
  _, height, width, _ = flow.shape
  new_h, new_w = feature_size
  resized = resize_linear_align_corners(flow, feature_size)
  as_columns = resized[..., 0] * (new_w / width)
  as_rows = resized[..., 1] * (new_h / height)
  return jnp.stack([as_rows, as_columns], axis=-1)


def global_average_pool(features: jax.Array) -> jax.Array:
  """``[B, H, W, C] -> [B, C]``."""
  return jnp.mean(features, axis=(1, 2))


def temporal_attention_block(
  num_heads: int, dropout_rate: float, ffn_expansion: int, dtype: jnp.dtype, name: str
) -> TransformerBlock:
  """BCRBench's post-norm layer over the short token sequence: ``[B, S, D] -> [B, S, D]``.

  ``x = LN1(x + MHA(x)); x = LN2(x + W2 relu(W1 x))`` with dropout on the attention weights only
  (torch ``nn.MultiheadAttention`` + BCRBench's feed-forward, which has no dropout). Parameters:
  ``attn``, ``norm1``, ``norm2``, ``ff_in``, ``ff_out`` (``mammojax.convert.imgfeatalign``).
  """
  return TransformerBlock(
    num_heads=num_heads,
    mlp_ratio=ffn_expansion,
    pre_norm=False,
    activation=nn.relu,
    attention_dropout_rate=dropout_rate,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-5,
    dtype=dtype,
    name=name,
  )


class AttentionRiskFusion(nn.Module):
  """BCRBench's ``RiskModelWithAttention``: feature maps + time gap -> three risk heads.

  With ``use_prior=False`` the attention sees the current token alone (prior, aligned prior and
  difference are ignored and may be None) and ``pred_pri`` is the prior head applied to zero
  features (a constant; keep the head out of the loss), so the parameter tree never changes.

  Attributes mirror :class:`ImgFeatAlign`.
  """

  num_years: int = 5
  num_heads: int = 8
  dropout_rate: float = 0.1
  ffn_expansion: int = 4
  max_time: float = 5.0
  time_steps: int = 240
  time_dropout_rate: float = 0.1
  use_prior: bool = True
  use_time_encoding: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    current: jax.Array,
    prior: jax.Array | None,
    aligned_prior: jax.Array | None,
    difference: jax.Array | None,
    time_gap: jax.Array,
    deterministic: bool,
  ) -> dict[str, jax.Array]:
    """Args: feature maps ``[B, h, w, D]``; time_gap ``[B]`` years. Returns logits ``[B, Y]``."""
    batch, _, _, dim = current.shape
    current_pooled = global_average_pool(current)
    if self.use_prior:
      difference_tokens = difference.reshape(batch, -1, dim)
      if self.use_time_encoding:
        difference_tokens = ContinuousTimeEncoding(
          self.max_time, self.time_steps, self.time_dropout_rate, name="time_encoding"
        )(difference_tokens, time_gap, deterministic=deterministic)
      prior_pooled = global_average_pool(prior)
      sequence = jnp.stack(
        [global_average_pool(aligned_prior), jnp.mean(difference_tokens, axis=1), current_pooled],
        axis=1,
      )
    else:
      prior_pooled = jnp.zeros_like(current_pooled)
      sequence = current_pooled[:, None, :]
    attended = temporal_attention_block(
      self.num_heads, self.dropout_rate, self.ffn_expansion, self.dtype, name="attention"
    )(sequence, deterministic)
    fused = partitioning.dense(
      dim, "feature_projection", kernel_init=initializers.torch_default_kernel, dtype=self.dtype
    )(jnp.mean(attended, axis=1))
    head = lambda name: CumulativeRiskHead(self.num_years, self.dtype, name=name)  # noqa: E731
    return {
      "pred_fused": head("head_fused")(fused),
      "pred_cur": head("head_cur")(current_pooled),
      "pred_pri": head("head_pri")(prior_pooled),
    }


class ImgFeatAlign(nn.Module, RiskModel):
  """Feature-level aligned longitudinal risk model (see the module docstring).

  Attributes:
    registration: the frozen registration network, called as ``registration(moving=prior,
      fixed=current)`` with images ``[B, H, W, 1]``; it must return a dict with
      ``'flow'`` ``[B, H, W, 2]`` ('ij' pixels). Its outputs are wrapped in ``stop_gradient``;
      the trainer must also keep the optimizer off its parameters (``params['registration']``).
    num_years: risk horizon (BCRBench ``max_followup``: 5).
    num_heads: attention heads (8).
    dropout_rate: attention-weight dropout (BCRBench ``dropout``: 0.1).
    ffn_expansion: feed-forward width factor (4).
    max_time, time_steps, time_dropout_rate: time encoding (5.0 years, 240 rows, 0.1).
    encoder_width: first-stage width of the Mirai ResNet-18 (64 -> 512 feature channels).
    finetune_all: False (BCRBench default) freezes the encoder: its BatchNorm always uses the
      running statistics and its features are wrapped in ``stop_gradient`` (the trainer should
      also mask its parameters out of the optimizer, e.g. against weight decay).
    align: False replaces the registration flow by the identity (the network is not called;
      ``deformation_field`` is zeros).
    use_prior: False drops the prior: no registration, the fused attention sees only the
      current token; prior / aligned / difference outputs are zeros and ``pred_pri`` is the
      prior head on zero features, excluded from :meth:`risk_heads`.
    use_time_encoding: False leaves the difference tokens without time-gap encoding.
    bcrbench_flow_compat: reproduce BCRBench's flow resize and x/y reading bit for bit instead of
      the geometrically right 'ij' use of the flow.
    warp_impl: ``'gather'`` or ``'map_coordinates'`` (:func:`mammojax.nn.warp.warp`).
    dtype: computation dtype.
    encoder_activation: every ReLU of the encoder (injectable, e.g. for guided backpropagation).
    attribution_mode: the forward pass of attribution (:mod:`mammojax.interpret.risk`): the same
      outputs without the ``stop_gradient`` on a frozen encoder (so that gradients reach the
      pixels), and the encoder called as ``prior_encoder`` and ``current_encoder``, the shared
      weights under both names, so that a layer of each call can be taken alone. Not for
      training.
  """

  registration: nn.Module
  num_years: int = 5
  num_heads: int = 8
  dropout_rate: float = 0.1
  ffn_expansion: int = 4
  max_time: float = 5.0
  time_steps: int = 240
  time_dropout_rate: float = 0.1
  encoder_width: int = 64
  finetune_all: bool = False
  align: bool = True
  use_prior: bool = True
  use_time_encoding: bool = True
  bcrbench_flow_compat: bool = False
  warp_impl: str = "gather"
  dtype: jnp.dtype = jnp.float32
  encoder_activation: Callable[[jax.Array], jax.Array] = nn.relu
  attribution_mode: bool = False

  @nn.compact
  def __call__(
    self,
    current_image: jax.Array,
    previous_image: jax.Array,
    time_gap: jax.Array,
    train: bool,
    flow: jax.Array | None = None,
  ) -> dict[str, Any]:
    """Risk logits and intermediate features.

    Args:
      current_image, previous_image: ``[B, H, W, 1]`` (normalised intensities).
      time_gap: ``[B]`` years between the exams.
      train: dropout on; BatchNorm uses batch statistics iff also ``finetune_all`` (then call
        ``apply(..., mutable=['batch_stats'])``).
      flow: the registration flow ``[B, H, W, 2]`` to use instead of calling the network (e.g.
        the example's own, held fixed while attribution moves its pixels); None: computed.
    Returns:
      ``{'risk_prediction': {'pred_fused', 'pred_cur', 'pred_pri'}`` (logits ``[B, Y]``),
      ``'deformation_field'`` ``[B, H, W, 2]`` ('ij' pixels, image grid), ``'aligned_prior_feature'``,
      ``'prior_feature'``, ``'current_feature'``, ``'diff_feature'`` (``[B, h, w, D]``)}.
    """
    self._check_inputs(current_image, previous_image, time_gap)

    def encoder(name: str) -> MiraiResNet18:
      return MiraiResNet18(
        self.encoder_width, dtype=self.dtype, activation=self.encoder_activation, name=name
      )

    shared = None if self.attribution_mode else encoder("encoder")
    bn_running = not (train and self.finetune_all)

    def encode(image, call):
      module = shared if shared is not None else encoder(f"{call}_encoder")
      features = module(image, use_running_average=bn_running)
      keep_gradient = self.finetune_all or self.attribution_mode
      return features if keep_gradient else jax.lax.stop_gradient(features)

    current = encode(current_image, "current")
    feature_size = current.shape[1:3]
    zeros_field = jnp.zeros(current_image.shape[:3] + (2,), jnp.float32)
    if self.use_prior:
      prior = encode(previous_image, "prior")
      if self.align:
        if flow is None:
          flow = self.registration(moving=previous_image, fixed=current_image)["flow"]
        flow = jax.lax.stop_gradient(flow)
        displacement = feature_displacement(flow, feature_size, self.bcrbench_flow_compat)
        aligned = warp(prior, displacement.astype(prior.dtype), impl=self.warp_impl)
      else:
        flow, aligned = zeros_field, prior
      difference = jnp.abs(current - aligned)
    else:
      flow = zeros_field
      prior = aligned = difference = jnp.zeros_like(current)

    risk = AttentionRiskFusion(**fusion_fields(self), name="risk_model")(
      current, prior, aligned, difference, time_gap, deterministic=not train
    )
    return {
      "risk_prediction": risk,
      "deformation_field": flow,
      "aligned_prior_feature": aligned,
      "prior_feature": prior,
      "current_feature": current,
      "diff_feature": difference,
    }

  def risk_heads(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> RiskHeads:
    """fused and cur against ``target``/``y_mask``; pri against ``target_prior``/``y_mask_prior``."""
    risk = outputs["risk_prediction"]
    heads = {
      "fused": (risk["pred_fused"], batch["target"], batch["y_mask"]),
      "cur": (risk["pred_cur"], batch["target"], batch["y_mask"]),
    }
    if self.use_prior:
      heads["pri"] = (risk["pred_pri"], batch["target_prior"], batch["y_mask_prior"])
    return heads

  def primary_risk(self, outputs: Mapping[str, Any]) -> jax.Array:
    """``sigmoid(pred_fused)``: ``[B, Y]`` probability of cancer within 1..Y years."""
    return jax.nn.sigmoid(outputs["risk_prediction"]["pred_fused"])

  @staticmethod
  def _check_inputs(current_image, previous_image, time_gap) -> None:
    if current_image.ndim != 4 or current_image.shape[-1] != 1:
      raise ValueError(f"current_image must be [B, H, W, 1], got {current_image.shape}")
    if previous_image.shape != current_image.shape:
      raise ValueError(
        f"previous_image {previous_image.shape} must have the shape of "
        f"current_image {current_image.shape}"
      )
    gap_shape = jnp.shape(time_gap)
    if gap_shape not in ((current_image.shape[0],), (current_image.shape[0], 1)):
      raise ValueError(f"time_gap must be [B] = [{current_image.shape[0]}] years, got {gap_shape}")


def fusion_fields(model: ImgFeatAlign) -> dict[str, Any]:
  """The :class:`AttentionRiskFusion` fields of ``model`` (its ``risk_model``), so that the
  fusion can be built and applied on its own, e.g. to attribute the risk to its inputs."""
  names = (
    "num_years",
    "num_heads",
    "dropout_rate",
    "ffn_expansion",
    "max_time",
    "time_steps",
    "time_dropout_rate",
    "use_prior",
    "use_time_encoding",
    "dtype",
  )
  return {name: getattr(model, name) for name in names}
