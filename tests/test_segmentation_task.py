"""3-D segmentation task: UNETR and UNet smoke runs on the synthetic volumes, whole-volume
sliding-window prediction, the evaluate report, and the configuration errors."""

import csv
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from shipped_configs import shipped_config, smoke_config, smoke_training_run

from mammojax import compare, tasks
from mammojax.evaluate import evaluate_checkpoint


@pytest.fixture(scope="module")
def unetr_run(unetr_smoke_run):
  return unetr_smoke_run


@pytest.fixture(scope="module")
def test_report(unetr_run):
  """``(evaluate's result, its folder)`` on the test split."""
  config, workdir, _, tmp_path = unetr_run
  out = str(tmp_path / "eval_test")
  return evaluate_checkpoint(config, workdir, "best", "test", out, None), out


def test_unetr_smoke_trains_and_evaluate_reports_every_subject(unetr_run, test_report):
  config, workdir, summary, _ = unetr_run
  assert summary["step"] == config.train.steps
  metrics = json.load(open(os.path.join(workdir, "summary.json")))
  assert any("dice_mean" in key for key in json.dumps(metrics).split('"'))
  result, out = test_report
  report = json.load(open(os.path.join(out, "report.json")))
  assert report == json.loads(json.dumps(result["report"]))
  with open(os.path.join(out, "subjects.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == config.data.synthetic.num_test  # one foreground class, every subject
  infarct = report["per_class"]["infarct"]
  skipped = sum(1 for r in rows if r["dice"] == "nan")
  assert infarct["dice"]["n_skipped"] == skipped
  assert infarct["dice"]["n"] + skipped == len(rows)
  assert report["metrics"]["dice_infarct_skipped"] == skipped
  figures = report["figures"]
  assert len(figures) == config.eval.report_figures and all(os.path.exists(p) for p in figures)


def test_compare_pairs_subjects_of_two_reports(test_report, tmp_path):
  _, out = test_report
  other = str(tmp_path / "other")
  shutil.copytree(out, other)
  with open(os.path.join(out, "subjects.csv")) as f:
    rows = list(csv.DictReader(f))
  shifted = [dict(r, dice=str(float(r["dice"]) - 0.05 * (i + 1))) for i, r in enumerate(rows)]
  with open(os.path.join(other, "subjects.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(shifted)
  result = compare.run([f"--a={out}", f"--b={other}", f"--out={tmp_path / 'c.json'}"])
  infarct = result["classes"]["infarct"]
  a = np.array([float(r["dice"]) for r in rows])
  b = np.array([float(r["dice"]) for r in shifted])
  keep = ~np.isnan(a)
  expected = scipy.stats.wilcoxon(a[keep], b[keep], alternative="two-sided")
  assert infarct["p_value"] == pytest.approx(expected.pvalue)
  assert infarct["n_pairs"] == keep.sum() and infarct["n_dropped_nan"] == (~keep).sum()
  assert infarct["mean_difference"] == pytest.approx(np.mean(a[keep] - b[keep]))
  report = json.load(open(os.path.join(other, "report.json")))
  report["truth_digest"] = "0" * 64
  json.dump(report, open(os.path.join(other, "report.json"), "w"))
  with pytest.raises(ValueError, match="not evaluated on the same subjects"):
    compare.run([f"--a={out}", f"--b={other}"])


def test_sliding_windows_of_one_crop_equal_the_model(unetr_run):
  config = unetr_run[0]
  task = tasks.build_task(config)
  rng = np.random.default_rng(0)
  crop = rng.normal(size=(1, *config.data.crop_size, len(config.data.contrasts)))
  crop = jnp.asarray(crop.astype(np.float32))
  variables = task.init_variables(jax.random.key(1), {"volume": crop})
  direct = task.model.apply(variables, crop)
  np.testing.assert_allclose(task.logits(variables, crop), direct, atol=1e-5)


def test_loss_ignores_subjects_without_a_mask(unetr_run):
  config = unetr_run[0]
  task = tasks.build_task(config)
  rng = np.random.default_rng(2)
  shape = (2, *config.data.crop_size)
  volume = jnp.asarray(rng.normal(size=(*shape, 3)).astype(np.float32))
  labels = (rng.random(shape) < 0.1).astype(np.int32)
  labels[1] = 0  # the second subject's truth differs: its loss term would change the mean
  labels = jnp.asarray(labels)
  variables = task.init_variables(jax.random.key(3), {"volume": volume})
  params, state = variables["params"], {}

  def loss(batch):
    return task.loss(params, state, batch, jax.random.key(0), False)[0]

  both = {"volume": volume, "label": labels, "_valid": jnp.ones(2), "has_mask": jnp.array([1, 0])}
  first = {k: v[:1] for k, v in both.items()}
  np.testing.assert_allclose(loss(both), loss(first), rtol=1e-6)
  second_only = dict(both, has_mask=jnp.array([0, 1]))
  assert abs(float(loss(second_only)) - float(loss(first))) > 1e-2


def test_unet3d_smoke_trains(tmp_path_factory):
  config, _, summary, _ = smoke_training_run("unet3d", tmp_path_factory)
  assert summary["step"] == config.train.steps


def test_configuration_errors_name_the_field_and_the_fix(tmp_path):
  config = smoke_config("unetr", tmp_path)
  config.data.crop_size = (16, 20, 16)
  with pytest.raises(ValueError, match=r"multiple of 16.*crop_size='\(16, 32, 16\)'"):
    tasks.build_task(config)
  config = smoke_config("unetr", tmp_path)
  config.data.contrasts = ("TRACE", "ADC", "DWI2")
  with pytest.raises(ValueError, match=r"\['DWI2'\].*they hold \['ADC', 'TRACE'"):
    tasks.build_task(config).dataset("train")
  config = smoke_config("unetr", tmp_path)
  config.data.required_contrasts = ("TRACE", "ADC", "T2")
  task = tasks.build_task(config)
  examples = task.dataset("train")
  lacking = [i for i in range(len(examples)) if not _has_t2(task, examples, i)]
  assert lacking, "the synthetic set misses T2 in some subjects (missing_probability 0.3)"
  with pytest.raises(ValueError, match=r"lacks the required contrast\(s\) \['T2'\]"):
    examples[lacking[0]]
  config = shipped_config("unetr")
  config.loss.kind = "focal"
  with pytest.raises(ValueError, match="loss.kind='focal'"):
    tasks.build_task(config)


def _has_t2(task, examples, index: int) -> bool:
  try:
    examples[index]
  except ValueError:
    return False
  return True
