"""AMAE as trainer tasks: the smoke pretraining run and its report (the seed's Figure 2), fine-tuning
that starts from its encoder (adaptive UNETR and plain UNETR), sliding windows that pass each
volume's contrasts, and the errors for bad contrasts, subjects and checkpoints."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from shipped_configs import shipped_config, smoke_training_run

from mammojax import tasks
from mammojax.evaluate import evaluate_checkpoint
from mammojax.models.amae.transfer import select_contrasts, unetr_vit_params
from mammojax.runs.segmenter import Segmenter
from mammojax.tasks.amae import SelectSlots
from mammojax.tasks.segmentation import apply_model, volume_logits
from mammojax.train.build import build
from mammojax.train.init_state import load_pretrained


@pytest.fixture(scope="module")
def amae_run(tmp_path_factory):
  return smoke_training_run("amae", tmp_path_factory)


def _fine_tune_config(variant: str, amae_run) -> ml_collections.ConfigDict:
  _, workdir, _, tmp_path = amae_run
  config = shipped_config("amae_unetr", f"{variant},smoke")
  config.data.synthetic.root = str(tmp_path / "data")
  config.model.pretrained = workdir
  return config


def test_pretraining_learns_and_reports_figure_2(amae_run):
  config, workdir, summary, tmp_path = amae_run
  assert summary["stopped"] == "steps"
  out = str(tmp_path / "eval")
  result = evaluate_checkpoint(config, workdir, "best", "test", out)
  metrics = result["report"]["metrics"]
  # 8 test subjects, 8 patches per 32^3 crop at patch 16, 6 masked in each acquired contrast.
  assert metrics["num_examples"] == 8 and metrics["masked_patches"] % 6 == 0
  assert metrics["masked_patches"] >= 8 * 2 * 6  # ADC and TRACE are always acquired
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  figures = result["report"]["figures"]
  assert len(figures) == config.eval.report_figures
  assert all(os.path.getsize(path) > 1000 for path in figures)


@pytest.mark.parametrize("network", ["adaptive", "unetr"])
def test_fine_tuning_starts_from_the_pretrained_encoder(amae_run, network):
  _, workdir, _, _ = amae_run
  config = _fine_tune_config(network, amae_run)
  state = build(tasks.build_task(config), config).state
  pretrained = load_pretrained(workdir)["params"]["encoder"]
  source = tuple(json.load(open(os.path.join(workdir, "config.json")))["data"]["contrasts"])
  contrasts = tuple(config.data.contrasts)
  if network == "adaptive":
    expected = select_contrasts(pretrained, source, contrasts)
    got = state.params["encoder"]
  else:
    expected = unetr_vit_params(
      pretrained,
      source,
      contrasts,
      update="scale",
      position_embedding="sincos_hwd",
      grid=tuple(int(s) // 16 for s in config.data.crop_size),
    )
    got = state.params["vit"]
  assert jax.tree.structure(jax.tree.map(np.asarray, dict(got))) == jax.tree.structure(
    jax.tree.map(np.asarray, dict(expected))
  )
  for ours, theirs in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-7)


def test_a_pretrained_encoder_of_another_width_is_refused(amae_run):
  config = _fine_tune_config("adaptive", amae_run)
  config.model.encoder.hidden_dim = 48
  with pytest.raises(ValueError, match=r"hidden_dim=24 \(config.json model.encoder.hidden_dim\)"):
    build(tasks.build_task(config), config)


def test_adaptive_sliding_windows_pass_each_volumes_contrasts(amae_run):
  config = _fine_tune_config("adaptive,scratch", amae_run)
  config.model.pretrained = ""
  task = tasks.build_task(config)
  rng = np.random.default_rng(0)
  crop = jnp.asarray(rng.normal(size=(2, *task.crop, 3)).astype(np.float32))
  present = jnp.asarray([[1, 1, 0], [1, 1, 1]])
  variables = nn.unbox(task.init_variables(jax.random.key(0), {"volume": crop}))
  direct = apply_model(task.model, variables, crop, present)
  windows = volume_logits(
    task.model, variables, crop, task.crop, overlap=0.5, blend="gaussian", sw_batch_size=1,
    present=present,
  )  # fmt: skip
  np.testing.assert_allclose(windows, direct, atol=1e-4)
  # The segment command's engine hands each subject's given contrasts to the network.
  segmenter = Segmenter(
    model=task.model,
    variables=variables,
    roi=task.crop,
    contrasts=task.contrasts,
    required=(0, 1),
    record_size=None,
    class_names=("background", "infarct"),
    source="test",
  )
  single = segmenter.logits(
    np.asarray(crop[0]), np.asarray(present[0]), overlap=0.5, blend="gaussian", sw_batch_size=1
  )
  np.testing.assert_allclose(single, direct[0], atol=1e-4)
  with pytest.raises(ValueError, match="contrast presence"):
    volume_logits(task.model, variables, crop, task.crop, overlap=0.5, blend="gaussian",
                  sw_batch_size=1)  # fmt: skip


def test_bad_contrasts_and_subjects_name_the_field_or_subject(amae_run, tmp_path):
  config, _, _, run_tmp = amae_run
  bad = config.copy_and_resolve_references()
  bad.data.contrasts = ("ADC", "DWI")
  with pytest.raises(ValueError, match=r"data.contrasts=\['ADC', 'DWI'\]: \['DWI'\]"):
    tasks.build_task(bad).dataset("train")
  select = SelectSlots((0, 1, 2), ("TRACE", "ADC", "T2"), required=("TRACE", "ADC"))
  element = {
    "volume": np.zeros((4, 4, 4, 3), np.float32),
    "contrast_present": np.asarray([0, 0, 0]),
    "subject_hash": "abc123",
  }
  with pytest.raises(ValueError, match="subject abc123 has none of the contrasts"):
    select.map(element)
  element["contrast_present"] = np.asarray([0, 0, 1])
  with pytest.raises(
    ValueError, match=r"abc123 lacks the required contrast\(s\) \['TRACE', 'ADC'\]"
  ):
    select.map(element)
  element["contrast_present"] = np.asarray([1, 1, 0])
  assert select.map(element)["contrast_present"].tolist() == [1, 1, 0]
  ratio = config.copy_and_resolve_references()
  ratio.model.mask_ratio = 1.0
  with pytest.raises(ValueError, match="model.mask_ratio=1.0"):
    tasks.build_task(ratio)
  unlinked = shipped_config("amae_unetr", "adaptive,smoke")
  with pytest.raises(ValueError, match="model.pretrained is empty"):
    tasks.build_task(unlinked)
  crop = config.copy_and_resolve_references()
  crop.data.crop_size = (32, 32, 40)
  with pytest.raises(ValueError, match="data.crop_size sides"):
    tasks.build_task(crop)


def test_withheld_contrast_is_zeros_and_absent():
  select = SelectSlots((2, 0, 1), ("T2", "ADC", "TRACE"), required=("ADC",), dropped=("T2",))
  volume = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3) + 1
  out = select.map({"volume": volume, "contrast_present": np.asarray([1, 1, 1])})
  assert out["contrast_present"].tolist() == [0, 1, 1]
  np.testing.assert_array_equal(out["volume"][..., 0], 0)
  np.testing.assert_array_equal(out["volume"][..., 1:], volume[..., [0, 1]])


def test_tables_command_trains_evaluates_and_compares(amae_run, tmp_path, monkeypatch):
  from mammojax import amae_tables

  _, pretrained, _, _ = amae_run
  monkeypatch.setenv("MAMMOJAX_DATA", str(tmp_path / "data"))
  workdir = tmp_path / "tables"
  shutil.copytree(pretrained, workdir / "amae")  # a finished pretraining is reused
  models = ["UNETR", "AMAE pretrain + UNETR"]
  result = amae_tables.run(
    [f"--workdir={workdir}", "--size=smoke", f"--models={','.join(models)}", "--bootstrap=50"]
  )
  assert json.loads((workdir / "tables.json").read_text()) == json.loads(json.dumps(result))
  assert "## Table 3" in (workdir / "tables.md").read_text()
  for setting in ("all", "without_T2"):
    rows = result["mean_dice"][setting]
    assert list(rows) == models
    for row in rows.values():
      assert row["n"] + row["n_skipped"] == 8 and row["low"] <= row["mean"] <= row["high"]
    (pair,) = result["wilcoxon"][setting]
    assert (pair["a"], pair["b"]) == ("AMAE pretrain + UNETR", "UNETR")
    assert pair["n_pairs"] + pair["n_dropped_nan"] == 8
  for name in ("unetr", "amae_pretrain_unetr"):
    assert (workdir / name / "eval_test_without_T2" / "subjects.csv").exists()
  assert sorted(os.listdir(workdir / "amae")) == sorted(os.listdir(pretrained))
