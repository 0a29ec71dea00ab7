"""``python -m mammojax.convert <kind> <file> --out=<dir>``: PyTorch checkpoint -> Flax variables.

Reads a .pt/.pth/.tar/.p file with torch (the ``torch`` extra), converts it and writes the
variable tree with ``mammojax.convert.store.save_variables`` (``<dir>/variables`` +
``<dir>/source.json``, which records the file, its SHA-256 and the model fields to build the
matching Flax module with). ``--config.init_from=<dir>`` in a training config then loads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

KINDS_HELP = """kinds:
  icon          ICON / GradICON / uniGradICON registration network (state dict of a
                TwoStep/Downsample/FunctionFromVectorField tree of UNet2s, optionally under a
                loss wrapper's 'regis_net.'). Flag: --input_shape (required: the grid it was
                trained on, e.g. 175,175,175). `python -m mammojax.register --model DIR` uses it.
  imgfeatalign  BCRBench ImgFeatAlign checkpoint (model.state_dict(), optionally inside
                {'model': ...}, 'module.' prefixes allowed): Mirai encoder (encoder.0-8),
                MammoRegNet (mammo_reg_net.*) and the attention risk model. Flags: --num_heads
                (not stored in the weights; BCRBench 8), --max_time (5.0, checked against the
                stored time table), --registration_hparams (JSON, MammoRegNet sizes).
                Build the model as ImgFeatAlign(registration=MammoRegNet(**registration_hparams),
                **model_fields from source.json).
  mammoclip     Mammo-CLIP EfficientNet-B2 image encoder (.tar with a 'model' state dict, keys
                prefixed 'image_encoder.') -> EfficientNet variables with Mammo-CLIP's static
                "same" padding (260x260).
  mammoregnet   MammoRegNet state dict (Longitudinal_Mammogram_Alignment / BCRBench
                best_model_registration_*.pth). Flag: --registration_hparams (JSON).
  mirai         Mirai ResNet-18 backbone -> MiraiResNet18 variables, from a state dict in
                Mirai's layout (e.g. module._model.layer1_0.conv1.weight) or BCRBench's
                (encoder.0..8.*); heads and pooling are skipped. Released Mirai snapshots
                (mgh_mammo_MIRAI_Base_May20_2019.p) are pickled modules: first, where Mirai's
                onconet is importable, run
                  m = torch.load(path, map_location='cpu', weights_only=False)
                  torch.save(m.state_dict(), 'mirai_state.pt')
                and convert mirai_state.pt.
"""


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _convert_imgfeatalign(state_dict: dict, args: argparse.Namespace) -> tuple[dict, dict]:
  from mammojax.convert.imgfeatalign import import_imgfeatalign, infer_hparams

  variables = import_imgfeatalign(
    state_dict,
    num_heads=args.num_heads,
    max_time=args.max_time,
    registration_hparams=args.registration_hparams,
  )
  fields = dict(infer_hparams(state_dict), num_heads=args.num_heads, max_time=args.max_time)
  return variables, {"model_fields": fields, "registration_hparams": args.registration_hparams}


def _convert_icon(state_dict: dict, args: argparse.Namespace) -> tuple[dict, dict]:
  from mammojax.convert.icon import describe_icon_tree, import_icon_registration

  if not args.input_shape:
    raise ValueError(
      "--input_shape is required for icon checkpoints (the grid the network was "
      "trained on, e.g. --input_shape=175,175,175)"
    )
  return import_icon_registration(state_dict), {
    "model_fields": describe_icon_tree(state_dict),
    "input_shape": list(args.input_shape),
  }


def _convert_mammoregnet(state_dict: dict, args: argparse.Namespace) -> tuple[dict, dict]:
  from mammojax.convert.mammoregnet import import_mammoregnet

  variables = import_mammoregnet(state_dict, **args.registration_hparams)
  return variables, {"model_fields": args.registration_hparams}


def _convert_mirai(state_dict: dict, args: argparse.Namespace) -> tuple[dict, dict]:
  del args
  from mammojax.convert.mirai import backbone_width, find_backbone, import_backbone

  prefixes, layout = find_backbone(state_dict)
  variables, consumed = import_backbone(state_dict, prefixes)
  skipped = sorted(set(state_dict) - consumed)
  return variables, {
    "model_fields": {"base_width": backbone_width(variables)},
    "layout": layout,
    "skipped_keys": skipped,
  }


def _convert_mammoclip(state_dict: dict, args: argparse.Namespace) -> tuple[dict, dict]:
  del args
  from mammojax.convert.mammoclip import MAMMOCLIP_STATIC_SIZE, import_efficientnet

  variables = import_efficientnet(state_dict)
  return variables, {
    "model_fields": {"static_padding_size": list(MAMMOCLIP_STATIC_SIZE), "include_head": False}
  }


CONVERTERS: dict[str, Callable[[dict, argparse.Namespace], tuple[dict, dict]]] = {
  "icon": _convert_icon,
  "imgfeatalign": _convert_imgfeatalign,
  "mammoclip": _convert_mammoclip,
  "mammoregnet": _convert_mammoregnet,
  "mirai": _convert_mirai,
}


def _json_object(text: str) -> dict[str, Any]:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"enc_channels\": 8}'")
  return value


def _shape(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(s) for s in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) not in (2, 3) or min(shape) < 1:
    raise argparse.ArgumentTypeError(f"expected H,W or D,H,W positive integers, got {text!r}")
  return shape


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m mammojax.convert",
    description=__doc__,
    epilog=KINDS_HELP,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("kind", choices=sorted(CONVERTERS), help="what the file holds (see below)")
  parser.add_argument("file", help="PyTorch checkpoint (.pt/.pth/.tar/.p)")
  parser.add_argument("--out", required=True, help="new output directory (must not exist)")
  parser.add_argument(
    "--num_heads",
    type=int,
    default=8,
    help="imgfeatalign: attention heads of the trained model (default 8)",
  )
  parser.add_argument(
    "--max_time",
    type=float,
    default=5.0,
    help="imgfeatalign: time-encoding range in years (default 5.0)",
  )
  parser.add_argument(
    "--registration_hparams",
    type=_json_object,
    default={},
    help="imgfeatalign/mammoregnet: JSON object of MammoRegNet sizes passed to "
    "import_mammoregnet (default: the reference sizes)",
  )
  parser.add_argument(
    "--input_shape",
    type=_shape,
    default=None,
    help="icon: spatial size the network was trained on, e.g. 175,175,175",
  )
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from mammojax.convert.store import save_variables
  from mammojax.convert.torch_files import load_torch_state_dict

  try:
    state_dict = load_torch_state_dict(args.file)
    variables, details = CONVERTERS[args.kind](state_dict, args)
    source = {
      "kind": args.kind,
      "file": os.path.abspath(args.file),
      "sha256": _file_sha256(args.file),
      **details,
    }
    save_variables(args.out, variables, source)
  except (KeyError, ValueError, OSError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: cannot convert {args.file} as {args.kind}: {message}", file=sys.stderr)
    return 1
  print(f"wrote {args.out} ({args.kind} from {args.file})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
