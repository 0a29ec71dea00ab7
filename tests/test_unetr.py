"""UNETR against MONAI's: eval parity of the logits and the ViT taps (3D and a non-square 2D),
the parameter count, the import's skipped and refused keys, the size errors and the ``unetr``
CLI kind."""

import json

import jax
import numpy as np
import pytest
from flax import linen as nn

from mammojax.convert.__main__ import run
from mammojax.convert.unetr import import_unetr
from mammojax.models.segmentation.unetr import UNETR
from mammojax.train.variable_store import load_variables

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")
from monai.networks.nets import UNETR as MonaiUNETR  # noqa: E402
from test_unet_blocks import (  # noqa: E402
  assert_close,
  channels_first,
  channels_last,
  perturbed,
  state,
)

SMALL = dict(feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)


@pytest.fixture(scope="module")
def monai_unetr():
  """A small 3D MONAI UNETR (12 blocks: UNETR taps 3, 6 and 9), perturbed, in eval mode."""
  torch.manual_seed(0)
  return perturbed(MonaiUNETR(in_channels=2, out_channels=3, img_size=32, **SMALL))


@pytest.fixture(scope="module")
def unetr_case(monai_unetr):
  """``(x [2, 32, 32, 32, 2], MONAI logits, MONAI normed tokens, MONAI block outputs)``."""
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 32, 2)).astype(np.float32)
  with torch.no_grad():
    logits = channels_last(monai_unetr(channels_first(x)))
    tokens, hidden_states = monai_unetr.vit(channels_first(x))
  return x, logits, tokens.numpy(), [h.numpy() for h in hidden_states]


def test_unetr_3d_matches_monai(monai_unetr, unetr_case):
  variables, fields, skipped = import_unetr(state(monai_unetr, "model."), num_heads=4)
  assert fields == dict(
    SMALL,
    out_channels=3,
    img_size=(32, 32, 32),
    conv_block=True,
    res_block=True,
    qkv_bias=False,
  )
  assert skipped == sorted(
    f"model.vit.blocks.{i}.norm_cross_attn.{leaf}" for i in range(12) for leaf in ("bias", "weight")
  )
  x, logits, tokens, hidden_states = unetr_case
  apply = jax.jit(lambda v, x: UNETR(**fields).apply(v, x, mutable=["intermediates"]))
  ours, sown = apply(variables, x)
  assert_close(ours, logits)
  vit = sown["intermediates"]["vit"]
  for i in (3, 6, 9):
    assert_close(vit[f"encoder_layer_{i}_out"][0], hidden_states[i])
  assert_close(vit["encoder_norm_out"][0], tokens)


def test_unetr_2d_non_square_matches_monai():
  """spatial_dims=2 on a 32 x 48 grid, with MONAI's other switches: qkv biases, basic (not
  residual) blocks and plain transposed convs in the projection up-sampling."""
  torch_model = perturbed(
    MonaiUNETR(
      in_channels=1,
      out_channels=2,
      img_size=(32, 48),
      spatial_dims=2,
      qkv_bias=True,
      res_block=False,
      conv_block=False,
      **SMALL,
    ),
    seed=1,
  )
  weights = state(torch_model)
  with pytest.raises(ValueError, match="not a 2-D cube.*pass img_size"):
    import_unetr(weights, num_heads=4)
  variables, fields, _ = import_unetr(weights, num_heads=4, img_size=(32, 48))
  assert (fields["qkv_bias"], fields["res_block"], fields["conv_block"]) == (True, False, False)
  x = np.random.default_rng(1).normal(size=(2, 32, 48, 1)).astype(np.float32)
  with torch.no_grad():
    reference = channels_last(torch_model(channels_first(x)))
  assert_close(jax.jit(UNETR(**fields).apply)(variables, x), reference)


def test_full_size_parameter_count_is_monai_used_parameters():
  """in 1, out 14, 96^3, defaults: MONAI's count less the unused ``norm_cross_attn`` LayerNorms
  (the torch model is built on the meta device: no memory)."""
  with torch.device("meta"):
    torch_model = MonaiUNETR(in_channels=1, out_channels=14, img_size=96)
  named = dict(torch_model.named_parameters())
  unused = sum(p.numel() for name, p in named.items() if "norm_cross_attn" in name)
  assert unused == 12 * 2 * 768
  model = UNETR(out_channels=14, img_size=96)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 96, 96, 96, 1)))
  )
  ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.meta.unbox(abstract["params"])))
  monai_total = sum(p.numel() for p in named.values())
  assert ours == monai_total - unused == 92_784_046


def test_unetr_size_errors_say_the_shape_multiple_and_fix():
  model = UNETR(out_channels=2, img_size=32, **SMALL)
  with pytest.raises(ValueError, match=r"\(1, 32, 40, 32, 2\).*multiple of 16.*sliding-window"):
    model.init(jax.random.key(0), np.zeros((1, 32, 40, 32, 2), np.float32))
  with pytest.raises(ValueError, match=r"\(48, 48, 48\).*img_size=\(32, 32, 32\)"):
    model.init(jax.random.key(0), np.zeros((1, 48, 48, 48, 2), np.float32))


def test_unetr_import_skips_stale_cross_attention_and_refuses_bad_keys(monai_unetr):
  good = state(monai_unetr)
  stale = dict(good, **{"vit.blocks.0.cross_attn.to_q.weight": np.zeros((48, 48), np.float32)})
  _, _, skipped = import_unetr(stale, num_heads=4)
  assert "vit.blocks.0.cross_attn.to_q.weight" in skipped and len(skipped) == 25
  wrong = dict(good, **{"decoder4.conv_block.conv1.conv.weight": np.zeros((32, 63, 3, 3, 3))})
  with pytest.raises(ValueError, match=r"decoder4\.conv_block\.conv1\.conv\.weight: \(32, 63"):
    import_unetr(wrong, num_heads=4)
  unknown = dict(good, **{"encoder1.layer.norm1.weight": np.ones(8, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys \['encoder1\.layer\.norm1\.weight'\]"):
    import_unetr(unknown, num_heads=4)
  missing = {k: v for k, v in good.items() if k != "vit.blocks.7.attn.out_proj.bias"}
  with pytest.raises(ValueError, match=r"missing keys \['vit\.blocks\.7\.attn\.out_proj\.bias'\]"):
    import_unetr(missing, num_heads=4)
  with pytest.raises(ValueError, match="num_heads=5"):
    import_unetr(good, num_heads=5)


def test_unetr_cli_round_trip(tmp_path, capsys, monai_unetr, unetr_case):
  path = tmp_path / "unetr.pt"
  torch.save({"state_dict": {f"module.{k}": v for k, v in monai_unetr.state_dict().items()}}, path)
  out = tmp_path / "out"
  assert run(["unetr", str(path), f"--out={out}", "--unetr_num_heads=4"]) == 0
  assert "skipped 24 MONAI weights that UNETR never uses" in capsys.readouterr().out
  source = json.loads((out / "source.json").read_text())
  assert len(source["skipped_keys"]) == 24
  x, logits, _, _ = unetr_case
  ours = jax.jit(UNETR(**source["model_fields"]).apply)(load_variables(str(out)), x)
  assert_close(ours, logits)
