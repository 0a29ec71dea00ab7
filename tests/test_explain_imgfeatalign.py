"""python -m mammojax.explain on an ImgFeatAlign run whose encoder is frozen: pixel maps of the
current and the prior image (not zero, though the model stops the gradient at the encoder), the
year's risk split over the current / prior / alignment features (complete within its delta),
lesion scores of both images, and the errors it names; the pair adapter is the model (with the
run's alignment, and without one, where its GradCAM per encoder call and its gradients are
checked at less compile time)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shipped_configs import smoke_config

from mammojax import explain, interpret, tasks
from mammojax.interpret import explainer, risk
from mammojax.interpret.methods import MethodSettings
from mammojax.models.imgfeatalign import AttentionRiskFusion, fusion_fields
from mammojax.runs.config_files import load_run_config
from mammojax.train import trainer
from mammojax.train.init_state import load_pretrained


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
  """``configs/imgfeatalign.py:smoke`` with the encoder frozen (``finetune_all=False``, as
  ``:paper``), one step on one device."""
  tmp_path = tmp_path_factory.mktemp("imgfeatalign_explain")
  config = smoke_config("imgfeatalign", tmp_path)
  config.model.finetune_all = False
  config.mesh.shape = (1, 1, 1)
  config.train.steps = config.eval.every_steps = config.checkpoint.every_steps = 1
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir, tasks.build_task(config), show_progress=False)
  return workdir


@pytest.fixture(scope="module")
def explained(frozen_run, tmp_path_factory):
  """The command's summary and output directory on the first two test examples (the second
  has a lesion and a prior)."""
  out = tmp_path_factory.mktemp("explained")
  summary = explain.run(
    [
      f"--workdir={frozen_run}",
      "--split=test",
      "--num_examples=2",
      "--methods=gradcam,integrated_gradients",
      "--n_steps=4",
      f"--out={out}",
      "--noprogress",
    ]
  )
  return summary, out


def test_command_writes_both_images_maps_split_and_scores(explained):
  summary, out = explained
  with open(out / "attributions.json") as f:
    assert json.load(f) == summary
  assert summary["model"]["images"] == ["prior", "current"] and summary["model"]["years"] == 5
  # 32-pixel smoke images: layer4 is 1x1, so GradCAM takes layer3 of each encoder call.
  assert summary["settings"]["layer"] == "layer3" and summary["guided_rectified"]
  assert [row["name"] for row in summary["examples"]] == ["test_0000", "test_0001"]
  for row in summary["examples"]:
    assert row["target"] == 4  # the last year by default
    cam = np.load(out / row["name"] / "gradcam.npy")
    pixels = np.load(out / row["name"] / "integrated_gradients.npy")
    assert cam.shape == (2, 32, 32) and pixels.shape == (2, 32, 32, 1)
    assert os.path.getsize(out / row["name"] / "pair.png") > 0
    # Frozen encoder: the maps of both images are not zero.
    for image in (0, 1):
      assert np.abs(pixels[image]).sum() > 0 and np.abs(cam[image]).sum() > 0
    split = row["risk_split"]
    assert split["aligned_prior"] == pytest.approx(split["prior"] + split["alignment"])
    assert split["n_steps"] == risk.SPLIT_MIN_STEPS
  # test_0001 has a lesion (boxes in both images); test_0000 none: one scorable example.
  scores = summary["scores"]
  methods = ("gradcam", "integrated_gradients", "region")
  assert set(scores) == {f"{image}/{m}" for image in ("prior", "current") for m in methods}
  for image in ("prior", "current"):
    area = scores[f"{image}/region"]["area_fraction"]
    assert area["count"] == 1 and area["unscorable"] == 1 and 0 < area["mean"] < 0.5
    fraction = scores[f"{image}/integrated_gradients"]["positive_fraction_inside"]
    assert fraction["count"] == 1 and 0.0 <= fraction["mean"] <= 1.0


def test_the_split_is_complete_and_its_aligned_prior_share_exact(frozen_run, explained):
  summary, _ = explained
  task = tasks.build_task(load_run_config(frozen_run))
  model, variables = risk.hashable_model(task.model), load_pretrained(frozen_run)
  example = task.explain_dataset("test")[1]
  current, prior = (jnp.asarray(example[k])[None] for k in ("current_image", "previous_image"))
  gap = jnp.asarray([example["time_gap"]], jnp.float32)
  outputs = risk.model_outputs(model, variables, current, prior, gap)
  logit = float(outputs["risk_prediction"]["pred_fused"][0, 4])
  # The pair adapter, its flow held at the example's, computes the model's logits.
  adapter = risk.pair_adapter(model, variables, gap[0], outputs["deformation_field"][0])
  pair = jnp.concatenate([prior, current], axis=-1)
  np.testing.assert_allclose(
    adapter.forward(pair), outputs["risk_prediction"]["pred_fused"], atol=1e-6
  )
  with pytest.raises(ValueError, match="aligns the prior: give the example's flow"):
    risk.pair_adapter(model, variables, gap[0])

  # The logit is the model's, the baseline the fusion's on zero features, and the shares add up
  # to their difference within the reported delta, which is small.
  row = summary["examples"][1]["risk_split"]
  fusion = AttentionRiskFusion(**fusion_fields(model))
  params = {"params": variables["params"]["risk_model"]}
  zeros = jnp.zeros_like(outputs["current_feature"])
  base = fusion.apply(params, zeros, zeros, zeros, zeros, gap, deterministic=True)["pred_fused"]
  change = logit - float(base[0, 4])
  assert row["logit"] == pytest.approx(logit, abs=1e-5)
  assert row["baseline_logit"] == pytest.approx(float(base[0, 4]), abs=1e-5)
  total = row["current"] + row["prior"] + row["alignment"]
  assert total - change == pytest.approx(row["delta"], abs=1e-5)
  assert abs(row["delta"]) < 0.1 * abs(change) + 1e-3

  # prior + alignment is the aligned prior's share of the two-input split [C, A].
  def two_inputs(c, a):
    out = fusion.apply(params, c, a, a, jnp.abs(c - a), jnp.tile(gap, c.shape[0]), True)
    return out["pred_fused"][:, 4]

  (_, aligned_share), _ = jax.jit(
    lambda c, a: risk.integrated_gradients_over(two_inputs, (c, a), n_steps=risk.SPLIT_MIN_STEPS)
  )(outputs["current_feature"], outputs["aligned_prior_feature"])
  assert float(aligned_share.sum()) == pytest.approx(row["aligned_prior"], abs=1e-4)


def test_integrated_gradients_over_is_exact_on_a_polynomial():
  x, y = jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), jnp.asarray([[2.0], [-1.0]])

  def fn(a, b):  # [N, 2], [N, 1] -> [N]; degree 3, so 2 Gauss-Legendre points are exact
    return jnp.sum(a**2, axis=1) * b[:, 0] + 3.0 * a[:, 0]

  (ax, ay), delta = risk.integrated_gradients_over(fn, (x, y), n_steps=2)
  np.testing.assert_allclose(ax.sum(axis=1) + ay.sum(axis=1), fn(x, y), rtol=1e-6)
  np.testing.assert_allclose(delta, 0.0, atol=1e-5)
  # a^2 b is homogeneous of degree 3 and 1 of it in b: b's share is a third of it.
  np.testing.assert_allclose(ay[:, 0], jnp.sum(x**2, axis=1) * y[:, 0] / 3, rtol=1e-6)


@pytest.fixture(scope="module")
def unaligned(frozen_run):
  """The run's model (frozen encoder) with the identity alignment: no registration to compile."""
  task = tasks.build_task(load_run_config(frozen_run))
  return task.model.clone(align=False), load_pretrained(frozen_run)


def test_pair_adapter_is_the_model_and_reaches_the_pixels(unaligned):
  model, variables = unaligned
  rng = np.random.default_rng(0)
  prior, current = (jnp.asarray(rng.standard_normal((1, 32, 32, 1)), jnp.float32) for _ in "ab")
  gap = jnp.asarray([1.5])
  adapter = risk.pair_adapter(model, variables, gap[0])
  pair = jnp.concatenate([prior, current], axis=-1)

  def year_logit(c, p):
    return model.apply(variables, c, p, gap, train=False)["risk_prediction"]["pred_fused"][0, 2]

  logit, own = jax.jit(jax.value_and_grad(year_logit, argnums=(0, 1)))(current, prior)
  np.testing.assert_allclose(adapter.forward(pair)[0, 2], logit, atol=1e-5)
  # The model stops the gradient at its frozen encoder; the adapter's (guided) gradient is not 0.
  assert all(float(jnp.abs(g).max()) == 0.0 for g in own)
  guided = np.asarray(interpret.guided_backprop(adapter, pair, 2).attributions[0])
  assert all(np.abs(guided[..., i]).max() > 0 for i in (0, 1))

  # The prior's GradCAM (first) is Captum's LayerGradCam at its encoder call's layer; guided
  # GradCAM multiplies its guided gradient by that call's ReLU'd map. Both images' maps differ.
  methods = ["gradcam", "guided_gradcam"]
  maps = risk.pair_maps(adapter, pair, jnp.asarray([2]), methods, MethodSettings(layer="layer3"))
  cam = interpret.gradcam(adapter, pair, 2, "prior_encoder/layer3")[0]
  np.testing.assert_allclose(maps["gradcam"][0], cam, atol=1e-6)
  relu = np.asarray(interpret.gradcam(adapter, pair, 2, "prior_encoder/layer3", relu=True)[0])
  np.testing.assert_allclose(
    maps["guided_gradcam"][0], guided[..., :1] * relu[..., None], atol=1e-6
  )
  assert np.abs(maps["gradcam"][1]).max() > 0
  assert not np.allclose(maps["gradcam"][0], maps["gradcam"][1])


def test_target_year_out_of_range_sanity_check_and_layer_are_named(frozen_run, tmp_path):
  config = load_run_config(frozen_run)
  task = tasks.build_task(config)
  subject = explainer.subject_of_run(
    task.model, load_pretrained(frozen_run), task.explain_dataset("test"), "test", 1
  )
  with pytest.raises(ValueError, match=r"--target=5: this ImgFeatAlign run predicts .* 0\.\.4"):
    explainer.explain(subject, str(tmp_path), methods=["gradcam"], target=5, progress=False)
  with pytest.raises(ValueError, match="--sanity_check: .* not on ImgFeatAlign runs"):
    explainer.explain(subject, str(tmp_path), methods=["gradcam"], sanity_check=True)
  with pytest.raises(ValueError, match="--layer=layer9: ImgFeatAlign's GradCAM layers are"):
    explainer.explain(subject, str(tmp_path), methods=["gradcam"], layer="layer9")
