"""Temporal-GradCam speed: frozen backbone feature extraction and temporal-model train steps.

Cases, JAX against PyTorch in the same process, timed interleaved (benchmarks/harness.py):

* ``extract/resnet18/<size>``: pooled features ``[B, 512]`` of a frozen ResNet-18 (inference:
  BatchNorm on running statistics, no gradient), batch 32 at 256x256. JAX:
  :class:`mammojax.nn.resnet.ResNet` jitted on channels-last images; torch:
  ``torchvision.models.resnet18()`` with ``fc = Identity`` in ``eval()`` under
  ``torch.inference_mode()`` on NCHW images.
* ``extract/vit_b16/<size>``: the same for ViT-B/16 at 224x224 (the class token after the final
  LayerNorm, ``[B, 768]``): :func:`mammojax.nn.vit.vit_b16` against
  ``torchvision.models.vit_b_16()`` with ``heads = Identity``.
* ``temporal_step/<kind>`` for ``dnn``, ``gru``, ``transformer``: one training step (forward,
  cross-entropy, backward, Adam update at lr 1e-3) of
  :func:`mammojax.models.temporal.build_temporal_model` (its default sizes: hidden 64; GRU time
  encoding 16; transformer 2 pre-norm blocks of width 64, 4 heads, MLP 128) over features
  ``[64, 3, 512]`` with a mask (end padding) and time offsets.

Extraction: both sides hold the same weights (torchvision's default init; the state dict is
converted with :func:`mammojax.convert.resnet.import_resnet` / :func:`mammojax.convert.vit.
import_vit`), and before timing one batch's features are compared (``max_abs_diff``, which must
be within 1e-3, and ``max_abs_feature`` for scale); ``images_per_s`` is batch / median seconds.

Temporal steps: the torch modules written here (flatten -> Linear -> BatchNorm1d -> Dropout ->
Linear; ``nn.GRU`` over the features and a sinusoidal time encoding + Linear; Linear embedding +
time encoding + ``nn.TransformerEncoder`` (pre-norm, GELU) + LayerNorm + Linear on the current
token) do the same amount and kind of work as the JAX models, but they are SPEED REFERENCES
ONLY: their weights are their own and nothing checks that they compute the same function (the
parity tests of the temporal models live in tests/test_temporal_models.py).

Every JAX case is jitted on arguments (weights are not baked in as constants), compiled ahead of
time (``compile_s``, reported apart from the timings); a train step donates its state.
``--small`` shrinks everything (64x64 images, a 2-block ViT at 32x32, batch 4; temporal batch 8)
so the run takes seconds. Prints one JSON object. torch uses its default intra-op threads (one
per core) unless ``--torch_threads`` says otherwise: on a machine another job keeps busy those
threads wait on one another (small temporal steps slow down by 10x or more), so note the load,
and compare with ``--torch_threads=1`` there.

  python -m benchmarks.temporal [--small] [--repeats 5] [--batch 32] [--skip_vit]
"""

from __future__ import annotations

import argparse
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import linen as nn

from benchmarks import harness
from mammojax.convert.resnet import import_resnet
from mammojax.convert.vit import import_vit
from mammojax.models.temporal import build_temporal_model
from mammojax.nn.resnet import ResNet
from mammojax.nn.time_encoding import sinusoid_table
from mammojax.nn.vit import VisionTransformer, vit_b16

TEMPORAL_KINDS = ("dnn", "gru", "transformer")
NUM_CLASSES = 2
LEARNING_RATE = 1e-3
FEATURE_TOLERANCE = 1e-3
# The small ViT of --small (the same on both sides).
SMALL_VIT = dict(image_size=32, patch_size=8, hidden_dim=64, depth=2, num_heads=4, mlp_dim=128)
# The temporal models' defaults (mammojax/models/temporal.py), mirrored by the torch references.
HIDDEN_DIM = 64
TIME_DIM = 16
MAX_TIME = 10.0
TIME_STEPS = 240
DROPOUT_RATE = 0.1


def import_torchvision() -> types.ModuleType:
  """``torchvision``, through the tests' import shim (its CUDA ops fail beside the CPU torch).

  The shim reports a missing torchvision with ``pytest.skip``; here that becomes a clear error.
  """
  import pytest

  from tests.torch_refs.torchvision_import import import_torchvision as shim

  try:
    return shim()
  except pytest.skip.Exception as e:
    raise SystemExit(f"benchmarks.temporal needs torchvision: {e}") from None


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _extraction_cases(
  name: str,
  model: nn.Module,
  variables: dict[str, Any],
  apply: Callable[..., jax.Array],
  torch_model: torch.nn.Module,
  images: np.ndarray,
) -> list[harness.Case]:
  """A JAX and a torch case extracting features of the same ``images [B, H, W, 3]``.

  ``apply(model, variables, images)`` runs the JAX model in inference mode. Raises
  RuntimeError when the two sides' features differ by more than :data:`FEATURE_TOLERANCE`.
  """
  torch_model.eval()
  variables = jax.device_put(variables)
  x = jax.device_put(jnp.asarray(images))
  extract = jax.jit(lambda v, x: apply(model, v, x))
  compiled, compile_s = harness.compile_jax(extract, variables, x)
  x_t = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

  def run_torch() -> torch.Tensor:
    with torch.inference_mode():
      return torch_model(x_t)

  ours = np.asarray(compiled(variables, x))
  theirs = run_torch().numpy()
  if ours.shape != theirs.shape:
    raise RuntimeError(f"{name}: JAX features {ours.shape} but torch {theirs.shape}")
  diff = float(np.max(np.abs(ours.astype(np.float64) - theirs)))
  if not diff <= FEATURE_TOLERANCE:
    raise RuntimeError(
      f"{name}: JAX and torch features differ by {diff:.3g} > {FEATURE_TOLERANCE} (the two "
      "sides must compute the same function for the timings to compare)"
    )
  batch = images.shape[0]
  check = {
    "batch": batch,
    "image_size": images.shape[1],
    "feature_dim": ours.shape[-1],
    "max_abs_diff": diff,
    "max_abs_feature": float(np.max(np.abs(theirs))),
  }
  stats = harness.compiled_stats(compiled)
  return [
    harness.Case(
      name,
      "jax",
      lambda: jax.block_until_ready(compiled(variables, x)),
      compile_s=compile_s,
      extra={**check, **stats},
    ),
    harness.Case(name, "torch", run_torch, extra=dict(check)),
  ]


def resnet_cases(torchvision: types.ModuleType, size: int, batch: int) -> list[harness.Case]:
  """``extract/resnet18/<size>``: torchvision ResNet-18 (default init) and its import."""
  torch.manual_seed(0)
  torch_model = torchvision.models.resnet18()
  torch_model.fc = torch.nn.Identity()
  variables, fields, _ = import_resnet(_state_dict(torch_model))
  images = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)

  def apply(model: nn.Module, v: dict[str, Any], x: jax.Array) -> jax.Array:
    return model.apply(v, x, use_running_average=True)

  return _extraction_cases(
    f"extract/resnet18/{size}", ResNet(**fields), variables, apply, torch_model.eval(), images
  )


def vit_cases(torchvision: types.ModuleType, small: bool, batch: int) -> list[harness.Case]:
  """``extract/vit_b16/224`` (or ``extract/vit_small/32``): torchvision ViT and its import."""
  torch.manual_seed(0)
  if small:
    model = VisionTransformer(**SMALL_VIT)
    torch_model = torchvision.models.vision_transformer.VisionTransformer(
      image_size=SMALL_VIT["image_size"],
      patch_size=SMALL_VIT["patch_size"],
      num_layers=SMALL_VIT["depth"],
      num_heads=SMALL_VIT["num_heads"],
      hidden_dim=SMALL_VIT["hidden_dim"],
      mlp_dim=SMALL_VIT["mlp_dim"],
    )
    name = f"extract/vit_small/{model.image_size}"
  else:
    model = vit_b16()
    torch_model = torchvision.models.vit_b_16()
    name = f"extract/vit_b16/{model.image_size}"
  torch_model.heads = torch.nn.Identity()
  variables, fields, _ = import_vit(_state_dict(torch_model), num_heads=model.num_heads)
  expected = {k: getattr(model, k) for k in fields}
  if fields != expected:
    raise RuntimeError(f"{name}: imported ViT fields {fields} differ from the model's {expected}")
  size = model.image_size
  images = np.random.default_rng(1).normal(size=(batch, size, size, 3)).astype(np.float32)

  def apply(model: nn.Module, v: dict[str, Any], x: jax.Array) -> jax.Array:
    return model.apply(v, x, train=False)

  return _extraction_cases(name, model, variables, apply, torch_model.eval(), images)


def temporal_inputs(batch: int, length: int, dim: int, seed: int = 2) -> dict[str, np.ndarray]:
  """Features ``[B, L, D]`` (zeros at padding), an end-padded mask with 1..L real images per
  row, time offsets in years before the current (newest real) image, integer labels."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, length + 1, size=batch)
  mask = np.arange(length)[None, :] < counts[:, None]
  gaps = rng.uniform(0.5, 2.5, size=(batch, length))
  # Offset of image t = sum of the gaps between it and the current image (index counts - 1).
  after = np.cumsum(gaps[:, ::-1], axis=1)[:, ::-1] - gaps
  offsets = np.where(mask, after - np.take_along_axis(after, counts[:, None] - 1, axis=1), 0.0)
  features = rng.normal(size=(batch, length, dim)) * mask[..., None]
  return {
    "features": features.astype(np.float32),
    "mask": mask,
    "time_offsets": offsets.astype(np.float32),
    "labels": rng.integers(0, NUM_CLASSES, size=batch).astype(np.int32),
  }


def jax_temporal_case(kind: str, inputs: dict[str, np.ndarray]) -> harness.Case:
  """The compiled Adam train step of ``build_temporal_model(kind, 2)``, state donated."""
  model = build_temporal_model(kind, NUM_CLASSES)
  batch = jax.device_put({k: jnp.asarray(v) for k, v in inputs.items()})
  args = (batch["features"], batch["mask"], batch["time_offsets"])
  variables = nn.meta.unbox(model.init(jax.random.key(0), *args, train=False))
  tx = optax.adam(LEARNING_RATE)
  has_stats = "batch_stats" in variables
  state = {
    "step": jnp.zeros((), jnp.int32),
    "params": variables["params"],
    "batch_stats": variables.get("batch_stats", {}),
    "opt_state": tx.init(variables["params"]),
  }
  dropout_key = jax.random.key(1)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[Any, jax.Array]:
    rng = jax.random.fold_in(dropout_key, state["step"])
    args = (batch["features"], batch["mask"], batch["time_offsets"])

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
      if has_stats:
        logits, updated = model.apply(
          {"params": params, "batch_stats": state["batch_stats"]},
          *args,
          train=True,
          rngs={"dropout": rng},
          mutable=["batch_stats"],
        )
        stats = updated["batch_stats"]
      else:
        logits = model.apply({"params": params}, *args, train=True, rngs={"dropout": rng})
        stats = state["batch_stats"]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
      return loss, stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
      "step": state["step"] + 1,
      "params": optax.apply_updates(state["params"], updates),
      "batch_stats": stats,
      "opt_state": opt_state,
    }
    return new_state, loss

  compiled, compile_s = harness.compile_jax(jax.jit(train_step, donate_argnums=0), state, batch)

  def run() -> None:
    nonlocal state
    state, loss = compiled(state, batch)  # the old state is donated: always rebind
    jax.block_until_ready((state, loss))

  return harness.Case(
    f"temporal_step/{kind}", "jax", run, compile_s=compile_s, extra=harness.compiled_stats(compiled)
  )


class TorchTimeEncoding(torch.nn.Module):
  """The JAX models' continuous sinusoidal time encoding: ``[B, L]`` years -> ``[B, L, dim]``."""

  def __init__(self, dim: int):
    super().__init__()
    self.register_buffer("table", torch.from_numpy(sinusoid_table(dim, MAX_TIME, TIME_STEPS)))

  def forward(self, offsets: torch.Tensor) -> torch.Tensor:
    steps = self.table.shape[0]
    position = offsets.clamp(0.0, MAX_TIME) * ((steps - 1) / MAX_TIME)
    lower = position.floor()
    alpha = (position - lower)[..., None]
    upper = (lower + 1).clamp(max=steps - 1)
    return (1 - alpha) * self.table[lower.long()] + alpha * self.table[upper.long()]


def _current_token(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  """The token of the newest real image: ``[B, L, D], [B, L] bool -> [B, D]``."""
  length = mask.shape[1]
  index = length - 1 - torch.argmax(mask.flip(1).int(), dim=1)
  return tokens[torch.arange(tokens.shape[0]), index]


class TorchTemporalDNN(torch.nn.Module):
  """flatten -> Linear(L*D, 64) -> BatchNorm1d -> Dropout -> Linear(64, 2) (the reference's)."""

  def __init__(self, length: int, dim: int):
    super().__init__()
    self.input = torch.nn.Linear(length * dim, HIDDEN_DIM)
    self.bn = torch.nn.BatchNorm1d(HIDDEN_DIM)
    self.dropout = torch.nn.Dropout(DROPOUT_RATE)
    self.projection = torch.nn.Linear(HIDDEN_DIM, NUM_CLASSES)

  def forward(self, features, mask, offsets):
    del mask, offsets
    x = self.input(features.flatten(1))
    return self.projection(self.dropout(self.bn(x)))


class TorchTemporalGRU(torch.nn.Module):
  """``nn.GRU`` over [features, time encoding]; the state after the current image -> Linear.

  As in the JAX model a padded step leaves the state unchanged: with end padding that is the
  state at the current image, read here from the GRU's outputs.
  """

  def __init__(self, dim: int):
    super().__init__()
    self.time = TorchTimeEncoding(TIME_DIM)
    self.gru = torch.nn.GRU(dim + TIME_DIM, HIDDEN_DIM, batch_first=True)
    self.dropout = torch.nn.Dropout(DROPOUT_RATE)
    self.head = torch.nn.Linear(HIDDEN_DIM, NUM_CLASSES)

  def forward(self, features, mask, offsets):
    outputs, _ = self.gru(torch.cat([features, self.time(offsets)], dim=-1))
    return self.head(self.dropout(_current_token(outputs, mask)))


class TorchTemporalTransformer(torch.nn.Module):
  """Linear(D, 64) + time encoding -> 2 pre-norm encoder layers (padded keys masked) ->
  LayerNorm -> Linear on the current image's token."""

  def __init__(self, dim: int):
    super().__init__()
    self.embed = torch.nn.Linear(dim, HIDDEN_DIM)
    self.time = TorchTimeEncoding(HIDDEN_DIM)
    self.dropout = torch.nn.Dropout(DROPOUT_RATE)
    layer = torch.nn.TransformerEncoderLayer(
      HIDDEN_DIM,
      nhead=4,
      dim_feedforward=128,
      dropout=DROPOUT_RATE,
      activation="gelu",
      batch_first=True,
      norm_first=True,
    )
    self.encoder = torch.nn.TransformerEncoder(
      layer, num_layers=2, norm=torch.nn.LayerNorm(HIDDEN_DIM), enable_nested_tensor=False
    )
    self.head = torch.nn.Linear(HIDDEN_DIM, NUM_CLASSES)

  def forward(self, features, mask, offsets):
    tokens = self.dropout(self.embed(features) + self.time(offsets))
    tokens = self.encoder(tokens, src_key_padding_mask=~mask)
    return self.head(self.dropout(_current_token(tokens, mask)))


def torch_temporal_case(kind: str, inputs: dict[str, np.ndarray]) -> harness.Case:
  """The torch reference's train step: zero grads, forward, cross-entropy, backward, Adam."""
  torch.manual_seed(0)
  _, length, dim = inputs["features"].shape
  model = {
    "dnn": lambda: TorchTemporalDNN(length, dim),
    "gru": lambda: TorchTemporalGRU(dim),
    "transformer": lambda: TorchTemporalTransformer(dim),
  }[kind]().train()
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
  features = torch.from_numpy(inputs["features"])
  mask = torch.from_numpy(inputs["mask"])
  offsets = torch.from_numpy(inputs["time_offsets"])
  labels = torch.from_numpy(inputs["labels"]).long()

  def step() -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(features, mask, offsets), labels)
    loss.backward()
    optimizer.step()
    return loss

  return harness.Case(f"temporal_step/{kind}", "torch", step)


def temporal_cases(batch: int, length: int, dim: int) -> list[harness.Case]:
  inputs = temporal_inputs(batch, length, dim)
  shape = {"batch": batch, "length": length, "feature_dim": dim}
  cases = []
  for kind in TEMPORAL_KINDS:
    for case in (jax_temporal_case(kind, inputs), torch_temporal_case(kind, inputs)):
      case.extra.update(shape)
      cases.append(case)
  return cases


def add_images_per_s(results: list[dict[str, Any]]) -> None:
  """``images_per_s = batch / median seconds`` on every extraction row."""
  for row in results:
    if row["name"].startswith("extract/"):
      row["images_per_s"] = row["batch"] * 1e3 / row["median_ms"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="tiny sizes for a quick check")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each case")
  parser.add_argument(
    "--batch", type=int, default=None, help="images per extraction batch (32; --small: 4)"
  )
  parser.add_argument(
    "--temporal_batch", type=int, default=None, help="sequences per train step (64; --small: 8)"
  )
  parser.add_argument("--skip_vit", action="store_true", help="no ViT extraction case")
  parser.add_argument("--skip_extract", action="store_true", help="only the temporal steps")
  parser.add_argument("--skip_temporal", action="store_true", help="only the extraction cases")
  parser.add_argument(
    "--torch_threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
  )
  harness.add_host_memory_flag(parser)
  args = parser.parse_args()
  harness.setup_host_memory(args.release_host_memory)
  if args.torch_threads > 0:
    torch.set_num_threads(args.torch_threads)
  start = time.perf_counter()
  batch = args.batch or (4 if args.small else 32)
  temporal_batch = args.temporal_batch or (8 if args.small else 64)
  cases: list[harness.Case] = []
  if not args.skip_extract:
    torchvision = import_torchvision()
    cases += resnet_cases(torchvision, 64 if args.small else 256, batch)
    if not args.skip_vit:
      cases += vit_cases(torchvision, args.small, batch)
  if not args.skip_temporal:
    cases += temporal_cases(temporal_batch, 3, 512)
  results = harness.time_cases(cases, warmup=args.warmup, repeats=args.repeats)
  add_images_per_s(results)
  harness.report("temporal", results, small=args.small, wall_s=time.perf_counter() - start)


if __name__ == "__main__":
  main()
