"""ResNets, channels-last: Mirai's ResNet-18 trunk and torchvision's ResNet-18/34/50.

**Mirai** (:class:`MiraiResNet18`), as Mirai's ``ResNet`` builds it from
``block_layout = 'BasicBlock,2' x 4``:

* ``downsampler``: conv 7x7 / 2 (pad 3, no bias) -> BN -> ReLU -> max-pool 3x3 / 2 (pad 1);
* ``layer{1..4}_{0,1}``: eight basic blocks (two 3x3 convs, no bias, BN after each) with widths
  64, 64, 128, 128, 256, 256, 512, 512. The first block of layers 2-4 convolves with stride 2
  and has a projection shortcut (1x1 conv / 2, no bias, + BN); the other five add the input.

The output is the last block's feature map, ``[B, H/32, W/32, 8 * base_width]``. Submodule names
mirror Mirai's attribute names so that checkpoint import is a renaming. Stage outputs are sown
into the ``'intermediates'`` collection under :data:`INTERMEDIATE_NAMES` (``stem``, ``layer1`` ..
``layer4``) and exposed to attribution like torchvision's (below).

**torchvision** (:class:`ResNet`, ``depth`` 18, 34 or 50; ResNet-50 is v1.5, the stride in the
bottleneck's 3x3 conv): the same stem at the top level (``conv1``, ``bn1``), then four stages of
basic blocks (18: 2, 2, 2, 2; 34: 3, 4, 6, 3) or bottlenecks (50: 3, 4, 6, 3) named
``layer{s}_{b}`` (torchvision's ``layer{s}.{b}``), global average pooling and, when
``num_classes > 0``, a linear classifier ``fc``. A block projects its shortcut (1x1 conv, no
bias, + BN) when it strides or changes the channel count. Sown under torchvision's module names
(:data:`RESNET_INTERMEDIATE_NAMES`), so that an attribution names the same layer as in Captum:
``relu`` (stem after its ReLU, ``[B, H/2, W/2, C]``), ``maxpool`` (``[B, H/4, W/4, C]``),
``layer1`` .. ``layer4`` (each stage's output, down to ``[B, H/32, W/32, C]``) and ``avgpool``
(the pooled ``[B, C]``); sizes round up. Each sown value also passes through Flax's
``perturb`` under the same name (:func:`mammojax.nn.intermediates.expose`), so that gradients with respect to it can be
taken without hooks (:mod:`mammojax.interpret`).

Both: BatchNorm uses torch's defaults (epsilon 1e-5, torch momentum 0.1 == Flax momentum 0.9);
convs are initialised as torchvision does (He normal on fan-out), BN with scale 1 and bias 0.
Sown values are a tuple, one entry per call, stored only when the caller makes the collection
mutable (``apply(..., mutable=['intermediates'])``), e.g. for GradCAM. ReLU is injectable
(``activation``), e.g. for guided backpropagation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.nn import initializers, partitioning
from mammojax.nn.intermediates import expose

Activation = Callable[[jax.Array], jax.Array]

# Torch initialises these convs with normal(0, sqrt(2 / (k*k*out))): He init on fan-out.
_conv_init = partitioning.conv_kernel_init(initializers.he_fan_out_normal)

STAGE_NAMES = (
  "layer1_0",
  "layer1_1",
  "layer2_0",
  "layer2_1",
  "layer3_0",
  "layer3_1",
  "layer4_0",
  "layer4_1",
)
# Sown stage outputs: the downsampler, then the second block of each stage.
INTERMEDIATE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
# What :class:`ResNet` sows, under torchvision's module names.
RESNET_INTERMEDIATE_NAMES = (
  "relu",
  "maxpool",
  "layer1",
  "layer2",
  "layer3",
  "layer4",
  "avgpool",
)


def _batch_norm(name: str, momentum: float, epsilon: float, dtype) -> nn.BatchNorm:
  return nn.BatchNorm(momentum=momentum, epsilon=epsilon, dtype=dtype, name=name)


def _conv(features: int, kernel: int, stride: int, pad: int, name: str, dtype) -> nn.Conv:
  """A bias-free ``kernel x kernel`` conv with torch's explicit symmetric padding."""
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=_conv_init,
    dtype=dtype,
    name=name,
  )


def _stem_conv(
  x: jax.Array,
  features: int,
  use_running_average: bool,
  bn_momentum: float,
  bn_epsilon: float,
  dtype,
  activation: Activation,
) -> jax.Array:
  """conv 7x7 / 2 (``conv1``) -> BN (``bn1``) -> ReLU, created in the calling compact module.

  ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), features]``.
  """
  x = _conv(features, 7, 2, 3, "conv1", dtype)(x)
  x = _batch_norm("bn1", bn_momentum, bn_epsilon, dtype)(x, use_running_average=use_running_average)
  return activation(x)


def _stem_pool(x: jax.Array) -> jax.Array:
  """Max-pool 3x3 / 2, pad 1. Flax pads max-pool windows with -inf, as torch does."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  """Two 3x3 convs with BN and a residual; projection shortcut when ``project``.

  ``[B, H, W, C_in] -> [B, H / stride, W / stride, features]``.
  """

  features: int
  stride: int = 1
  project: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  activation: Activation = nn.relu

  expansion = 1  # output channels / features (a class constant, not a field)

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    conv = lambda feats, k, s, pad, name: _conv(feats, k, s, pad, name, self.dtype)  # noqa: E731
    bn = lambda name: _batch_norm(name, self.bn_momentum, self.bn_epsilon, self.dtype)  # noqa: E731

    out = conv(self.features, 3, self.stride, 1, "conv1")(x)
    out = self.activation(bn("bn1")(out, use_running_average=use_running_average))
    out = conv(self.features, 3, 1, 1, "conv2")(out)
    out = bn("bn2")(out, use_running_average=use_running_average)
    residual = x
    if self.project:
      residual = conv(self.features, 1, self.stride, 0, "downsample_conv")(x)
      residual = bn("downsample_bn")(residual, use_running_average=use_running_average)
    return self.activation(out + residual)


class Bottleneck(nn.Module):
  """torchvision's ResNet v1.5 bottleneck: 1x1 -> 3x3 (with the stride) -> 1x1 to 4x width.

  Each conv is followed by BN, the first two by ReLU; the sum with the shortcut is ReLU'd. The
  shortcut is a projection (1x1 conv with the stride, no bias, + BN) when ``project``.
  ``[B, H, W, C_in] -> [B, H / stride, W / stride, 4 * features]``.
  """

  features: int
  stride: int = 1
  project: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  activation: Activation = nn.relu

  expansion = 4  # output channels / features (a class constant, not a field)

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    conv = lambda feats, k, s, pad, name: _conv(feats, k, s, pad, name, self.dtype)  # noqa: E731
    bn = lambda name: _batch_norm(name, self.bn_momentum, self.bn_epsilon, self.dtype)  # noqa: E731
    out_features = self.expansion * self.features

    out = conv(self.features, 1, 1, 0, "conv1")(x)
    out = self.activation(bn("bn1")(out, use_running_average=use_running_average))
    out = conv(self.features, 3, self.stride, 1, "conv2")(out)
    out = self.activation(bn("bn2")(out, use_running_average=use_running_average))
    out = conv(out_features, 1, 1, 0, "conv3")(out)
    out = bn("bn3")(out, use_running_average=use_running_average)
    residual = x
    if self.project:
      residual = conv(out_features, 1, self.stride, 0, "downsample_conv")(x)
      residual = bn("downsample_bn")(residual, use_running_average=use_running_average)
    return self.activation(out + residual)


class Downsampler(nn.Module):
  """conv 7x7 / 2 -> BN -> ReLU -> max-pool 3x3 / 2: ``[B, H, W, C] -> [B, H/4, W/4, features]``."""

  features: int = 64
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    x = _stem_conv(
      x,
      self.features,
      use_running_average,
      self.bn_momentum,
      self.bn_epsilon,
      self.dtype,
      self.activation,
    )
    return _stem_pool(x)


def _check_images(images: jax.Array, model: str) -> jax.Array:
  """``[B, H, W, 1 or 3]`` -> ``[B, H, W, 3]`` (grayscale repeated); ValueError otherwise."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{model} expects images [B, H, W, 1 or 3], got {images.shape}")
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return images


class MiraiResNet18(nn.Module):
  """Mirai's ResNet-18 trunk.

  Attributes:
    base_width: channels of the first stage; stages use 1, 2, 4, 8 times it (Mirai: 64, so
      the output has 512 channels). Smaller values only make tests cheaper.
    bn_momentum: Flax BatchNorm momentum (0.9 == torch momentum 0.1).
    bn_epsilon: BatchNorm epsilon (torch default 1e-5).
    dtype: computation dtype (parameters stay float32).
    activation: every ReLU of the trunk.
  """

  base_width: int = 64
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, images: jax.Array, use_running_average: bool) -> jax.Array:
    """Feature map of ``images``.

    Args:
      images: ``[B, H, W, 1]`` grayscale (repeated to 3 channels here, as Mirai's 3-channel
        input expects) or ``[B, H, W, 3]``.
      use_running_average: True = BatchNorm uses its running statistics (evaluation, or a
        frozen encoder); False = batch statistics, and ``batch_stats`` must be mutable.
    Returns:
      ``[B, ceil(H/32), ceil(W/32), 8 * base_width]``.
    """
    images = _check_images(images, "MiraiResNet18")
    common = dict(
      bn_momentum=self.bn_momentum,
      bn_epsilon=self.bn_epsilon,
      dtype=self.dtype,
      activation=self.activation,
    )
    x = Downsampler(self.base_width, name="downsampler", **common)(
      images, use_running_average=use_running_average
    )
    x = expose(self, "stem", x)
    for index, name in enumerate(STAGE_NAMES):
      stage = index // 2
      first_of_strided_stage = stage > 0 and index % 2 == 0
      x = BasicBlock(
        self.base_width * 2**stage,
        stride=2 if first_of_strided_stage else 1,
        project=first_of_strided_stage,
        name=name,
        **common,
      )(x, use_running_average=use_running_average)
      if index % 2:
        x = expose(self, INTERMEDIATE_NAMES[stage + 1], x)
    return x


# depth -> (blocks per stage, block class), as torchvision's resnet18 / resnet34 / resnet50.
RESNET_DEPTHS: dict[int, tuple[tuple[int, int, int, int], type[nn.Module]]] = {
  18: ((2, 2, 2, 2), BasicBlock),
  34: ((3, 4, 6, 3), BasicBlock),
  50: ((3, 4, 6, 3), Bottleneck),
}


def _depth_config(depth: int) -> tuple[tuple[int, int, int, int], type[nn.Module]]:
  if depth not in RESNET_DEPTHS:
    raise ValueError(f"unsupported ResNet depth {depth!r}; supported: {sorted(RESNET_DEPTHS)}")
  return RESNET_DEPTHS[depth]


def resnet_feature_dim(depth: int, base_width: int = 64) -> int:
  """Channels of :class:`ResNet`'s pooled features: 512 for depth 18/34, 2048 for 50 (base 64)."""
  _, block = _depth_config(depth)
  return 8 * base_width * block.expansion


class ResNet(nn.Module):
  """torchvision's ResNet-18/34/50 (see the module docstring for the layout and sown names).

  Attributes:
    depth: 18, 34 or 50.
    base_width: channels of the stem and of the first stage's blocks (torchvision: 64); stages
      use 1, 2, 4, 8 times it (times 4 at a bottleneck's output). Smaller only for cheap tests.
    num_classes: 0 = no classifier, return the pooled features; > 0 = a linear ``fc`` (with
      bias) on them, return logits.
    bn_momentum: Flax BatchNorm momentum (0.9 == torch momentum 0.1).
    bn_epsilon: BatchNorm epsilon (torch default 1e-5).
    dtype: computation dtype (parameters stay float32), e.g. ``jnp.bfloat16``.
    activation: every ReLU of the network.
  """

  depth: int = 18
  base_width: int = 64
  num_classes: int = 0
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, images: jax.Array, use_running_average: bool) -> jax.Array:
    """Pooled features or logits of ``images``.

    Args:
      images: ``[B, H, W, 1]`` grayscale (repeated to 3 channels) or ``[B, H, W, 3]``.
      use_running_average: True = BatchNorm uses its running statistics (evaluation, or a
        frozen encoder); False = batch statistics, and ``batch_stats`` must be mutable.
    Returns:
      ``[B, resnet_feature_dim(depth, base_width)]`` features when ``num_classes == 0``, else
      ``[B, num_classes]`` logits.
    """
    stage_sizes, block = _depth_config(self.depth)
    if self.num_classes < 0:
      raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {self.num_classes}")
    images = _check_images(images, f"ResNet-{self.depth}")
    bn = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    x = _stem_conv(images, self.base_width, use_running_average, activation=self.activation, **bn)
    x = expose(self, "relu", x)
    x = expose(self, "maxpool", _stem_pool(x))
    for stage, num_blocks in enumerate(stage_sizes):
      features = self.base_width * 2**stage
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        x = block(
          features,
          stride=stride,
          project=stride != 1 or x.shape[-1] != features * block.expansion,
          activation=self.activation,
          name=f"layer{stage + 1}_{index}",
          **bn,
        )(x, use_running_average=use_running_average)
      x = expose(self, f"layer{stage + 1}", x)
    # Average in float32 whatever the computation dtype.
    x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)
    x = expose(self, "avgpool", x)
    if self.num_classes > 0:
      x = partitioning.dense(
        self.num_classes, "fc", kernel_init=initializers.torch_default_kernel, dtype=self.dtype
      )(x)
    return x
