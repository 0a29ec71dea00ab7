"""AMAE in PyTorch, for :mod:`benchmarks.amae` only: the architecture of
:mod:`mammojax.models.amae` (same sizes, same FLOPs), channels-first, not the same weights.

Benchmark code: it imports torch and MONAI, which the ``mammojax`` package itself never does.

* :class:`ContrastEncoder`: the Dynamic Convolution Tokenizer (every slot's patches, unfolded
  ``[B, K, P, p^3]``, through one shared matmul ``[p^3, E]`` -- a Conv3d with kernel = stride =
  patch of one input channel -- then scaled by ``1 + s_w[k]`` and shifted by ``b * (1 + s_b[k])``,
  ``(s_w, s_b)`` a ``Linear(K -> 2E)`` of the slot's one-hot vector), the fixed sin-cos position
  table (SelfMedMAE's ``hwd`` order) and a learned modality embedding per slot (with ``keep``,
  only the visible patches are gathered and projected), then pre-norm ViT blocks (LayerNorm eps 1e-5, attention without
  query/key/value biases through ``scaled_dot_product_attention`` with a boolean key mask that
  keeps absent contrasts' tokens out, exact GELU MLP) and a final LayerNorm.
* :class:`AdaptiveMAE`: per-example, per-slot random masking (argsort of uniform noise, the first
  ``n = int(P * (1 - mask_ratio))`` kept, sorted), the encoder over the visible tokens,
  ``Linear(E -> E_d)``, the mask token scattered around the encoded tokens, position + modality
  embedding again, pre-norm blocks over all ``K * P`` tokens with the key mask, LayerNorm,
  ``Linear(E_d -> p^3)``; :func:`masked_patch_loss` is the MSE on masked patches of present
  contrasts against per-patch normalised targets.
* :class:`AdaptiveUNETR`: the encoder over all tokens, the masked max over contrasts of block
  outputs 3, 6, 9 and of the normed final tokens, ``encoder1`` (MONAI's ``UnetrBasicBlock`` of one
  input channel) on every contrast separately then the masked max, and MONAI UNETR's decoder
  blocks with the arguments ``monai.networks.nets.UNETR`` gives them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

TAPPED_BLOCKS = (3, 6, 9)
NORM_EPSILON = 1e-6  # of the per-patch target normalisation


def sincos_table(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> np.ndarray:
  """``[P, dim]`` fixed sin-cos position table over a 3-D patch grid, frequency blocks over the
  grid axes in the order 0, 1, 2 (SelfMedMAE's ``hwd``), tokens in row-major grid order."""
  grid = tuple(int(g) for g in grid)
  if dim % (2 * len(grid)):
    raise ValueError(f"sin-cos table over a {len(grid)}-D grid needs a multiple of 6, got {dim}")
  per_axis = dim // (2 * len(grid))
  omega = 1.0 / temperature ** (np.arange(per_axis, dtype=np.float32) / per_axis)
  positions = np.meshgrid(*(np.arange(g, dtype=np.float32) for g in grid), indexing="ij")
  blocks = []
  for axis in range(len(grid)):
    angles = positions[axis].reshape(-1, 1) * omega[None]
    blocks += [np.sin(angles), np.cos(angles)]
  return np.concatenate(blocks, axis=1).astype(np.float32)


def patchify(volumes: torch.Tensor, patch: int) -> torch.Tensor:
  """``[B, K, D, H, W] -> [B, K, P, p^3]``: patches in row-major grid order, voxels row-major."""
  b, k, d, h, w = volumes.shape
  g = (d // patch, h // patch, w // patch)
  x = volumes.reshape(b, k, g[0], patch, g[1], patch, g[2], patch)
  x = x.permute(0, 1, 2, 4, 6, 3, 5, 7)
  return x.reshape(b, k, g[0] * g[1] * g[2], patch**3)


def masked_patch_loss(
  prediction: torch.Tensor,
  volumes: torch.Tensor,
  mask: torch.Tensor,
  present: torch.Tensor,
  patch: int,
) -> torch.Tensor:
  """MSE over the voxels of the masked patches of present contrasts, per-patch normalised
  targets (mean 0, ``sqrt(var + 1e-6)``); every such patch weighs the same."""
  target = patchify(volumes, patch)
  mean = target.mean(dim=-1, keepdim=True)
  var = target.var(dim=-1, unbiased=False, keepdim=True)
  target = (target - mean) / torch.sqrt(var + NORM_EPSILON)
  per_patch = (prediction - target).square().mean(dim=-1)
  weight = mask.float() * present[..., None].float()
  return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


class Attention(nn.Module):
  """Multi-head self-attention: one ``Linear(E -> 3E)`` without bias, SDPA, ``Linear(E -> E)``."""

  def __init__(self, dim: int, heads: int) -> None:
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.out = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, n, e = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask [B, 1, 1, n], True = keep
    return self.out(y.transpose(1, 2).reshape(b, n, e))


class Block(nn.Module):
  """Pre-norm transformer block: ``x + attn(LN(x))``, ``x + MLP(LN(x))`` (exact GELU)."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float = 1e-5) -> None:
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=eps)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=eps)
    self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x), mask)
    return x + self.mlp(self.norm2(x))


class Tokenizer(nn.Module):
  """``[B, K, P, p^3]`` patches -> ``[B, K, P, E]``: one shared projection, per-slot scale and
  bias from ``Linear(K -> 2E)`` of the one-hot slot vectors (``'scale'`` update)."""

  def __init__(self, slots: int, patch: int, dim: int) -> None:
    super().__init__()
    voxels = patch**3
    self.kernel = nn.Parameter(torch.randn(voxels, dim) * voxels**-0.5)
    self.bias = nn.Parameter(torch.zeros(dim))
    self.projector = nn.Linear(slots, 2 * dim)
    nn.init.zeros_(self.projector.weight)
    nn.init.zeros_(self.projector.bias)
    self.register_buffer("eye", torch.eye(slots), persistent=False)

  def forward(self, patches: torch.Tensor) -> torch.Tensor:
    s_w, s_b = self.projector(self.eye).chunk(2, dim=-1)  # [K, E] each
    projected = patches @ self.kernel
    return projected * (1.0 + s_w)[None, :, None] + (self.bias * (1.0 + s_b))[None, :, None]


def key_mask(present: torch.Tensor, per_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
  """``[B, K]`` presence -> (``[B, K * n]`` token presence, ``[B, 1, 1, K * n]`` key mask)."""
  token_present = present.repeat_interleave(per_slot, dim=1)
  return token_present, token_present[:, None, None, :]


class ContrastEncoder(nn.Module):
  """Tokenizer, position + modality embedding, optional visible gather, ViT blocks, LayerNorm."""

  def __init__(
    self,
    slots: int,
    image_size: int,
    patch: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_dim: int,
  ) -> None:
    super().__init__()
    self.slots, self.patch, self.dim = slots, patch, dim
    self.grid = (image_size // patch,) * 3
    self.num_patches = int(np.prod(self.grid))
    self.tokenizer = Tokenizer(slots, patch, dim)
    self.register_buffer("pos", torch.from_numpy(sincos_table(self.grid, dim)), persistent=False)
    self.modality = nn.Parameter(torch.randn(slots, dim) * 0.02)
    self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
    self.norm = nn.LayerNorm(dim, eps=1e-5)

  def forward(
    self, volumes: torch.Tensor, present: torch.Tensor, keep: torch.Tensor | None = None
  ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``volumes [B, K, D, H, W]``, ``present [B, K]`` bool, ``keep [B, K, n]`` int64 or None ->
    (normed tokens ``[B, K * n, E]``, every block's output, token presence ``[B, K * n]``)."""
    patches = patchify(volumes, self.patch)
    pos = self.pos[None, None]
    if keep is not None:  # only the visible patches are projected, as on the JAX side
      patches = torch.gather(patches, 2, keep[..., None].expand(-1, -1, -1, patches.shape[-1]))
      pos = self.pos[keep]
    tokens = self.tokenizer(patches) + pos + self.modality[None, :, None]
    b, k, n, e = tokens.shape
    token_present, mask = key_mask(present, n)
    x = torch.where(token_present[..., None], tokens.reshape(b, k * n, e), 0.0)
    hidden = []
    for block in self.blocks:
      x = block(x, mask)
      hidden.append(x)
    return self.norm(x), hidden, token_present


class AdaptiveMAE(nn.Module):
  """The masked autoencoder: ``(volumes, present) -> (prediction [B, K, P, p^3], mask [B, K, P]
  bool, True = masked)``."""

  def __init__(
    self,
    encoder: ContrastEncoder,
    decoder_dim: int,
    decoder_depth: int,
    decoder_heads: int,
    decoder_mlp_dim: int,
    mask_ratio: float = 0.7,
  ) -> None:
    super().__init__()
    self.encoder = encoder
    patches = encoder.num_patches
    self.visible = max(1, int(patches * (1.0 - mask_ratio)))
    self.decoder_dim = decoder_dim
    self.decoder_embed = nn.Linear(encoder.dim, decoder_dim)
    self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
    table = torch.from_numpy(sincos_table(encoder.grid, decoder_dim))
    self.register_buffer("decoder_pos", table, persistent=False)
    self.decoder_modality = nn.Parameter(torch.randn(encoder.slots, decoder_dim) * 0.02)
    self.decoder_blocks = nn.ModuleList(
      Block(decoder_dim, decoder_heads, decoder_mlp_dim) for _ in range(decoder_depth)
    )
    self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-5)
    self.decoder_pred = nn.Linear(decoder_dim, encoder.patch**3)

  def forward(
    self, volumes: torch.Tensor, present: torch.Tensor
  ) -> tuple[torch.Tensor, torch.Tensor]:
    enc = self.encoder
    b, k, p, n, ed = volumes.shape[0], enc.slots, enc.num_patches, self.visible, self.decoder_dim
    noise = torch.rand(b, k, p, device=volumes.device)
    keep = noise.argsort(dim=-1)[..., :n].sort(dim=-1).values
    mask = torch.ones(b, k, p, dtype=torch.bool, device=volumes.device).scatter(2, keep, False)
    latent, _, _ = enc(volumes, present, keep)
    x = self.decoder_embed(latent).view(b, k, n, ed)
    full = self.mask_token.expand(b, k, p, ed)
    full = torch.scatter(full, 2, keep[..., None].expand(-1, -1, -1, ed), x)
    full = full + self.decoder_pos[None, None] + self.decoder_modality[None, :, None]
    token_present, key = key_mask(present, p)
    y = torch.where(token_present[..., None], full.reshape(b, k * p, ed), 0.0)
    for block in self.decoder_blocks:
      y = block(y, key)
    prediction = self.decoder_pred(self.decoder_norm(y)).view(b, k, p, -1)
    return prediction, mask


def pool_over_contrasts(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
  """``[B, K, ...]`` -> ``[B, ...]``: the maximum over the acquired contrasts (zeros if none)."""
  acquired = present.view(*present.shape, *((1,) * (x.ndim - 2)))
  pooled = torch.where(acquired, x, float("-inf")).amax(dim=1)
  return torch.where(acquired.any(dim=1), pooled, 0.0)


class AdaptiveUNETR(nn.Module):
  """UNETR over a variable set of contrasts: ``(volumes [B, K, D, H, W], present [B, K]) ->
  logits [B, out_channels, D, H, W]``."""

  def __init__(
    self, encoder: ContrastEncoder, out_channels: int, feature_size: int, norm: str = "instance"
  ) -> None:
    super().__init__()
    if encoder.patch != 16 or len(encoder.blocks) <= max(TAPPED_BLOCKS):
      raise ValueError("AdaptiveUNETR needs patch 16 and more than 9 encoder blocks")
    self.encoder = encoder
    f, e = feature_size, encoder.dim
    up = dict(spatial_dims=3, kernel_size=3, stride=1, upsample_kernel_size=2, norm_name=norm)
    up.update(conv_block=True, res_block=True)
    dec = dict(spatial_dims=3, kernel_size=3, upsample_kernel_size=2, norm_name=norm)
    dec.update(res_block=True)
    self.encoder1 = UnetrBasicBlock(
      spatial_dims=3,
      in_channels=1,
      out_channels=f,
      kernel_size=3,
      stride=1,
      norm_name=norm,
      res_block=True,
    )
    self.encoder2 = UnetrPrUpBlock(in_channels=e, out_channels=2 * f, num_layer=2, **up)
    self.encoder3 = UnetrPrUpBlock(in_channels=e, out_channels=4 * f, num_layer=1, **up)
    self.encoder4 = UnetrPrUpBlock(in_channels=e, out_channels=8 * f, num_layer=0, **up)
    self.decoder5 = UnetrUpBlock(in_channels=e, out_channels=8 * f, **dec)
    self.decoder4 = UnetrUpBlock(in_channels=8 * f, out_channels=4 * f, **dec)
    self.decoder3 = UnetrUpBlock(in_channels=4 * f, out_channels=2 * f, **dec)
    self.decoder2 = UnetrUpBlock(in_channels=2 * f, out_channels=f, **dec)
    self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=out_channels)

  def forward(self, volumes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    enc = self.encoder
    b, k, *spatial = volumes.shape
    tokens, hidden, _ = enc(volumes, present)

    def skip(t: torch.Tensor) -> torch.Tensor:
      pooled = pool_over_contrasts(t.view(b, k, enc.num_patches, enc.dim), present)
      return pooled.view(b, *enc.grid, enc.dim).permute(0, 4, 1, 2, 3).contiguous()

    maps = self.encoder1(volumes.reshape(b * k, 1, *spatial))
    enc1 = pool_over_contrasts(maps.view(b, k, *maps.shape[1:]), present)
    enc2 = self.encoder2(skip(hidden[TAPPED_BLOCKS[0]]))
    enc3 = self.encoder3(skip(hidden[TAPPED_BLOCKS[1]]))
    enc4 = self.encoder4(skip(hidden[TAPPED_BLOCKS[2]]))
    dec3 = self.decoder5(skip(tokens), enc4)
    dec2 = self.decoder4(dec3, enc3)
    dec1 = self.decoder3(dec2, enc2)
    return self.out(self.decoder2(dec1, enc1))


def parameter_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())
