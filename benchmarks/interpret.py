"""Attribution speed: each :mod:`mammojax.interpret` method against Captum on the same ResNet-18.

Cases, JAX against Captum 0.9 in the same process, timed interleaved (benchmarks/harness.py), on
one batch of ``B`` images ``N(0, 1)`` of ``S x S`` (8 at 224x224; ``--small``: 2 at 64x64), each
image with its own target class (random, fixed by a seed), on a ResNet-18 with 1000 classes:

* ``gradcam/layer4``: :func:`mammojax.interpret.gradcam` on ``layer4`` (signed, resized to the
  input with ``'nearest'``, ``[B, S, S]``) against ``LayerGradCam(model, model.layer4)
  .attribute`` (``relu_attributions=False``, both libraries' default) followed by
  ``LayerAttribution.interpolate(cam, (S, S))`` (``'nearest'``), ``[B, 1, S, S]``.
* ``guided_backprop``: :func:`mammojax.interpret.guided_backprop` against
  ``GuidedBackprop(model)``, ``[B, S, S, 3]`` / ``[B, 3, S, S]``.
* ``guided_gradcam/layer4``: :func:`mammojax.interpret.guided_gradcam` against
  ``GuidedGradCam(model, model.layer4)`` (``'nearest'``). Both do a guided and a plain forward
  and backward pass.
* ``integrated_gradients/<n>``: :func:`mammojax.interpret.integrated_gradients` against
  ``IntegratedGradients(model)``: zero baseline, ``n`` Gauss-Legendre points (32; ``--small``:
  4; ``'gausslegendre'`` is Captum's default), ``internal_batch_size`` rows (examples times
  points) per forward pass on both sides (32: 4 points of 8 examples; ``--small``: 4), so
  ``B * n / internal_batch_size`` passes of a scan (JAX) or a Python loop (Captum). The JAX
  function always returns the convergence delta (one more forward pass over the ``2 B`` inputs
  and baselines), so Captum is asked for it too (``return_convergence_delta=True``).
* ``gradient_shap/<n>``: :func:`mammojax.interpret.gradient_shap` against ``GradientShap(model)``
  with ``n`` samples per example (``n_samples``, 32; ``--small``: 4), baselines drawn from
  :data:`SHAP_BASELINES` fixed random images ``0.5 N(0, 1)``, input noise ``stdevs =``
  :data:`SHAP_STDEVS`. Captum's ``GradientShap`` has no ``internal_batch_size``: it runs all
  ``B * n`` rows in one forward and backward pass, and so does the JAX side here
  (``internal_batch_size=None``); at 224x224 that is 256 rows, several GiB of activations on
  each side.

Both sides hold the same weights: torchvision's ``resnet18()`` default init (BatchNorm running
statistics 0 and 1), in ``eval()``, its state dict converted with
:func:`mammojax.convert.resnet.import_resnet` into :class:`mammojax.nn.resnet.ResNet` behind
:func:`mammojax.interpret.resnet_adapter`. JAX takes channels-last images ``[B, S, S, 3]``, torch
the same values NCHW.

Checks, before timing: for the deterministic methods (all but gradient SHAP) the first call's
maps are compared, Captum's transposed to channels-last (``max_abs_diff``; ``map_min``,
``map_max``: the range of Captum's map; ``relative_diff = max_abs_diff / max |map|``, which must
be within :data:`RELATIVE_TOLERANCE`, or the run stops), and for integrated gradients the
convergence deltas too (``delta_max_abs_diff``, reported only). Integrated gradients evaluate the
network at many points, and in float32 a few of them fall within rounding of a ReLU's kink where
torch and XLA take different sides (mammojax/interpret/integrated.py: 5e-4 of the map's range),
so its ``relative_diff`` is larger than the others' (1e-6 or so). Gradient SHAP draws its own
random numbers on each side: only the shapes are compared, and ``max_abs_map`` is reported.

Timing and compile time: the JAX side is timed as a user calls it, through the public functions
(each jits its network part on the adapter, a pytree whose leaves are the weights, so the
weights are arguments, not constants; a few cheap steps, e.g. GradCAM's channel sum and resizing,
run as separately dispatched ops). There is no single program to compile ahead of time, so each
case in turn starts from empty caches (``jax.clear_caches()``: its compile time is its own, not
shared with an earlier case, e.g. guided GradCAM's reuse of the guided backprop and GradCAM
programs), its first JAX call is timed (``first_call_s``: tracing, compiling, one run), and
``compile_s = first_call_s - median`` of its steady-state calls. Then its two sides are timed
interleaved, after ``--warmup`` untimed calls each, before the next case starts (so only one
case's programs and buffers are alive at a time). torch uses its default intra-op threads (one
per core) unless ``--torch_threads`` says otherwise; XLA uses every core. ``goal`` reports which
cases meet JAX / Captum <= :data:`GOAL_RATIO`. Prints one JSON object on stdout.

``--small`` (64x64) is a quick check of the code, not of speed: ResNet-18's ``layer4`` is then
2x2, where XLA:CPU's 3x3 convolution of 512 channels is many times slower than torch's (on the
2-core VM; at 224x224 layer4 is 7x7 and the two are close), so its ratios say little about the
224x224 ones.

  python -m benchmarks.interpret [--small] [--repeats 5] [--warmup 1] [--batch 8] [--size 224]
    [--steps 32] [--internal_batch_size 32] [--cases gradcam,integrated_gradients]
    [--torch_threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch

from benchmarks import harness
from mammojax import interpret
from mammojax.convert.resnet import import_resnet
from mammojax.nn.resnet import ResNet

METHODS = (
  "gradcam",
  "guided_backprop",
  "guided_gradcam",
  "integrated_gradients",
  "gradient_shap",
)
LAYER = "layer4"
NUM_CLASSES = 1000  # torchvision's resnet18() head
SHAP_BASELINES = 4
SHAP_STDEVS = 0.1
RELATIVE_TOLERANCE = 1e-2
GOAL_RATIO = 0.5
# Captum's notes on its own hooks (stderr only, but noisy).
CAPTUM_WARNINGS = (
  "Input Tensor 0 did not already require gradients",
  "Setting backward hooks on ReLU activations",
)

Outputs = dict[str, Any]


def import_torchvision_and_captum() -> tuple[types.ModuleType, types.ModuleType]:
  """``torchvision`` (through the tests' import shim, as benchmarks/temporal.py does) and
  ``captum.attr``; a missing one is a clear error."""
  import pytest

  from tests.torch_refs.torchvision_import import import_torchvision as shim

  try:
    torchvision = shim()
  except pytest.skip.Exception as e:
    raise SystemExit(f"benchmarks.interpret needs torchvision: {e}") from None
  try:
    import captum.attr as captum_attr
  except ImportError as e:
    raise SystemExit(f"benchmarks.interpret needs captum (pip install captum): {e}") from None
  return torchvision, captum_attr


@dataclasses.dataclass
class Setup:
  """The shared inputs of every case: the two models and one batch, in both layouts."""

  adapter: interpret.ModelAdapter
  model: torch.nn.Module
  images: jax.Array  # [B, S, S, 3]
  images_t: torch.Tensor  # [B, 3, S, S]
  target: np.ndarray  # [B] int
  target_t: torch.Tensor
  baselines: jax.Array  # [SHAP_BASELINES, S, S, 3]
  baselines_t: torch.Tensor
  steps: int
  internal_batch_size: int


def _nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def build_setup(
  torchvision: types.ModuleType, size: int, batch: int, steps: int, internal_batch_size: int
) -> Setup:
  """torchvision's ResNet-18 (default init, ``eval()``), its import, images and targets."""
  torch.manual_seed(0)
  model = torchvision.models.resnet18().eval()
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  variables, fields, _ = import_resnet(state)
  adapter = interpret.resnet_adapter(ResNet(**fields), jax.device_put(variables))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  baselines = (0.5 * rng.normal(size=(SHAP_BASELINES, size, size, 3))).astype(np.float32)
  target = rng.integers(0, NUM_CLASSES, size=batch)
  return Setup(
    adapter=adapter,
    model=model,
    images=jax.device_put(images),
    images_t=_nchw(images),
    target=target,
    target_t=torch.from_numpy(target),
    baselines=jax.device_put(baselines),
    baselines_t=_nchw(baselines),
    steps=steps,
    internal_batch_size=internal_batch_size,
  )


@dataclasses.dataclass
class Method:
  """One case: the JAX and the Captum call, each returning ``{'map': ..., ['delta': ...]}``
  (the JAX map channels-last, Captum's NCHW as Captum returns it)."""

  name: str
  jax_call: Callable[[], Outputs]
  torch_call: Callable[[], Outputs]
  deterministic: bool
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  torch_extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def gradcam_method(s: Setup, captum_attr: types.ModuleType) -> Method:
  size = tuple(s.images_t.shape[2:])
  layer_gradcam = captum_attr.LayerGradCam(s.model, getattr(s.model, LAYER))

  def run_torch() -> Outputs:
    cam = layer_gradcam.attribute(s.images_t, target=s.target_t)
    return {"map": captum_attr.LayerAttribution.interpolate(cam, size, "nearest")}

  return Method(
    f"gradcam/{LAYER}",
    lambda: {"map": interpret.gradcam(s.adapter, s.images, s.target, LAYER)},
    run_torch,
    deterministic=True,
  )


def guided_backprop_method(s: Setup, captum_attr: types.ModuleType) -> Method:
  guided = captum_attr.GuidedBackprop(s.model)

  def run_jax() -> Outputs:
    out = interpret.guided_backprop(s.adapter, s.images, s.target)
    return {"map": out.attributions, "rectified": out.rectified}

  return Method(
    "guided_backprop",
    run_jax,
    lambda: {"map": guided.attribute(s.images_t, target=s.target_t)},
    deterministic=True,
  )


def guided_gradcam_method(s: Setup, captum_attr: types.ModuleType) -> Method:
  guided_gradcam = captum_attr.GuidedGradCam(s.model, getattr(s.model, LAYER))

  def run_jax() -> Outputs:
    out = interpret.guided_gradcam(s.adapter, s.images, s.target, LAYER)
    return {"map": out.attributions, "rectified": out.rectified}

  return Method(
    f"guided_gradcam/{LAYER}",
    run_jax,
    lambda: {"map": guided_gradcam.attribute(s.images_t, target=s.target_t)},
    deterministic=True,
  )


def integrated_gradients_method(s: Setup, captum_attr: types.ModuleType) -> Method:
  integrated = captum_attr.IntegratedGradients(s.model)

  def run_jax() -> Outputs:
    out = interpret.integrated_gradients(
      s.adapter,
      s.images,
      s.target,
      n_steps=s.steps,
      method="gausslegendre",
      internal_batch_size=s.internal_batch_size,
    )
    return {"map": out.attributions, "delta": out.delta}

  def run_torch() -> Outputs:
    attributions, delta = integrated.attribute(
      s.images_t,
      target=s.target_t,
      n_steps=s.steps,
      method="gausslegendre",
      internal_batch_size=s.internal_batch_size,
      return_convergence_delta=True,
    )
    return {"map": attributions, "delta": delta}

  extra = {"n_steps": s.steps, "internal_batch_size": s.internal_batch_size}
  return Method(
    f"integrated_gradients/{s.steps}",
    run_jax,
    run_torch,
    deterministic=True,
    extra=extra,
    torch_extra=dict(extra),
  )


def gradient_shap_method(s: Setup, captum_attr: types.ModuleType) -> Method:
  shap = captum_attr.GradientShap(s.model)
  key = jax.random.key(0)

  def run_jax() -> Outputs:
    attributions = interpret.gradient_shap(
      s.adapter,
      s.images,
      s.target,
      s.baselines,
      key=key,
      n_samples=s.steps,
      stdevs=SHAP_STDEVS,
      internal_batch_size=None,
    )
    return {"map": attributions}

  def run_torch() -> Outputs:
    attributions = shap.attribute(
      s.images_t, s.baselines_t, n_samples=s.steps, stdevs=SHAP_STDEVS, target=s.target_t
    )
    return {"map": attributions}

  extra = {
    "n_samples": s.steps,
    "stdevs": SHAP_STDEVS,
    "num_baselines": SHAP_BASELINES,
    "internal_batch_size": None,
  }
  return Method(
    f"gradient_shap/{s.steps}",
    run_jax,
    run_torch,
    deterministic=False,
    extra=extra,
    torch_extra=dict(extra),
  )


BUILDERS: dict[str, Callable[[Setup, types.ModuleType], Method]] = {
  "gradcam": gradcam_method,
  "guided_backprop": guided_backprop_method,
  "guided_gradcam": guided_gradcam_method,
  "integrated_gradients": integrated_gradients_method,
  "gradient_shap": gradient_shap_method,
}


def channels_last(theirs: torch.Tensor, ours: np.ndarray) -> np.ndarray:
  """Captum's ``[B, C, H, W]`` (``[B, 1, H, W]`` for a GradCAM map) in our layout."""
  theirs = theirs.detach().numpy()
  if theirs.ndim == 4 and ours.ndim == 3:
    return theirs[:, 0]
  if theirs.ndim == 4:
    return theirs.transpose(0, 2, 3, 1)
  return theirs


def compare(name: str, ours: Outputs, theirs: Outputs, deterministic: bool) -> dict[str, Any]:
  """The parity figures of one case (see the module docstring); raises RuntimeError when the
  shapes differ or a deterministic map is off by more than :data:`RELATIVE_TOLERANCE`."""
  ours_map = np.asarray(ours["map"], np.float64)
  theirs_map = channels_last(theirs["map"], ours_map).astype(np.float64)
  if ours_map.shape != theirs_map.shape:
    raise RuntimeError(f"{name}: JAX map {ours_map.shape} but Captum's {theirs_map.shape}")
  check: dict[str, Any] = {"map_shape": list(ours_map.shape)}
  if "rectified" in ours:
    check["rectified"] = bool(ours["rectified"])
  if not deterministic:
    check["max_abs_map"] = float(np.max(np.abs(ours_map)))
    check["max_abs_map_captum"] = float(np.max(np.abs(theirs_map)))
    return check
  diff = float(np.max(np.abs(ours_map - theirs_map)))
  scale = float(np.max(np.abs(theirs_map)))
  check.update(
    max_abs_diff=diff,
    map_min=float(theirs_map.min()),
    map_max=float(theirs_map.max()),
    relative_diff=diff / scale if scale > 0 else float("inf"),
  )
  if "delta" in ours:
    delta = np.asarray(ours["delta"], np.float64) - theirs["delta"].detach().numpy()
    check["delta_max_abs_diff"] = float(np.max(np.abs(delta)))
  if not check["relative_diff"] <= RELATIVE_TOLERANCE:
    raise RuntimeError(
      f"{name}: JAX and Captum maps differ by {diff:.3g}, {check['relative_diff']:.3g} of the "
      f"map's scale > {RELATIVE_TOLERANCE} (the two sides must compute the same attributions "
      "for the timings to compare)"
    )
  return check


def method_cases(method: Method, shape: dict[str, Any]) -> list[harness.Case]:
  """A JAX and a torch case for ``method``: the JAX side's first call from empty caches timed
  (``first_call_s``), both sides' first outputs compared (:func:`compare`)."""
  jax.clear_caches()
  start = time.perf_counter()
  ours = jax.block_until_ready(method.jax_call())
  first_call_s = time.perf_counter() - start
  theirs = method.torch_call()
  check = compare(method.name, ours, theirs, method.deterministic)

  def run_jax() -> None:
    jax.block_until_ready(method.jax_call()["map"])

  return [
    harness.Case(
      method.name,
      "jax",
      run_jax,
      extra={**shape, **method.extra, **check, "first_call_s": first_call_s},
    ),
    harness.Case(
      method.name, "torch", method.torch_call, extra={**shape, **method.torch_extra, **check}
    ),
  ]


def time_method(
  method: Method, shape: dict[str, Any], warmup: int, repeats: int
) -> list[dict[str, Any]]:
  """The two rows of ``method``: its sides timed interleaved, ``compile_s`` on the JAX row
  (``first_call_s`` minus the steady-state median, see the module docstring)."""
  results = harness.time_cases(method_cases(method, shape), warmup=warmup, repeats=repeats)
  for row in results:
    if "first_call_s" in row:
      row["compile_s"] = row["first_call_s"] - row["median_ms"] / 1e3
  return results


def goal(ratios: dict[str, float]) -> dict[str, Any]:
  """Which cases meet JAX / Captum <= :data:`GOAL_RATIO`."""
  met = {name: ratio <= GOAL_RATIO for name, ratio in ratios.items()}
  return {"max_ratio": GOAL_RATIO, "met": met, "all_met": all(met.values())}


def parse_methods(text: str) -> list[str]:
  """``'gradcam,integrated_gradients'`` -> those methods, in :data:`METHODS`' order."""
  chosen = {name.strip().split("/")[0] for name in text.split(",") if name.strip()}
  unknown = chosen - set(METHODS)
  if unknown:
    raise SystemExit(f"unknown --cases {sorted(unknown)}; choose from {', '.join(METHODS)}")
  return [m for m in METHODS if m in chosen]


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="tiny sizes for a quick check")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each side of a case")
  parser.add_argument("--batch", type=int, default=None, help="images per batch (8; --small: 2)")
  parser.add_argument("--size", type=int, default=None, help="image side (224; --small: 64)")
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help="integration points and gradient SHAP samples (32; --small: 4)",
  )
  parser.add_argument(
    "--internal_batch_size",
    type=int,
    default=None,
    help="integrated gradients' rows per forward pass, both sides (32; --small: 4)",
  )
  parser.add_argument(
    "--cases", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}"
  )
  parser.add_argument(
    "--torch_threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
  )
  harness.add_host_memory_flag(parser)
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  methods = parse_methods(args.cases)
  harness.setup_host_memory(args.release_host_memory)
  if args.torch_threads > 0:
    torch.set_num_threads(args.torch_threads)
  for message in CAPTUM_WARNINGS:
    warnings.filterwarnings("ignore", message=message)
  start = time.perf_counter()
  batch = args.batch or (2 if args.small else 8)
  size = args.size or (64 if args.small else 224)
  steps = args.steps or (4 if args.small else 32)
  internal_batch_size = args.internal_batch_size or (4 if args.small else 32)
  torchvision, captum_attr = import_torchvision_and_captum()
  setup = build_setup(torchvision, size, batch, steps, internal_batch_size)
  shape = {"batch": batch, "image_size": size}
  results: list[dict[str, Any]] = []
  for name in methods:
    method = BUILDERS[name](setup, captum_attr)
    results += time_method(method, shape, args.warmup, args.repeats)
  harness.report(
    "interpret",
    results,
    model="resnet18",
    layer=LAYER,
    goal=goal(harness.ratios(results)),
    small=args.small,
    wall_s=time.perf_counter() - start,
  )


if __name__ == "__main__":
  main()
