"""EfficientNet image encoder (B2 by default) laid out like Mammo-CLIP's `efficientnet_custom`.

The layer layout (stem, 23 MBConv blocks for B2, optional 1x1 head) and the parameter names follow
the efficientnet_pytorch layout that Mammo-CLIP checkpoints use, so `mammojax.convert.mammoclip`
can import them one to one. Batch norm uses epsilon 1e-3 and, by default, a running-average
momentum of 0.99 (torch momentum 0.01).

"Same" padding comes in two flavours:

* dynamic (``static_padding_size=None``): TensorFlow SAME computed from the actual input size;
* static (``static_padding_size=(h, w)``): the padding each convolution would get for an input of
  ``(h, w)``, applied whatever the real input size is, as efficientnet_pytorch's
  ``Conv2dStaticSamePadding`` does. Mammo-CLIP builds B2 for 260x260 (`MAMMOCLIP_STATIC_SIZE`) and
  runs it on 512x512 patches, so only the static flavour reproduces its feature maps.

Only stride-2 convolutions can differ between the two (a stride-1 SAME convolution always pads
``k - 1`` in total).

Feature maps are sown into the ``'intermediates'`` collection when the caller makes it mutable
(``apply(..., mutable=['intermediates'])``): ``stem`` (after ``bn0`` and swish), each block's
output as ``blocks_<i>/output`` (efficientnet_pytorch's ``_blocks.<i>``) and, with
``include_head``, ``head``; each also passes through ``perturb``
(:func:`mammojax.nn.intermediates.expose`) for attribution. Swish is injectable (``activation``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mammojax.nn import initializers, partitioning
from mammojax.nn.depthwise_conv import DepthwiseConv
from mammojax.nn.depthwise_conv import Impl as DepthwiseImpl
from mammojax.nn.intermediates import expose

Activation = Callable[[jax.Array], jax.Array]

# The image size efficientnet_pytorch assigns to B2; Mammo-CLIP's static paddings come from it.
MAMMOCLIP_STATIC_SIZE = (260, 260)

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage of the B0 template before width/depth scaling."""

  repeats: int
  kernel: int
  stride: int
  expand: int
  in_filters: int
  out_filters: int
  se_ratio: float = 0.25


# The EfficientNet-B0 template (Tan & Le 2019, Table 1); other variants scale it.
B0_STAGES = (
  StageSpec(1, 3, 1, 1, 32, 16),
  StageSpec(2, 3, 2, 6, 16, 24),
  StageSpec(2, 5, 2, 6, 24, 40),
  StageSpec(3, 3, 2, 6, 40, 80),
  StageSpec(3, 5, 1, 6, 80, 112),
  StageSpec(4, 5, 2, 6, 112, 192),
  StageSpec(1, 3, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One MBConv block after scaling."""

  kernel: int
  stride: int
  expand: int
  in_filters: int
  out_filters: int
  se_ratio: float


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Scales a channel count by ``width`` and rounds it to a multiple of ``divisor``."""
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:  # Never round down by more than 10%.
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
  """Scales a stage's block count by ``depth`` (ceil)."""
  return int(math.ceil(depth * repeats))


def block_specs(
  width: float, depth: float, stages: Sequence[StageSpec] = B0_STAGES
) -> tuple[BlockSpec, ...]:
  """The MBConv blocks of a scaled EfficientNet, in order (23 for B2: width 1.1, depth 1.2)."""
  blocks = []
  for stage in stages:
    in_f = round_filters(stage.in_filters, width)
    out_f = round_filters(stage.out_filters, width)
    for i in range(round_repeats(stage.repeats, depth)):
      blocks.append(
        BlockSpec(
          stage.kernel,
          stage.stride if i == 0 else 1,
          stage.expand,
          in_f if i == 0 else out_f,
          out_f,
          stage.se_ratio,
        )
      )
  return tuple(blocks)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow SAME padding (low, high) of one axis for an input of ``size`` pixels."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _padding_2d(
  size_hw: tuple[int, int], kernel: int, stride: int
) -> tuple[tuple[int, int], tuple[int, int]]:
  return same_padding(size_hw[0], kernel, stride), same_padding(size_hw[1], kernel, stride)


def _conv_kernel_init() -> nn.initializers.Initializer:
  return partitioning.conv_kernel_init(initializers.he_fan_out_normal)


def _depthwise_kernel_init() -> nn.initializers.Initializer:
  return partitioning.depthwise_kernel_init(initializers.he_fan_out_normal)


def _batch_norm(train: bool, name: str, dtype: jnp.dtype, momentum: float) -> nn.BatchNorm:
  return nn.BatchNorm(
    use_running_average=not train, momentum=momentum, epsilon=BN_EPSILON, dtype=dtype, name=name
  )


class MBConvBlock(nn.Module):
  """Mobile inverted bottleneck with squeeze-excitation and swish.

  Attributes:
    spec: kernel, stride, expansion and channel counts of the block.
    drop_connect_rate: probability of dropping the residual branch per sample in training.
    static_input_size: (h, w) the block's static paddings are computed for; None for dynamic.
    batch_norm_momentum: decay of the batch-norm running averages.
    depthwise_impl: lowering of the depthwise convolution (``mammojax.nn.depthwise_conv``).
    activation: swish (SiLU) after the expansion, the depthwise conv and the SE reduction.
  """

  spec: BlockSpec
  drop_connect_rate: float = 0.0
  static_input_size: tuple[int, int] | None = None
  batch_norm_momentum: float = BN_MOMENTUM
  depthwise_impl: DepthwiseImpl = "auto"
  dtype: jnp.dtype = jnp.float32
  activation: Activation = nn.swish

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, in_filters] -> [B, ceil(H / stride), ceil(W / stride), out_filters]."""
    spec = self.spec
    inputs = x
    expanded = spec.in_filters * spec.expand
    if spec.expand != 1:
      x = nn.Conv(
        expanded,
        (1, 1),
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_conv_kernel_init(),
        name="expand_conv",
      )(x)
      x = self.activation(_batch_norm(train, "bn0", self.dtype, self.batch_norm_momentum)(x))
    size = self.static_input_size or (x.shape[1], x.shape[2])
    x = DepthwiseConv(
      (spec.kernel, spec.kernel),
      strides=(spec.stride, spec.stride),
      padding=_padding_2d(size, spec.kernel, spec.stride),
      impl=self.depthwise_impl,
      dtype=self.dtype,
      kernel_init=_depthwise_kernel_init(),
      name="depthwise_conv",
    )(x)
    x = self.activation(_batch_norm(train, "bn1", self.dtype, self.batch_norm_momentum)(x))
    if 0 < spec.se_ratio <= 1:
      squeezed = max(1, int(spec.in_filters * spec.se_ratio))
      s = jnp.mean(x, axis=(1, 2), keepdims=True)
      s = self.activation(
        nn.Conv(
          squeezed, (1, 1), dtype=self.dtype, kernel_init=_conv_kernel_init(), name="se_reduce"
        )(s)
      )
      s = nn.Conv(
        expanded, (1, 1), dtype=self.dtype, kernel_init=_conv_kernel_init(), name="se_expand"
      )(s)
      x = x * nn.sigmoid(s)
    x = nn.Conv(
      spec.out_filters,
      (1, 1),
      use_bias=False,
      dtype=self.dtype,
      kernel_init=_conv_kernel_init(),
      name="project_conv",
    )(x)
    x = _batch_norm(train, "bn2", self.dtype, self.batch_norm_momentum)(x)
    if spec.stride == 1 and spec.in_filters == spec.out_filters:
      if train and self.drop_connect_rate > 0:
        keep = 1.0 - self.drop_connect_rate
        rng = self.make_rng("dropout")
        alive = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, 1))
        x = jnp.where(alive, x / keep, jnp.zeros_like(x))
      x = x + inputs
    return expose(self, "output", x)


class EfficientNet(nn.Module):
  """EfficientNet feature extractor (B2 by default) returning the stride-16 and stride-32 maps.

  Attributes:
    width: channel multiplier (B2: 1.1).
    depth: block-count multiplier (B2: 1.2).
    static_padding_size: (h, w) for efficientnet_pytorch static SAME padding
      (`MAMMOCLIP_STATIC_SIZE` reproduces Mammo-CLIP), or None for padding computed from the input.
    drop_connect_rate: stochastic-depth rate; block i drops with ``rate * i / num_blocks``.
    include_head: also compute the 1x1 head conv + BN + swish (1408 channels for B2) that
      Mammo-CLIP uses for its global image embedding.
    batch_norm_momentum: decay of the batch-norm running averages: 0.99 as Mammo-CLIP; a network
      trained from scratch for a few hundred steps needs a shorter memory (0.9, torch's default)
      or its running averages lag its weights and the evaluation-mode outputs are off.
    depthwise_impl: 'auto' (shifted multiply-adds on CPU, the native grouped convolution
      elsewhere), 'conv' or 'taps'; same parameters and outputs (``mammojax.nn.depthwise_conv``).
    activation: every swish of the network (stem, blocks, head).
  """

  width: float = 1.1
  depth: float = 1.2
  static_padding_size: tuple[int, int] | None = None
  drop_connect_rate: float = 0.2
  include_head: bool = False
  batch_norm_momentum: float = BN_MOMENTUM
  depthwise_impl: DepthwiseImpl = "auto"
  dtype: jnp.dtype = jnp.float32
  activation: Activation = nn.swish

  @property
  def blocks(self) -> tuple[BlockSpec, ...]:
    return block_specs(self.width, self.depth)

  @property
  def stride16_index(self) -> int:
    """Index of the last block at stride 16 (15 for B2; Mammo-CLIP's C4)."""
    stride, last = 2, 0
    for i, spec in enumerate(self.blocks):
      stride *= spec.stride
      if stride == 16:
        last = i
    return last

  @property
  def stride16_channels(self) -> int:
    return self.blocks[self.stride16_index].out_filters

  @property
  def stride32_channels(self) -> int:
    return self.blocks[-1].out_filters

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Extracts feature maps.

    Args:
      images: [B, H, W, 3] normalised pixels.
      train: batch statistics, drop-connect (needs a 'dropout' rng) and running-average updates.

    Returns:
      {'stride_16': [B, H/16, W/16, 120], 'stride_32': [B, H/32, W/32, 352]} for B2 (sizes are
      ceilings for dynamic padding), plus 'head': [B, H/32, W/32, 1408] with ``include_head``.
    """
    if images.ndim != 4:
      raise ValueError(f"EfficientNet expects images [B, H, W, C], got shape {images.shape}.")
    static = self.static_padding_size
    size = static or (images.shape[1], images.shape[2])
    x = nn.Conv(
      round_filters(32, self.width),
      (3, 3),
      strides=2,
      padding=_padding_2d(size, 3, 2),
      use_bias=False,
      dtype=self.dtype,
      kernel_init=_conv_kernel_init(),
      name="conv_stem",
    )(images)
    x = self.activation(_batch_norm(train, "bn0", self.dtype, self.batch_norm_momentum)(x))
    x = expose(self, "stem", x)
    size = (-(-size[0] // 2), -(-size[1] // 2))
    blocks = self.blocks
    features = {}
    for i, spec in enumerate(blocks):
      x = MBConvBlock(
        spec,
        drop_connect_rate=self.drop_connect_rate * i / len(blocks),
        static_input_size=size if static else None,
        batch_norm_momentum=self.batch_norm_momentum,
        depthwise_impl=self.depthwise_impl,
        dtype=self.dtype,
        activation=self.activation,
        name=f"blocks_{i}",
      )(x, train)
      size = (-(-size[0] // spec.stride), -(-size[1] // spec.stride))
      if i == self.stride16_index:
        features["stride_16"] = x
    features["stride_32"] = x
    if self.include_head:
      h = nn.Conv(
        round_filters(1280, self.width),
        (1, 1),
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_conv_kernel_init(),
        name="conv_head",
      )(x)
      features["head"] = self.activation(
        _batch_norm(train, "bn1", self.dtype, self.batch_norm_momentum)(h)
      )
      features["head"] = expose(self, "head", features["head"])
    return features
