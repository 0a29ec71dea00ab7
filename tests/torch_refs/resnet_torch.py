"""A PyTorch Mirai-style ResNet-18 trunk, written from the architecture, for parity tests.

Attribute names follow Mirai's ``onconet`` ResNet (``downsampler``, ``layer1_0`` ..
``layer4_1``, ``downsample = Sequential(conv, bn)``), so its ``state_dict`` has Mirai's keys.
"""

import torch
from torch import nn

# Mirai's block names: two BasicBlocks in each of four stages.
BLOCKS = tuple(f"layer{stage}_{block}" for stage in range(1, 5) for block in range(2))


class Downsampler(nn.Module):
  def __init__(self, width):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

  def forward(self, x):
    return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class BasicBlock(nn.Module):
  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
      )

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    residual = x if self.downsample is None else self.downsample(x)
    return torch.relu(out + residual)


class ResNet18Trunk(nn.Module):
  """[B, 3, H, W] -> [B, 8 * width, H/32, W/32]."""

  def __init__(self, width=64):
    super().__init__()
    self.downsampler = Downsampler(width)
    inplanes = width
    for index, name in enumerate(BLOCKS):
      planes = width * 2 ** (index // 2)
      stride = 2 if index >= 2 and index % 2 == 0 else 1
      setattr(self, name, BasicBlock(inplanes, planes, stride))
      inplanes = planes

  def blocks(self):
    return [self.downsampler] + [getattr(self, name) for name in BLOCKS]

  def forward(self, x):
    for block in self.blocks():
      x = block(x)
    return x


def randomize_batch_norm(module, generator):
  """Non-trivial affine parameters and running statistics for every BatchNorm2d."""
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
        m.bias.copy_(0.2 * torch.randn(n, generator=generator))
        m.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
        m.num_batches_tracked.fill_(7)
