"""The train-step and pipeline benchmarks run end to end and print the shared JSON shape."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE_KEYS = {"name", "impl", "median_ms", "min_ms", "max_ms"}


def _run(argv, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "MAMMOJAX_DATA": str(tmp_path / "data")}
  result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  body = json.loads(result.stdout)  # Nothing but the JSON object on stdout.
  assert {"benchmark", "machine", "results", "ratios"} <= set(body)
  assert body["machine"]["jax_backend"] == "cpu"
  for row in body["results"]:
    assert CASE_KEYS <= set(row), row
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
  return body


def test_train_step_benchmark_reports_compile_time_flops_and_memory(tmp_path):
  # The tiny test task keeps the compile short; the driver registers it as config.task='tiny'.
  body = _run(
    [
      sys.executable,
      os.path.join("tests", "run_tiny_task.py"),
      "benchmarks.train_step",
      f"--config={os.path.join('tests', 'tiny_task_config.py')}",
      "--steps",
      "2",
      "--warmup=1",
      "--config.optim.learning_rate=0.001",
    ],
    tmp_path,
  )
  assert body["benchmark"] == "train_step"
  assert body["overrides"] == {"optim.learning_rate": 0.001}
  [row] = body["results"]
  assert row["name"] == "tiny" and row["impl"] == "jax" and row["repeats"] == 2
  assert row["compile_s"] > 0 and row["flops"] > 0
  assert row["temp_size_in_bytes"] >= 0 and row["argument_size_in_bytes"] > 0
  assert row["batch_size"] == 8 and row["mesh"]["data"] == 8  # conftest's 8 CPU devices
  assert abs(row["examples_per_s"] - 8e3 / row["median_ms"]) < 1e-6 * row["examples_per_s"]


def test_pipeline_benchmark_reports_batches_per_second(tmp_path):
  body = _run(
    [
      sys.executable,
      os.path.join("benchmarks", "pipeline.py"),
      "--config=configs/imgfeatalign.py:smoke",
      "--workers=0",
      "--batches=2",
      "--repeats=2",
      "--warmup=0",
      "--augment",
    ],
    tmp_path,
  )
  assert body["benchmark"] == "pipeline"
  assert [r["name"] for r in body["results"]] == ["workers=0", "workers=0+augment"]
  for row in body["results"]:
    assert row["impl"] == "grain" and row["batch_size"] == 8
    assert abs(row["batches_per_s"] - 2e3 / row["median_ms"]) < 1e-6 * row["batches_per_s"]


def test_icon_digits_benchmark_compares_jax_and_torch(tmp_path):
  body = _run(
    [
      sys.executable,
      "-m",
      "benchmarks.icon_digits",
      "--batch=4",
      "--size=8",
      "--num_steps=3",
      "--repeats=2",
      "--warmup=1",
      "--torch_threads=1",
    ],
    tmp_path,
  )
  assert body["benchmark"] == "icon_digits" and body["num_steps"] == 3
  cases = {(r["name"], r["impl"]) for r in body["results"]}
  assert cases == {(n, i) for n in ("train_step", "forward") for i in ("jax", "torch")}
  assert set(body["ratios"]) == {"train_step", "forward"}
  for row in body["results"]:
    assert abs(row["steps_per_sec"] - 1e3 / row["median_ms"]) < 1e-6 * row["steps_per_sec"]


def test_warp_benchmark_compares_gather_map_coordinates_and_torch(tmp_path):
  body = _run([sys.executable, "-m", "benchmarks.warp", "--small", "--repeats=2"], tmp_path)
  assert body["benchmark"] == "warp"
  impls = {r["impl"] for r in body["results"]}
  assert {"jax-gather", "jax-map_coordinates", "torch"} <= impls, impls
  for row in body["results"]:
    assert row["effective_gb_s"] > 0 and row["bytes"] > 0, row


def test_temporal_benchmark_compares_extraction_and_temporal_steps(tmp_path):
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
    pytest.skip("torch and torchvision are not installed (pip install mammojax[torch])")
  body = _run(
    [
      sys.executable,
      "-m",
      "benchmarks.temporal",
      "--small",
      "--repeats=2",
      "--torch_threads=1",
    ],
    tmp_path,
  )
  assert body["benchmark"] == "temporal" and body["small"]
  names = [
    "extract/resnet18/64",
    "extract/vit_small/32",
    *(f"temporal_step/{kind}" for kind in ("dnn", "gru", "transformer")),
  ]
  assert {(r["name"], r["impl"]) for r in body["results"]} == {
    (n, i) for n in names for i in ("jax", "torch")
  }
  assert set(body["ratios"]) == set(names)
  for row in body["results"]:
    if row["impl"] == "jax":
      assert row["compile_s"] > 0, row
    if row["name"].startswith("extract/"):
      assert row["max_abs_diff"] <= 1e-3 < row["max_abs_feature"], row
      assert abs(row["images_per_s"] - 4e3 / row["median_ms"]) < 1e-6 * row["images_per_s"]
    else:
      assert row["batch"] == 8 and row["length"] == 3 and row["feature_dim"] == 512, row


def test_interpret_benchmark_compares_attributions_with_captum(tmp_path):
  for package in ("torch", "torchvision", "captum"):
    if importlib.util.find_spec(package) is None:
      pytest.skip(f"{package} is not installed (pip install mammojax[torch] captum)")
  body = _run(
    [
      sys.executable,
      "-m",
      "benchmarks.interpret",
      "--small",
      "--repeats=1",
      "--torch_threads=1",
    ],
    tmp_path,
  )
  assert body["benchmark"] == "interpret" and body["small"]
  names = [
    "gradcam/layer4",
    "guided_backprop",
    "guided_gradcam/layer4",
    "integrated_gradients/4",
    "gradient_shap/4",
  ]
  assert {(r["name"], r["impl"]) for r in body["results"]} == {
    (n, i) for n in names for i in ("jax", "torch")
  }
  assert set(body["ratios"]) == set(names) == set(body["goal"]["met"])
  for row in body["results"]:
    assert row["batch"] == 2 and row["image_size"] == 64, row
    if row["impl"] == "jax":
      assert row["first_call_s"] > row["compile_s"] > 0, row
    shape = [2, 64, 64] if row["name"].startswith("gradcam/") else [2, 64, 64, 3]
    assert row["map_shape"] == shape, row
    if row["name"].startswith("gradient_shap/"):
      assert row["max_abs_map"] > 0 and row["n_samples"] == 4, row
    else:
      assert row["max_abs_diff"] <= 1e-2 * max(abs(row["map_min"]), abs(row["map_max"])), row
      assert row["map_min"] < 0 < row["map_max"], row


def test_segmentation3d_benchmark_compares_unetr_with_monai(tmp_path, monkeypatch):
  for package in ("torch", "monai"):
    if importlib.util.find_spec(package) is None:
      pytest.skip(f"{package} is not installed (pip install mammojax[torch])")
  # XLA:CPU compiles each fused kernel of UNETR's train step on its own: cheaper code generation
  # about halves its compile time (this checks the code path, not speed).
  flags = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
  monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  out = tmp_path / "segmentation3d.json"
  body = _run(
    [
      sys.executable,
      "-m",
      "benchmarks.segmentation3d",
      "--small",
      "--repeats=1",
      "--torch_threads=1",
      f"--out={out}",
    ],
    tmp_path,
  )
  assert body["benchmark"] == "segmentation3d" and body["small"] and body["compiled_only"] == []
  assert json.loads(out.read_text())["results"] == body["results"]
  names = ["train_step/small", "sliding_window/small"]
  assert {(r["name"], r["impl"]) for r in body["results"]} == {
    (n, i) for n in names for i in ("jax", "torch")
  }
  assert set(body["ratios"]) == set(names) == set(body["goal"]["met"])
  for row in body["results"]:
    assert row["size"] == "small" and row["hidden_size"] == 24 and row["repeats"] == 1, row
    assert row["rss_peak_increase_bytes"] is None or row["rss_peak_increase_bytes"] >= 0, row
    if row["impl"] == "torch":
      continue
    assert row["compile_s"] > 0 and row["xla_peak_bytes"] > row["xla_temp_size_bytes"] >= 0, row
    if row["name"].startswith("train_step/"):
      assert row["batch"] == 1 and row["crop"] == 16, row
      assert row["loss_relative_diff"] <= 1e-3 and row["grad_norm_relative_diff"] <= 1e-3, row
    else:
      assert row["output_shape"] == [1, 24, 24, 24, 2] and row["roi"] == 16, row
      assert row["output_relative_diff"] <= 1e-3 < row["max_abs_output"], row


def test_amae_benchmark_compares_pretraining_and_adaptive_unetr_with_torch(tmp_path, monkeypatch):
  for package in ("torch", "monai"):
    if importlib.util.find_spec(package) is None:
      pytest.skip(f"{package} is not installed (pip install mammojax[torch])")
  # Cheaper XLA:CPU code generation, as in the segmentation3d test (the code path, not speed).
  flags = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
  monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  out = tmp_path / "amae.json"
  body = _run(
    [
      sys.executable,
      "-m",
      "benchmarks.amae",
      "--small",
      "--repeats=1",
      "--threads=1",
      f"--out={out}",
    ],
    tmp_path,
  )
  assert body["benchmark"] == "amae" and body["small"] and body["compiled_only"] == []
  assert body["threads"] == {"torch": 1, "xla_cpus": 1}
  assert json.loads(out.read_text())["results"] == body["results"]
  names = ["pretrain_step/small/k3", "adaptive_unetr_step/small/k3"]
  assert {(r["name"], r["impl"]) for r in body["results"]} == {
    (n, i) for n in names for i in ("jax", "torch")
  }
  assert set(body["ratios"]) == set(names) == set(body["goal"]["met"])
  for row in body["results"]:
    assert row["size"] == "small" and row["hidden_dim"] == 24 and row["repeats"] == 1, row
    assert row["params_jax"] == row["params_torch"] > 0 and row["slots"] == 3, row
    assert row["batch"] == 1 and row["crop"] == 32 and row["patches"] == 8, row
    assert row["loss"] > 0 and row["grad_norm"] > 0, row
    seconds = row["median_ms"] / 1e3
    assert (
      abs(row["encoder_tokens_per_s"] * seconds - row["encoder_tokens"])
      < 1e-6 * row["encoder_tokens"]
    )
    if row["name"].startswith("pretrain_step/"):
      assert row["visible"] == 2 and row["encoder_tokens"] == 6, row
      assert row["decoder_tokens"] == 24 and row["decoder_tokens_per_s"] > 0, row
    else:
      assert row["encoder_tokens"] == 24 and "decoder_tokens" not in row, row
    if row["impl"] == "jax":
      assert row["compile_s"] > 0 and row["xla_peak_bytes"] > row["xla_temp_size_bytes"] >= 0, row
