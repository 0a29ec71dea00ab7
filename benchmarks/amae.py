"""AMAE speed: the masked-autoencoder pretraining step and the adaptive UNETR's Dice step, JAX
against a PyTorch implementation of the same architecture in one process.

Cases, timed interleaved (benchmarks/harness.py) against :mod:`benchmarks.amae_torch` (torch and
MONAI's UNETR blocks, channels-first) in the same process, at each size of ``--sizes``:

* ``pretrain_step/<size>/k<K>``: one Adam step (lr 1e-4) of
  :class:`~mammojax.models.amae.mae.AdaptiveMAE` on ``B`` crops ``[B, c, c, c, K]`` (torch
  ``[B, K, c, c, c]``), every contrast present: random masking (mask ratio 0.7, per example and
  contrast, drawn anew every step: JAX from a key carried in the state, torch from its global
  generator), the encoder over the ``n = int(P * 0.3)`` visible tokens of each contrast, the
  decoder over all ``K * P`` tokens, the L2 loss on the masked patches against per-patch
  normalised targets (:func:`~mammojax.losses.masked_reconstruction.masked_patch_loss` with
  ``normalize_target=True``; :func:`benchmarks.amae_torch.masked_patch_loss`), the gradient of
  every parameter, its global norm and the Adam update.
* ``adaptive_unetr_step/<size>/k3``: the same step of
  :class:`~mammojax.models.amae.adaptive_unetr.AdaptiveUNETR` (2 classes) on 3 present contrasts,
  MONAI's soft Dice loss on the softmax against labels ``x[..., 0] > 1``
  (:func:`mammojax.losses.dice.dice_loss` with ``softmax=True``;
  ``monai.losses.DiceLoss(to_onehot_y=True, softmax=True)``).

JAX: one jitted program per step, its state (parameters, Adam moments, masking key) donated,
``train=True`` (dropout 0). torch: ``zero_grad(set_to_none=True)``, forward, loss, ``backward()``,
``get_total_norm``, ``step()`` of ``model.train()``. On both sides Adam's moments exist before the
first step, as in :mod:`benchmarks.segmentation3d`.

The two sides are the same architecture with the same sizes and FLOPs, not the same weights (no
converter: parameters are each side's own initialisation); their parameter counts are reported
(``params_jax``, ``params_torch``) and must agree within :data:`PARAM_TOLERANCE` or the run stops.
Each side's first-call loss and gradient norm are reported, unchecked.

Sizes (patch 16, 12 encoder blocks everywhere; decoder = dim / depth / heads / MLP):

* ``paper``: ViT-B (768, 12 heads, MLP 3072), decoder 384 / 8 / 12 / 1536, feature size 16, 96^3
  crops (216 patches, 64 visible), batch 2, K = 3 and 7. Slow on a CPU: ``--max_case_s`` caps the
  timed calls of a case.
* ``default``: the CPU config (96, 4 heads, MLP 192), decoder 48 / 2 / 4 / 96, feature size 8,
  32^3 crops (8 patches, 2 visible), batch 4, K = 3 and 7.
* ``small`` (``--small``): 24, 2 heads, MLP 48, decoder 12 / 1 / 2 / 24, feature size 4, 32^3
  crops, batch 1, K = 3. A check of the code, not of speed.

Variants of the JAX step on the same weights (the encoder's field, which the MAE decoder and the
UNETR head follow): ``bf16`` (``dtype=bfloat16``: float32 parameters, Adam and loss) and ``remat``
(``remat=True``). By default (``--variants auto``) ``bf16`` is timed at ``default`` (a row
``impl='jax-bf16'``, ratio ``<case>[jax-bf16]``) and ``remat`` compiled only at ``paper`` for its
memory figures (top-level ``compiled_only`` rows); ``--variants bf16,remat`` times the named ones at
every size, ``none`` has none.

Figures per row: ``median_ms`` etc. (harness), ``encoder_tokens_per_s`` (``B * K * n`` visible
tokens per pretraining step, ``B * K * P`` per UNETR step) and ``decoder_tokens_per_s`` (``B * K *
P``, pretraining), ``compile_s`` (JAX: lower + compile, apart from the timings), XLA's memory
analysis (``xla_*``, :func:`benchmarks.segmentation3d.xla_memory`), and on both sides
``rss_peak_increase_bytes`` of the first call (:func:`benchmarks.segmentation3d.rss_peak_increase`).

Threads: ``--threads N`` gives torch ``N`` intra-op threads and XLA the same number of CPUs (the
process's CPU affinity narrowed to ``N`` of them before JAX starts its backend: XLA:CPU sizes its
thread pool by the schedulable CPUs); 0 (default) = every CPU on both sides. ``goal`` reports which
ratios meet JAX / torch <= :data:`GOAL_RATIO`. Prints one JSON object on stdout (and writes it to
``--out``).

  python -m benchmarks.amae [--small] [--sizes default,paper] [--cases pretrain_step,...]
    [--variants auto] [--repeats 5] [--max_case_s 600] [--threads 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import linen as nn

from benchmarks import amae_torch, harness
from benchmarks.segmentation3d import Side, parse_list, rss_peak_increase, timed, xla_memory
from mammojax.losses.dice import dice_loss
from mammojax.losses.masked_reconstruction import masked_patch_loss
from mammojax.models.amae.adaptive_unetr import AdaptiveUNETR
from mammojax.models.amae.encoder import ContrastEncoder
from mammojax.models.amae.mae import AdaptiveMAE, visible_count
from mammojax.nn.dynamic_tokenizer import patchify

CASES = ("pretrain_step", "adaptive_unetr_step")
VARIANTS = ("bf16", "remat")
VARIANT_FIELDS = {"bf16": {"dtype": jnp.bfloat16}, "remat": {"remat": True}}
PATCH = 16
MASK_RATIO = 0.7
NUM_CLASSES = 2
UNETR_SLOTS = 3
LEARNING_RATE = 1e-4
PARAM_TOLERANCE = 0.005
GOAL_RATIO = 0.8


@dataclasses.dataclass(frozen=True)
class Size:
  """One model size and its crops."""

  hidden_dim: int
  num_heads: int
  mlp_dim: int
  decoder_dim: int
  decoder_depth: int
  decoder_heads: int
  decoder_mlp_dim: int
  feature_size: int
  crop: int
  batch: int
  slots: tuple[int, ...]  # K of the pretraining cases
  variants: tuple[str, ...]  # timed JAX variants
  compiled_variants: tuple[str, ...]  # JAX variants compiled only
  repeats: int
  depth: int = 12

  def encoder_fields(self) -> dict[str, Any]:
    return dict(
      hidden_dim=self.hidden_dim,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
    )

  def decoder_fields(self) -> dict[str, Any]:
    return dict(
      decoder_dim=self.decoder_dim,
      decoder_depth=self.decoder_depth,
      decoder_heads=self.decoder_heads,
      decoder_mlp_dim=self.decoder_mlp_dim,
    )


SIZES = {
  "small": Size(24, 2, 48, 12, 1, 2, 24, 4, 32, 1, (3,), (), (), repeats=2),
  "default": Size(96, 4, 192, 48, 2, 4, 96, 8, 32, 4, (3, 7), ("bf16",), (), repeats=5),
  "paper": Size(768, 12, 3072, 384, 8, 12, 1536, 16, 96, 2, (3, 7), (), ("remat",), repeats=3),
}


# Models and inputs.


def jax_model(case: str, size: Size, slots: int, **variant: Any) -> nn.Module:
  """Our AMAE model of ``case`` at ``size`` (``variant``: ContrastEncoder fields)."""
  encoder = ContrastEncoder(
    num_slots=slots,
    image_size=(size.crop,) * 3,
    patch_size=PATCH,
    **size.encoder_fields(),
    position_embedding="sincos_hwd",
    modality_embedding=True,
    tokenizer_update="scale",
    qkv_bias=False,
    layer_norm_epsilon=1e-5,
    dropout_rate=0.0,
    **variant,
  )
  if case == "pretrain_step":
    return AdaptiveMAE(encoder=encoder, **size.decoder_fields(), mask_ratio=MASK_RATIO)
  return AdaptiveUNETR(NUM_CLASSES, encoder=encoder, feature_size=size.feature_size)


def torch_model(case: str, size: Size, slots: int) -> torch.nn.Module:
  """The PyTorch model of ``case`` at ``size`` (seed 0)."""
  torch.manual_seed(0)
  encoder = amae_torch.ContrastEncoder(
    slots, size.crop, PATCH, size.hidden_dim, size.depth, size.num_heads, size.mlp_dim
  )
  if case == "pretrain_step":
    return amae_torch.AdaptiveMAE(
      encoder,
      size.decoder_dim,
      size.decoder_depth,
      size.decoder_heads,
      size.decoder_mlp_dim,
      MASK_RATIO,
    )
  return amae_torch.AdaptiveUNETR(encoder, NUM_CLASSES, size.feature_size)


def inputs(size: Size, slots: int, seed: int) -> dict[str, np.ndarray]:
  """``N(0, 1)`` channels-last volumes ``[B, c, c, c, K]``, every contrast present, and labels
  ``x[..., 0] > 1``."""
  shape = (size.batch, *(size.crop,) * 3, slots)
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return {
    "volumes": x,
    "present": np.ones((size.batch, slots), np.float32),
    "labels": (x[..., 0] > 1.0).astype(np.int32),
  }


def init_params(model: nn.Module, batch: dict[str, jax.Array]) -> Any:
  """``model.init`` (jitted) and unboxed: the float32 parameters."""

  def init(volumes: jax.Array, present: jax.Array) -> Any:
    rngs = {"params": jax.random.PRNGKey(0), "masking": jax.random.PRNGKey(1)}
    return model.init(rngs, volumes, present, train=True)

  variables = jax.jit(init)(batch["volumes"], batch["present"])
  return nn.meta.unbox(variables)["params"]


def parameter_count(params: Any) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


# JAX side.


def loss_function(case: str, model: nn.Module) -> Callable[..., jax.Array]:
  """``loss(params, rng, batch)`` of ``case`` (module docstring)."""
  if case == "pretrain_step":

    def pretrain_loss(params: Any, rng: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
      out = model.apply(
        {"params": params}, batch["volumes"], batch["present"], train=True, rngs={"masking": rng}
      )
      target = patchify(batch["volumes"], PATCH)
      loss, _ = masked_patch_loss(
        out["prediction"], target, out["mask"], batch["present"], normalize_target=True
      )
      return loss

    return pretrain_loss

  def unetr_loss(params: Any, rng: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    del rng  # no masking
    logits = model.apply({"params": params}, batch["volumes"], batch["present"], train=True)
    return dice_loss(logits, batch["labels"], softmax=True)

  return unetr_loss


def initial_state(params: Any) -> dict[str, Any]:
  """Parameters, Adam's moments and the masking key."""
  opt_state = optax.adam(LEARNING_RATE).init(params)
  return {"params": params, "opt_state": opt_state, "rng": jax.random.PRNGKey(2)}


def compile_train_step(
  case: str, model: nn.Module, state: Any, batch: dict[str, Any]
) -> tuple[Any, float]:
  """``(compiled, seconds)``: the Adam step of ``model`` for ``state`` (arrays or shapes), its
  state donated; it returns ``(new state, loss, gradient norm)``."""
  tx = optax.adam(LEARNING_RATE)
  loss_fn = loss_function(case, model)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[Any, Any, Any]:
    rng, step_rng = jax.random.split(state["rng"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], step_rng, batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "rng": rng}
    return new_state, loss, optax.global_norm(grads)

  return harness.compile_jax(jax.jit(train_step, donate_argnums=0), state, batch)


def step_extra(model: nn.Module, compiled: Any) -> dict[str, Any]:
  encoder = model.encoder
  return {"dtype": jnp.dtype(encoder.dtype).name, "remat": encoder.remat, **xla_memory(compiled)}


def jax_side(
  impl: str, case: str, model: nn.Module, params: Any, batch: dict[str, jax.Array]
) -> Side:
  """The compiled step of ``model`` on its own copy of ``params``."""
  state = jax.jit(initial_state)(jax.tree.map(jnp.copy, params))
  compiled, compile_s = compile_train_step(case, model, state, batch)

  def run() -> dict[str, Any]:
    nonlocal state
    state, loss, norm = compiled(state, batch)  # the old state is donated: always rebind
    jax.block_until_ready((state, loss, norm))
    return {"loss": float(loss), "grad_norm": float(norm)}

  return Side(impl, run, compile_s, step_extra(model, compiled), enforce=False)


def compiled_only_row(
  name: str, impl: str, case: str, model: nn.Module, params: Any, batch: dict[str, Any]
) -> dict[str, Any]:
  """Compile time and XLA's memory figures of a variant that is not run."""
  state = jax.eval_shape(initial_state, params)
  compiled, compile_s = compile_train_step(case, model, state, batch)
  return {"name": name, "impl": impl, "compile_s": compile_s, **step_extra(model, compiled)}


# torch side.


def torch_side(case: str, model: torch.nn.Module, batch: dict[str, np.ndarray]) -> Side:
  """The torch step: zero grads, forward, loss, backward, gradient norm, Adam."""
  from monai.losses import DiceLoss

  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
  for p in model.parameters():  # Adam's moments before the first step, as optax's tx.init
    optimizer.state[p] = {
      "step": torch.tensor(0.0),
      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }
  volumes = torch.from_numpy(np.ascontiguousarray(np.moveaxis(batch["volumes"], -1, 1)))
  present = torch.from_numpy(batch["present"] > 0)
  if case == "pretrain_step":

    def loss_fn() -> torch.Tensor:
      prediction, mask = model(volumes, present)
      return amae_torch.masked_patch_loss(prediction, volumes, mask, present, PATCH)

  else:
    dice = DiceLoss(to_onehot_y=True, softmax=True)
    labels = torch.from_numpy(batch["labels"][:, None].astype(np.int64))

    def loss_fn() -> torch.Tensor:
      return dice(model(volumes, present), labels)

  def run() -> dict[str, Any]:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    return {"loss": loss.item(), "grad_norm": norm.item()}

  return Side("torch", run, extra={"dtype": "float32"}, enforce=False)


# Cases.


def case_sides(
  case: str,
  size: Size,
  slots: int,
  name: str,
  variants: tuple[str, ...],
  compiled_variants: tuple[str, ...],
) -> tuple[list[Side], dict[str, Any], list[dict[str, Any]]]:
  """One case's sides (JAX, its timed variants, torch), shape fields and compiled-only rows."""
  model = jax_model(case, size, slots)
  data = inputs(size, slots, seed=0)
  keys = ("volumes", "present") + (("labels",) if case == "adaptive_unetr_step" else ())
  batch = jax.device_put({k: jnp.asarray(data[k]) for k in keys})
  params = init_params(model, batch)
  model_t = torch_model(case, size, slots)
  count_j, count_t = parameter_count(params), amae_torch.parameter_count(model_t)
  if abs(count_j - count_t) > PARAM_TOLERANCE * count_j:
    raise RuntimeError(
      f"{name}: JAX has {count_j} parameters and torch {count_t}, more than "
      f"{PARAM_TOLERANCE:.1%} apart (the two sides must be the same architecture)"
    )
  patches = (size.crop // PATCH) ** 3
  visible = visible_count(patches, MASK_RATIO)
  if case == "pretrain_step" and visible != model_t.visible:
    raise RuntimeError(f"{name}: JAX keeps {visible} patches per contrast, torch {model_t.visible}")
  shape: dict[str, Any] = {
    "slots": slots,
    "batch": size.batch,
    "crop": size.crop,
    "patches": patches,
    "params_jax": count_j,
    "params_torch": count_t,
    "optimizer": "adam",
  }
  if case == "pretrain_step":
    shape.update(
      size.decoder_fields(),
      mask_ratio=MASK_RATIO,
      visible=visible,
      encoder_tokens=size.batch * slots * visible,
      decoder_tokens=size.batch * slots * patches,
    )
  else:
    shape.update(
      feature_size=size.feature_size,
      num_classes=NUM_CLASSES,
      encoder_tokens=size.batch * slots * patches,
      foreground=float(data["labels"].mean()),
    )
  compiled_rows = [
    {
      **compiled_only_row(
        name, f"jax-{v}", case, jax_model(case, size, slots, **VARIANT_FIELDS[v]), params, batch
      ),
      **shape,
    }
    for v in compiled_variants
  ]
  sides = [jax_side("jax", case, model, params, batch)]
  for v in variants:
    variant_model = jax_model(case, size, slots, **VARIANT_FIELDS[v])
    sides.append(jax_side(f"jax-{v}", case, variant_model, params, batch))
  sides.append(torch_side(case, model_t, data))
  return sides, shape, compiled_rows


def run_case(
  name: str, sides: list[Side], shape: dict[str, Any], repeats: int, max_case_s: float
) -> list[dict[str, Any]]:
  """Each side's first call (loss, gradient norm, memory probe), then the interleaved timing;
  the repeats are cut to what fits ``max_case_s`` at the first calls' pace (at least 1)."""
  first = {side.impl: rss_peak_increase(lambda side=side: timed(side.run)) for side in sides}
  cases = []
  for side in sides:
    (outputs, seconds), rss = first[side.impl]
    extra = {**shape, **side.extra, **outputs}
    extra.update(first_call_s=seconds, rss_peak_increase_bytes=rss)
    cases.append(harness.Case(name, side.impl, side.run, side.compile_s, extra))
  round_s = sum(seconds for (_, seconds), _ in first.values())
  n = max(1, min(repeats, int(max_case_s // max(round_s, 1e-9))))
  rows = harness.time_cases(cases, warmup=0, repeats=n)
  for row in rows:
    seconds = row["median_ms"] / 1e3
    for what in ("encoder_tokens", "decoder_tokens"):
      if what in row:
        row[f"{what}_per_s"] = row[what] / seconds
  return rows


def goal(ratios: dict[str, float]) -> dict[str, Any]:
  """Which ratios meet JAX / torch <= :data:`GOAL_RATIO`."""
  met = {name: ratio <= GOAL_RATIO for name, ratio in ratios.items()}
  return {"max_ratio": GOAL_RATIO, "met": met, "all_met": all(met.values())}


def set_threads(threads: int) -> dict[str, Any]:
  """torch's intra-op threads and XLA's CPUs, equal (module docstring); call before JAX starts
  its backend."""
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  count = len(cpus) if cpus else os.cpu_count() or 1
  if threads > 0 and cpus and threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
    count = threads
  torch.set_num_threads(threads if threads > 0 else count)
  return {"torch": torch.get_num_threads(), "xla_cpus": count}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="the tiny size only, a quick check")
  parser.add_argument("--sizes", default="default", help="comma-separated: default, paper")
  parser.add_argument(
    "--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}"
  )
  parser.add_argument(
    "--variants",
    default="auto",
    help="JAX variants, comma-separated from bf16, remat; 'auto': bf16 timed at default, remat "
    "compiled only at paper; 'none'",
  )
  parser.add_argument(
    "--repeats", type=int, default=None, help="timed calls per side (paper 3, default 5)"
  )
  parser.add_argument(
    "--max_case_s", type=float, default=600.0, help="cap on one case's timed calls, seconds"
  )
  parser.add_argument(
    "--threads", type=int, default=0, help="torch threads and XLA CPUs (0: every CPU)"
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
  threads = set_threads(args.threads)
  harness.setup_host_memory(args.release_host_memory)
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
    fields = {"size": size_name, **size.encoder_fields()}
    for case in cases:
      for slots in size.slots if case == "pretrain_step" else (UNETR_SLOTS,):
        name = f"{case}/{size_name}/k{slots}"
        sides, shape, compiled = case_sides(case, size, slots, name, variants, compiled_variants)
        shape = {**fields, **shape}
        compiled_only += [{**row, **fields} for row in compiled]
        results += run_case(name, sides, shape, repeats, args.max_case_s)
        del sides  # only one case's programs and buffers alive at a time
        gc.collect()
  body = harness.report(
    "amae",
    results,
    model="amae",
    goal=goal(harness.ratios(results)),
    compiled_only=compiled_only,
    small=args.small,
    threads=threads,
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
