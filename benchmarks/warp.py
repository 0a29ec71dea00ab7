"""Feature-map warping: JAX gather and map_coordinates paths against torch grid_sample.

Bilinear warp of a ``[B, H, W, C]`` feature map by a pixel displacement ``[B, H, W, 2]`` with zero
padding (the ImgFeatAlign hot path), forward and forward+backward (gradients for the feature map
and the displacement). torch runs ``grid_sample`` on the same data in its native NCHW layout with
the equivalent ``align_corners=True`` grid. Effective GB/s counts the bytes of every argument and
result once (a lower bound on memory traffic).

  python -m benchmarks.warp            # [8, 64, 52, 512] and [8, 128, 104, 256]
  python -m benchmarks.warp --small    # tiny sizes, seconds
  python -m benchmarks.warp --sizes 2x32x26x64,4x16x16x8
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from mammojax.nn import warp as warp_lib

FULL_SIZES = ((8, 64, 52, 512), (8, 128, 104, 256))
SMALL_SIZES = ((2, 16, 13, 32), (2, 32, 26, 16))


def _parse_sizes(text: str) -> tuple[tuple[int, int, int, int], ...]:
  sizes = []
  for item in text.split(","):
    parts = tuple(int(v) for v in item.lower().split("x"))
    if len(parts) != 4:
      raise argparse.ArgumentTypeError(f"size {item!r} must be BxHxWxC, e.g. 8x64x52x512")
    sizes.append(parts)
  return tuple(sizes)


def _jax_cases(size, impl, source, displacement, cotangent):
  nbytes = source.nbytes + displacement.nbytes
  name = "x".join(map(str, size))

  def forward(s, d):
    return warp_lib.warp(s, d, impl)

  def forward_backward(s, d, c):
    _, vjp = jax.vjp(forward, s, d)
    return vjp(c)

  cases = []
  # Every array is an argument, never a closed-over constant that XLA would try to fold.
  for label, fn, args, moved in [
    ("fwd", forward, (source, displacement), nbytes + source.nbytes),
    ("fwd+bwd", forward_backward, (source, displacement, cotangent), 2 * nbytes + cotangent.nbytes),
  ]:
    compiled, compile_s = harness.compile_jax(jax.jit(fn), *args)
    cases.append(
      harness.Case(
        name=f"{label} {name}",
        impl=f"jax-{impl}",
        fn=lambda c=compiled, a=args: jax.block_until_ready(c(*a)),
        compile_s=compile_s,
        extra={"bytes": moved, **harness.compiled_stats(compiled)},
      )
    )
  return cases


def _torch_cases(size, source, displacement, cotangent):
  import torch

  name = "x".join(map(str, size))
  src = torch.from_numpy(np.array(source)).permute(0, 3, 1, 2).contiguous()
  coords = warp_lib.identity_map(size[1:3])[None] + displacement
  grid = torch.from_numpy(np.array(warp_lib.pixels_to_grid_sample(coords, size[1:3])))
  cot = torch.from_numpy(np.array(cotangent)).permute(0, 3, 1, 2).contiguous()
  nbytes = source.nbytes + displacement.nbytes

  def forward():
    with torch.no_grad():
      return torch.nn.functional.grid_sample(
        src, grid, mode="bilinear", padding_mode="zeros", align_corners=True
      )

  src_g = src.clone().requires_grad_(True)
  grid_g = grid.clone().requires_grad_(True)

  def forward_backward():
    out = torch.nn.functional.grid_sample(
      src_g, grid_g, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return torch.autograd.grad(out, (src_g, grid_g), cot)

  return [
    harness.Case(
      name=f"fwd {name}", impl="torch", fn=forward, extra={"bytes": nbytes + source.nbytes}
    ),
    harness.Case(
      name=f"fwd+bwd {name}",
      impl="torch",
      fn=forward_backward,
      extra={"bytes": 2 * nbytes + cotangent.nbytes},
    ),
  ]


def _check_agreement(size, source, displacement):
  """The two JAX paths must agree before their speeds mean anything."""
  gather = warp_lib.warp(source, displacement, "gather")
  reference = warp_lib.warp(source, displacement, "map_coordinates")
  error = float(jnp.max(jnp.abs(gather - reference)))
  if error > 1e-4:
    raise AssertionError(f"gather and map_coordinates differ by {error} at {size}")
  return error


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny sizes for a quick check")
  parser.add_argument("--sizes", type=_parse_sizes, help="comma-separated BxHxWxC")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--no-torch", action="store_true", help="skip torch.grid_sample")
  harness.add_host_memory_flag(parser)
  args = parser.parse_args(argv)
  harness.setup_host_memory(args.release_host_memory)
  sizes = args.sizes or (SMALL_SIZES if args.small else FULL_SIZES)
  with_torch = not args.no_torch
  if with_torch:
    try:
      import torch  # noqa: F401
    except ImportError:
      with_torch = False

  results, agreement = [], {}
  for size in sizes:
    key_s, key_d, key_c = jax.random.split(jax.random.key(0), 3)
    source = jax.random.normal(key_s, size, jnp.float32)
    # Displacements of a few pixels, some samples falling outside (zero padding matters).
    displacement = 3.0 * jax.random.normal(key_d, (*size[:3], 2), jnp.float32)
    cotangent = jax.random.normal(key_c, size, jnp.float32)
    agreement["x".join(map(str, size))] = _check_agreement(size, source, displacement)
    cases = []
    for impl in ("gather", "map_coordinates"):
      cases += _jax_cases(size, impl, source, displacement, cotangent)
    if with_torch:
      cases += _torch_cases(size, source, displacement, cotangent)
    if with_torch:
      torch_out = cases[-2].fn().permute(0, 2, 3, 1).numpy()
      error = float(np.max(np.abs(torch_out - np.asarray(warp_lib.warp(source, displacement)))))
      if error > 1e-4:
        raise AssertionError(f"gather and torch grid_sample differ by {error} at {size}")
      agreement["x".join(map(str, size)) + " vs torch"] = error
    rows = harness.time_cases(cases, warmup=2, repeats=args.repeats)
    for row in rows:
      row["effective_gb_s"] = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
    results += rows
  return harness.report(
    "warp", results, max_abs_difference_to_gather=agreement, sizes=[list(s) for s in sizes]
  )


if __name__ == "__main__":
  main()
