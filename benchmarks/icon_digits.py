"""Train steps per second of the seed's eight-times-composed digits MLP, JAX against torch.

Both sides run the same computation: the two-hidden-layer MLP (width 50) applied nine times with
shared weights, each step registering the moving digit warped by the composition of all earlier
steps (ICON's ``TwoStepRegistration``: the composed transform is re-evaluated point by point
through every step's field, bilinear with border padding), then ``2 * SSD + 0.05 * diffusion``,
its gradient and one Adam update (``train_step``); ``forward`` times the registration alone (the
composed displacement on the grid, no gradient), as at inference. JAX runs
``mammojax.models.registration.icon`` with ``mammojax.losses.registration``; torch runs a plain
implementation with ``grid_sample``.

  python -m benchmarks.icon_digits                  # batch 128, 28x28
  python -m benchmarks.icon_digits --batch=8 --repeats=3

Prints one JSON object (``benchmarks/harness.py``); ``steps_per_sec`` per side and the ratio.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from benchmarks import harness
from mammojax.losses.registration import regularized_loss
from mammojax.losses.similarity import ssd_loss
from mammojax.models.registration.icon import digits_registration

LMBDA = 0.05


def jax_cases(
  moving: np.ndarray, fixed: np.ndarray, hidden: int, num_steps: int
) -> list[harness.Case]:
  size = moving.shape[1]
  net = digits_registration((size, size), hidden=hidden, num_steps=num_steps)
  moving, fixed = jnp.asarray(moving), jnp.asarray(fixed)
  params = nn.meta.unbox(net.init(jax.random.key(0), moving, fixed))["params"]
  # Small non-zero last layer so every step moves and the warps do real interpolation.
  params = jax.tree.map(lambda p: p + 1e-3 * jax.random.normal(jax.random.key(1), p.shape), params)
  tx = optax.adam(1e-3)

  def loss_fn(params, moving, fixed):
    displacement = net.apply({"params": params}, moving, fixed)
    return regularized_loss(
      moving, fixed, displacement, lmbda=LMBDA, similarity=ssd_loss, regularizer="diffusion"
    )["loss"]

  @jax.jit
  def train_step(params, opt_state, moving, fixed):
    loss, grads = jax.value_and_grad(loss_fn)(params, moving, fixed)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  compiled, compile_s = harness.compile_jax(train_step, params, opt_state, moving, fixed)
  state = {"params": params, "opt": opt_state}

  def run():
    state["params"], state["opt"], loss = compiled(state["params"], state["opt"], moving, fixed)
    loss.block_until_ready()

  forward, forward_compile_s = harness.compile_jax(
    jax.jit(lambda p, a, b: net.apply({"params": p}, a, b)), params, moving, fixed
  )

  def run_forward():
    forward(state["params"], moving, fixed).block_until_ready()

  return [
    harness.Case("train_step", "jax", run, compile_s=compile_s),
    harness.Case("forward", "jax", run_forward, compile_s=forward_compile_s),
  ]


def torch_cases(
  moving: np.ndarray, fixed: np.ndarray, hidden: int, num_steps: int
) -> list[harness.Case]:
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  size = moving.shape[1]

  class MLP(torch.nn.Module):
    """The seed's network: pair -> displacement ``[B, 2, H, W]`` in [0, 1] unit coordinates."""

    def __init__(self):
      super().__init__()
      self.dense1 = torch.nn.Linear(size * size * 2, hidden)
      self.dense2 = torch.nn.Linear(hidden, hidden)
      self.dense3 = torch.nn.Linear(hidden, size * size * 2)
      torch.nn.init.normal_(self.dense3.weight, std=1e-3)
      torch.nn.init.normal_(self.dense3.bias, std=1e-3)

    def forward(self, a, b):
      x = torch.cat([a, b], 1).reshape(a.shape[0], -1)
      x = self.dense3(F.relu(self.dense2(F.relu(self.dense1(x)))))
      return x.reshape(a.shape[0], 2, size, size)

  def interpolate(values, coords):
    """values ``[B, C, H, W]`` at unit coordinates ``[B, 2, H, W]`` ('ij'), border padding."""
    grid = (2.0 * coords - 1.0).permute(0, 2, 3, 1).flip(-1)
    return F.grid_sample(values, grid, mode="bilinear", padding_mode="border", align_corners=True)

  def field_transform(field):
    return lambda coords: coords + interpolate(field, coords)

  def compose(outer, inner):
    return lambda coords: outer(inner(coords))

  net = MLP()
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
  axis = torch.linspace(0.0, 1.0, size)
  identity = torch.stack(torch.meshgrid(axis, axis, indexing="ij"))[None].expand(
    moving.shape[0], -1, -1, -1
  )
  a = torch.from_numpy(np.ascontiguousarray(moving.transpose(0, 3, 1, 2)))
  b = torch.from_numpy(np.ascontiguousarray(fixed.transpose(0, 3, 1, 2)))

  def register():
    phi = field_transform(net(a, b))
    for _ in range(num_steps - 1):
      psi = field_transform(net(interpolate(a, phi(identity)), b))
      phi = compose(phi, psi)
    return phi(identity)

  def run():
    optimizer.zero_grad(set_to_none=True)
    coords = register()
    field = coords - identity
    similarity = 2.0 * torch.mean((interpolate(a, coords) - b) ** 2)
    regularity = (
      torch.mean((field[:, :, 1:] - field[:, :, :-1]) ** 2)
      + torch.mean((field[:, :, :, 1:] - field[:, :, :, :-1]) ** 2)
    ) * size**2
    loss = similarity + LMBDA * regularity
    loss.backward()
    optimizer.step()

  def run_forward():
    with torch.no_grad():
      register()

  extra = {"torch_threads": torch.get_num_threads()}
  return [
    harness.Case("train_step", "torch", run, extra=extra),
    harness.Case("forward", "torch", run_forward, extra=extra),
  ]


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--size", type=int, default=28)
  parser.add_argument("--hidden", type=int, default=50)
  parser.add_argument(
    "--num_steps", type=int, default=9, help="network applications (the seed: 1 + 8 compositions)"
  )
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument(
    "--torch_threads",
    type=int,
    default=0,
    help="torch intra-op threads (0: torch's default); on a loaded machine "
    "torch's OpenMP threads can stall, so compare 1 as well",
  )
  harness.add_host_memory_flag(parser)
  args = parser.parse_args(argv)
  harness.setup_host_memory(args.release_host_memory)

  rng = np.random.default_rng(0)
  shape = (args.batch, args.size, args.size, 1)
  moving = rng.random(shape, dtype=np.float32)
  fixed = rng.random(shape, dtype=np.float32)
  cases = jax_cases(moving, fixed, args.hidden, args.num_steps)
  if not args.no_torch:
    if args.torch_threads:
      import torch  # pylint: disable=import-outside-toplevel

      torch.set_num_threads(args.torch_threads)
    cases += torch_cases(moving, fixed, args.hidden, args.num_steps)
  results = harness.time_cases(cases, warmup=args.warmup, repeats=args.repeats)
  for row in results:
    row["steps_per_sec"] = 1e3 / row["median_ms"]
    row["batch"] = args.batch
  return harness.report("icon_digits", results, num_steps=args.num_steps, size=args.size)


if __name__ == "__main__":
  main()
