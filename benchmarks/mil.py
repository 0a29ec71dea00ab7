"""FPN-MIL speed: MIL head on large bags and the whole online model, JAX vs plain torch.

Cases (forward + backward of a deep-supervision BCE loss w.r.t. the trainable parameters):

* ``head/<config>/n=<N>``: one-scale MIL head on bags of N instances of width 256, batch 8, for
  the reference's two best configurations: 'mlp-gated' (masses: MLP + gated attention) and
  'isab-pma' (calcifications: ISAB with ceil(10 log10 N) inducing points + PMA, LayerNorm).
* ``online/<H>x<W>``: EfficientNet-B2 (frozen, static padding) + FPN + MLP / gated-attention head
  on one mammogram cut into 512-px patches (1520x912 -> 3x2 patches), batch 1.

``--small`` shrinks everything (bags of 200 / 2,000, batch 2, a 512x512 image in 256-px patches)
so the run finishes in minutes on a laptop CPU. Prints one JSON object (benchmarks/harness.py).

  python -m benchmarks.mil [--small] [--skip_online] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import harness
from mammojax.convert.mammoclip import import_fpn_mil
from mammojax.losses.mil import deep_supervision_loss
from mammojax.models.mil import FPNMIL, MultiScaleMILHead
from mammojax.nn.efficientnet import MAMMOCLIP_STATIC_SIZE, EfficientNet
from mammojax.nn.fpn import FPN
from mammojax.nn.set_transformer import num_inducing_points
from tests.torch_refs.efficientnet_torch import TorchEfficientNet
from tests.torch_refs.fpn_mil_torch import TorchFPN, TorchFPNMIL

WIDTH = 256
CONFIGS = {
  "mlp-gated": dict(encoder_type="mlp", pooling_type="gated-attention", layer_norm=False),
  "isab-pma": dict(encoder_type="isab", pooling_type="pma", layer_norm=True),
}


def _torch_step(model: torch.nn.Module, inputs, labels: torch.Tensor):
  params = [p for p in model.parameters() if p.requires_grad]
  bce = torch.nn.BCEWithLogitsLoss()

  def step():
    for p in params:
      p.grad = None
    logits, side, _ = model(inputs)
    loss = bce(logits, labels) + sum(bce(side[:, s], labels) for s in range(side.shape[1]))
    loss.backward()
    return loss

  return step


def _jax_case(name: str, model: FPNMIL, variables, inputs, labels, trainable) -> harness.Case:
  """Compiles grad of the deep-supervision loss w.r.t. the ``trainable`` top-level params."""
  params = {k: v for k, v in variables["params"].items() if k in trainable}
  frozen = {
    **variables,
    "params": {k: v for k, v in variables["params"].items() if k not in trainable},
  }

  def loss(params, frozen, inputs, labels):
    out = model.apply({**frozen, "params": {**frozen["params"], **params}}, inputs)
    return deep_supervision_loss(out["logits"], out["scale_logits"], labels)

  grad = jax.jit(jax.value_and_grad(loss))
  compiled, compile_s = harness.compile_jax(grad, params, frozen, inputs, labels)
  return harness.Case(
    name,
    "jax",
    lambda: jax.block_until_ready(compiled(params, frozen, inputs, labels)),
    compile_s=compile_s,
  )


def head_cases(bag_sizes, batch: int) -> list[harness.Case]:
  cases = []
  rng = np.random.RandomState(0)
  for config_name, config in CONFIGS.items():
    for n in bag_sizes:
      inducing = num_inducing_points(n)
      torch.manual_seed(0)
      ref = TorchFPNMIL(
        None,
        in_dim=WIDTH,
        dim=WIDTH,
        scales=(16,),
        encoder_type=config["encoder_type"],
        pooling_type=config["pooling_type"],
        num_inducing=(inducing,),
        layer_norm=config["layer_norm"],
      )
      model = FPNMIL(head=MultiScaleMILHead(scales=(16,), num_inducing=(inducing,), **config))
      state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
      variables = import_fpn_mil(state, model)
      x = rng.randn(batch, n, WIDTH).astype(np.float32)
      labels = (np.arange(batch) % 2).astype(np.float32)
      name = f"head/{config_name}/n={n}"
      cases.append(
        _jax_case(
          name, model, variables, {16: jnp.asarray(x)}, jnp.asarray(labels), trainable=("head",)
        )
      )
      cases[-1].extra.update(batch=batch, instances=n, width=WIDTH, inducing=inducing)
      cases.append(
        harness.Case(
          name, "torch", _torch_step(ref, {16: torch.from_numpy(x)}, torch.from_numpy(labels))
        )
      )
  return cases


def online_cases(image_size: tuple[int, int], patch: int) -> list[harness.Case]:
  grid = (math.ceil(image_size[0] / patch), math.ceil(image_size[1] / patch))
  patches = np.random.RandomState(1).randn(1, grid[0] * grid[1], patch, patch, 3)
  patches = patches.astype(np.float32)
  torch.manual_seed(0)
  backbone = TorchEfficientNet(static_size=MAMMOCLIP_STATIC_SIZE)
  for p in backbone.parameters():
    p.requires_grad = False
  ref = TorchFPNMIL(TorchFPN(backbone, features=WIDTH), in_dim=WIDTH, dim=WIDTH).eval()
  model = FPNMIL(
    head=MultiScaleMILHead(),
    fpn=FPN(WIDTH),
    backbone=EfficientNet(static_padding_size=MAMMOCLIP_STATIC_SIZE),
  )
  variables = import_fpn_mil({k: v.detach().numpy() for k, v in ref.state_dict().items()}, model)
  labels = np.ones((1,), np.float32)
  name = f"online/{image_size[0]}x{image_size[1]}"
  case = _jax_case(
    name, model, variables, jnp.asarray(patches), jnp.asarray(labels), trainable=("fpn", "head")
  )
  case.extra.update(patches=grid[0] * grid[1], patch_size=patch, backbone="frozen")
  return [
    case,
    harness.Case(
      name,
      "torch",
      _torch_step(ref, torch.from_numpy(patches).permute(0, 1, 4, 2, 3), torch.from_numpy(labels)),
    ),
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="small sizes for a quick check")
  parser.add_argument("--skip_online", action="store_true", help="only the MIL head cases")
  parser.add_argument("--skip_head", action="store_true", help="only the whole-model case")
  parser.add_argument("--repeats", type=int, default=5)
  harness.add_host_memory_flag(parser)
  args = parser.parse_args()
  harness.setup_host_memory(args.release_host_memory)
  start = time.perf_counter()
  bag_sizes, batch = ((200, 2000), 2) if args.small else ((2000, 20000), 8)
  image, patch = ((512, 512), 256) if args.small else ((1520, 912), 512)
  cases = [] if args.skip_head else head_cases(bag_sizes, batch)
  if not args.skip_online:
    cases += online_cases(image, patch)
  results = harness.time_cases(cases, warmup=1, repeats=args.repeats)
  harness.report("mil", results, small=args.small, wall_s=time.perf_counter() - start)


if __name__ == "__main__":
  main()
