"""UNETR speed: a Dice train step and sliding-window inference, JAX against MONAI in one process.

Cases, timed interleaved (benchmarks/harness.py) against MONAI 1.6's ``monai.networks.nets.UNETR``
(torch, channels-first) in the same process, at each size of ``--sizes``:

* ``train_step/<size>``: one training step on a batch of ``B`` crops ``[B, c, c, c, 3]`` (torch:
  ``[B, 3, c, c, c]``) with a label map of 2 classes: forward, MONAI's soft Dice loss on the
  softmax of the logits against the one-hot labels (:func:`mammojax.losses.dice.dice_loss` with
  ``softmax=True``; ``monai.losses.DiceLoss(to_onehot_y=True, softmax=True)``, labels
  ``[B, 1, c, c, c]``), the gradient w.r.t. every parameter, the gradients' global norm (both
  sides return it with the loss: ``optax.global_norm``, ``torch.nn.utils.get_total_norm``), and
  an Adam update at lr 1e-4 (``optax.adam``; ``torch.optim.Adam`` with torch's default, per-tensor
  implementation on CPU). JAX: :class:`mammojax.models.segmentation.unetr.UNETR` (``train=True``;
  dropout 0, instance norm: the same function as in eval), one jitted program whose state
  (parameters and Adam moments) is donated. torch: ``zero_grad(set_to_none=True)``, forward,
  ``backward()``, ``step()`` of ``model.train()``. On both sides Adam's moments exist before the
  first step (``tx.init``; torch's optimizer state filled with zeros as its first ``step()``
  would), so no call allocates them.
* ``sliding_window/<size>``: inference over one volume ``[1, *V, 3]`` (torch ``[1, 3, *V]``), roi
  ``c^3`` (the model's ``img_size``), overlap 0.5, ``"gaussian"`` blending (sigma 0.125 roi),
  ``sw_batch_size`` 4 (MONAI's usual): :func:`mammojax.nn.sliding_window.sliding_window_inference`
  (one compiled program: a ``lax.scan`` over batches of windows) against
  ``monai.inferers.sliding_window_inference`` (a Python loop over batches of windows) on the model
  in ``eval()`` under ``torch.inference_mode()``. The output is the blended logits
  ``[1, *V, 2]`` (torch ``[1, 2, *V]``), float32.

Sizes (3 input channels and 2 classes everywhere; UNETR's 12 ViT blocks, patch 16):

* ``paper``: ViT-B (hidden 768, MLP 3072, 12 heads), feature size 16, 96^3 crops, batch 2; volume
  160 x 192 x 160 (27 windows: 3 per axis, 7 predictor calls). 3 timed repeats (fewer under
  ``--max_case_s``).
* ``default``: the CPU config of ``configs/unetr.py`` (hidden 96, MLP 192, 4 heads, feature size
  8), 32^3 crops, batch 4; volume 48^3 (8 windows). 5 timed repeats.
* ``small`` (``--small``): hidden 24, MLP 48, 2 heads, feature size 4, 16^3 crops (one ViT
  token), batch 1; volume 24^3 (8 windows). A check of the code, not of speed.

Variants of the JAX train step, on the same weights: ``bf16`` (``UNETR(dtype=bfloat16)``: float32
parameters, Adam and loss, bf16 convolutions and matmuls) and ``remat`` (``remat=True``: each ViT
block recomputed in the backward pass). A timed variant is a row of the same case with its own
``impl`` (``jax-bf16``), timed interleaved with the others (``ratios`` names it
``<case>[<impl>]``); a compiled-only variant is only lowered and compiled for its compile time and
XLA memory figures (top-level ``compiled_only`` rows; nothing runs). By default (``--variants
auto``) ``bf16`` is timed at ``default`` and ``remat`` compiled only at ``paper`` (its figure of
interest is memory, and a paper-size step is slow); ``--variants bf16,remat`` times the named ones
at every size, ``--variants none`` has no variant.

Both sides hold the same weights: MONAI's UNETR (default init, ``torch.manual_seed(0)``, a fresh
model per case) converted with :func:`mammojax.convert.unetr.import_unetr`. Inputs are ``N(0, 1)``,
labels ``x[..., 0] > 1`` (about 16% foreground), fixed by a seed.

Checks, before timing, on the first call of each side (float32): the train step's loss and
gradient norm (of the initial weights) and the sliding window's output are compared
(``relative_diff``: ``|ours - theirs| / |theirs|`` for the loss and the norm, ``max |ours -
theirs| / max |theirs|`` for the output), which must be within :data:`RELATIVE_TOLERANCE` or the
run stops. The ``jax-bf16`` row reports its differences from MONAI's float32 step without a
limit.

Compile time and memory, apart from the timings: each JAX program is jitted on its arguments
(weights are arguments, not constants) and compiled ahead of time (``compile_s``: lower and
compile). ``xla_*`` figures are XLA's ``compiled.memory_analysis()`` (argument, output, alias and
temporary bytes; ``xla_peak_bytes = argument + output - alias + temp``: the train step's new
state aliases its donated arguments). torch's CPU allocator keeps no statistics, so memory is
also measured the same way on both sides from the process: ``rss_peak_increase_bytes`` is the
peak resident set during each side's first call (``VmHWM`` reset through
``/proc/self/clear_refs`` after ``malloc_trim(0)`` has handed freed heap pages back) less the
resident set before it: what the call touches beyond the weights, optimizer state and inputs
that were already resident (activations, gradients, temporaries, outputs); None where the kernel
does not offer ``clear_refs``.

Warm-up and time: each side's first call (the check and the memory probe; ``first_call_s``) is
the only untimed one; the timed calls follow it, interleaved. A paper-size call takes tens of
seconds or more per side on 2 cores, so ``--max_case_s`` caps a case's timed calls: the repeats
are cut to what fits at the first calls' pace (at least 1); ``repeats`` on each row says how
many ran. torch uses one intra-op thread per core
(``os.cpu_count()``) unless ``--torch_threads`` says otherwise; XLA uses every core. ``goal``
reports which ratios meet JAX / MONAI <= :data:`GOAL_RATIO`. Prints one JSON object on stdout
(and writes it to ``--out``), with the 1, 5 and 15 minute load averages at the start and the end.

  python -m benchmarks.segmentation3d [--small] [--sizes default,paper]
    [--cases train_step,sliding_window] [--variants bf16,remat] [--repeats 3] [--max_case_s 600]
    [--torch_threads 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from benchmarks import harness
from mammojax.convert.unetr import import_unetr
from mammojax.losses.dice import dice_loss
from mammojax.models.segmentation.unetr import UNETR
from mammojax.nn.sliding_window import sliding_window_inference

CASES = ("train_step", "sliding_window")
VARIANTS = ("bf16", "remat")
IN_CHANNELS = 3
NUM_CLASSES = 2
LEARNING_RATE = 1e-4
OVERLAP = 0.5
MODE = "gaussian"
SW_BATCH_SIZE = 4
RELATIVE_TOLERANCE = 1e-3
GOAL_RATIO = 0.8


@dataclasses.dataclass(frozen=True)
class Size:
  """One model size, its training crops and its inference volume."""

  hidden_size: int
  mlp_dim: int
  num_heads: int
  feature_size: int
  crop: int  # the model's img_size and the sliding window's roi, every axis
  batch: int
  volume: tuple[int, int, int]
  variants: tuple[str, ...]  # timed JAX train-step variants
  compiled_variants: tuple[str, ...]  # JAX train-step variants compiled only, not run
  repeats: int

  def model_fields(self) -> dict[str, Any]:
    return dict(
      hidden_size=self.hidden_size,
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      feature_size=self.feature_size,
    )


SIZES = {
  "small": Size(24, 48, 2, 4, 16, 1, (24, 24, 24), variants=(), compiled_variants=(), repeats=2),
  "default": Size(
    96, 192, 4, 8, 32, 4, (48, 48, 48), variants=("bf16",), compiled_variants=(), repeats=5
  ),
  "paper": Size(
    768, 3072, 12, 16, 96, 2, (160, 192, 160), variants=(), compiled_variants=("remat",), repeats=3
  ),
}


# Memory of the process.


def _libc() -> Any:
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  return ctypes.CDLL(None)


def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_peak_increase(fn: Callable[[], Any]) -> tuple[Any, int | None]:
  """``(fn(), bytes)``: the peak resident set during ``fn`` less the resident set before it
  (freed heap pages handed back first, the kernel's high-water mark reset); None where
  ``/proc/self/clear_refs`` is not available."""
  libc = _libc()
  if libc is not None:
    libc.malloc_trim(0)
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current VmRSS
  except OSError:
    return fn(), None
  before = _status_kib("VmRSS")
  result = fn()
  peak = _status_kib("VmHWM")
  if before is None or peak is None:
    return result, None
  return result, (peak - before) * 1024


def xla_memory(compiled: Any) -> dict[str, Any]:
  """XLA's memory analysis (and FLOPs), with ``xla_peak_bytes`` (module docstring)."""
  stats = harness.compiled_stats(compiled)
  out = {f"xla_{k.removesuffix('_in_bytes')}_bytes": v for k, v in stats.items() if "size" in k}
  if "flops" in stats:
    out["flops"] = stats["flops"]
  try:
    alias = int(compiled.memory_analysis().alias_size_in_bytes)
  except Exception:  # Not every backend reports it.
    alias = 0
  out["xla_alias_size_bytes"] = alias
  if {"xla_argument_size_bytes", "xla_output_size_bytes", "xla_temp_size_bytes"} <= set(out):
    out["xla_peak_bytes"] = (
      out["xla_argument_size_bytes"]
      + out["xla_output_size_bytes"]
      - alias
      + out["xla_temp_size_bytes"]
    )
  return out


# Models and inputs.


def monai_unetr(size: Size) -> torch.nn.Module:
  """MONAI's UNETR at ``size`` (default init, seed 0: the same weights on every call)."""
  from monai.networks.nets import UNETR as MonaiUNETR

  torch.manual_seed(0)
  return MonaiUNETR(
    in_channels=IN_CHANNELS,
    out_channels=NUM_CLASSES,
    img_size=size.crop,
    **size.model_fields(),
    proj_type="conv",
    norm_name="instance",
    res_block=True,
    dropout_rate=0.0,
    qkv_bias=False,
  )


def import_weights(model: torch.nn.Module, size: Size) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(variables, fields)`` of our UNETR holding ``model``'s weights."""
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  variables, fields, _ = import_unetr(state, num_heads=size.num_heads, img_size=size.crop)
  expected = dict(size.model_fields(), out_channels=NUM_CLASSES, qkv_bias=False)
  got = {k: fields[k] for k in expected}
  if got != expected:
    raise RuntimeError(f"imported UNETR fields {got} differ from the size's {expected}")
  return jax.device_put(variables), fields


def volume_inputs(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``N(0, 1)`` channels-last volumes ``[*shape, 3]`` and labels ``x[..., 0] > 1``."""
  x = np.random.default_rng(seed).normal(size=(*shape, IN_CHANNELS)).astype(np.float32)
  return x, (x[..., 0] > 1.0).astype(np.int32)


def channels_first(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def relative_diff(ours: Any, theirs: Any) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  scale = float(np.max(np.abs(theirs)))
  diff = float(np.max(np.abs(ours - theirs)))
  return diff / scale if scale > 0 else float("inf")


def check(name: str, impl: str, diffs: dict[str, float], enforce: bool) -> None:
  for what, diff in diffs.items():
    if enforce and not diff <= RELATIVE_TOLERANCE:
      raise RuntimeError(
        f"{name} [{impl}]: JAX and MONAI {what} differ by {diff:.3g} of MONAI's > "
        f"{RELATIVE_TOLERANCE} (the two sides must compute the same function for the timings "
        "to compare)"
      )


# Cases: each side is a Side (its first call's outputs for the check, then a steady call).


@dataclasses.dataclass
class Side:
  """One side of a case: ``run()`` blocks until done and returns what the check compares."""

  impl: str
  run: Callable[[], dict[str, Any]]
  compile_s: float | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  enforce: bool = True  # whether the check against MONAI must hold


def compile_train_step(model: UNETR, state: Any, x: Any, y: Any) -> tuple[Any, float]:
  """``(compiled, seconds)``: the Adam train step of ``model`` for ``state`` (arrays or shapes),
  its state donated."""
  tx = optax.adam(LEARNING_RATE)

  def train_step(state: dict[str, Any], x: jax.Array, y: jax.Array) -> tuple[Any, Any, Any]:
    def loss_fn(params: Any) -> jax.Array:
      logits = model.apply({"params": params}, x, train=True)
      return dice_loss(logits, y, softmax=True)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
    return new_state, loss, optax.global_norm(grads)

  return harness.compile_jax(jax.jit(train_step, donate_argnums=0), state, x, y)


def initial_state(params: Any) -> dict[str, Any]:
  """Parameters and Adam's moments (``optax.adam(...).init``)."""
  return {"params": params, "opt_state": optax.adam(LEARNING_RATE).init(params)}


def train_extra(model: UNETR, compiled: Any) -> dict[str, Any]:
  return {"dtype": jnp.dtype(model.dtype).name, "remat": model.remat, **xla_memory(compiled)}


def jax_train_side(
  impl: str, fields: dict[str, Any], variables: dict[str, Any], x: jax.Array, y: jax.Array
) -> Side:
  """The compiled Adam train step of ``UNETR(**fields)`` on its own copy of the weights."""
  model = UNETR(**fields)
  state = jax.jit(initial_state)(jax.tree.map(jnp.copy, variables["params"]))
  compiled, compile_s = compile_train_step(model, state, x, y)

  def run() -> dict[str, Any]:
    nonlocal state
    state, loss, norm = compiled(state, x, y)  # the old state is donated: always rebind
    jax.block_until_ready((state, loss, norm))
    return {"loss": float(loss), "grad_norm": float(norm)}

  extra = train_extra(model, compiled)
  return Side(impl, run, compile_s, extra, enforce=model.dtype == jnp.float32)


def compiled_only_row(
  name: str, impl: str, fields: dict[str, Any], variables: dict[str, Any], x: Any, y: Any
) -> dict[str, Any]:
  """Compile time and XLA's memory figures of a train-step variant that is not run."""
  model = UNETR(**fields)
  state = jax.eval_shape(initial_state, variables["params"])
  compiled, compile_s = compile_train_step(model, state, x, y)
  return {"name": name, "impl": impl, "compile_s": compile_s, **train_extra(model, compiled)}


def torch_train_side(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> Side:
  """MONAI's UNETR train step: zero grads, forward, Dice loss, backward, gradient norm, Adam."""
  from monai.losses import DiceLoss

  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
  for p in model.parameters():  # Adam's moments before the first step, as optax's tx.init
    optimizer.state[p] = {
      "step": torch.tensor(0.0),
      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }
  loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
  x_t = channels_first(x)
  y_t = torch.from_numpy(y[:, None].astype(np.int64))

  def run() -> dict[str, Any]:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x_t), y_t)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    optimizer.step()
    return {"loss": loss.item(), "grad_norm": norm.item()}

  return Side("torch", run, extra={"dtype": "float32"})


VARIANT_FIELDS = {"bf16": {"dtype": jnp.bfloat16}, "remat": {"remat": True}}


def train_step_sides(
  size: Size, name: str, variants: tuple[str, ...], compiled_variants: tuple[str, ...]
) -> tuple[list[Side], dict[str, Any], list[dict[str, Any]]]:
  """``train_step/<size>``: the JAX step, its timed variants and MONAI's on one batch (sides),
  the case's shape fields, and the compiled-only variants' rows."""
  model_t = monai_unetr(size)
  variables, fields = import_weights(model_t, size)
  x, y = volume_inputs((size.batch, *(size.crop,) * 3), seed=0)
  x_j, y_j = jax.device_put(jnp.asarray(x)), jax.device_put(jnp.asarray(y))
  shape = {
    "batch": size.batch,
    "crop": size.crop,
    "foreground": float(y.mean()),
    "optimizer": "adam",
  }
  compiled_rows = [
    {
      **compiled_only_row(name, f"jax-{v}", dict(fields, **VARIANT_FIELDS[v]), variables, x_j, y_j),
      **shape,
    }
    for v in compiled_variants
  ]
  sides = [jax_train_side("jax", fields, variables, x_j, y_j)]
  for v in variants:
    sides.append(jax_train_side(f"jax-{v}", dict(fields, **VARIANT_FIELDS[v]), variables, x_j, y_j))
  sides.append(torch_train_side(model_t, x, y))
  return sides, shape, compiled_rows


def jax_window_side(fields: dict[str, Any], variables: dict[str, Any], volume: jax.Array) -> Side:
  """:func:`sliding_window_inference` over ``volume``, compiled once with the weights traced."""
  model = UNETR(**fields)

  def predictor(windows: jax.Array, variables: dict[str, Any]) -> jax.Array:
    return model.apply(variables, windows)

  roi = tuple(fields["img_size"])
  infer = jax.jit(
    lambda variables, volume: sliding_window_inference(
      volume,
      roi,
      SW_BATCH_SIZE,
      predictor,
      overlap=OVERLAP,
      mode=MODE,
      predictor_args=(variables,),
    )
  )
  compiled, compile_s = harness.compile_jax(infer, variables, volume)

  def run() -> dict[str, Any]:
    return {"output": jax.block_until_ready(compiled(variables, volume))}

  return Side("jax", run, compile_s, {"dtype": "float32", **xla_memory(compiled)})


def torch_window_side(model: torch.nn.Module, volume: np.ndarray, roi: int) -> Side:
  from monai.inferers import sliding_window_inference as monai_sliding_window

  model.eval()
  volume_t = channels_first(volume)

  def run() -> dict[str, Any]:
    with torch.inference_mode():
      out = monai_sliding_window(
        volume_t, (roi,) * 3, SW_BATCH_SIZE, model, overlap=OVERLAP, mode=MODE
      )
    return {"output": out}

  return Side("torch", run, extra={"dtype": "float32"})


def sliding_window_sides(
  size: Size, name: str, variants: tuple[str, ...], compiled_variants: tuple[str, ...]
) -> tuple[list[Side], dict[str, Any], list[dict[str, Any]]]:
  """``sliding_window/<size>``: JAX and MONAI over one volume (no variants, no extra rows)."""
  del name, variants, compiled_variants  # the train step's only
  model_t = monai_unetr(size)
  variables, fields = import_weights(model_t, size)
  volume, _ = volume_inputs((1, *size.volume), seed=1)
  sides = [
    jax_window_side(fields, variables, jax.device_put(jnp.asarray(volume))),
    torch_window_side(model_t, volume, size.crop),
  ]
  shape = {
    "volume": list(size.volume),
    "roi": size.crop,
    "overlap": OVERLAP,
    "mode": MODE,
    "sw_batch_size": SW_BATCH_SIZE,
  }
  return sides, shape, []


def compare(name: str, side: Side, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
  """The parity figures of one JAX side against MONAI's first call (module docstring)."""
  figures: dict[str, Any] = {}
  if "output" in ours:
    ours_out = np.asarray(ours["output"])
    theirs_out = np.moveaxis(theirs["output"].numpy(), 1, -1)
    if ours_out.shape != theirs_out.shape:
      raise RuntimeError(f"{name}: JAX output {ours_out.shape} but MONAI's {theirs_out.shape}")
    figures["output_shape"] = list(ours_out.shape)
    figures["max_abs_output"] = float(np.max(np.abs(theirs_out)))
    diffs = {"output": relative_diff(ours_out, theirs_out)}
  else:
    figures.update(loss=ours["loss"], grad_norm=ours["grad_norm"])
    figures.update(loss_monai=theirs["loss"], grad_norm_monai=theirs["grad_norm"])
    diffs = {k: relative_diff(ours[k], theirs[k]) for k in ("loss", "grad_norm")}
  check(name, side.impl, diffs, side.enforce)
  figures.update({f"{k}_relative_diff": v for k, v in diffs.items()})
  return figures


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def run_case(
  name: str, sides: list[Side], shape: dict[str, Any], repeats: int, max_case_s: float
) -> list[dict[str, Any]]:
  """Checks, memory probes and interleaved timing of one case's sides (module docstring)."""
  first = {}
  for side in sides:
    first[side.impl] = rss_peak_increase(lambda: timed(side.run))
  theirs = first["torch"][0][0]
  cases = []
  for side in sides:
    (outputs, seconds), rss = first[side.impl]
    extra = {**shape, **side.extra, "first_call_s": seconds, "rss_peak_increase_bytes": rss}
    if side.impl != "torch":
      extra.update(compare(name, side, outputs, theirs))
    cases.append(harness.Case(name, side.impl, side.run, side.compile_s, extra))
  round_s = sum(seconds for (_, seconds), _ in first.values())
  n = max(1, min(repeats, int(max_case_s // max(round_s, 1e-9))))
  return harness.time_cases(cases, warmup=0, repeats=n)


Builder = Callable[
  [Size, str, tuple[str, ...], tuple[str, ...]],
  tuple[list[Side], dict[str, Any], list[dict[str, Any]]],
]
BUILDERS: dict[str, Builder] = {
  "train_step": train_step_sides,
  "sliding_window": sliding_window_sides,
}


def goal(ratios: dict[str, float]) -> dict[str, Any]:
  """Which ratios meet JAX / MONAI <= :data:`GOAL_RATIO`."""
  met = {name: ratio <= GOAL_RATIO for name, ratio in ratios.items()}
  return {"max_ratio": GOAL_RATIO, "met": met, "all_met": all(met.values())}


def parse_list(text: str, choices: tuple[str, ...], flag: str) -> list[str]:
  """``'a,b'`` -> those names, in ``choices``' order; an unknown name is an error."""
  chosen = {name.strip() for name in text.split(",") if name.strip()}
  unknown = chosen - set(choices)
  if unknown:
    raise SystemExit(f"unknown {flag} {sorted(unknown)}; choose from {', '.join(choices)}")
  return [c for c in choices if c in chosen]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="the tiny size only, a quick check")
  parser.add_argument("--sizes", default="default,paper", help="comma-separated: default, paper")
  parser.add_argument(
    "--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}"
  )
  parser.add_argument(
    "--variants",
    default="auto",
    help="JAX train-step variants, comma-separated from bf16, remat; 'auto': each size's "
    "(bf16 at small and default, remat at paper); 'none'",
  )
  parser.add_argument(
    "--repeats", type=int, default=None, help="timed calls per side (paper 3, default 5)"
  )
  parser.add_argument(
    "--max_case_s", type=float, default=600.0, help="cap on one case's timed calls, seconds"
  )
  parser.add_argument(
    "--torch_threads", type=int, default=0, help="torch intra-op threads (0: os.cpu_count())"
  )
  parser.add_argument("--out", default=None, help="also write the JSON object to this file")
  harness.add_host_memory_flag(parser)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  sizes = ["small"] if args.small else parse_list(args.sizes, ("default", "paper"), "--sizes")
  cases = parse_list(args.cases, CASES, "--cases")
  chosen = None
  if args.variants not in ("auto", "none"):
    chosen = tuple(parse_list(args.variants, VARIANTS, "--variants"))
  harness.setup_host_memory(args.release_host_memory)
  torch.set_num_threads(args.torch_threads if args.torch_threads > 0 else os.cpu_count())
  start = time.perf_counter()
  load_start = os.getloadavg()
  results: list[dict[str, Any]] = []
  compiled_only: list[dict[str, Any]] = []
  for size_name in sizes:
    size = SIZES[size_name]
    variants, compiled_variants = size.variants, size.compiled_variants
    if args.variants != "auto":
      variants, compiled_variants = chosen or (), ()
    repeats = args.repeats or size.repeats
    for case in cases:
      name = f"{case}/{size_name}"
      sides, shape, compiled = BUILDERS[case](size, name, variants, compiled_variants)
      shape = {"size": size_name, **size.model_fields(), **shape}
      compiled_only += [{**row, "size": size_name, **size.model_fields()} for row in compiled]
      results += run_case(name, sides, shape, repeats, args.max_case_s)
      del sides  # only one case's programs and buffers alive at a time
      gc.collect()
  body = harness.report(
    "segmentation3d",
    results,
    model="unetr",
    goal=goal(harness.ratios(results)),
    compiled_only=compiled_only,
    small=args.small,
    memory=(
      "JAX: XLA memory_analysis (xla_*); both sides: rss_peak_increase_bytes, the peak resident "
      "set of each side's first call less the resident set before it"
    ),
    load_average={"start": load_start, "end": os.getloadavg()},
    wall_s=time.perf_counter() - start,
  )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(body, f, indent=2, default=float)
  return body


if __name__ == "__main__":
  main()
