"""A plain-torch EfficientNet written from the architecture, in efficientnet_pytorch's key layout.

Used only by tests and benchmarks: its state dict has the names a Mammo-CLIP checkpoint has under
``image_encoder.`` (``_conv_stem``, ``_bn0``, ``_blocks.{i}._depthwise_conv`` ...), and its SAME
padding is either computed from the input (``static_size=None``) or fixed for ``static_size``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from mammojax.nn.efficientnet import BlockSpec, block_specs, round_filters


def _pad_amounts(size: int, kernel: int, stride: int) -> tuple[int, int]:
  out = math.ceil(size / stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class SameConv(nn.Conv2d):
  """Conv2d with TF SAME padding, static for ``static_size`` (h, w) or computed per input."""

  def __init__(
    self,
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    bias: bool = True,
    static_size: tuple[int, int] | None = None,
  ):
    super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)
    self.static_size = static_size

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h, w = self.static_size or x.shape[-2:]
    k, s = self.kernel_size[0], self.stride[0]
    top, bottom = _pad_amounts(h, k, s)
    left, right = _pad_amounts(w, k, s)
    return F.conv2d(
      F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0, 1, self.groups
    )


def _bn(channels: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class TorchMBConv(nn.Module):
  def __init__(self, spec: BlockSpec, static_size: tuple[int, int] | None, drop_connect: float):
    super().__init__()
    self.spec = spec
    self.drop_connect = drop_connect
    mid = spec.in_filters * spec.expand
    if spec.expand != 1:
      self._expand_conv = SameConv(spec.in_filters, mid, 1, bias=False, static_size=static_size)
      self._bn0 = _bn(mid)
    self._depthwise_conv = SameConv(
      mid, mid, spec.kernel, spec.stride, groups=mid, bias=False, static_size=static_size
    )
    self._bn1 = _bn(mid)
    squeezed = max(1, int(spec.in_filters * spec.se_ratio))
    self._se_reduce = nn.Conv2d(mid, squeezed, 1)
    self._se_expand = nn.Conv2d(squeezed, mid, 1)
    self._project_conv = nn.Conv2d(mid, spec.out_filters, 1, bias=False)
    self._bn2 = _bn(spec.out_filters)

  def forward(self, inputs: torch.Tensor) -> torch.Tensor:
    x = inputs
    if self.spec.expand != 1:
      x = F.silu(self._bn0(self._expand_conv(x)))
    x = F.silu(self._bn1(self._depthwise_conv(x)))
    s = F.silu(self._se_reduce(x.mean(dim=(2, 3), keepdim=True)))
    x = torch.sigmoid(self._se_expand(s)) * x
    x = self._bn2(self._project_conv(x))
    if self.spec.stride == 1 and self.spec.in_filters == self.spec.out_filters:
      if self.training and self.drop_connect > 0:
        keep = 1 - self.drop_connect
        alive = torch.floor(keep + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype))
        x = x / keep * alive
      x = x + inputs
    return x


class TorchEfficientNet(nn.Module):
  """Returns [C4 (stride 16), C5 (stride 32)] and, with ``include_head``, the head map."""

  def __init__(
    self,
    width: float = 1.1,
    depth: float = 1.2,
    static_size: tuple[int, int] | None = None,
    drop_connect_rate: float = 0.2,
    include_head: bool = False,
  ):
    super().__init__()
    specs = block_specs(width, depth)
    stem = round_filters(32, width)
    self._conv_stem = SameConv(3, stem, 3, 2, bias=False, static_size=static_size)
    self._bn0 = _bn(stem)
    size = static_size
    blocks, stride = [], 2
    self.c4_index = 0
    if size is not None:
      size = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    for i, spec in enumerate(specs):
      blocks.append(TorchMBConv(spec, size, drop_connect_rate * i / len(specs)))
      if size is not None:
        size = (math.ceil(size[0] / spec.stride), math.ceil(size[1] / spec.stride))
      stride *= spec.stride
      if stride == 16:
        self.c4_index = i
    self._blocks = nn.ModuleList(blocks)
    self.include_head = include_head
    if include_head:
      self._conv_head = nn.Conv2d(specs[-1].out_filters, round_filters(1280, width), 1, bias=False)
      self._bn1 = _bn(round_filters(1280, width))

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    x = F.silu(self._bn0(self._conv_stem(x)))
    outs = []
    for i, block in enumerate(self._blocks):
      x = block(x)
      if i == self.c4_index:
        outs.append(x)
    outs.append(x)
    if self.include_head:
      outs.append(F.silu(self._bn1(self._conv_head(x))))
    return outs


def randomize_batch_norm(module: nn.Module, generator: torch.Generator) -> None:
  """Gives every BatchNorm/GroupNorm/LayerNorm non-trivial statistics and affine parameters."""
  for m in module.modules():
    if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
      with torch.no_grad():
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=generator))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
        if isinstance(m, nn.BatchNorm2d):
          m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
          m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
