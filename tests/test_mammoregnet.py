"""MammoRegNet: shapes, identity behaviour, PyTorch parity through the importer, errors."""

import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.convert.mammoregnet import import_mammoregnet
from mammojax.convert.torch_files import load_torch_state_dict, unwrap_state_dict
from mammojax.models.registration.mammoregnet import (
  AffineHead,
  DeformHead,
  MammoRegNet,
  affine_params_to_flow,
)
from mammojax.nn import swin

SMALL = dict(enc_channels=2, dec_channels=8, num_layers=2)  # Small widths, whole heads.
SMALL_MODEL = MammoRegNet(**SMALL)
# Shared by the tests so each input shape compiles once.
small_apply = jax.jit(SMALL_MODEL.apply)


def _images(batch, height, width, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  return (
    rng.random((batch, height, width, 1)).astype(dtype),
    rng.random((batch, height, width, 1)).astype(dtype),
  )


def _random_params(seed=0, scale=0.1):
  """Random variables for SMALL_MODEL without compiling its init (slow on a busy CPU)."""
  fixed, moving = _images(1, 16, 16)
  abstract = flax.linen.meta.unbox(
    jax.eval_shape(SMALL_MODEL.init, jax.random.key(0), moving, fixed)
  )
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda a: (scale * rng.standard_normal(a.shape)).astype(a.dtype), abstract
  )


def _torch_model(seed=0, head_std=0.02, **hparams):
  """Random torch weights; heads and position biases enlarged so they matter numerically."""
  torch = pytest.importorskip("torch")
  from torch_refs.mammoregnet_torch import MammoRegNetTorch

  torch.manual_seed(seed)
  model = MammoRegNetTorch(**hparams).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "reg_head" in name:
        param.normal_(0.0, head_std)
      elif "relative_position_bias_table" in name:
        param.normal_(0.0, 0.5)
  return model


def _torch_outputs(model, fixed, moving):
  import torch

  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    warped, flow, affine_warped, affine_params = model(to_torch(fixed), to_torch(moving))
  channels_last = lambda t: t.numpy().transpose(0, 2, 3, 1)
  return {
    "warped": channels_last(warped),
    "flow": channels_last(flow),
    "affine_warped": channels_last(affine_warped),
    "affine_params": affine_params.numpy(),
  }


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_output_shapes():
  fixed, moving = _images(2, 32, 32)
  out = small_apply(_random_params(), moving, fixed)
  assert out["warped"].shape == (2, 32, 32, 1)
  assert out["flow"].shape == (2, 32, 32, 2)
  assert out["affine_warped"].shape == (2, 32, 32, 1)
  assert out["affine_params"].shape == (2, 6)
  assert all(bool(jnp.isfinite(v).all()) for v in out.values())


def test_zero_heads_give_identity():
  flat = flax.traverse_util.flatten_dict(_random_params())
  zeroed = {
    k: (np.zeros_like(v) if any(p.startswith("reghead_") for p in k) else v)
    for k, v in flat.items()
  }
  fixed, moving = _images(2, 32, 32)
  out = small_apply(flax.traverse_util.unflatten_dict(zeroed), moving, fixed)
  np.testing.assert_allclose(out["affine_params"], 0.0, atol=1e-7)
  np.testing.assert_allclose(out["flow"], 0.0, atol=1e-5)
  np.testing.assert_allclose(out["warped"], moving, atol=1e-5)
  np.testing.assert_allclose(out["affine_warped"], moving, atol=1e-5)


def test_fresh_init_heads():
  """Deformation heads start at ~0 (N(0, 1e-5), zero bias), so at init the flow is the upsampled
  affine flow of the coarsest level; the affine head does not start at zero."""
  features = np.random.default_rng(0).normal(size=(2, 4, 4, 16)).astype(np.float32)
  deform = flax.linen.meta.unbox(DeformHead().init(jax.random.key(0), features))["params"]
  assert float(np.std(deform["reg_head"]["kernel"])) < 2e-5
  np.testing.assert_array_equal(deform["reg_head"]["bias"], 0.0)
  head = AffineHead()
  affine_vars = head.init(jax.random.key(1), features)
  flow, affine_params = head.apply(affine_vars, features)
  assert flow.shape == (2, 4, 4, 2) and affine_params.shape == (2, 6)
  assert float(jnp.abs(affine_params).max()) > 1e-3


def test_affine_params_to_flow_translation():
  # theta translation t_y = 0.5 (normalised) is 0.5 * (H - 1) / 2 rows everywhere.
  params = jnp.asarray([[0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])
  flow = affine_params_to_flow(params, (9, 5))
  np.testing.assert_allclose(flow[..., 0], 2.0, atol=1e-6)
  np.testing.assert_allclose(flow[..., 1], 0.0, atol=1e-6)


def test_shifted_window_mask_separates_wrapped_regions():
  mask = swin.shifted_window_mask((10, 5), (5, 5), (2, 0))
  assert mask.shape == (2, 25, 25)
  assert not mask[0].any()  # First window: one region.
  # Last window after the roll: rows 0-2 from the bottom band, rows 3-4 wrapped from the top.
  region = np.repeat([0, 0, 0, 1, 1], 5)
  np.testing.assert_array_equal(mask[1] != 0, region[:, None] != region[None, :])


@pytest.mark.parametrize("size", [(64, 64), (16, 32)])
def test_parity_with_torch_float32(size):
  torch_model = _torch_model(**SMALL)
  variables = import_mammoregnet(_state_dict(torch_model), **SMALL)
  fixed, moving = _images(2, *size)
  expected = _torch_outputs(torch_model, fixed, moving)
  assert np.abs(expected["flow"]).max() > 0.5  # The deformation heads do contribute.
  out = small_apply(variables, moving, fixed)
  for key, value in expected.items():
    np.testing.assert_allclose(out[key], value, atol=1e-4, rtol=0, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(64, 32), (48, 80)])
def test_parity_with_torch_float64_is_exact(size):
  """In float64 the two agree to rounding even with large flows: same algorithm, not just close."""
  torch_model = _torch_model(head_std=0.3, **SMALL)
  variables = import_mammoregnet(_state_dict(torch_model), **SMALL)
  torch_model = torch_model.double()
  fixed, moving = _images(2, *size, dtype=np.float64)
  expected = _torch_outputs(torch_model, fixed, moving)
  assert np.abs(expected["flow"]).max() > 10.0
  with jax.enable_x64(True):
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    out = small_apply(variables, moving, fixed)
    for key, value in expected.items():
      assert out[key].dtype == jnp.float64
      np.testing.assert_allclose(out[key], value, atol=1e-8, rtol=0, err_msg=key)


def test_default_hyperparameters_match_reference_shapes():
  torch_model = _torch_model()
  state = _state_dict(torch_model)
  variables = import_mammoregnet(state)
  imported = sum(v.size for v in jax.tree_util.tree_leaves(variables))
  trainable = sum(p.numel() for p in torch_model.parameters())
  assert imported == trainable  # The importer also checked every key and shape one-to-one.


def test_importer_accepts_nesting_and_prefixes():
  state = _state_dict(_torch_model(**SMALL))
  plain = import_mammoregnet(state, **SMALL)
  wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
  nested = import_mammoregnet(wrapped, **SMALL)
  jax.tree_util.tree_map(np.testing.assert_array_equal, plain, nested)


def test_importer_names_missing_unexpected_and_mismatched_keys():
  state = _state_dict(_torch_model(**SMALL))
  missing = dict(state)
  del missing["Decoder.trans_3.blocks.1.attn.qkv.weight"]
  with pytest.raises(ValueError, match=r"missing keys \['Decoder\.trans_3\.blocks\.1\.attn\.qkv"):
    import_mammoregnet(missing, **SMALL)
  with pytest.raises(ValueError, match=r"unexpected keys \['Decoder\.extra\.weight'\]"):
    import_mammoregnet({**state, "Decoder.extra.weight": np.zeros(3)}, **SMALL)
  with pytest.raises(ValueError, match=r"Encoder\.conv_1\.Conv_1\.weight: checkpoint"):
    import_mammoregnet(state, enc_channels=4, dec_channels=8)
  bad_index = dict(state)
  bad_index["Decoder.trans_2.blocks.0.attn.relative_position_index"] = np.zeros((25, 25))
  with pytest.raises(ValueError, match="relative_position_index"):
    import_mammoregnet(bad_index, **SMALL)
  with pytest.raises(ValueError, match="unknown MammoRegNet hyper-parameters"):
    import_mammoregnet(state, enc_chanels=2)


@pytest.mark.parametrize("size", [(40, 64), (64, 8)])
def test_invalid_spatial_size_is_a_clear_error(size):
  fixed, moving = _images(1, *size)
  with pytest.raises(ValueError, match="multiples of 16"):
    jax.eval_shape(SMALL_MODEL.init, jax.random.key(0), moving, fixed)


def test_wrong_channels_and_shapes_are_clear_errors():
  fixed, moving = _images(1, 32, 32)
  with pytest.raises(ValueError, match=r"moving must be \[B, H, W, 1\]"):
    jax.eval_shape(SMALL_MODEL.init, jax.random.key(0), np.repeat(moving, 3, axis=-1), fixed)
  with pytest.raises(ValueError, match="same shape"):
    jax.eval_shape(SMALL_MODEL.init, jax.random.key(0), moving[:, :16], fixed)


def test_load_torch_state_dict_roundtrip(tmp_path):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "ckpt.pt")
  torch.save(
    {
      "model": {
        "module.a.weight": torch.ones(2, 3, dtype=torch.bfloat16),
        "module.b": torch.arange(4),
      },
      "epoch": 1,
    },
    path,
  )
  state = load_torch_state_dict(path)
  assert sorted(state) == ["a.weight", "b"]
  assert state["a.weight"].dtype == np.float32 and state["a.weight"].shape == (2, 3)
  np.testing.assert_array_equal(state["b"], np.arange(4))


def test_unwrap_state_dict_errors():
  with pytest.raises(ValueError, match="two entries for 'x'"):
    unwrap_state_dict({"x": np.zeros(1), "module.x": np.zeros(1)})
  with pytest.raises(ValueError, match="'opt' is a str"):
    unwrap_state_dict({"opt": "adam"})


def test_load_without_torch_says_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"pip install mammojax\[torch\]"):
    load_torch_state_dict(str(tmp_path / "ckpt.pt"))
