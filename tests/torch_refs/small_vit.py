"""A small torchvision ViT with every parameter redrawn, shared by the ViT import and the
attribution parity tests."""

from __future__ import annotations

import torch

from torch_refs.torchvision_import import import_torchvision


def randomize_vit(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Every parameter redrawn (torch starts some at zero: class token, biases, the head), at a
  scale that keeps the attention and the residual stream non-trivial; returns it in eval mode."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if param.ndim == 1 and name.endswith("weight"):  # LayerNorm scales
        param.copy_(1.0 + 0.2 * noise)
      elif param.ndim >= 2 and "token" not in name and "pos_embed" not in name:
        param.copy_(noise / param[0].numel() ** 0.5)
      else:  # biases, class token, position embedding
        param.copy_(0.5 * noise)
  return model.eval()


def small_torchvision_vit(num_classes: int) -> torch.nn.Module:
  """torchvision's ``VisionTransformer`` at 32x32, patch 8, 2 blocks of width 64, 4 heads,
  MLP 128, randomised (:func:`randomize_vit`, seed 1)."""
  torch.manual_seed(0)
  model = import_torchvision().models.vision_transformer.VisionTransformer(
    image_size=32,
    patch_size=8,
    num_layers=2,
    num_heads=4,
    hidden_dim=64,
    mlp_dim=128,
    num_classes=num_classes,
  )
  return randomize_vit(model, seed=1)
