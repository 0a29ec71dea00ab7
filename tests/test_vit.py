"""Vision Transformer: torchvision and timm import, eval parity, sown intermediates, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from mammojax.convert.layouts import torch_attention_params
from mammojax.convert.vit import import_vit
from mammojax.nn.vit import VIT_INTERMEDIATE_NAMES, VisionTransformer, tokens_to_grid, vit_b16

torch = pytest.importorskip("torch")
from torch_refs.small_vit import randomize_vit, small_torchvision_vit  # noqa: E402
from torch_refs.torchvision_import import import_timm, import_torchvision  # noqa: E402

torchvision = import_torchvision()

TOLERANCE = 1e-4
SMALL = dict(image_size=32, patch_size=8, depth=2, num_heads=4, hidden_dim=64)
SMALL_FIELDS = {**SMALL, "mlp_dim": 128, "num_classes": 10}


def _state(model, prefix: str = "") -> dict[str, np.ndarray]:
  return {f"{prefix}{k}": v.numpy() for k, v in model.state_dict().items()}


def _images(size: int, channels: int = 3, batch: int = 2, seed: int = 0) -> np.ndarray:
  """``[B, size, size, channels]``."""
  return np.random.default_rng(seed).normal(size=(batch, size, size, channels)).astype(np.float32)


def _torch_run(model, images: np.ndarray, hooks: dict[str, object]):
  """Logits and the hooked modules' outputs of ``model`` on NHWC ``images``."""
  outputs = {}
  handles = [
    module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.numpy()))
    for name, module in hooks.items()
  ]
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  with torch.no_grad():
    logits = model(x).numpy()
  for handle in handles:
    handle.remove()
  return logits, outputs


def _flax_run(fields: dict, params: dict, images: np.ndarray):
  """(logits, class-token features, sown intermediates) of the imported model."""
  model = VisionTransformer(**fields)
  logits, state = model.apply({"params": params}, images, mutable=["intermediates"])
  trunk = VisionTransformer(**{**fields, "num_classes": 0})
  trunk_params = {k: v for k, v in params.items() if k != "head"}
  features = trunk.apply({"params": trunk_params}, images)
  return np.asarray(logits), np.asarray(features), state["intermediates"]


def _max_diff(a, b) -> float:
  assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def torchvision_small():
  return small_torchvision_vit(num_classes=10)


@pytest.fixture(scope="module")
def timm_small():
  timm = import_timm()
  torch.manual_seed(0)
  model = timm.models.vision_transformer.VisionTransformer(
    img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10
  )
  return randomize_vit(model, seed=2)


@pytest.mark.parametrize("channels", [3, 1])
def test_torchvision_small_parity(torchvision_small, channels):
  variables, fields, layout = import_vit(_state(torchvision_small), num_heads=4)
  assert layout == "torchvision"
  assert fields == SMALL_FIELDS
  images = _images(32, channels)
  hooks = {
    "conv_proj": torchvision_small.conv_proj,
    "encoder_layer_0": torchvision_small.encoder.layers.encoder_layer_0,
    "encoder": torchvision_small.encoder,
  }
  torch_logits, torch_out = _torch_run(torchvision_small, images, hooks)
  logits, features, sown = _flax_run(fields, variables["params"], images)
  diffs = {
    "logits": _max_diff(logits, torch_logits),
    "features": _max_diff(features, torch_out["encoder"][:, 0]),
    "conv_proj": _max_diff(sown["conv_proj_out"][0], torch_out["conv_proj"].transpose(0, 2, 3, 1)),
    "encoder_layer_0": _max_diff(sown["encoder_layer_0_out"][0], torch_out["encoder_layer_0"]),
    "encoder_norm": _max_diff(sown["encoder_norm_out"][0], torch_out["encoder"]),
  }
  print(f"torchvision small, {channels} channels, max abs diffs: {diffs}")
  assert np.abs(torch_logits).max() > 0.1  # not a trivial all-zero comparison
  assert max(diffs.values()) <= TOLERANCE, diffs


def test_timm_small_parity(timm_small):
  variables, fields, layout = import_vit(_state(timm_small))  # heads: 64 // 64 by default
  assert layout == "timm"
  assert fields == {**SMALL_FIELDS, "mlp_dim": 256, "num_heads": 1}
  variables, fields, _ = import_vit(_state(timm_small), num_heads=4)
  assert fields == {**SMALL_FIELDS, "mlp_dim": 256}
  images = _images(32)
  hooks = {"block0": timm_small.blocks[0], "norm": timm_small.norm}
  torch_logits, torch_out = _torch_run(timm_small, images, hooks)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    torch_features = timm_small.forward_head(timm_small.forward_features(x), pre_logits=True)
  logits, features, sown = _flax_run(fields, variables["params"], images)
  diffs = {
    "logits": _max_diff(logits, torch_logits),
    "features": _max_diff(features, torch_features.numpy()),
    "encoder_layer_0": _max_diff(sown["encoder_layer_0_out"][0], torch_out["block0"]),
    "encoder_norm": _max_diff(sown["encoder_norm_out"][0], torch_out["norm"]),
  }
  print(f"timm small, max abs diffs: {diffs}")
  assert np.abs(torch_logits).max() > 0.1
  assert max(diffs.values()) <= TOLERANCE, diffs


def _full_size_parity(model, layout: str, final_norm) -> dict[str, float]:
  """Max abs diffs of the logits and of the class-token features (``final_norm``'s output token
  0) on one 224x224 image; one forward each side (the features come from the sown tokens)."""
  variables, fields, found = import_vit(_state(model))
  assert found == layout
  assert fields == {
    "patch_size": 16,
    "hidden_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_dim": 3072,
    "num_classes": 1000,
    "image_size": 224,
  }
  images = _images(224, batch=1)
  torch_logits, torch_out = _torch_run(model, images, {"norm": final_norm})
  logits, state = VisionTransformer(**fields).apply(variables, images, mutable=["intermediates"])
  features = state["intermediates"]["encoder_norm_out"][0][:, 0]
  assert np.abs(torch_logits).max() > 0.1
  return {
    "logits": _max_diff(logits, torch_logits),
    "features": _max_diff(features, torch_out["norm"][:, 0]),
  }


def test_torchvision_vit_b_16_parity():
  torch.manual_seed(0)
  model = randomize_vit(torchvision.models.vit_b_16(weights=None), seed=3)
  diffs = _full_size_parity(model, "torchvision", model.encoder)
  print(f"torchvision vit_b_16 at 224, max abs diffs: {diffs}")
  assert max(diffs.values()) <= TOLERANCE, diffs


def test_timm_vit_base_patch16_224_parity():
  timm = import_timm()
  torch.manual_seed(0)
  model = randomize_vit(timm.create_model("vit_base_patch16_224", pretrained=False), seed=4)
  diffs = _full_size_parity(model, "timm", model.norm)
  print(f"timm vit_base_patch16_224 at 224, max abs diffs: {diffs}")
  assert max(diffs.values()) <= TOLERANCE, diffs


def test_vit_b16_sizes_match_torchvision():
  model = vit_b16(num_classes=1000)
  assert (model.image_size, model.patch_size, model.hidden_dim, model.depth) == (224, 16, 768, 12)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract)))
  assert count == 86_567_656  # torchvision's vit_b_16
  assert vit_b16(depth=2).depth == 2


def test_prefix_tolerated_and_unexpected_keys_named(torchvision_small):
  plain, _, _ = import_vit(_state(torchvision_small), num_heads=4)
  prefixed, fields, layout = import_vit(_state(torchvision_small, "module."), num_heads=4)
  assert layout == "torchvision" and fields == SMALL_FIELDS
  flat, flat_prefixed = (traverse_util.flatten_dict(v["params"]) for v in (plain, prefixed))
  assert flat.keys() == flat_prefixed.keys()
  assert all(np.array_equal(flat[k], flat_prefixed[k]) for k in flat)
  state = {**_state(torchvision_small), "encoder.extra.weight": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected keys.*encoder\.extra\.weight"):
    import_vit(state, num_heads=4)


def test_unsupported_and_unknown_layouts_refused(torchvision_small, timm_small):
  with pytest.raises(ValueError, match="not a torchvision or timm ViT state dict"):
    import_vit({"conv1.weight": np.zeros((8, 3, 3, 3)), "fc.weight": np.zeros((2, 8))})
  state = {**_state(torchvision_small), "heads.pre_logits.weight": np.zeros((64, 64))}
  with pytest.raises(ValueError, match="representation_size"):
    import_vit(state, num_heads=4)
  state = {**_state(timm_small), "fc_norm.weight": np.ones(64), "fc_norm.bias": np.zeros(64)}
  with pytest.raises(ValueError, match="fc_norm"):
    import_vit(state, num_heads=4)
  with pytest.raises(ValueError, match="divisible by num_heads=5"):
    import_vit(_state(timm_small), num_heads=5)
  state = _state(torchvision_small)
  del state["encoder.layers.encoder_layer_1.ln_2.bias"]
  with pytest.raises(ValueError, match="encoder_layer_1.ln_2.bias' missing"):
    import_vit(state, num_heads=4)


@pytest.fixture(scope="module")
def small_trunk():
  """A 2-block ViT without head (num_classes=0) and its variables, initialised once."""
  model = VisionTransformer(**{**SMALL, "mlp_dim": 32})
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))


def test_sown_names_shapes_and_tokens_to_grid(small_trunk):
  model, variables = small_trunk
  assert "intermediates" not in variables
  images = jnp.asarray(_images(32, channels=1))
  apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))
  features, state = apply(variables, images)
  sown = state["intermediates"]
  names = VIT_INTERMEDIATE_NAMES(2)
  assert names == (
    "conv_proj_out",
    "encoder_layer_0_out",
    "encoder_layer_1_out",
    "encoder_norm_out",
  )
  assert tuple(sown) == names
  assert sown["conv_proj_out"][0].shape == (2, 4, 4, 64)
  assert all(sown[name][0].shape == (2, 17, 64) for name in names[1:])
  assert features.shape == (2, 64)
  np.testing.assert_array_equal(features, sown["encoder_norm_out"][0][:, 0])
  grid = tokens_to_grid(sown["encoder_layer_0_out"][0], (4, 4))
  assert grid.shape == (2, 4, 4, 64)
  np.testing.assert_array_equal(grid[:, 2, 3], sown["encoder_layer_0_out"][0][:, 1 + 2 * 4 + 3])
  patches = sown["conv_proj_out"][0]
  flat = patches.reshape(2, 16, 64)
  np.testing.assert_array_equal(tokens_to_grid(flat, (4, 4), class_token=False), patches)
  with pytest.raises(ValueError, match="patch grid"):
    tokens_to_grid(sown["encoder_layer_0_out"][0], (4, 5))


def test_wrong_image_size_head_and_dropout(small_trunk):
  model, variables = small_trunk
  with pytest.raises(ValueError, match="built for image_size=32"):
    model.apply(variables, jnp.zeros((1, 48, 32, 3)))
  with pytest.raises(ValueError, match="not multiples of patch_size=8"):
    model.apply(variables, jnp.zeros((1, 36, 36, 3)))
  with pytest.raises(ValueError, match=r"\[B, H, W, 1 or 3\]"):
    model.apply(variables, jnp.zeros((1, 32, 32, 2)))
  images = jnp.asarray(_images(32, batch=1))
  # The head starts at zero, as torchvision's (only the head is computed: XLA drops the rest).
  classifier = model.clone(num_classes=3)
  head = jax.jit(lambda key: classifier.init(key, images)["params"]["head"])(jax.random.key(0))
  assert nn.meta.unbox(head)["kernel"].shape == (64, 3)
  assert all(not np.any(x) for x in jax.tree.leaves(nn.meta.unbox(head)))
  # Dropout acts in training only.
  dropping = model.clone(dropout_rate=0.5)
  run = jax.jit(dropping.apply, static_argnames="train")
  evaluated = run(variables, images)
  np.testing.assert_array_equal(evaluated, run(variables, images))
  trained = run(variables, images, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(trained, evaluated)


def test_mean_pool_bf16_and_volumes():
  model = VisionTransformer(
    image_size=16, patch_size=8, hidden_dim=32, depth=1, num_heads=2, mlp_dim=32, class_token=False
  )
  volume = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, 16, 1)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), volume)
  assert "class_token" not in variables["params"]
  assert nn.meta.unbox(variables)["params"]["pos_embedding"].shape == (1, 8, 32)
  features, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
    variables, volume
  )
  assert state["intermediates"]["conv_proj_out"][0].shape == (1, 2, 2, 2, 32)
  np.testing.assert_allclose(
    features, state["intermediates"]["encoder_norm_out"][0].mean(1), rtol=1e-6, atol=1e-6
  )
  half = model.clone(dtype=jnp.bfloat16)
  out = jax.jit(half.apply)(variables, volume)
  assert out.dtype == jnp.bfloat16
  abstract = jax.eval_shape(lambda: half.init(jax.random.key(0), volume))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(abstract)))
  np.testing.assert_allclose(np.asarray(out, np.float32), features, atol=0.1)


def test_torch_attention_params_shapes():
  dim, heads = 8, 2
  rng = np.random.default_rng(0)
  params = torch_attention_params(
    rng.normal(size=(3 * dim, dim)),
    rng.normal(size=3 * dim),
    rng.normal(size=(dim, dim)),
    rng.normal(size=dim),
    heads,
  )
  assert params["query"]["kernel"].shape == (dim, heads, dim // heads)
  assert params["value"]["bias"].shape == (heads, dim // heads)
  assert params["out"]["kernel"].shape == (heads, dim // heads, dim)
  with pytest.raises(ValueError, match="out weight"):
    torch_attention_params(
      np.zeros((3 * dim, dim)), np.zeros(3 * dim), np.zeros((dim, 2)), np.zeros(dim), heads
    )
