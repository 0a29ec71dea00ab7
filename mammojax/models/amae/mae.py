"""AMAE's masked autoencoder over a variable number of 3-D contrasts.

``[B, D, H, W, K]`` volumes with a presence mask ``[B, K]`` ->
per-slot patch reconstructions ``[B, K, P, p^3]`` and the patch mask ``[B, K, P]``:

1. masking (:func:`random_masking`): of each slot's ``P`` patches ``n = int(P * (1 -
   mask_ratio))`` stay visible, drawn anew per example and per contrast (``shared_mask=False``,
   the seed's "in each modality's volume") or the same positions in every contrast
   (``shared_mask=True``); the count is fixed so the shapes never change;
2. the encoder (:class:`~mammojax.models.amae.encoder.ContrastEncoder`) sees the visible tokens of
   all acquired contrasts as one sequence ``[B, K * n, E]``;
3. ``decoder_embed`` (Dense ``E -> E_d``); a learned ``mask_token`` fills every masked position,
   the encoded tokens return to their own; the position table (the encoder's kind, at width
   ``E_d``) and a learned ``decoder_modality_embedding`` per slot are added again;
4. ``decoder_layer_{i}`` / ``decoder_norm``: a lighter pre-norm transformer over all ``K * P``
   tokens, absent contrasts masked out of attention as in the encoder;
5. ``decoder_pred``: Dense ``E_d -> p^3``, the voxels of each token's patch
   (:func:`~mammojax.nn.dynamic_tokenizer.patchify`'s order).

The loss is :func:`mammojax.losses.masked_reconstruction.masked_patch_loss` (L2 on masked patches
of acquired contrasts only). The masking draws from the ``'masking'`` rng stream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.models.amae.encoder import ContrastEncoder, key_mask, position_table, slot_token_mask
from mammojax.nn import partitioning
from mammojax.nn.vit import encoder_stack


def visible_count(num_patches: int, mask_ratio: float) -> int:
  """Visible patches per contrast at ``mask_ratio`` (at least one), or a ValueError naming the
  field when the ratio is outside (0, 1)."""
  if not 0.0 < float(mask_ratio) < 1.0:
    raise ValueError(f"model.mask_ratio={mask_ratio} must lie in (0, 1), e.g. 0.7 (the seed's)")
  visible = max(1, int(num_patches * (1.0 - float(mask_ratio))))
  if visible >= num_patches:
    raise ValueError(
      f"a crop of {num_patches} patch(es) at mask_ratio={mask_ratio} leaves no patch to mask; "
      "use larger crops (data.crop_size) or a smaller patch"
    )
  return visible


def random_masking(
  rng: jax.Array, batch: int, slots: int, patches: int, visible: int, shared: bool
) -> tuple[jax.Array, jax.Array]:
  """Random visible patches per example and contrast.

  Returns:
    ``keep [B, K, visible]`` int32 patch indices (ascending) and ``mask [B, K, P]`` bool, True
    where a patch is masked. With ``shared`` every contrast of an example keeps the same ones.
  """
  noise = jax.random.uniform(rng, (batch, 1 if shared else slots, patches))
  noise = jnp.broadcast_to(noise, (batch, slots, patches))
  keep = jnp.sort(jnp.argsort(noise, axis=-1)[..., :visible], axis=-1).astype(jnp.int32)
  visible_mask = jnp.zeros((batch, slots, patches), bool)
  visible_mask = jax.vmap(jax.vmap(lambda m, i: m.at[i].set(True)))(visible_mask, keep)
  return keep, ~visible_mask


class AdaptiveMAE(nn.Module):
  """The masked autoencoder (see the module docstring).

  Attributes:
    encoder: the :class:`ContrastEncoder` (its parameters live under ``encoder``, the names the
      segmentation networks load).
    decoder_dim, decoder_depth, decoder_heads, decoder_mlp_dim: the lighter decoder (SelfMedMAE:
      384, 8, 12, 1536).
    mask_ratio: share of each contrast's patches masked, in (0, 1) (the seed's 0.7).
    shared_mask: mask the same positions in every contrast of an example.
  """

  encoder: ContrastEncoder
  decoder_dim: int = 384
  decoder_depth: int = 8
  decoder_heads: int = 12
  decoder_mlp_dim: int = 1536
  mask_ratio: float = 0.7
  shared_mask: bool = False

  @nn.compact
  def __call__(
    self, volumes: jax.Array, present: jax.Array, *, train: bool = False
  ) -> dict[str, jax.Array]:
    """Args:
      volumes: ``[B, *image_size, K]``; present: ``[B, K]``.
      train: dropout on.
    Returns:
      ``{'prediction': [B, K, P, p^3] float32, 'mask': [B, K, P] bool (True = masked)}``.
    """
    enc = self.encoder
    enc.check_inputs(volumes, present)
    batch, slots, patches = volumes.shape[0], enc.num_slots, enc.num_patches
    visible = visible_count(patches, self.mask_ratio)
    keep, mask = random_masking(
      self.make_rng("masking"), batch, slots, patches, visible, self.shared_mask
    )
    latent, _, _ = enc(volumes, present, keep=keep, train=train)  # [B, K * n, E]
    dtype = enc.dtype
    x = partitioning.dense(self.decoder_dim, "decoder_embed", dtype=dtype)(latent)
    x = x.reshape(batch, slots, visible, self.decoder_dim)
    mask_token = self.param(
      "mask_token",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), partitioning.TOKEN_AXES),
      (1, 1, self.decoder_dim),
    )
    full = jnp.broadcast_to(mask_token.astype(x.dtype), (batch, slots, patches, self.decoder_dim))
    full = jax.vmap(jax.vmap(lambda f, i, v: f.at[i].set(v)))(full, keep, x)
    table = position_table(
      self, enc.position_embedding, enc.grid, self.decoder_dim, "decoder_pos_embedding"
    )
    modality = self.param(
      "decoder_modality_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (None, "mlp")),
      (slots, self.decoder_dim),
    )
    full = full + table[:, None].astype(full.dtype) + modality[None, :, None].astype(full.dtype)
    token_present = slot_token_mask(present, patches)
    y = full.reshape(batch, slots * patches, self.decoder_dim)
    y = jnp.where(token_present[..., None], y, 0).astype(full.dtype)
    y, _ = encoder_stack(
      self,
      y,
      depth=self.decoder_depth,
      num_heads=self.decoder_heads,
      mlp_dim=self.decoder_mlp_dim,
      deterministic=not train,
      mask=key_mask(token_present),
      layer_norm_epsilon=enc.layer_norm_epsilon,
      qkv_bias=enc.qkv_bias,
      remat=enc.remat,
      dtype=dtype,
      prefix="decoder",
    )
    voxels = enc.patch_size ** len(enc.grid)
    prediction = partitioning.dense(voxels, "decoder_pred", dtype=dtype)(y)
    prediction = prediction.reshape(batch, slots, patches, voxels).astype(jnp.float32)
    return {"prediction": prediction, "mask": mask}
