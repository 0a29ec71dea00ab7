"""A plain-torch FPN-MIL written from the architecture, in the reference checkpoint's key layout.

Keys: ``inst_encoder.backbone.*`` / ``inst_encoder.inner_blocks.inner_block_{i}.{0,1}`` /
``inst_encoder.layer_blocks.layer_block_{i}.{0,1}`` (one GroupNorm shared by all four),
``side_inst_aggregator.encoders.encoder_{s}`` / ``.aggregators.aggregator_{s}``,
``side_classifiers.classifier_{s}.head_classifier``, ``scale_aggregator``,
``classifier.head_classifier``. Masks are [B, N] bool with True for real instances.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class TorchFPN(nn.Module):
  """1x1 laterals, nearest top-down, 3x3 outputs, extra level = stride-4 subsampling."""

  def __init__(
    self,
    backbone: nn.Module | None,
    in_channels=(120, 352),
    features: int = 256,
    group_norm: bool = False,
  ):
    super().__init__()
    self.backbone = backbone
    norm = nn.GroupNorm(1, features) if group_norm else nn.Identity()
    bias = not group_norm
    self.inner_blocks = nn.ModuleDict(
      {
        f"inner_block_{i}": nn.Sequential(nn.Conv2d(c, features, 1, bias=bias), norm)
        for i, c in enumerate(in_channels)
      }
    )
    self.layer_blocks = nn.ModuleDict(
      {
        f"layer_block_{i}": nn.Sequential(
          nn.Conv2d(features, features, 3, padding=1, bias=bias), norm
        )
        for i in range(len(in_channels))
      }
    )

  def forward(self, x):
    c4, c5 = self.backbone(x)[:2] if self.backbone is not None else x
    inner5 = self.inner_blocks["inner_block_1"](c5)
    out5 = self.layer_blocks["layer_block_1"](inner5)
    inner4 = self.inner_blocks["inner_block_0"](c4)
    inner4 = inner4 + F.interpolate(inner5, size=inner4.shape[-2:], mode="nearest")
    out4 = self.layer_blocks["layer_block_0"](inner4)
    return [out4, out5, F.max_pool2d(out5, kernel_size=1, stride=4)]


class TorchMAB(nn.Module):
  def __init__(self, dim_q: int, dim_k: int, dim_v: int, heads: int, ln: bool):
    super().__init__()
    self.dim_v, self.heads = dim_v, heads
    self.fc_q = nn.Linear(dim_q, dim_v)
    self.fc_k = nn.Linear(dim_k, dim_v)
    self.fc_v = nn.Linear(dim_k, dim_v)
    self.fc_o = nn.Linear(dim_v, dim_v)
    if ln:
      self.ln0 = nn.LayerNorm(dim_v)
      self.ln1 = nn.LayerNorm(dim_v)
    self.ln = ln

  def forward(self, q_in, k_in, key_mask=None):
    q, k, v = self.fc_q(q_in), self.fc_k(k_in), self.fc_v(k_in)
    b, nq, _ = q.shape
    nk = k.shape[1]
    d = self.dim_v // self.heads
    qh = q.view(b, nq, self.heads, d).transpose(1, 2)
    kh = k.view(b, nk, self.heads, d).transpose(1, 2)
    vh = v.view(b, nk, self.heads, d).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(self.dim_v)
    if key_mask is not None:
      scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    out = (qh + attn @ vh).transpose(1, 2).reshape(b, nq, self.dim_v)
    if self.ln:
      out = self.ln0(out)
    out = out + F.relu(self.fc_o(out))
    if self.ln:
      out = self.ln1(out)
    return out, attn


class TorchSAB(nn.Module):
  def __init__(self, dim_in, dim, heads, ln):
    super().__init__()
    self.mab = TorchMAB(dim_in, dim_in, dim, heads, ln)

  def forward(self, x, mask=None):
    return self.mab(x, x, mask)[0]


class TorchISAB(nn.Module):
  def __init__(self, dim_in, dim, num_inducing, heads, ln):
    super().__init__()
    self.I = nn.Parameter(torch.empty(1, num_inducing, dim))
    nn.init.xavier_uniform_(self.I)
    self.mab0 = TorchMAB(dim, dim_in, dim, heads, ln)
    self.mab1 = TorchMAB(dim_in, dim, dim, heads, ln)

  def forward(self, x, mask=None):
    h = self.mab0(self.I.expand(x.shape[0], -1, -1), x, mask)[0]
    return self.mab1(x, h)[0]


class TorchPMA(nn.Module):
  def __init__(self, dim, heads, ln):
    super().__init__()
    self.S = nn.Parameter(torch.empty(1, 1, dim))
    nn.init.xavier_uniform_(self.S)
    self.mab = TorchMAB(dim, dim, dim, heads, ln)

  def forward(self, x, mask=None):
    out, attn = self.mab(self.S.expand(x.shape[0], -1, -1), x, mask)
    return out[:, 0], attn[:, :, 0].mean(1)


class TorchGatedAttention(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.attention_V = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(0.0))
    self.attention_U = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(0.0))
    self.attention_weights = nn.Linear(hidden, 1)

  def forward(self, x, mask=None):
    scores = self.attention_weights(self.attention_V(x) * self.attention_U(x))[..., 0]
    return _pool(x, scores, mask)


class TorchAttention(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.module = nn.Sequential(
      nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(0.0), nn.Linear(hidden, 1)
    )

  def forward(self, x, mask=None):
    return _pool(x, self.module(x)[..., 0], mask)


def _pool(x, scores, mask):
  if mask is not None:
    scores = scores.masked_fill(~mask, float("-inf"))
  weights = torch.softmax(scores, dim=1)
  return (weights[:, :, None] * x).sum(1), weights


class TorchHead(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.head_classifier = nn.Linear(dim, 1)

  def forward(self, x):
    return self.head_classifier(x)[:, 0]


class TorchFPNMIL(nn.Module):
  """Multi-scale MIL over FPN pixels; ``forward`` gives (logits, side logits [B, S], attention)."""

  def __init__(
    self,
    inst_encoder: nn.Module | None,
    in_dim: int = 256,
    dim: int = 256,
    scales=(16, 32, 128),
    encoder_type: str = "mlp",
    pooling_type: str = "gated-attention",
    attention_hidden: int = 128,
    heads: int = 4,
    num_blocks: int = 2,
    num_inducing=None,
    layer_norm: bool = False,
    pma_heads: int = 1,
  ):
    super().__init__()
    self.inst_encoder = inst_encoder
    self.scales = scales
    encoders, pools = {}, {}
    for i, s in enumerate(scales):
      if encoder_type == "mlp":
        enc = nn.ModuleList([nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(0.0))])
      elif encoder_type == "sab":
        enc = nn.ModuleList(
          [TorchSAB(in_dim if j == 0 else dim, dim, heads, layer_norm) for j in range(num_blocks)]
        )
      else:
        enc = nn.ModuleList(
          [
            TorchISAB(in_dim if j == 0 else dim, dim, num_inducing[i], heads, layer_norm)
            for j in range(num_blocks)
          ]
        )
      encoders[f"encoder_{s}"] = enc
      if pooling_type == "gated-attention":
        pools[f"aggregator_{s}"] = TorchGatedAttention(dim, attention_hidden)
      elif pooling_type == "attention":
        pools[f"aggregator_{s}"] = TorchAttention(dim, attention_hidden)
      else:
        pools[f"aggregator_{s}"] = TorchPMA(dim, pma_heads, layer_norm)
    self.side_inst_aggregator = nn.ModuleDict(
      {"encoders": nn.ModuleDict(encoders), "aggregators": nn.ModuleDict(pools)}
    )
    self.side_classifiers = nn.ModuleDict({f"classifier_{s}": TorchHead(dim) for s in scales})
    self.scale_aggregator = TorchGatedAttention(dim, attention_hidden)
    self.classifier = TorchHead(dim)

  def forward(self, x, masks=None):
    """x: patches [B, P, C, H, W] (with inst_encoder) or {scale: [B, N, D]} instances."""
    if self.inst_encoder is not None:
      b, p = x.shape[:2]
      maps = self.inst_encoder(x.flatten(0, 1))
      instances = {}
      for s, fmap in zip((16, 32, 128), maps):
        fmap = fmap.view(b, p, *fmap.shape[1:]).permute(0, 1, 3, 4, 2)
        instances[s] = fmap.reshape(b, -1, fmap.shape[-1])
    else:
      instances = x
    embeddings, side, attention = [], [], {}
    for s in self.scales:
      h = instances[s]
      mask = None if masks is None else masks[s]
      for block in self.side_inst_aggregator["encoders"][f"encoder_{s}"]:
        h = block(h) if isinstance(block, nn.Sequential) else block(h, mask)
      bag, weights = self.side_inst_aggregator["aggregators"][f"aggregator_{s}"](h, mask)
      attention[s] = weights
      embeddings.append(bag)
      side.append(self.side_classifiers[f"classifier_{s}"](bag))
    bag, _ = self.scale_aggregator(torch.stack(embeddings, 1))
    return self.classifier(bag), torch.stack(side, 1), attention
