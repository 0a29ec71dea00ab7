"""One harness and one output shape for every benchmark in this folder.

Each benchmark prints a single JSON object on stdout::

  {"benchmark": name, "machine": {...}, "results": [case, ...], "ratios": {case: jax/torch}}

where a case is ``{"name", "impl", "median_ms", "min_ms", "max_ms", "compile_s"?, ...}``.
JAX and torch sides of the same case are timed interleaved (round-robin) in the same process,
so a ratio compares like with like on a machine whose load drifts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from mammojax import host_memory


@dataclasses.dataclass
class Case:
  """One timed callable. ``fn`` must block until its work is done (``block_until_ready``)."""

  name: str
  impl: str
  fn: Callable[[], Any]
  compile_s: float | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def machine_info() -> dict[str, Any]:
  info: dict[str, Any] = {
    "python": platform.python_version(),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "host_memory_kept": host_memory.freed_host_memory_is_kept(),
  }
  try:
    import jax

    info["jax"] = jax.__version__
    info["jax_backend"] = jax.default_backend()
    info["devices"] = [str(d.device_kind) for d in jax.devices()]
  except ImportError:
    pass
  if "torch" in sys.modules:
    torch = sys.modules["torch"]
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  return info


def add_host_memory_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--release_host_memory",
    action="store_true",
    help="leave glibc returning freed memory to the kernel (its default); XLA:CPU then "
    "page-faults its per-call buffers on every call (mammojax/host_memory.py)",
  )


def setup_host_memory(release: bool = False) -> None:
  """Keeps freed host memory in the process (as ``python -m mammojax.main`` does) unless
  ``release``; call before JAX starts its backend. It applies to torch in the same process too,
  so the two sides run on the same allocator."""
  if not release:
    host_memory.keep_freed_host_memory()


def time_cases(cases: list[Case], warmup: int = 2, repeats: int = 10) -> list[dict[str, Any]]:
  """Times every case ``repeats`` times, interleaved, after ``warmup`` untimed calls each."""
  for case in cases:
    for _ in range(warmup):
      case.fn()
  samples: dict[int, list[float]] = {i: [] for i in range(len(cases))}
  for _ in range(repeats):
    for i, case in enumerate(cases):
      start = time.perf_counter()
      case.fn()
      samples[i].append((time.perf_counter() - start) * 1e3)
  results = []
  for i, case in enumerate(cases):
    row = {
      "name": case.name,
      "impl": case.impl,
      "median_ms": statistics.median(samples[i]),
      "min_ms": min(samples[i]),
      "max_ms": max(samples[i]),
      "repeats": repeats,
    }
    if case.compile_s is not None:
      row["compile_s"] = case.compile_s
    row.update(case.extra)
    results.append(row)
  return results


def ratios(results: list[dict[str, Any]]) -> dict[str, float]:
  """Case name -> jax median / torch median, for names timed on both sides."""
  by_name: dict[str, dict[str, float]] = {}
  for row in results:
    by_name.setdefault(row["name"], {})[row["impl"]] = row["median_ms"]
  out = {}
  for name, impls in by_name.items():
    torch_ms = impls.get("torch")
    for impl, ms in impls.items():
      if impl != "torch" and torch_ms:
        key = name if impl == "jax" else f"{name}[{impl}]"
        out[key] = ms / torch_ms
  return out


def report(benchmark: str, results: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
  """Prints the benchmark's JSON object on stdout and returns it."""
  body = {
    "benchmark": benchmark,
    "machine": machine_info(),
    "results": results,
    "ratios": ratios(results),
    **extra,
  }
  print(json.dumps(body, indent=2, default=float))
  return body


def compile_jax(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  """AOT-compiles a jitted ``fn`` for ``args``; returns (compiled, seconds spent compiling)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def compiled_stats(compiled: Any) -> dict[str, Any]:
  """FLOPs and memory from XLA's cost and memory analyses, where the backend provides them."""
  stats: dict[str, Any] = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    if cost and "flops" in cost:
      stats["flops"] = float(cost["flops"])
  except Exception:  # Not every backend implements cost analysis.
    pass
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      for field in (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
      ):
        stats[field] = int(getattr(mem, field))
  except Exception:  # Likewise for memory analysis.
    pass
  return stats
