"""FPN-MIL: masked pooling, Set Transformer blocks, FPN, losses, torch parity and import."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.convert.mammoclip import import_efficientnet, import_fpn_mil
from mammojax.losses.bce import weighted_bce_with_logits
from mammojax.losses.mil import deep_supervision_loss
from mammojax.models.mil import FPNMIL, MultiScaleMILHead, reference_num_inducing
from mammojax.nn.efficientnet import MAMMOCLIP_STATIC_SIZE, EfficientNet
from mammojax.nn.fpn import FPN
from mammojax.nn.mil_pooling import InstanceEncoder, make_pooling
from mammojax.nn.resize import resize_nearest as nearest_resize
from mammojax.nn.set_transformer import ISAB, PMA, num_inducing_points

torch = pytest.importorskip("torch")
from torch_refs.efficientnet_torch import TorchEfficientNet, randomize_batch_norm  # noqa: E402
from torch_refs.fpn_mil_torch import TorchFPN, TorchFPNMIL  # noqa: E402

POOLINGS = ("mean", "max", "attention", "gated-attention", "pma")
D = 16


def _bag(seed, b=2, n=7, d=D):
  return jnp.asarray(np.random.RandomState(seed).randn(b, n, d), jnp.float32)


def _apply(module, x, mask):
  variables = module.init(jax.random.key(0), x, mask)
  return variables, lambda v, x, m: module.apply(v, x, m)


class _Bag(nn.Module):
  """Instance encoder followed by pooling, as in one scale of the MIL head."""

  encoder: str
  pooling: str

  @nn.compact
  def __call__(self, x, mask):
    x = InstanceEncoder(
      self.encoder, D, num_blocks=1, num_heads=2, num_inducing=3, layer_norm=True
    )(x, mask)
    return make_pooling(self.pooling, features=D, attention_hidden=8, num_heads=2, layer_norm=True)(
      x, mask
    )


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("encoder", ("mlp", "isab"))
def test_pooling_is_permutation_invariant_and_ignores_padding(pooling, encoder):
  x = _bag(0)
  mask = jnp.asarray([[True] * 7, [True] * 4 + [False] * 3])
  variables, run = _apply(_Bag(encoder, pooling), x, mask)
  pooled, weights = run(variables, x, mask)

  perm = np.random.RandomState(1).permutation(7)
  pooled_p, weights_p = run(variables, x[:, perm], mask[:, perm])
  np.testing.assert_allclose(pooled_p, pooled, atol=1e-5)
  if weights is not None:
    np.testing.assert_allclose(weights_p, weights[:, perm], atol=1e-6)
    np.testing.assert_array_equal(weights[1, 4:], 0.0)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)

  # Padded instances (any values) change nothing: same as the unpadded bag of 4.
  garbage = x.at[1, 4:].set(1e4)
  pooled_g, _ = run(variables, garbage, mask)
  np.testing.assert_allclose(pooled_g[1], pooled[1], atol=1e-5)
  pooled_short, _ = run(variables, x[1:, :4], None)
  np.testing.assert_allclose(pooled[1], pooled_short[0], atol=1e-5)

  # A bag with a single real instance still works.
  one = jnp.asarray([[True] + [False] * 6] * 2)
  pooled_one, weights_one = run(variables, garbage, one)
  assert np.all(np.isfinite(pooled_one))
  if weights_one is not None:
    np.testing.assert_allclose(weights_one[:, 0], 1.0, atol=1e-6)


def test_gated_attention_against_hand_computation():
  x = _bag(2, b=1, n=5)
  mask = jnp.asarray([[True, True, False, True, True]])
  pool = make_pooling("gated-attention", features=D, attention_hidden=4)
  variables, run = _apply(pool, x, mask)
  pooled, weights = run(variables, x, mask)
  p = variables["params"]
  v = np.tanh(np.asarray(x[0]) @ p["attention_V"]["kernel"].unbox() + p["attention_V"]["bias"])
  u = 1 / (
    1 + np.exp(-(np.asarray(x[0]) @ p["attention_U"]["kernel"].unbox() + p["attention_U"]["bias"]))
  )
  scores = (v * u) @ p["attention_weights"]["kernel"].unbox()[:, 0] + p["attention_weights"]["bias"]
  valid = np.asarray(mask[0])
  expected = np.where(valid, np.exp(scores - scores[valid].max()), 0.0)
  expected /= expected.sum()
  np.testing.assert_allclose(weights[0], expected, atol=1e-6)
  np.testing.assert_allclose(pooled[0], expected @ np.asarray(x[0]), atol=1e-5)


def test_attention_dropout_active_only_in_training():
  x = _bag(3)
  pool = make_pooling("gated-attention", features=D, attention_hidden=8, dropout=0.5)
  variables = pool.init(jax.random.key(0), x, None)
  evaluate = pool.apply(variables, x, None)[1]
  runs = [
    pool.apply(variables, x, None, False, rngs={"dropout": jax.random.key(k)})[1] for k in (1, 2)
  ]
  assert not np.allclose(runs[0], runs[1])
  np.testing.assert_array_equal(evaluate, pool.apply(variables, x, None)[1])


def test_isab_pma_shapes_and_inducing_rule():
  assert num_inducing_points(6144) == 38 and num_inducing_points(8) == 8
  assert reference_num_inducing((1520, 912), 512, (16, 32, 128)) == (38, 32, 20)
  x = _bag(4, b=3, n=11)
  isab = ISAB(12, num_inducing=5, num_heads=3)
  variables = isab.init(jax.random.key(0), x)
  assert variables["params"]["I"].unbox().shape == (1, 5, 12)
  assert isab.apply(variables, x).shape == (3, 11, 12)
  pma = PMA(D, num_heads=4)
  pooled, attention = pma.apply(pma.init(jax.random.key(0), x), x)
  assert pooled.shape == (3, D) and attention.shape == (3, 4, 11)
  with pytest.raises(ValueError, match="num_heads"):
    ISAB(10, 4, num_heads=3).init(jax.random.key(0), x)


def test_bad_shapes_and_names_are_rejected():
  with pytest.raises(ValueError, match=r"\[B, N\]"):
    make_pooling("mean", features=D).init(jax.random.key(0), _bag(0), jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match="pooling type"):
    make_pooling("median", features=D)
  head = MultiScaleMILHead(scales=(16,), encoder_type="isab")
  with pytest.raises(ValueError, match="num_inducing"):
    head.init(jax.random.key(0), {16: _bag(0)})
  with pytest.raises(ValueError, match="missing"):
    MultiScaleMILHead(scales=(16, 32)).init(jax.random.key(0), {16: _bag(0)})


def test_fpn_levels_and_nearest_resize():
  x = jnp.arange(2 * 3 * 1, dtype=jnp.float32).reshape(1, 2, 3, 1)
  # torch 'nearest': source index floor(i * in / out).
  np.testing.assert_array_equal(
    nearest_resize(x, (4, 5))[0, :, :, 0],
    [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5], [3, 3, 4, 4, 5]],
  )
  fpn = FPN(8, group_norm=True)
  c4, c5 = jnp.ones((2, 9, 7, 5)), jnp.ones((2, 5, 4, 6))
  variables = fpn.init(jax.random.key(0), c4, c5)
  assert "bias" not in variables["params"]["inner_block_0"]
  out = fpn.apply(variables, c4, c5)
  assert {k: v.shape for k, v in out.items()} == {
    16: (2, 9, 7, 8),
    32: (2, 5, 4, 8),
    128: (2, 2, 1, 8),
  }


def test_weighted_bce_and_deep_supervision_by_hand():
  logits = jnp.asarray([2.0, -1.0, 0.5])
  labels = jnp.asarray([1.0, 0.0, 0.0])
  sig = 1 / (1 + np.exp(-np.asarray(logits)))
  per = [-3.0 * np.log(sig[0]), -np.log(1 - sig[1]), -np.log(1 - sig[2])]
  np.testing.assert_allclose(weighted_bce_with_logits(logits, labels, 3.0), np.mean(per), rtol=1e-6)
  ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0]))(
    torch.tensor(np.asarray(logits)), torch.tensor(np.asarray(labels))
  )
  np.testing.assert_allclose(weighted_bce_with_logits(logits, labels, 3.0), ref.item(), rtol=1e-6)

  sides = jnp.asarray([[0.0, 1.0], [3.0, -2.0], [1.0, 1.0]])
  expected = float(weighted_bce_with_logits(logits, labels, 3.0))
  for s in range(2):
    expected += 0.5 * float(weighted_bce_with_logits(sides[:, s], labels, 3.0))
  np.testing.assert_allclose(
    deep_supervision_loss(logits, sides, labels, 3.0, side_weight=0.5), expected, rtol=1e-6
  )
  np.testing.assert_allclose(
    deep_supervision_loss(logits, None, labels), weighted_bce_with_logits(logits, labels), rtol=1e-6
  )
  with pytest.raises(ValueError, match="same shape"):
    weighted_bce_with_logits(logits, labels[:2])


def _torch_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
  "encoder,pooling", [("isab", "pma"), ("sab", "attention"), ("mlp", "gated-attention")]
)
def test_head_parity_with_torch_and_masks(encoder, pooling):
  scales = (16, 32)
  torch.manual_seed(0)
  ref = TorchFPNMIL(
    None,
    in_dim=D,
    dim=12,
    scales=scales,
    encoder_type=encoder,
    pooling_type=pooling,
    attention_hidden=6,
    heads=2,
    num_blocks=2,
    num_inducing=(4, 3),
    layer_norm=True,
    pma_heads=2,
  ).eval()
  randomize_batch_norm(ref, torch.Generator().manual_seed(1))
  head = MultiScaleMILHead(
    scales=scales,
    encoder_type=encoder,
    encoder_features=12,
    encoder_heads=2,
    num_inducing=(4, 3),
    layer_norm=True,
    pooling_type=pooling,
    attention_hidden=6,
    pma_heads=2,
  )
  model = FPNMIL(head=head)
  instances = {16: _bag(5, n=9), 32: _bag(6, n=4)}
  masks = {
    16: jnp.asarray([[True] * 9, [True] * 6 + [False] * 3]),
    32: jnp.asarray([[True] * 4, [True] + [False] * 3]),
  }
  variables = import_fpn_mil(_torch_state(ref), model)
  out = jax.jit(lambda v, x, m: model.apply(v, x, m))(variables, instances, masks)
  with torch.no_grad():
    logits, side, attention = ref(
      {s: torch.tensor(np.asarray(x)) for s, x in instances.items()},
      {s: torch.tensor(np.asarray(m)) for s, m in masks.items()},
    )
  np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out["scale_logits"], side.numpy(), atol=1e-4, rtol=1e-4)
  for s in scales:
    np.testing.assert_allclose(out["attention"][s], attention[s].numpy(), atol=1e-5)
  assert out["scale_weights"].shape == (2, 2)


def test_online_model_parity_import_and_patch_mask():
  """B2 + FPN (GroupNorm) + MLP / gated attention on 64-px patches, weights from torch."""
  torch.manual_seed(0)
  backbone = TorchEfficientNet(static_size=MAMMOCLIP_STATIC_SIZE)
  ref = TorchFPNMIL(
    TorchFPN(backbone, features=D, group_norm=True), in_dim=D, dim=12, attention_hidden=6
  ).eval()
  randomize_batch_norm(ref, torch.Generator().manual_seed(1))
  head = MultiScaleMILHead(encoder_features=12, attention_hidden=6)
  model = FPNMIL(
    head=head,
    fpn=FPN(D, group_norm=True),
    backbone=EfficientNet(static_padding_size=MAMMOCLIP_STATIC_SIZE),
  )
  state = _torch_state(ref)
  variables = import_fpn_mil({"model": state, "epoch": 3}, model)
  patches = np.random.RandomState(7).randn(1, 2, 64, 64, 3).astype(np.float32)
  run = jax.jit(lambda v, x, m: model.apply(v, x, m))
  out = run(variables, jnp.asarray(patches), None)
  with torch.no_grad():
    logits, side, attention = ref(torch.from_numpy(patches).permute(0, 1, 4, 2, 3))
  np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out["scale_logits"], side.numpy(), atol=1e-4, rtol=1e-4)
  # Attention maps come back on the patch grids: 64-px patches -> 4x4, 2x2, 1x1.
  assert {s: a.shape for s, a in out["attention"].items()} == {
    16: (1, 2, 4, 4),
    32: (1, 2, 2, 2),
    128: (1, 2, 1, 1),
  }
  np.testing.assert_allclose(out["attention"][16].reshape(1, -1), attention[16].numpy(), atol=1e-5)

  # A padded patch (any pixels) gets no attention and changes no output.
  padded = np.concatenate([patches, 50 * np.ones_like(patches[:, :1])], axis=1)
  out_padded = run(variables, jnp.asarray(padded), jnp.asarray([[True, True, False]]))
  np.testing.assert_allclose(out_padded["logits"], out["logits"], atol=1e-5)
  np.testing.assert_array_equal(out_padded["attention"][32][0, 2], 0.0)

  # An offline-trained checkpoint (no backbone weights) takes the backbone from Mammo-CLIP.
  offline = {k: v for k, v in state.items() if not k.startswith("inst_encoder.backbone.")}
  mammoclip = {
    "image_encoder." + k[len("inst_encoder.backbone.") :]: v
    for k, v in state.items()
    if k.startswith("inst_encoder.backbone.")
  }
  with pytest.raises(ValueError, match="backbone_state_dict"):
    import_fpn_mil(offline, model)
  combined = import_fpn_mil(offline, model, backbone_state_dict=mammoclip)
  np.testing.assert_allclose(
    run(combined, jnp.asarray(patches), None)["logits"], out["logits"], atol=1e-6
  )

  # The same FPN and head on precomputed backbone maps (the reference's offline mode).
  offline_model = FPNMIL(head=head, fpn=FPN(D, group_norm=True))
  offline_vars = import_fpn_mil(offline, offline_model)
  maps = jax.jit(lambda v, x: model.backbone.apply(v, x))(
    import_efficientnet(mammoclip, model.backbone), jnp.asarray(patches[0])
  )
  features = {k: v[None] for k, v in maps.items()}
  np.testing.assert_allclose(
    offline_model.apply(offline_vars, features)["logits"], out["logits"], atol=1e-5
  )


def test_frozen_backbone_gets_no_gradient_and_finetune_does():
  head = MultiScaleMILHead(scales=(32,), encoder_features=8, attention_hidden=4)
  tiny = EfficientNet(width=0.25, depth=0.34)
  torch.manual_seed(0)
  ref = TorchFPNMIL(
    TorchFPN(
      TorchEfficientNet(width=0.25, depth=0.34),
      (tiny.stride16_channels, tiny.stride32_channels),
      features=8,
    ),
    in_dim=8,
    dim=8,
    scales=(32,),
    attention_hidden=4,
  )
  patches = jnp.asarray(np.random.RandomState(8).randn(1, 1, 32, 32, 3), jnp.float32)
  for trainable in (False, True):
    model = FPNMIL(head=head, fpn=FPN(8), backbone=tiny, backbone_trainable=trainable)
    variables = import_fpn_mil(_torch_state(ref), model)

    def loss(params, variables=variables, model=model):
      out, _ = model.apply(
        {**variables, "params": params},
        patches,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(1)},
      )
      return out["logits"].sum()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["backbone"]))
    assert (norm > 0) == trainable
