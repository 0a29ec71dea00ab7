"""AMAE's model pieces: the Dynamic Convolution Tokenizer against per-contrast convolutions, the
contrast encoder's masking of absent contrasts, the masked autoencoder's masking and loss, the
adaptive UNETR's pooling over contrasts, the transfer into a plain UNETR, and the token axis
sharded over devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType

from mammojax.losses.masked_reconstruction import masked_patch_loss, normalized_patches
from mammojax.models.amae.adaptive_unetr import AdaptiveUNETR
from mammojax.models.amae.encoder import ContrastEncoder, pool_over_contrasts
from mammojax.models.amae.mae import AdaptiveMAE, random_masking, visible_count
from mammojax.models.amae.transfer import select_contrasts, unetr_vit_params
from mammojax.models.segmentation.unetr import UNETR
from mammojax.nn.dynamic_tokenizer import (
  UPDATE_RULES,
  DynamicConvTokenizer,
  patchify,
  slot_filters,
  unpatchify,
)

ENCODER = dict(
  num_slots=3, image_size=(16, 16, 32), patch_size=8, hidden_dim=24, depth=2, num_heads=2
)


def _volumes(shape=(2, 16, 16, 32, 3), seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _perturbed(params, seed=1, scale=0.3):
  """Random values on every leaf (the projector starts at zero, which would hide its effect)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, noisy)


def _conv(x, kernel, patch):
  return jax.lax.conv_general_dilated(
    x, kernel, (patch,) * 3, "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
  )


@pytest.mark.parametrize("update", UPDATE_RULES)
def test_tokenizer_is_one_convolution_per_contrast_with_its_own_filter(update):
  tokenizer = DynamicConvTokenizer(num_slots=3, patch_size=4, hidden_dim=12, update=update)
  x = _volumes((2, 8, 8, 12, 3))
  params = _perturbed(nn.unbox(tokenizer.init(jax.random.key(0), x))["params"])
  tokens = tokenizer.apply({"params": params}, x)
  kernels, biases = slot_filters(params, update)
  assert tokens.shape == (2, 3, 2 * 2 * 3, 12)
  for k in range(3):
    expected = _conv(x[..., k : k + 1], kernels[k], 4) + biases[k]
    np.testing.assert_allclose(tokens[:, k], expected.reshape(2, -1, 12), atol=1e-5)
  # Distinct slots have distinct filters once the projector is trained.
  assert float(jnp.abs(kernels[0] - kernels[1]).max()) > 1e-3


@pytest.mark.parametrize("update", UPDATE_RULES)
def test_tokenizer_starts_from_the_shared_filter_in_every_slot(update):
  tokenizer = DynamicConvTokenizer(num_slots=3, patch_size=4, hidden_dim=12, update=update)
  x = _volumes((1, 8, 8, 8, 3))
  params = nn.unbox(tokenizer.init(jax.random.key(0), x))["params"]
  kernels, biases = slot_filters(params, update)
  for k in range(3):
    np.testing.assert_allclose(kernels[k], params["kernel"], atol=1e-7)
    np.testing.assert_allclose(biases[k], params["bias"], atol=1e-7)


def test_patchify_round_trip_and_order():
  x = _volumes((2, 8, 12, 4, 2))
  patches = patchify(x, 4)
  assert patches.shape == (2, 2, 2 * 3 * 1, 64)
  np.testing.assert_array_equal(unpatchify(patches, (2, 3, 1), 4), x)
  # Patch 1 is the second along the last grid axis with more than one patch: W here is 1 patch,
  # so it is H's second; voxels row-major inside it.
  np.testing.assert_array_equal(patches[0, 1, 1], x[0, 0:4, 4:8, 0:4, 1].reshape(-1))
  with pytest.raises(ValueError, match="patch_size=5"):
    patchify(x, 5)


def test_encoder_keeps_absent_contrasts_out_and_one_program_serves_every_set():
  encoder = ContrastEncoder(**ENCODER, mlp_dim=32)
  x = _volumes()
  present = jnp.asarray([[1, 1, 0], [1, 0, 1]])
  variables = nn.unbox(encoder.init(jax.random.key(0), x, present))
  run = jax.jit(lambda v, x, p: encoder.apply(v, x, p))
  tokens, hidden, token_present = run(variables, x, present)
  assert tokens.shape == (2, 3 * 16, 24) and len(hidden) == 2
  np.testing.assert_array_equal(token_present[0], np.repeat([True, True, False], 16))
  # What an absent slot holds changes nothing for the acquired ones.
  changed = x.at[0, ..., 2].set(7.0).at[1, ..., 1].set(-3.0)
  tokens2, _, _ = run(variables, changed, present)
  np.testing.assert_allclose(tokens2[0, :32], tokens[0, :32], atol=1e-6)
  np.testing.assert_allclose(tokens2[1, 32:], tokens[1, 32:], atol=1e-6)
  # Another set of contrasts: the same compiled program.
  run(variables, x, jnp.asarray([[0, 0, 1], [1, 1, 1]]))
  assert run._cache_size() == 1


def test_mae_masks_the_ratio_of_every_contrast_and_reconstructs_all_patches():
  encoder = ContrastEncoder(**ENCODER, mlp_dim=32)
  model = AdaptiveMAE(
    encoder=encoder, decoder_dim=12, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=24
  )
  x = _volumes()
  present = jnp.asarray([[1, 1, 0], [1, 1, 1]])
  rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
  variables = nn.unbox(model.init(rngs, x, present))
  out = model.apply(variables, x, present, rngs={"masking": jax.random.key(2)})
  assert out["prediction"].shape == (2, 3, 16, 512)
  # 16 patches at 0.7: 4 visible, 12 masked, in every slot; per-contrast draws differ.
  np.testing.assert_array_equal(out["mask"].sum(-1), 12)
  assert not np.array_equal(out["mask"][1, 0], out["mask"][1, 1]) or not np.array_equal(
    out["mask"][1, 1], out["mask"][1, 2]
  )
  shared = model.clone(shared_mask=True).apply(
    variables, x, present, rngs={"masking": jax.random.key(2)}
  )
  for k in (1, 2):
    np.testing.assert_array_equal(shared["mask"][:, k], shared["mask"][:, 0])
  # An absent contrast's content reaches no acquired contrast's reconstruction.
  changed = model.apply(
    variables, x.at[0, ..., 2].set(9.0), present, rngs={"masking": jax.random.key(2)}
  )
  np.testing.assert_allclose(changed["prediction"][0, :2], out["prediction"][0, :2], atol=1e-5)


def test_masking_keeps_sorted_distinct_patches():
  keep, mask = random_masking(jax.random.key(0), 3, 2, 10, 4, shared=False)
  assert keep.shape == (3, 2, 4) and mask.shape == (3, 2, 10)
  for b in range(3):
    for k in range(2):
      assert list(np.asarray(keep[b, k])) == sorted(set(np.asarray(keep[b, k]).tolist()))
      assert not np.asarray(mask[b, k])[np.asarray(keep[b, k])].any()


def test_mask_ratio_and_crop_errors_name_the_field():
  for ratio in (0.0, 1.0, 1.5):
    with pytest.raises(ValueError, match="mask_ratio"):
      visible_count(216, ratio)
  with pytest.raises(ValueError, match="data.crop_size"):
    visible_count(1, 0.7)
  with pytest.raises(ValueError, match="patch_size=8"):
    _ = ContrastEncoder(**{**ENCODER, "image_size": (16, 16, 20)}).grid


def test_masked_patch_loss_counts_masked_patches_of_acquired_contrasts_only():
  rng = np.random.default_rng(0)
  prediction = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
  target = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
  mask = np.array([[[1, 0, 1], [1, 1, 0]], [[0, 0, 1], [1, 1, 1]]], bool)
  present = np.array([[1, 0], [1, 1]])
  valid = np.array([1, 1])
  loss, count = masked_patch_loss(prediction, target, mask, present, valid)
  per_patch = ((prediction - target) ** 2).mean(-1)
  weight = mask * present[..., None]
  assert float(count) == weight.sum() == 6
  np.testing.assert_allclose(loss, (per_patch * weight).sum() / 6, rtol=1e-6)
  normed, _ = masked_patch_loss(prediction, target, mask, present, normalize_target=True)
  t = target - target.mean(-1, keepdims=True)
  t = t / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  expected = (((prediction - t) ** 2).mean(-1) * weight).sum() / 6
  np.testing.assert_allclose(normed, expected, rtol=1e-5)
  np.testing.assert_allclose(normalized_patches(jnp.asarray(target)), t, atol=1e-5)
  padded, padded_count = masked_patch_loss(prediction, target, mask, present, np.array([1, 0]))
  assert float(padded_count) == 2


def test_pool_over_contrasts_takes_the_maximum_of_acquired_ones():
  tokens = jnp.asarray(np.arange(2 * 3 * 2 * 1, dtype=np.float32).reshape(2, 6, 1))
  present = jnp.asarray([[1, 0, 1], [0, 0, 0]])
  pooled = pool_over_contrasts(tokens, present, 3)
  # Example 0: slots 0 and 2 -> max(t[0:2], t[4:6]) = t[4:6]; example 1: none -> zeros.
  np.testing.assert_array_equal(pooled[0, :, 0], [4.0, 5.0])
  np.testing.assert_array_equal(pooled[1], 0.0)


def test_adaptive_unetr_ignores_absent_contrasts():
  encoder = ContrastEncoder(
    num_slots=3, image_size=(16, 16, 16), patch_size=16, hidden_dim=24, depth=12, num_heads=2,
    mlp_dim=32,
  )  # fmt: skip
  model = AdaptiveUNETR(out_channels=2, encoder=encoder, feature_size=4)
  x = _volumes((2, 16, 16, 16, 3))
  present = jnp.asarray([[1, 1, 0], [1, 0, 1]])
  variables = nn.unbox(model.init(jax.random.key(0), x, present))
  logits = model.apply(variables, x, present)
  assert logits.shape == (2, 16, 16, 16, 2)
  changed = model.apply(variables, x.at[0, ..., 2].set(5.0).at[1, ..., 1].set(5.0), present)
  np.testing.assert_allclose(changed, logits, atol=1e-5)
  with pytest.raises(ValueError, match="patch_size=16"):
    AdaptiveUNETR(out_channels=2, encoder=encoder.clone(patch_size=8)).init(
      jax.random.key(0), x, present
    )


def test_pretrained_encoder_picks_contrasts_by_name():
  encoder = ContrastEncoder(**ENCODER, mlp_dim=32)
  x = _volumes()
  params = _perturbed(nn.unbox(encoder.init(jax.random.key(0), x, jnp.ones((2, 3))))["params"])
  picked = select_contrasts(params, ("ADC", "TRACE", "T2"), ("T2", "ADC"))
  np.testing.assert_array_equal(
    picked["tokenizer"]["projector"]["kernel"],
    np.asarray(params["tokenizer"]["projector"]["kernel"])[[2, 0]],
  )
  np.testing.assert_array_equal(
    picked["modality_embedding"], np.asarray(params["modality_embedding"])[[2, 0]]
  )
  with pytest.raises(ValueError, match=r"without \['FLAIR'\]"):
    select_contrasts(params, ("ADC", "TRACE", "T2"), ("FLAIR",), "RUN")


def test_plain_unetr_token_is_the_mean_of_the_pretrained_per_contrast_tokens():
  encoder = ContrastEncoder(
    num_slots=3, image_size=(32, 32, 32), patch_size=16, hidden_dim=24, depth=12, num_heads=2,
    mlp_dim=32,
  )  # fmt: skip
  x = _volumes((1, 32, 32, 32, 3))
  params = _perturbed(nn.unbox(encoder.init(jax.random.key(0), x, jnp.ones((1, 3))))["params"])
  names = ("ADC", "TRACE", "T2")
  vit = unetr_vit_params(
    params, names, names, update="scale", position_embedding="sincos_hwd", grid=(2, 2, 2)
  )
  unetr = UNETR(out_channels=2, img_size=32, feature_size=4, hidden_size=24, mlp_dim=32,
                num_heads=2)  # fmt: skip
  unetr_params = nn.unbox(unetr.init(jax.random.key(1), x))["params"]
  assert jax.tree.map(np.shape, dict(unetr_params["vit"])) == jax.tree.map(np.shape, vit)
  # UNETR's first tokens (patch embedding + position) against the encoder's, averaged over slots.
  tokens = DynamicConvTokenizer(3, 16, 24).apply({"params": params["tokenizer"]}, x)
  per_slot = tokens + params["modality_embedding"][None, :, None]
  expected = per_slot.mean(axis=1) + vit["pos_embedding"]
  ours = _conv(x, vit["conv_proj"]["kernel"], 16).reshape(1, 8, 24) + vit["conv_proj"]["bias"]
  np.testing.assert_allclose(ours + vit["pos_embedding"], expected, rtol=1e-5, atol=1e-4)
  for i in range(12):
    assert vit[f"encoder_layer_{i}"] is params[f"encoder_layer_{i}"]


def test_encoder_token_axis_shards_over_eight_devices_with_equal_outputs():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them")
  encoder = ContrastEncoder(**ENCODER, mlp_dim=32)  # 3 slots x 16 patches = 48 tokens
  x = _volumes()
  present = jnp.asarray([[1, 1, 0], [1, 0, 1]])
  variables = nn.unbox(encoder.init(jax.random.key(0), x, present))
  expected = encoder.apply(variables, x, present)[0]
  mesh = jax.make_mesh(
    (1, 8), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:8]
  )

  def run(params, volumes, present):
    with nn.logical_axis_rules((("batch", "data"), ("tokens", "model"))):
      return encoder.apply({"params": params}, volumes, present)[0]

  with jax.set_mesh(mesh):
    lowered = jax.jit(run).lower(variables["params"], x, present)
    sharded = lowered.compile()(variables["params"], x, present)
  constraints = [line for line in lowered.as_text().splitlines() if "sharding_constraint" in line]
  assert len(constraints) == ENCODER["depth"]
  assert all('[{"data"}, {"model"}, {}]' in line for line in constraints)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(expected), atol=1e-5)


def test_tokenizer_takes_only_the_kept_patches():
  tokenizer = DynamicConvTokenizer(num_slots=2, patch_size=4, hidden_dim=6)
  x = _volumes((2, 8, 8, 8, 2))
  params = _perturbed(nn.unbox(tokenizer.init(jax.random.key(0), x))["params"])
  keep, _ = random_masking(jax.random.key(3), 2, 2, 8, 3, shared=False)
  every = tokenizer.apply({"params": params}, x)
  kept = tokenizer.apply({"params": params}, x, keep)
  np.testing.assert_allclose(kept, jnp.take_along_axis(every, keep[..., None], axis=2), atol=1e-6)
