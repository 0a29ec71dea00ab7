"""FPN-MIL: multi-scale attention-based multiple instance learning for mammograms.

Instances are the pixels of FPN feature maps at several scales (default strides 16, 32, 128) over
all patches of an image. Each scale has its own instance encoder and pooling, giving one bag
embedding per scale; a gated-attention aggregator combines the scale embeddings and a linear head
classifies the bag. With deep supervision every scale also has a side classifier.

`FPNMIL` runs in one of three input modes, set by which sub-modules it is given:

* ``backbone`` and ``fpn``: patches ``[B, P, H, W, C]`` go through the EfficientNet encoder
  (frozen or fine-tuned) and the FPN (online feature extraction);
* ``fpn`` only: precomputed backbone maps ``{'stride_16': [B, P, h16, w16, C4], 'stride_32':
  [B, P, h32, w32, C5]}`` go through the FPN (the reference's offline mode);
* neither: precomputed per-scale instances ``{scale: [B, N_s, D]}`` with masks go straight to the
  MIL head.

Masks mark real patches / instances (True); padded ones get no attention and change no output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mammojax.nn.efficientnet import EfficientNet
from mammojax.nn.fpn import FPN
from mammojax.nn.mil_pooling import (
  ENCODER_TYPES,
  POOLING_TYPES,
  AttentionPooling,
  InstanceEncoder,
  make_pooling,
)
from mammojax.nn.set_transformer import num_inducing_points

SCALE_AGGREGATORS = ("gated-attention", "attention", "concatenation")


def reference_num_instances(
  image_size: tuple[int, int] = (1520, 912),
  patch_size: int = 512,
  scales: Sequence[int] = (16, 32, 128),
) -> tuple[int, ...]:
  """Instances per scale of a bag as FPN-MIL counts them: (patch/scale)^2 x number of patches."""
  num_patches = math.ceil(image_size[0] / patch_size) * math.ceil(image_size[1] / patch_size)
  return tuple(int((patch_size / s) ** 2 * num_patches) for s in scales)


def reference_num_inducing(
  image_size: tuple[int, int] = (1520, 912),
  patch_size: int = 512,
  scales: Sequence[int] = (16, 32, 128),
) -> tuple[int, ...]:
  """ISAB inducing points per scale as FPN-MIL sets them ((38, 32, 20) for the defaults)."""
  return tuple(
    num_inducing_points(n) for n in reference_num_instances(image_size, patch_size, scales)
  )


class ClassifierHead(nn.Module):
  """Dropout then a linear layer to one logit: [B, D] -> [B]."""

  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    return nn.Dense(
      1,
      name="fc",
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
    )(x)[:, 0]


class MultiScaleMILHead(nn.Module):
  """Per-scale instance encoding and pooling, scale aggregation, classification.

  Attributes:
    scales: the scales (feature strides) the bags come from, in order.
    encoder_type: 'mlp', 'sab' or 'isab'.
    encoder_features: instance embedding width (``fcl_encoder_dim``).
    encoder_dropout: dropout of the MLP encoder (``fcl_dropout``).
    num_encoder_blocks, encoder_heads: SAB / ISAB depth and heads.
    num_inducing: ISAB inducing points per scale (required for 'isab'; see
      `reference_num_inducing`).
    layer_norm: LayerNorm in the Set Transformer blocks (``trans_layer_norm``).
    pooling_type: 'mean', 'max', 'attention', 'gated-attention' or 'pma'.
    attention_hidden: hidden width of the attention pooling and scale aggregator.
    attention_dropout: dropout inside attention pooling and scale aggregator.
    pma_heads: heads of PMA pooling.
    scale_aggregator: 'gated-attention', 'attention' or 'concatenation'.
    deep_supervision: add a side classifier per scale.
    classifier_dropout: dropout before each classifier.
    activation: the ReLU of the instance encoders and of PMA pooling (injectable, e.g. for
      guided backpropagation).
  """

  scales: tuple[int, ...] = (16, 32, 128)
  encoder_type: str = "mlp"
  encoder_features: int = 256
  encoder_dropout: float = 0.0
  num_encoder_blocks: int = 2
  encoder_heads: int = 4
  num_inducing: tuple[int, ...] | None = None
  layer_norm: bool = False
  pooling_type: str = "gated-attention"
  attention_hidden: int = 128
  attention_dropout: float = 0.0
  pma_heads: int = 1
  scale_aggregator: str = "gated-attention"
  deep_supervision: bool = True
  classifier_dropout: float = 0.0
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  def _check_config(self) -> None:
    if self.encoder_type not in ENCODER_TYPES:
      raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, got {self.encoder_type!r}.")
    if self.pooling_type not in POOLING_TYPES:
      raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}.")
    if self.scale_aggregator not in SCALE_AGGREGATORS:
      raise ValueError(
        f"scale_aggregator must be one of {SCALE_AGGREGATORS}, got {self.scale_aggregator!r}."
      )
    if self.encoder_type == "isab" and (
      self.num_inducing is None or len(self.num_inducing) != len(self.scales)
    ):
      raise ValueError(
        'encoder_type="isab" needs num_inducing with one count per scale '
        f"{self.scales}, got {self.num_inducing}; see reference_num_inducing()."
      )

  @nn.compact
  def __call__(
    self,
    instances: Mapping[int, jax.Array],
    masks: Mapping[int, jax.Array] | None = None,
    train: bool = False,
  ) -> dict:
    """Classifies bags.

    Args:
      instances: {scale: [B, N_s, D]} instance features for every scale in ``scales``.
      masks: {scale: [B, N_s]} bool, True for real instances; None when no bag is padded.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      {'logits': [B], 'scale_logits': [B, S] (deep supervision only),
       'scale_weights': [B, S] (attention aggregators only),
       'attention': {scale: [B, N_s]} (attention / gated-attention / PMA pooling only)}.
    """
    self._check_config()
    missing = [s for s in self.scales if s not in instances]
    if missing:
      raise ValueError(
        f"MIL head needs instances for scales {self.scales}; missing {missing} "
        f"(got {sorted(instances)})."
      )
    deterministic = not train
    embeddings, side_logits, attention = [], [], {}
    for i, scale in enumerate(self.scales):
      x = instances[scale]
      mask = None if masks is None else masks.get(scale)
      x = InstanceEncoder(
        self.encoder_type,
        self.encoder_features,
        self.num_encoder_blocks,
        self.encoder_heads,
        self.num_inducing[i] if self.encoder_type == "isab" else 0,
        self.layer_norm,
        self.encoder_dropout,
        activation=self.activation,
        name=f"encoder_{scale}",
      )(x, mask, deterministic)
      bag, weights = make_pooling(
        self.pooling_type,
        features=self.encoder_features,
        attention_hidden=self.attention_hidden,
        dropout=self.attention_dropout,
        num_heads=self.pma_heads,
        layer_norm=self.layer_norm,
        activation=self.activation,
        name=f"aggregator_{scale}",
      )(x, mask, deterministic)
      embeddings.append(bag)
      if weights is not None:
        attention[scale] = weights
      if self.deep_supervision:
        side_logits.append(
          ClassifierHead(self.classifier_dropout, name=f"side_classifier_{scale}")(
            bag, deterministic
          )
        )
    stacked = jnp.stack(embeddings, axis=1)  # [B, S, D]
    out = {}
    if self.scale_aggregator == "concatenation":
      bag = stacked.reshape(stacked.shape[0], -1)
    else:
      bag, scale_weights = AttentionPooling(
        self.attention_hidden,
        gated=self.scale_aggregator == "gated-attention",
        dropout=self.attention_dropout,
        name="scale_aggregator",
      )(stacked, None, deterministic)
      out["scale_weights"] = scale_weights
    out["logits"] = ClassifierHead(self.classifier_dropout, name="classifier")(bag, deterministic)
    if self.deep_supervision:
      out["scale_logits"] = jnp.stack(side_logits, axis=1)
    if attention:
      out["attention"] = attention
    return out


class FPNMIL(nn.Module):
  """The multi-scale MIL model; the input mode follows from which sub-modules are set.

  Attributes:
    head: the MIL head (its ``scales`` choose the FPN levels used).
    fpn: FPN over the backbone's stride-16 / stride-32 maps; None for instance inputs.
    backbone: EfficientNet image encoder; None for precomputed inputs.
    backbone_trainable: fine-tune the backbone; otherwise its outputs are gradient-stopped and its
      batch norm uses running statistics.
    frozen_backbone_batch_stats: with a frozen backbone in training, still normalise with batch
      statistics and update the running ones, as the reference does (it never puts the frozen
      backbone in eval mode).
    gradient_through_frozen_backbone: do not stop the gradient at a frozen backbone's outputs
      (the outputs are the same; only their derivatives are no longer zero), so that attribution
      methods reach the pixels (:mod:`mammojax.interpret.mil`). Not for training: the frozen
      backbone's parameters would get gradients.
  """

  head: MultiScaleMILHead
  fpn: FPN | None = None
  backbone: EfficientNet | None = None
  backbone_trainable: bool = False
  frozen_backbone_batch_stats: bool = False
  gradient_through_frozen_backbone: bool = False

  @nn.compact
  def __call__(
    self, inputs, mask: jax.Array | Mapping[int, jax.Array] | None = None, train: bool = False
  ) -> dict:
    """Runs the model.

    Args:
      inputs: patches [B, P, H, W, C] (backbone + fpn); {'stride_16': [B, P, h, w, C4],
        'stride_32': [B, P, h', w', C5]} (fpn only); or {scale: [B, N_s, D]} (neither).
      mask: [B, P] bool patch mask for the first two modes, {scale: [B, N_s]} for the third;
        None when nothing is padded.
      train: dropout, drop-connect and batch statistics (rngs 'dropout'; mutable 'batch_stats'
        when the backbone trains its batch norm).

    Returns:
      The head's dict (see `MultiScaleMILHead`); in the two map modes 'attention' maps are
      reshaped to the feature grid, {scale: [B, P, h_s, w_s]}, for heatmaps.
    """
    if self.fpn is None:
      if self.backbone is not None:
        raise ValueError("FPNMIL with a backbone also needs an fpn.")
      if not isinstance(inputs, Mapping):
        raise ValueError(
          f"FPNMIL without fpn takes {{scale: [B, N_s, D]}} instances, got {type(inputs).__name__}."
        )
      return self.head(inputs, mask, train)

    if self.backbone is not None:
      if not hasattr(inputs, "ndim") or inputs.ndim != 5:
        raise ValueError(
          "FPNMIL with a backbone takes patches [B, P, H, W, C], got "
          f"{getattr(inputs, 'shape', type(inputs).__name__)}."
        )
      batch, num_patches = inputs.shape[:2]
      backbone_train = train and (self.backbone_trainable or self.frozen_backbone_batch_stats)
      maps = self.backbone(inputs.reshape((-1,) + inputs.shape[2:]), backbone_train)
      if not (self.backbone_trainable or self.gradient_through_frozen_backbone):
        maps = jax.lax.stop_gradient(maps)
      c4, c5 = maps["stride_16"], maps["stride_32"]
    else:
      if not isinstance(inputs, Mapping) or not {"stride_16", "stride_32"} <= set(inputs):
        raise ValueError(
          "FPNMIL with fpn and no backbone takes {'stride_16': [B, P, h, w, C4], "
          "'stride_32': [B, P, h', w', C5]} backbone maps."
        )
      c4, c5 = inputs["stride_16"], inputs["stride_32"]
      if c4.ndim != 5 or c5.ndim != 5 or c4.shape[:2] != c5.shape[:2]:
        raise ValueError(
          "backbone maps must be [B, P, h, w, C] with the same B, P; got "
          f"stride_16 {c4.shape} and stride_32 {c5.shape}."
        )
      batch, num_patches = c4.shape[:2]
      c4 = c4.reshape((-1,) + c4.shape[2:])
      c5 = c5.reshape((-1,) + c5.shape[2:])
    if mask is not None and mask.shape != (batch, num_patches):
      raise ValueError(f"patch mask must be [B, P] = {(batch, num_patches)}, got {mask.shape}.")

    pyramid = self.fpn(c4, c5)
    unknown = [s for s in self.head.scales if s not in pyramid]
    if unknown:
      raise ValueError(f"head scales {unknown} are not FPN levels {sorted(pyramid)}.")
    instances, masks, grids = {}, {}, {}
    for scale in self.head.scales:
      fmap = pyramid[scale]
      h, w, channels = fmap.shape[1:]
      grids[scale] = (h, w)
      instances[scale] = fmap.reshape(batch, num_patches * h * w, channels)
      if mask is not None:
        masks[scale] = jnp.repeat(mask, h * w, axis=1)
    out = self.head(instances, masks if mask is not None else None, train)
    if "attention" in out:
      out["attention"] = {
        s: a.reshape((batch, num_patches) + grids[s]) for s, a in out["attention"].items()
      }
    return out
