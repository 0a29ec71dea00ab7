"""The Mirai image encoder: a ResNet-18 trunk (no pooling, no classifier), channels-last.

Layout, as Mirai's ``ResNet`` builds it from ``block_layout = 'BasicBlock,2' x 4``:

* ``downsampler``: conv 7x7 / 2 (pad 3, no bias) -> BN -> ReLU -> max-pool 3x3 / 2 (pad 1);
* ``layer{1..4}_{0,1}``: eight basic blocks (two 3x3 convs, no bias, BN after each) with widths
  64, 64, 128, 128, 256, 256, 512, 512. The first block of layers 2-4 convolves with stride 2
  and has a projection shortcut (1x1 conv / 2, no bias, + BN); the other five add the input.

The output is the last block's feature map, ``[B, H/32, W/32, 8 * base_width]``. BatchNorm uses
torch's defaults (epsilon 1e-5, torch momentum 0.1 == Flax momentum 0.9). Submodule names mirror
Mirai's attribute names so that checkpoint import is a renaming.

Stage outputs are sown into the ``'intermediates'`` collection under torchvision's names
(:data:`INTERMEDIATE_NAMES`: ``stem``, ``layer1`` .. ``layer4``; a tuple, one entry per call, of
``[B, h, w, C]``) when the caller makes it mutable (``apply(..., mutable=['intermediates'])``),
e.g. for GradCAM; otherwise nothing is stored. ReLU is injectable (``activation``), e.g. for
guided backpropagation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.nn import initializers, partitioning

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


def _batch_norm(name: str, momentum: float, epsilon: float, dtype) -> nn.BatchNorm:
  return nn.BatchNorm(momentum=momentum, epsilon=epsilon, dtype=dtype, name=name)


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

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    conv = lambda feats, k, s, pad, name: nn.Conv(  # noqa: E731
      feats,
      (k, k),
      strides=(s, s),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=_conv_init,
      dtype=self.dtype,
      name=name,
    )
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


class Downsampler(nn.Module):
  """conv 7x7 / 2 -> BN -> ReLU -> max-pool 3x3 / 2: ``[B, H, W, C] -> [B, H/4, W/4, features]``."""

  features: int = 64
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    x = nn.Conv(
      self.features,
      (7, 7),
      strides=(2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      kernel_init=_conv_init,
      dtype=self.dtype,
      name="conv1",
    )(x)
    x = _batch_norm("bn1", self.bn_momentum, self.bn_epsilon, self.dtype)(
      x, use_running_average=use_running_average
    )
    x = self.activation(x)
    # Flax pads max-pool windows with -inf, as torch does.
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


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
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"MiraiResNet18 expects images [B, H, W, 1 or 3], got {images.shape}")
    if images.shape[-1] == 1:
      images = jnp.repeat(images, 3, axis=-1)
    common = dict(
      bn_momentum=self.bn_momentum,
      bn_epsilon=self.bn_epsilon,
      dtype=self.dtype,
      activation=self.activation,
    )
    x = Downsampler(self.base_width, name="downsampler", **common)(
      images, use_running_average=use_running_average
    )
    self.sow("intermediates", "stem", x)
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
        self.sow("intermediates", INTERMEDIATE_NAMES[stage + 1], x)
    return x
