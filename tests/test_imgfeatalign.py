"""ImgFeatAlign: torch parity (risk part and whole model), flow conventions, freezing, ablations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mammojax.convert.imgfeatalign import import_risk_model
from mammojax.convert.layouts import torch_conv_kernel as conv_kernel
from mammojax.convert.mirai import find_backbone, import_backbone
from mammojax.models.imgfeatalign import AttentionRiskFusion, ImgFeatAlign, feature_displacement
from mammojax.nn.resize import resize_linear_align_corners as resize_align_corners
from mammojax.nn.warp import warp

torch = pytest.importorskip("torch")
from torch_refs import imgfeatalign_torch as ref  # noqa: E402
from torch_refs.resnet_torch import randomize_batch_norm  # noqa: E402

WIDTH, HEADS = 8, 2  # feature dim 64
H, W = 128, 96  # features 4 x 3


class TinyRegistration(nn.Module):
  """Stand-in registration net: flow = 4 * conv3x3([fixed, moving]) ('ij' pixels)."""

  @nn.compact
  def __call__(self, fixed, moving):
    conv = nn.Conv(2, (3, 3), padding=((1, 1), (1, 1)), name="conv")
    return {"flow": 4.0 * conv(jnp.concatenate([fixed, moving], axis=-1))}


class TinyRegistrationTorch(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

  def forward(self, fixed, moving):
    return None, 4.0 * self.conv(torch.cat([fixed, moving], 1)), None, None


def _numpy_state(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _nchw_to_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@functools.cache
def _torch_model():
  torch.manual_seed(0)
  model = ref.ImgFeatAlignTorch(TinyRegistrationTorch(), width=WIDTH, heads=HEADS)
  randomize_batch_norm(model, torch.Generator().manual_seed(0))
  return model.eval()


def _flax_variables(model_t):
  state = _numpy_state(model_t)
  encoder, _ = import_backbone(
    state, find_backbone({k: v for k, v in state.items() if k.startswith("encoder.")})[0]
  )
  risk, _ = import_risk_model(state, num_heads=HEADS, max_time=5.0)
  registration = {
    "conv": {
      "kernel": conv_kernel(state["mammo_reg_net.conv.weight"]),
      "bias": state["mammo_reg_net.conv.bias"],
    }
  }
  return {
    "params": {"encoder": encoder["params"], "risk_model": risk, "registration": registration},
    "batch_stats": {"encoder": encoder["batch_stats"]},
  }


def _inputs(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  cur = rng.normal(size=(batch, H, W, 1)).astype(np.float32)
  pri = (cur + 0.5 * rng.normal(size=cur.shape)).astype(np.float32)
  gap = np.array([1.3, 7.0, 0.0, 2.5][:batch], np.float32)  # 7.0 is clipped to max_time
  return cur, pri, gap


def _model(**kwargs):
  return ImgFeatAlign(
    registration=TinyRegistration(), encoder_width=WIDTH, num_heads=HEADS, **kwargs
  )


def _jit_apply(model, **kwargs):
  """Compiled ``model.apply`` (one compile per model; far cheaper than op-by-op here)."""
  return jax.jit(lambda variables, cur, pri, gap: model.apply(variables, cur, pri, gap, **kwargs))


@functools.cache
def _init_variables():
  init = jax.jit(lambda cur, pri, gap: _model().init(jax.random.key(0), cur, pri, gap, train=False))
  return nn.meta.unbox(init(*_inputs()))


def test_risk_part_parity_with_torch():
  torch.manual_seed(1)
  risk_t = ref.RiskModel(32, heads=4, drop=0.1, expansion=4, years=5).eval()
  params, _ = import_risk_model(_numpy_state(risk_t), num_heads=4, max_time=5.0, prefix="")
  rng = np.random.default_rng(1)
  maps = [rng.normal(size=(3, 32, 4, 3)).astype(np.float32) for _ in range(4)]
  gap = np.array([0.37, 4.99, 6.0], np.float32)
  with torch.no_grad():
    expected = risk_t(*[torch.from_numpy(m) for m in maps], torch.from_numpy(gap))
  ours = AttentionRiskFusion(num_heads=4).apply(
    {"params": params}, *[_nchw_to_nhwc(m) for m in maps], gap, deterministic=True
  )
  for key in ("pred_fused", "pred_cur", "pred_pri"):
    np.testing.assert_allclose(np.asarray(ours[key]), expected[key].numpy(), atol=1e-4, rtol=1e-4)


def test_whole_model_parity_with_torch_bcrbench_compat():
  model_t = _torch_model()
  cur, pri, gap = _inputs()
  with torch.no_grad():
    expected = model_t(
      *[torch.from_numpy(x.transpose(0, 3, 1, 2)) for x in (cur, pri)], torch.from_numpy(gap)
    )
  ours = _jit_apply(_model(bcrbench_flow_compat=True), train=False)(
    _flax_variables(model_t), cur, pri, gap
  )
  assert np.abs(np.asarray(ours["deformation_field"])).max() > 0.5  # a real, non-trivial flow
  np.testing.assert_allclose(
    np.asarray(ours["deformation_field"]), _nchw_to_nhwc(expected["deformation_field"]), atol=1e-4
  )
  for key in ("current_feature", "prior_feature", "aligned_prior_feature", "diff_feature"):
    np.testing.assert_allclose(
      np.asarray(ours[key]), _nchw_to_nhwc(expected[key]), atol=1e-4, rtol=1e-4, err_msg=key
    )
  for key, value in expected["risk_prediction"].items():
    np.testing.assert_allclose(
      np.asarray(ours["risk_prediction"][key]), value.numpy(), atol=1e-4, rtol=1e-4, err_msg=key
    )


def test_default_flow_keeps_rows_as_rows_and_compat_swaps_them():
  features = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 8, 3)), jnp.float32)
  flow = jnp.zeros((1, 64, 64, 2)).at[..., 0].set(8.0)  # 8 image rows = 1 feature row down
  default = warp(features, feature_displacement(flow, (8, 8), bcrbench_flow_compat=False))
  np.testing.assert_allclose(default[:, :-1], features[:, 1:], atol=1e-5)  # rows shifted
  np.testing.assert_allclose(default[:, -1], 0.0)  # zero padding below the last row
  compat = warp(features, feature_displacement(flow, (8, 8), bcrbench_flow_compat=True))
  np.testing.assert_allclose(compat[:, :, :-1], features[:, :, 1:], atol=1e-5)  # columns!


def test_compat_resize_and_warp_equal_bcrbench_torch():
  rng = np.random.default_rng(3)
  features = rng.normal(size=(2, 5, 12, 9)).astype(np.float32)
  flow = (3.0 * rng.normal(size=(2, 2, 96, 72))).astype(np.float32)
  with torch.no_grad():
    small = ref.bcrbench_resize_flow(torch.from_numpy(flow), (12, 9), (96, 72))
    expected = ref.bcrbench_warp(torch.from_numpy(features), small).numpy()
  np.testing.assert_allclose(
    np.asarray(resize_align_corners(jnp.asarray(_nchw_to_nhwc(flow)), (12, 9))),
    _nchw_to_nhwc(
      torch.nn.functional.interpolate(
        torch.from_numpy(flow), size=(12, 9), mode="bilinear", align_corners=True
      )
    ),
    atol=1e-5,
  )
  ours = warp(
    jnp.asarray(_nchw_to_nhwc(features)),
    feature_displacement(jnp.asarray(_nchw_to_nhwc(flow)), (12, 9), True),
  )
  np.testing.assert_allclose(np.asarray(ours), _nchw_to_nhwc(expected), atol=1e-5)


@functools.cache
def _eval_outputs():
  return _jit_apply(_model(), train=False)(_init_variables(), *_inputs())


@pytest.mark.parametrize("finetune_all", [False, True])
def test_training_freezes_registration_and_frozen_encoder(finetune_all):
  """Zero gradient to the registration net; a frozen encoder gets none either and its
  BatchNorm keeps inference mode (running statistics, unchanged) while training."""
  variables = _init_variables()
  cur, pri, gap = _inputs()
  batch = {
    "target": np.zeros((2, 5), np.float32),
    "y_mask": np.ones((2, 5), np.float32),
    "target_prior": np.ones((2, 5), np.float32),
    "y_mask_prior": np.ones((2, 5)),
  }
  model = _model(finetune_all=finetune_all)

  def loss(params):
    outputs, state = model.apply(
      {**variables, "params": params},
      cur,
      pri,
      gap,
      train=True,
      rngs={"dropout": jax.random.key(2)},
      mutable=["batch_stats"],
    )
    heads = model.risk_heads(outputs, batch)
    return sum(jnp.mean(logits) for logits, _, _ in heads.values()), (outputs, state)

  grads, (outputs, state) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  norm = lambda tree: float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(tree)))  # noqa
  assert norm(grads["registration"]) == 0.0
  assert (norm(grads["encoder"]) > 0) == finetune_all
  assert norm(grads["risk_model"]) > 0
  same_features = np.allclose(
    outputs["current_feature"], _eval_outputs()["current_feature"], atol=1e-5
  )
  stats_changed = jax.tree.leaves(
    jax.tree.map(lambda a, b: not np.allclose(a, b), state["batch_stats"], variables["batch_stats"])
  )
  if finetune_all:  # batch statistics in use and updated
    assert not same_features and all(stats_changed)
  else:
    assert same_features and not any(stats_changed)


def test_ablation_switches():
  variables = _init_variables()
  cur, pri, gap = _inputs()
  other_pri = np.flip(pri, axis=1).copy()
  compiled = {}

  def apply(model, p=pri, g=gap):
    if model not in compiled:
      compiled[model] = _jit_apply(model, train=False)
    return compiled[model](variables, cur, p, g)

  full = _eval_outputs()
  assert np.abs(np.asarray(full["deformation_field"])).max() > 0

  unaligned = apply(_model(align=False))
  np.testing.assert_array_equal(unaligned["aligned_prior_feature"], unaligned["prior_feature"])
  np.testing.assert_array_equal(unaligned["deformation_field"], 0.0)
  assert not np.allclose(
    unaligned["risk_prediction"]["pred_fused"], full["risk_prediction"]["pred_fused"]
  )

  no_prior = _model(use_prior=False)
  a, b = apply(no_prior), apply(no_prior, p=other_pri)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # the prior image is never read
  np.testing.assert_array_equal(a["prior_feature"], 0.0)
  assert "pri" not in no_prior.risk_heads(a, {"target": 0, "y_mask": 0})
  assert not np.allclose(a["risk_prediction"]["pred_fused"], full["risk_prediction"]["pred_fused"])

  other_gap = gap + 1.0
  assert not np.allclose(
    _jit_apply(_model(), train=False)(variables, cur, pri, other_gap)["risk_prediction"][
      "pred_fused"
    ],
    full["risk_prediction"]["pred_fused"],
  )
  timeless = _model(use_time_encoding=False)
  np.testing.assert_array_equal(
    apply(timeless)["risk_prediction"]["pred_fused"],
    apply(timeless, g=other_gap)["risk_prediction"]["pred_fused"],
  )


def test_risk_model_interface():
  model = _model()
  outputs = _eval_outputs()
  batch = {
    k: np.full((2, 5), i, np.float32)
    for i, k in enumerate(("target", "y_mask", "target_prior", "y_mask_prior"))
  }
  heads = model.risk_heads(outputs, batch)
  assert sorted(heads) == ["cur", "fused", "pri"]
  assert heads["fused"][0] is outputs["risk_prediction"]["pred_fused"]
  assert heads["cur"][1] is batch["target"] and heads["cur"][2] is batch["y_mask"]
  assert heads["pri"][1] is batch["target_prior"] and heads["pri"][2] is batch["y_mask_prior"]
  np.testing.assert_allclose(
    model.primary_risk(outputs), jax.nn.sigmoid(outputs["risk_prediction"]["pred_fused"])
  )
  logits = outputs["risk_prediction"]["pred_fused"]
  assert logits.shape == (2, 5) and np.all(np.diff(np.asarray(logits), axis=1) >= 0)


def test_bad_inputs_are_named():
  cur, pri, gap = _inputs()
  with pytest.raises(ValueError, match="previous_image"):
    _model().init(jax.random.key(0), cur, pri[:, :64], gap, train=False)
  with pytest.raises(ValueError, match="time_gap"):
    _model().init(jax.random.key(0), cur, pri, gap[:1], train=False)
