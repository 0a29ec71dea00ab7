"""A PyTorch ImgFeatAlign written from the BCRBench architecture description, for parity tests.

Module and buffer names match BCRBench's so ``state_dict()`` has its keys: ``encoder.0..8``
(Sequential of the Mirai trunk), ``mammo_reg_net``, ``risk_model.{positional_encoding.pe,
attention_layer.{attn,norm1,norm2,ff}, feature_projection, head_*}``. The feature warper reads
flow channel 0 as x (columns), as BCRBench's does.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch_refs.resnet_torch import ResNet18Trunk


class TimeTable(nn.Module):
  def __init__(self, dim, max_time=5.0, steps=240, drop=0.1):
    super().__init__()
    self.max_time, self.steps = max_time, steps
    self.dropout = nn.Dropout(drop)
    t = torch.linspace(0, max_time, steps)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(steps, dim)
    table[:, 0::2] = torch.sin(t * freq)
    table[:, 1::2] = torch.cos(t * freq)
    self.register_buffer("pe", table)

  def forward(self, tokens, gap):  # tokens [N, B, C], gap [B]
    pos = gap.float().clamp(0, self.max_time) * (self.steps - 1) / self.max_time
    lo = pos.floor().long()
    hi = pos.ceil().long().clamp(max=self.steps - 1)
    a = (pos - lo)[:, None]
    return self.dropout(tokens + ((1 - a) * self.pe[lo] + a * self.pe[hi])[None])


class CumulativeHead(nn.Module):
  def __init__(self, dim, years):
    super().__init__()
    self.hazard_fc = nn.Linear(dim, years)
    self.base_hazard_fc = nn.Linear(dim, 1)
    self.register_buffer("triangular_mask", torch.ones(years, years).tril().T)

  def forward(self, x):
    h = torch.relu(self.hazard_fc(x))
    return (h[:, :, None] * self.triangular_mask).sum(1) + self.base_hazard_fc(x)


class AttentionLayer(nn.Module):
  def __init__(self, dim, heads, drop, expansion):
    super().__init__()
    self.attn = nn.MultiheadAttention(dim, heads, dropout=drop)
    self.norm1 = nn.LayerNorm(dim)
    self.norm2 = nn.LayerNorm(dim)
    self.ff = nn.Sequential(
      nn.Linear(dim, dim * expansion), nn.ReLU(), nn.Linear(dim * expansion, dim)
    )

  def forward(self, x):  # [S, B, C]
    x = self.norm1(x + self.attn(x, x, x)[0])
    return self.norm2(x + self.ff(x))


class RiskModel(nn.Module):
  def __init__(self, dim, heads=8, drop=0.1, expansion=4, years=5, max_time=5.0, steps=240):
    super().__init__()
    self.positional_encoding = TimeTable(dim, max_time, steps)
    self.attention_layer = AttentionLayer(dim, heads, drop, expansion)
    self.feature_projection = nn.Linear(dim, dim)
    self.head_fused = CumulativeHead(dim, years)
    self.head_cur = CumulativeHead(dim, years)
    self.head_pri = CumulativeHead(dim, years)

  def forward(self, cur, pri, aligned, diff, gap):
    b, c, h, w = diff.shape
    tokens = self.positional_encoding(diff.flatten(2).permute(2, 0, 1), gap)
    diff_pooled = tokens.mean(0)
    pool = lambda f: f.mean((2, 3))
    seq = torch.stack([pool(aligned), diff_pooled, pool(cur)], 0)
    fused = self.feature_projection(self.attention_layer(seq).mean(0))
    return {
      "pred_fused": self.head_fused(fused),
      "pred_cur": self.head_cur(pool(cur)),
      "pred_pri": self.head_pri(pool(pri)),
    }


def bcrbench_resize_flow(flow, feature_hw, image_hw):
  """flow [B, 2, H, W] -> feature grid, channel 0 scaled by the width ratio (read as x)."""
  out = F.interpolate(flow, size=feature_hw, mode="bilinear", align_corners=True).clone()
  out[:, 0] *= feature_hw[1] / image_hw[1]
  out[:, 1] *= feature_hw[0] / image_hw[0]
  return out


def bcrbench_warp(x, flow):
  """grid_sample of x [B, C, H, W] at (x + flow[:, 0], y + flow[:, 1]), align_corners=True."""
  _, _, h, w = x.shape
  ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
  grid = torch.stack([xs + flow[:, 0] * 2 / (w - 1), ys + flow[:, 1] * 2 / (h - 1)], -1)
  return F.grid_sample(x, grid, mode="bilinear", align_corners=True)


class ImgFeatAlignTorch(nn.Module):
  def __init__(self, mammo_reg_net, width=64, **risk_kwargs):
    super().__init__()
    self.encoder = nn.Sequential(*ResNet18Trunk(width).blocks())
    self.risk_model = RiskModel(8 * width, **risk_kwargs)
    self.mammo_reg_net = mammo_reg_net

  def forward(self, cur, pri, gap):
    f_cur = self.encoder(cur.expand(-1, 3, -1, -1))
    f_pri = self.encoder(pri.expand(-1, 3, -1, -1))
    flow = self.mammo_reg_net(cur, pri)[1].detach()
    flow_small = bcrbench_resize_flow(flow, f_cur.shape[2:], cur.shape[2:])
    aligned = bcrbench_warp(f_pri, flow_small)
    diff = (f_cur - aligned).abs()
    return {
      "risk_prediction": self.risk_model(f_cur, f_pri, aligned, diff, gap),
      "deformation_field": flow,
      "aligned_prior_feature": aligned,
      "prior_feature": f_pri,
      "current_feature": f_cur,
      "diff_feature": diff,
    }
