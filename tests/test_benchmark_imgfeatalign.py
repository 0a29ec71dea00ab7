"""benchmarks/imgfeatalign_step.py runs end to end (--small) and both sides compute one function."""

import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None
# Cheaper LLVM passes: the compile of the tiny model dominates this test; timings are not checked.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_small_run_reports_both_sides_and_forward_agreement():
  argv = [
    sys.executable,
    os.path.join("benchmarks", "imgfeatalign_step.py"),
    "--small",
    "--modes=frozen",
    "--repeats=1",
    "--warmup=0",
  ]
  if not HAS_TORCH:
    argv.append("--no_torch")
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip(),
  }
  result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  body = json.loads(result.stdout)  # nothing but the JSON object on stdout

  assert body["benchmark"] == "imgfeatalign_step"
  assert {
    "machine",
    "results",
    "ratios",
    "architecture",
    "optimizer",
    "torch",
    "forward_check",
    "forward_max_abs_diff",
  } <= set(body)
  impls = ["jax", "torch"] if HAS_TORCH else ["jax"]
  assert [(r["name"], r["impl"]) for r in body["results"]] == [
    ("step_64x64_b2_frozen", impl) for impl in impls
  ]
  for row in body["results"]:
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["repeats"] == 1
    assert row["batch_size"] == 2 and row["image_size"] == [64, 64] and row["mode"] == "frozen"
    assert abs(row["examples_per_s"] - 2e3 / row["median_ms"]) < 1e-6 * row["examples_per_s"]
  jax_row = body["results"][0]
  assert jax_row["compile_s"] > 0 and jax_row["flops"] > 0 and jax_row["gflops_per_s"] > 0
  assert jax_row["argument_size_in_bytes"] > 0

  if HAS_TORCH:
    assert body["torch"] == "timed" and body["machine"]["torch_threads"] == os.cpu_count()
    assert set(body["ratios"]) == {"step_64x64_b2_frozen"}
    check = body["forward_check"]["64x64"]
    assert check["max_abs_flow_pixels"] > 0.5  # a real flow, so the warp is exercised
    assert check["aligned_prior_feature_max_abs_diff"] < 1e-3
    assert body["forward_max_abs_diff"] == check["risk_logits_max_abs_diff"] < 1e-3
  else:
    assert body["torch"].startswith("skipped") and body["forward_check"] == {}
    assert body["ratios"] == {}
