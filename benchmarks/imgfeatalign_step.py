"""ImgFeatAlign train-step speed: the whole model, JAX against PyTorch, same weights, same step.

One step = forward of the whole model (two Mirai ResNet-18 passes, the frozen MammoRegNet, flow
resize and feature warp, temporal attention, three cumulative heads), the weighted masked BCE
over the three heads (fused 1.0, cur 0.2, pri 0.2), the gradient w.r.t. the trainable
parameters and an AdamW update (lr 5e-5, weight decay 1e-4, the paper's). Two modes:

* ``frozen`` (the paper's ``finetune_all=False``): encoder and registration frozen, encoder
  BatchNorm in inference mode; only the risk model is trained.
* ``finetune``: the encoder is trained too (BatchNorm on batch statistics, running stats updated).

Both sides get the same weights: a torch model of the architecture (``tests/torch_refs``) is
converted with :func:`mammojax.convert.imgfeatalign.import_imgfeatalign`, and before timing an
eval-mode forward of both is compared (``forward_check``: max abs difference of the risk
logits and of the aligned prior features). The JAX model runs with ``bcrbench_flow_compat`` so
it computes BCRBench's function, as the torch model does. The JAX step is jitted with the train
state donated and compiled ahead of time (``compile_s``); ``flops`` and ``*_bytes`` come from
XLA's analyses. The torch side uses ``os.cpu_count()`` threads, ``eval()`` and ``no_grad`` for
the frozen parts. Cases are named ``step_<H>x<W>_b<B>_<mode>``, impl ``jax`` / ``torch``, timed
interleaved (benchmarks/harness.py).

  python benchmarks/imgfeatalign_step.py --sizes=512x416,1024x832 --batch=8
  python benchmarks/imgfeatalign_step.py --small          # seconds: 64x64, batch 2, tiny widths
  python benchmarks/imgfeatalign_step.py --no_torch       # JAX only (torch not installed)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository root for ``benchmarks``/``mammojax``; tests/ for ``torch_refs`` (whose modules
# import each other by that name).
for _path in (_REPO, os.path.join(_REPO, "tests")):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from benchmarks import harness  # noqa: E402
from mammojax.convert.imgfeatalign import import_imgfeatalign  # noqa: E402
from mammojax.losses.risk import DEFAULT_HEAD_WEIGHTS, risk_loss  # noqa: E402
from mammojax.models.imgfeatalign import ImgFeatAlign  # noqa: E402
from mammojax.models.registration.mammoregnet import MammoRegNet  # noqa: E402

NUM_YEARS = 5
LEARNING_RATE, WEIGHT_DECAY = 5e-5, 1e-4  # configs/imgfeatalign.py:paper
MODES = ("frozen", "finetune")
# configs/imgfeatalign.py:paper (Mirai ResNet-18, reference MammoRegNet) and a tiny one for --small.
PAPER_ARCH = {
  "encoder_width": 64,
  "num_heads": 8,
  "registration": {"enc_channels": 8, "dec_channels": 16, "num_layers": 4, "window_size": (5, 5)},
}
SMALL_ARCH = {
  "encoder_width": 8,
  "num_heads": 2,
  "registration": {"enc_channels": 4, "dec_channels": 8, "num_layers": 1, "window_size": (5, 5)},
}


def parse_size(text: str) -> tuple[int, int]:
  """``'512x416'`` -> ``(512, 416)`` (H, W); both multiples of 16 (MammoRegNet's poolings)."""
  try:
    height, width = (int(part) for part in text.lower().split("x"))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"--sizes entry {text!r} must be HxW, e.g. 512x416") from e
  if height <= 0 or width <= 0 or height % 16 or width % 16:
    raise argparse.ArgumentTypeError(
      f"--sizes entry {text!r}: H and W must be positive "
      "multiples of 16 (MammoRegNet pools four times)"
    )
  return height, width


def make_inputs(batch: int, size: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
  """Current / prior images ``[B, H, W, 1]``, time gap ``[B]`` years, targets and masks
  ``[B, Y]`` (all observed, a mix of positives), float32."""
  rng = np.random.default_rng(seed)
  current = rng.normal(size=(batch, *size, 1)).astype(np.float32)
  prior = (np.roll(current, 3, axis=1) + 0.3 * rng.normal(size=current.shape)).astype(np.float32)
  return {
    "current_image": current,
    "previous_image": prior,
    "time_gap": rng.uniform(0.5, 4.5, size=batch).astype(np.float32),
    "target": (rng.uniform(size=(batch, NUM_YEARS)) < 0.3).astype(np.float32),
    "y_mask": np.ones((batch, NUM_YEARS), np.float32),
    "target_prior": (rng.uniform(size=(batch, NUM_YEARS)) < 0.3).astype(np.float32),
    "y_mask_prior": np.ones((batch, NUM_YEARS), np.float32),
  }


def jax_model(arch: dict[str, Any], finetune_all: bool) -> ImgFeatAlign:
  return ImgFeatAlign(
    registration=MammoRegNet(**arch["registration"]),
    num_years=NUM_YEARS,
    encoder_width=arch["encoder_width"],
    num_heads=arch["num_heads"],
    finetune_all=finetune_all,
    bcrbench_flow_compat=True,
  )


def trainable_keys(finetune_all: bool) -> tuple[str, ...]:
  return ("encoder", "risk_model") if finetune_all else ("risk_model",)


def jax_case(
  name: str,
  arch: dict[str, Any],
  variables: dict[str, Any],
  inputs: dict[str, np.ndarray],
  finetune_all: bool,
) -> harness.Case:
  """Compiles the donated train step; the case runs it on one fixed device-resident batch."""
  model = jax_model(arch, finetune_all)
  tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  keys = trainable_keys(finetune_all)
  params = variables["params"]
  trainable = jax.device_put({k: v for k, v in params.items() if k in keys})
  frozen = jax.device_put({k: v for k, v in params.items() if k not in keys})
  state = {
    "step": jnp.zeros((), jnp.int32),
    "params": trainable,
    "batch_stats": jax.device_put(variables["batch_stats"]),
    "opt_state": tx.init(trainable),
  }
  batch = jax.device_put(inputs)
  dropout_key = jax.random.key(1)

  def train_step(state, frozen, batch):
    rng = jax.random.fold_in(dropout_key, state["step"])

    def loss_fn(trainable):
      variables = {"params": {**frozen, **trainable}, "batch_stats": state["batch_stats"]}
      args = (batch["current_image"], batch["previous_image"], batch["time_gap"])
      if finetune_all:
        outputs, updated = model.apply(
          variables, *args, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
        )
        batch_stats = updated["batch_stats"]
      else:
        outputs = model.apply(variables, *args, train=True, rngs={"dropout": rng})
        batch_stats = state["batch_stats"]
      loss, _ = risk_loss(model.risk_heads(outputs, batch), DEFAULT_HEAD_WEIGHTS)
      return loss, batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
      "step": state["step"] + 1,
      "params": optax.apply_updates(state["params"], updates),
      "batch_stats": batch_stats,
      "opt_state": opt_state,
    }
    return new_state, loss

  compiled, compile_s = harness.compile_jax(
    jax.jit(train_step, donate_argnums=0), state, frozen, batch
  )

  def run() -> None:
    nonlocal state
    state, loss = compiled(state, frozen, batch)  # the old state is donated: always rebind
    jax.block_until_ready((state, loss))

  return harness.Case(name, "jax", run, compile_s=compile_s, extra=harness.compiled_stats(compiled))


def torch_model(arch: dict[str, Any]):
  """The torch reference model (BatchNorm statistics randomised, so inference mode matters)."""
  import torch
  from torch_refs.imgfeatalign_torch import ImgFeatAlignTorch
  from torch_refs.mammoregnet_torch import MammoRegNetTorch
  from torch_refs.resnet_torch import randomize_batch_norm

  torch.manual_seed(0)
  model = ImgFeatAlignTorch(
    MammoRegNetTorch(**arch["registration"]),
    width=arch["encoder_width"],
    heads=arch["num_heads"],
    years=NUM_YEARS,
  )
  randomize_batch_norm(model, torch.Generator().manual_seed(0))
  return model


def torch_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def to_nchw(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
  import torch

  return {
    k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2)) if v.ndim == 4 else v)
    for k, v in inputs.items()
  }


def forward_check(
  arch: dict[str, Any], model_t, variables: dict[str, Any], inputs: dict[str, np.ndarray]
) -> dict[str, float]:
  """Max abs differences of eval-mode outputs (risk logits; aligned prior features)."""
  import torch

  model_t.eval()
  with torch.no_grad():
    t_in = to_nchw(inputs)
    expected = model_t(t_in["current_image"], t_in["previous_image"], t_in["time_gap"])
  forward = jax.jit(lambda v, c, p, g: jax_model(arch, False).apply(v, c, p, g, train=False))
  ours = forward(variables, inputs["current_image"], inputs["previous_image"], inputs["time_gap"])
  risk_diff = max(
    float(np.max(np.abs(np.asarray(ours["risk_prediction"][k]) - v.numpy())))
    for k, v in expected["risk_prediction"].items()
  )
  aligned_diff = float(
    np.max(
      np.abs(
        np.asarray(ours["aligned_prior_feature"])
        - expected["aligned_prior_feature"].numpy().transpose(0, 2, 3, 1)
      )
    )
  )
  return {
    "risk_logits_max_abs_diff": risk_diff,
    "aligned_prior_feature_max_abs_diff": aligned_diff,
    "max_abs_flow_pixels": float(np.max(np.abs(expected["deformation_field"].numpy()))),
  }


def torch_case(
  name: str, model_t, inputs: dict[str, np.ndarray], finetune_all: bool
) -> harness.Case:
  """The same step in torch: frozen parts in eval() under no_grad, AdamW on the trainable ones."""
  import torch
  import torch.nn.functional as F
  from torch_refs.imgfeatalign_torch import bcrbench_resize_flow, bcrbench_warp

  registration, encoder, risk = model_t.mammo_reg_net, model_t.encoder, model_t.risk_model
  registration.eval().requires_grad_(False)
  encoder.train(finetune_all).requires_grad_(finetune_all)
  risk.train()
  trainable = [p for p in model_t.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  t_in = to_nchw(inputs)
  current, prior, gap = t_in["current_image"], t_in["previous_image"], t_in["time_gap"]

  def masked_bce(logits, target, mask):
    losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (losses * mask).sum() / mask.sum()

  def encode_both():
    return (encoder(current.expand(-1, 3, -1, -1)), encoder(prior.expand(-1, 3, -1, -1)))

  def run() -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
      flow = registration(current, prior)[1]
      if not finetune_all:
        f_cur, f_pri = encode_both()
    if finetune_all:
      f_cur, f_pri = encode_both()
    aligned = bcrbench_warp(f_pri, bcrbench_resize_flow(flow, f_cur.shape[2:], current.shape[2:]))
    out = risk(f_cur, f_pri, aligned, (f_cur - aligned).abs(), gap)
    weights = DEFAULT_HEAD_WEIGHTS
    loss = (
      weights["fused"] * masked_bce(out["pred_fused"], t_in["target"], t_in["y_mask"])
      + weights["cur"] * masked_bce(out["pred_cur"], t_in["target"], t_in["y_mask"])
      + weights["pri"] * masked_bce(out["pred_pri"], t_in["target_prior"], t_in["y_mask_prior"])
    )
    loss.backward()
    optimizer.step()

  return harness.Case(name, "torch", run)


def jax_only_variables(arch: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, Any]:
  init = jax.jit(
    lambda c, p, g: jax_model(arch, False).init(jax.random.key(0), c, p, g, train=False)
  )
  return nn.meta.unbox(
    init(inputs["current_image"][:1], inputs["previous_image"][:1], inputs["time_gap"][:1])
  )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--sizes",
    type=lambda s: [parse_size(x) for x in s.split(",") if x],
    default=[(512, 416), (1024, 832)],
    help="H x W list, e.g. 512x416,1024x832",
  )
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument(
    "--modes",
    type=lambda s: s.split(","),
    default=list(MODES),
    help=f"comma-separated subset of {MODES}",
  )
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument(
    "--small",
    action="store_true",
    help="64x64, batch 2 and tiny widths: runs in seconds (tests, CI)",
  )
  parser.add_argument("--no_torch", action="store_true", help="time the JAX side only")
  harness.add_host_memory_flag(parser)
  args = parser.parse_args(argv)
  harness.setup_host_memory(args.release_host_memory)
  if unknown := sorted(set(args.modes) - set(MODES)):
    parser.error(f"--modes: unknown {unknown}; choose from {MODES}")
  if args.batch < 1:
    parser.error("--batch must be >= 1")
  arch, sizes, batch = PAPER_ARCH, args.sizes, args.batch
  if args.small:
    arch, sizes, batch = SMALL_ARCH, [(64, 64)], 2

  torch_note = None
  if not args.no_torch:
    try:
      import torch
    except ImportError:
      torch_note = "skipped: torch is not installed"
    else:
      torch.set_num_threads(os.cpu_count())
  else:
    torch_note = "skipped: --no_torch"
  use_torch = torch_note is None

  model_t = None
  if use_torch:
    model_t = torch_model(arch)
    variables = import_imgfeatalign(
      torch_state(model_t), num_heads=arch["num_heads"], registration_hparams=arch["registration"]
    )
  else:
    variables = jax_only_variables(arch, make_inputs(1, sizes[0]))

  results, checks = [], {}
  for size in sizes:
    inputs = make_inputs(batch, size)
    size_name = f"{size[0]}x{size[1]}"
    if use_torch:
      checks[size_name] = forward_check(arch, model_t, variables, inputs)
    for mode in args.modes:
      finetune_all = mode == "finetune"
      name = f"step_{size_name}_b{batch}_{mode}"
      cases = [jax_case(name, arch, variables, inputs, finetune_all)]
      if use_torch:
        # A fresh torch model per case: AdamW state and trained weights do not leak between modes.
        fresh = torch_model(arch)
        cases.append(torch_case(name, fresh, inputs, finetune_all))
      print(
        f"{name}: jax compiled in {cases[0].compile_s:.1f} s; timing", file=sys.stderr, flush=True
      )  # progress on stderr: stdout carries only the JSON
      rows = harness.time_cases(cases, warmup=args.warmup, repeats=args.repeats)
      for row in rows:
        row.update(
          batch_size=batch,
          image_size=list(size),
          mode=mode,
          examples_per_s=batch / (row["median_ms"] / 1e3),
        )
        if "flops" in row:
          row["gflops_per_s"] = row["flops"] / (row["median_ms"] / 1e3) / 1e9
      results.extend(rows)
      del cases

  max_diff = max((c["risk_logits_max_abs_diff"] for c in checks.values()), default=None)
  return harness.report(
    "imgfeatalign_step",
    results,
    architecture={**arch, "bcrbench_flow_compat": True, "num_years": NUM_YEARS},
    optimizer={"name": "adamw", "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY},
    torch=torch_note or "timed",
    forward_check=checks,
    forward_max_abs_diff=max_diff,
  )


if __name__ == "__main__":
  main()
