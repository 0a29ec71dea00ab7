"""PyTorch MammoRegNet written from the public architecture, for parity tests and benchmarks.

Channels-first, state_dict keys as the public checkpoints (``Encoder.conv_1.Conv_1.weight``,
``Decoder.trans_5.blocks.0.attn.qkv.weight``, ...). Reproduces the reference numerics that
matter for parity: ``grid_sample``/``affine_grid`` with ``align_corners=True`` and zero padding,
flow upsampling as ``interpolate(2 * flow, scale_factor=2, align_corners=True)``, unmasked
zero-padding of windows, the ``[:n, :n]`` slice of the relative-position index for windows
shrunk to a small map, and the -100 shifted-window mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sample_at_pixels(image: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
  """Bilinear sample ``image [B, C, H, W]`` at pixel ``locations [B, 2, H, W]`` (rows, cols)."""
  height, width = locations.shape[2:]
  rows = 2.0 * (locations[:, 0] / (height - 1) - 0.5)
  cols = 2.0 * (locations[:, 1] / (width - 1) - 0.5)
  return F.grid_sample(
    image, torch.stack([cols, rows], dim=-1), mode="bilinear", align_corners=True
  )


def warp_by_flow(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
  """``image(x + flow(x))``; flow ``[B, 2, H, W]`` pixels, channel 0 = rows."""
  height, width = flow.shape[2:]
  grid_rows, grid_cols = torch.meshgrid(
    torch.arange(height, dtype=flow.dtype), torch.arange(width, dtype=flow.dtype), indexing="ij"
  )
  return sample_at_pixels(image, torch.stack([grid_rows, grid_cols])[None] + flow)


def affine_matrix(params: torch.Tensor) -> torch.Tensor:
  eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=params.dtype)
  return params.reshape(-1, 2, 3) + eye


def affine_flow(params: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
  """Pixel flow ``[B, 2, h, w]`` (rows, cols) of the affine parameters on ``like``'s grid."""
  height, width = like.shape[2:]
  grid = F.affine_grid(affine_matrix(params), list(like.shape), align_corners=True)
  rows = (grid[..., 1] / 2.0 + 0.5) * (height - 1)
  cols = (grid[..., 0] / 2.0 + 0.5) * (width - 1)
  grid_rows, grid_cols = torch.meshgrid(
    torch.arange(height, dtype=params.dtype), torch.arange(width, dtype=params.dtype), indexing="ij"
  )
  return torch.stack([rows - grid_rows, cols - grid_cols], dim=1)


def affine_warp(image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
  grid = F.affine_grid(affine_matrix(params), list(image.shape), align_corners=True)
  return F.grid_sample(image, grid, mode="bilinear", align_corners=True)


def upsample_flow(flow: torch.Tensor) -> torch.Tensor:
  return F.interpolate(2.0 * flow, scale_factor=2, mode="bilinear", align_corners=True)


class Conv_block(nn.Module):  # noqa: N801 (checkpoint module name)
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.Conv_1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.Conv_2 = nn.Conv2d(cout, cout, 3, padding=1)

  def forward(self, x):
    for conv in (self.Conv_1, self.Conv_2):
      x = F.instance_norm(F.leaky_relu(conv(x), 0.2), eps=1e-5)
    return x


class Encoder(nn.Module):
  def __init__(self, cin: int, channels: int):
    super().__init__()
    widths = [cin] + [channels * 2**k for k in range(5)]
    for k in range(5):
      setattr(self, f"conv_{k + 1}", Conv_block(widths[k], widths[k + 1]))

  def forward(self, x):
    out = []
    for k in range(5):
      if k:
        x = F.avg_pool2d(x, 2)
      x = getattr(self, f"conv_{k + 1}")(x)
      out.append(x)
    return out


def partition(x, wh, ww):
  b, h, w, c = x.shape
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, wh * ww, c)


def unpartition(x, wh, ww, b, h, w):
  x = x.reshape(b, h // wh, w // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, -1)


def region_mask(hp, wp, wh, ww, sh, sw):
  """Standard Swin shifted-window mask built by labelling three bands per axis."""
  labels = torch.zeros(1, hp, wp, 1)
  count = 0
  for rows in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
    for cols in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
      labels[:, rows, cols, :] = count
      count += 1
  windows = partition(labels, wh, ww).squeeze(-1)
  diff = windows[:, None, :] - windows[:, :, None]
  return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class Attention(nn.Module):
  def __init__(self, dim, heads, window):
    super().__init__()
    self.heads = heads
    wh, ww = window
    self.relative_position_bias_table = nn.Parameter(
      torch.randn((2 * wh - 1) * (2 * ww - 1), heads) * 0.02
    )
    pos = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    pos = pos.flatten(1)
    rel = pos[:, :, None] - pos[:, None, :]
    index = (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)
    self.register_buffer("relative_position_index", index)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, mask):
    n_all, n, c = x.shape
    hd = c // self.heads
    q, k, v = self.qkv(x).reshape(n_all, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
    attn = (q / math.sqrt(hd)) @ k.transpose(-1, -2)
    idx = self.relative_position_index[:n, :n].reshape(-1)
    attn = attn + self.relative_position_bias_table[idx].reshape(n, n, -1).permute(2, 0, 1)
    if mask is not None:
      nw = mask.shape[0]
      attn = (attn.reshape(-1, nw, self.heads, n, n) + mask[None, :, None]).reshape(
        n_all, self.heads, n, n
      )
    out = attn.softmax(-1) @ v
    return self.proj(out.transpose(1, 2).reshape(n_all, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.linear1 = nn.Linear(dim, hidden)
    self.linear2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.linear2(F.gelu(self.linear1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads, window, mlp_ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)
    self.attn = Attention(dim, heads, window)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x, window, shift, mask):
    b, h, w, _ = x.shape
    wh, ww = window
    y = F.pad(self.norm1(x), (0, 0, 0, (-w) % ww, 0, (-h) % wh))
    hp, wp = y.shape[1:3]
    shifted = shift != (0, 0)
    if shifted:
      y = torch.roll(y, (-shift[0], -shift[1]), (1, 2))
    y = unpartition(self.attn(partition(y, wh, ww), mask if shifted else None), wh, ww, b, hp, wp)
    if shifted:
      y = torch.roll(y, shift, (1, 2))
    x = x + y[:, :h, :w]
    return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
  def __init__(self, dim, depth, heads, window, mlp_ratio=4.0):
    super().__init__()
    self.window = tuple(window)
    self.blocks = nn.ModuleList(Block(dim, heads, window, mlp_ratio) for _ in range(depth))

  def forward(self, x):
    h, w = x.shape[2:]
    window, shift = [], []
    for size, win in zip((h, w), self.window):
      window.append(size if size <= win else win)
      shift.append(0 if size <= win else win // 2)
    hp, wp = (-(-h // window[0]) * window[0], -(-w // window[1]) * window[1])
    mask = region_mask(hp, wp, *window, *shift)
    y = x.permute(0, 2, 3, 1)
    for i, block in enumerate(self.blocks):
      y = block(y, tuple(window), tuple(shift) if i % 2 else (0, 0), mask)
    return y.permute(0, 3, 1, 2)


class Expand(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.up_conv = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
    self.norm = nn.LayerNorm(dim // 2)

  def forward(self, x):
    return self.norm(self.up_conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DeformHead(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.reg_head = nn.Conv2d(cin, 2, 3, padding=1)

  def forward(self, x):
    return self.reg_head(x)


class AffineHead(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.affine_head_1 = nn.Linear(cin, cin // 2, bias=False)
    self.affine_head_2 = nn.Linear(cin // 2, 6, bias=False)

  def forward(self, x):
    params = torch.tanh(self.affine_head_2(F.relu(self.affine_head_1(x.mean((2, 3))))))
    return affine_flow(params, x), params


class Decoder(nn.Module):
  def __init__(self, enc, dec, depth, window):
    super().__init__()
    self.conv_1 = Conv_block(2 * enc + dec, dec)
    for level in (2, 3, 4, 5):
      dim = dec * 2 ** (level - 1)
      setattr(self, f"trans_{level}", Stage(dim, depth, dec // 2 ** (5 - level), window))
      cin = enc * 2**level + (dim if level < 5 else 0)
      setattr(self, f"backdim_{level}", nn.Conv2d(cin, dim, 1))
    for level in (1, 2, 3, 4):
      setattr(self, f"upsample_{level}", Expand(dec * 2**level))
      setattr(self, f"reghead_{level}", DeformHead(dec * 2 ** (level - 1)))
    self.reghead_5 = AffineHead(dec * 16)

  def forward(self, fixed, moving):
    x = self.trans_5(self.backdim_5(torch.cat([fixed[4], moving[4]], 1)))
    flow, params = self.reghead_5(x)
    for level in (4, 3, 2, 1):
      flow_up = upsample_flow(flow)
      warped = warp_by_flow(moving[level - 1], flow_up)
      up = getattr(self, f"upsample_{level}")(x)
      x = torch.cat([fixed[level - 1], up, warped], 1)
      if level > 1:
        x = getattr(self, f"trans_{level}")(getattr(self, f"backdim_{level}")(x))
      else:
        x = self.conv_1(x)
      flow = getattr(self, f"reghead_{level}")(x) + flow_up
    return flow, params


class MammoRegNetTorch(nn.Module):
  """Returns ``(warped, flow, affine_warped, affine_params)`` like the public model."""

  def __init__(
    self, in_channels=1, enc_channels=8, dec_channels=16, num_layers=4, window_size=(5, 5)
  ):
    super().__init__()
    self.Encoder = Encoder(in_channels, enc_channels)
    self.Decoder = Decoder(enc_channels, dec_channels, num_layers, window_size)

  def forward(self, fixed, moving):
    flow, params = self.Decoder(self.Encoder(fixed), self.Encoder(moving))
    return warp_by_flow(moving, flow), flow, affine_warp(moving, params), params
