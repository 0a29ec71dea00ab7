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
