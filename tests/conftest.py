"""Test setup: 8 fake CPU devices (set before jax starts), absl flags marked parsed."""

import os

# Must happen before jax is imported anywhere: sharding tests need several devices.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# Grain worker processes and orbax read absl flags; pytest never calls app.run.
flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def temporal_backbone_run(tmp_path_factory):
  """``(root, workdir)``: the smoke ResNet pretraining stage of ``configs/temporal.py`` (an
  ``image_classifier`` run), trained once per test process for every module that needs it."""
  from shipped_configs import temporal_smoke_config

  from mammojax.runs.stages import run_pretraining

  root = tmp_path_factory.mktemp("temporal")
  config = temporal_smoke_config("resnet,dnn", root)
  run_pretraining(config, str(root), show_progress=False)
  return root, config.model.backbone_checkpoint


@pytest.fixture(scope="session")
def unetr_smoke_run(tmp_path_factory):
  """``(config, workdir, summary, tmp_path)`` of ``configs/unetr.py:smoke``, trained once per test
  process (tests/shipped_configs.smoke_training_run)."""
  from shipped_configs import smoke_training_run

  return smoke_training_run("unetr", tmp_path_factory)
