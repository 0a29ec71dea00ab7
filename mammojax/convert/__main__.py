"""``python -m mammojax.convert <kind> <file> --out=<dir>``: PyTorch checkpoint -> Flax variables.

Reads a .pt/.pth/.tar/.p file with torch (the ``torch`` extra), converts it and writes the
variable tree with ``mammojax.train.variable_store.save_variables`` (``<dir>/variables`` +
``<dir>/source.json``, which records the file, its SHA-256 and the model fields to build the
matching Flax module with). ``--config.init_from=<dir>`` in a training config then loads it.

kinds:
  fpn_mil       a trained FPN-MIL (PyramidalMILmodel) state dict. Flags: --config (required:
                the FPN-MIL config it was trained with, e.g. configs/fpn_mil.py:calc, which
                decides backbone + FPN + head, FPN + head or head alone), --backbone (a
                Mammo-CLIP .tar to take the backbone from when the checkpoint has none).
                Then --config.init_from=DIR with the same config.
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
                "same" padding (260x260). What is left out (text encoder, projections,
                logit_scale, the encoder's 1x1 head) is printed and listed in source.json's
                'dropped' (key prefix, tensors, parameters). Flag: --include_head keeps the 1x1
                head (model_fields include_head=True, output 'head') and the image projection as
                extra parameters params['image_projection'] that EfficientNet ignores and
                mammojax.convert.mammoclip_projection.mammoclip_image_embedding applies (source.json's
                'image_projection' says linear or mlp); such a directory does not fit an
                encoder without head (FPN-MIL's --config.model.backbone_checkpoint).
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
  resnet        a torchvision ResNet-18/34/50 state dict, e.g. the ImageNet weights a user saved
                with torch.save(torchvision.models.resnet18(weights=...).state_dict(), 'r18.pt');
                nothing is downloaded. Keys may sit behind a prefix ('backbone.', ...); depth,
                base_width and num_classes (0 without 'fc') are read from the weights. Build
                the model as ResNet(**model_fields from source.json).
  unet3d        MONAI BasicUNet state dict with spatial_dims=3 (e.g. torch.save(net.state_dict())
                of monai.networks.nets.BasicUNet; 'module.'/'model.' prefixes allowed);
                features, bias, in/out channels are read from the weights. Affine instance
                norm and upsample='deconv' (MONAI's defaults) only. Build the model as
                BasicUNet(**model_fields from source.json); input [B, D, H, W, in_channels].
  unetr         MONAI UNETR state dict (monai.networks.nets.UNETR, proj_type='conv', instance
                norm). Sizes and the grid are read from the weights; the unused
                vit.blocks.*.norm_cross_attn / cross_attn weights are skipped and listed.
                Flags: --unetr_num_heads (not stored in the weights; MONAI default 12),
                --input_shape (optional: img_size, for a non-cubic patch grid). Build the
                model as UNETR(**model_fields from source.json).
  vit           torchvision vit_b_16 or timm vit_base_patch16_224 state dict (layouts detected).
                Flag: --vit_num_heads (not stored in the weights; default: hidden size / 64).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from mammojax.console import command_flags, fail, run_program
from mammojax.data.records import file_sha256

PROGRAM = "mammojax.convert"


def _convert_imgfeatalign(state_dict: dict, f: flags.FlagValues) -> tuple[dict, dict]:
  from mammojax.convert.imgfeatalign import import_imgfeatalign, infer_hparams

  variables = import_imgfeatalign(
    state_dict,
    num_heads=f.num_heads,
    max_time=f.max_time,
    registration_hparams=_registration_hparams(f),
  )
  fields = dict(infer_hparams(state_dict), num_heads=f.num_heads, max_time=f.max_time)
  return variables, {"model_fields": fields, "registration_hparams": _registration_hparams(f)}


def _convert_icon(state_dict: dict, f: flags.FlagValues) -> tuple[dict, dict]:
  from mammojax.convert.icon import describe_icon_tree, import_icon_registration

  if not f.input_shape:
    raise ValueError(
      "--input_shape is required for icon checkpoints (the grid the network was "
      "trained on, e.g. --input_shape=175,175,175)"
    )
  return import_icon_registration(state_dict), {
    "model_fields": describe_icon_tree(state_dict),
    "input_shape": list(_shape(f.input_shape)),
  }


def _convert_mammoregnet(state_dict: dict, f: flags.FlagValues) -> tuple[dict, dict]:
  from mammojax.convert.mammoregnet import import_mammoregnet

  variables = import_mammoregnet(state_dict, **_registration_hparams(f))
  return variables, {"model_fields": _registration_hparams(f)}


def _convert_mirai(state_dict: dict, f: flags.FlagValues) -> tuple[dict, dict]:
  del f
  from mammojax.convert.mirai import backbone_width, find_backbone, import_backbone

  prefixes, layout = find_backbone(state_dict)
  variables, consumed = import_backbone(state_dict, prefixes)
  skipped = sorted(set(state_dict) - consumed)
  return variables, {
    "model_fields": {"base_width": backbone_width(variables)},
    "layout": layout,
    "skipped_keys": skipped,
  }


def _convert_resnet(state_dict: dict, f: flags.FlagValues) -> tuple[dict, dict]:
  del f
  from mammojax.convert.resnet import import_resnet

  variables, fields, consumed = import_resnet(state_dict)
  return variables, {"model_fields": fields, "skipped_keys": sorted(set(state_dict) - consumed)}


def _convert_vit(state_dict: dict, f: flags.FlagValues) -> tuple[dict, dict]:
  from mammojax.convert.vit import import_vit

  variables, fields, layout = import_vit(state_dict, num_heads=f.vit_num_heads or None)
  return variables, {"model_fields": fields, "layout": layout}


def _convert_unetr(state_dict: dict, f: flags.FlagValues) -> tuple[dict, dict]:
  from mammojax.convert.unetr import import_unetr

  img_size = _shape(f.input_shape) if f.input_shape else None
  variables, fields, skipped = import_unetr(
    state_dict, num_heads=f.unetr_num_heads, img_size=img_size
  )
  if skipped:
    print(f"skipped {len(skipped)} MONAI weights that UNETR never uses: {_listed(skipped)}")
  in_channels = int(variables["params"]["vit"]["conv_proj"]["kernel"].shape[-2])
  fields = dict(fields, img_size=list(fields["img_size"]))
  return variables, {"model_fields": fields, "in_channels": in_channels, "skipped_keys": skipped}


def _convert_unet3d(state_dict: dict, f: flags.FlagValues) -> tuple[dict, dict]:
  del f
  from mammojax.convert.basic_unet import import_basic_unet, infer_basic_unet

  variables, fields = import_basic_unet(state_dict, spatial_dims=3)
  _, in_channels, _ = infer_basic_unet(state_dict)
  fields = dict(fields, features=list(fields["features"]))
  return variables, {"model_fields": fields, "in_channels": in_channels}


def _listed(keys: Sequence[str], shown: int = 4) -> str:
  more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
  return ", ".join(keys[:shown]) + more


def _convert_mammoclip(state_dict: dict, f: flags.FlagValues) -> tuple[dict, dict]:
  from mammojax.convert.mammoclip import MAMMOCLIP_STATIC_SIZE, import_mammoclip

  variables, details = import_mammoclip(state_dict, include_head=f.include_head)
  dropped = details["dropped"]
  if dropped:
    groups = ", ".join(
      f"{g['prefix']} ({g['tensors']} tensor{'s' * (g['tensors'] != 1)}, "
      f"{g['parameters']:,} parameters)"
      for g in dropped
    )
    keep = "" if f.include_head else "; --include_head keeps the image head and projection"
    print(f"dropped {len(dropped)} key prefixes the image encoder does not use: {groups}{keep}")
  if f.include_head and details["image_projection"] is None:
    print("the checkpoint has no image_projection.* weights: kept the encoder's head only")
  return variables, {
    "model_fields": {
      "static_padding_size": list(MAMMOCLIP_STATIC_SIZE),
      "include_head": f.include_head,
    },
    "image_projection": details["image_projection"],
    "dropped": dropped,
  }


def _convert_fpn_mil(state_dict: dict, f: flags.FlagValues) -> tuple[dict, dict]:
  from mammojax import tasks
  from mammojax.convert.mammoclip import import_fpn_mil
  from mammojax.convert.torch_files import load_torch_state_dict

  config = f.config
  if config is None or config.get("task") != "fpn_mil":
    raise ValueError(
      "--config is required for fpn_mil checkpoints: the FPN-MIL config the model was "
      "trained with, e.g. --config=configs/fpn_mil.py:calc"
    )
  model = tasks.build_task(config).model
  backbone = load_torch_state_dict(f.backbone) if f.backbone else None
  variables = import_fpn_mil(state_dict, model, backbone_state_dict=backbone)
  return variables, {
    "config_file": config_flags.get_config_filename(f["config"]),
    "model": config.model.to_dict(),
    "backbone_file": os.path.abspath(f.backbone) if f.backbone else "",
  }


CONVERTERS: dict[str, Callable[[dict, flags.FlagValues], tuple[dict, dict]]] = {
  "fpn_mil": _convert_fpn_mil,
  "icon": _convert_icon,
  "imgfeatalign": _convert_imgfeatalign,
  "mammoclip": _convert_mammoclip,
  "mammoregnet": _convert_mammoregnet,
  "mirai": _convert_mirai,
  "resnet": _convert_resnet,
  "unet3d": _convert_unet3d,
  "unetr": _convert_unetr,
  "vit": _convert_vit,
}


def _registration_hparams(f: flags.FlagValues) -> dict[str, Any]:
  try:
    value = json.loads(f.registration_hparams)
  except json.JSONDecodeError as e:
    raise ValueError(f"--registration_hparams is not valid JSON: {e}") from None
  if not isinstance(value, dict):
    raise ValueError("--registration_hparams must be a JSON object, e.g. '{\"enc_channels\": 8}'")
  return value


def _shape(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(s) for s in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) not in (2, 3) or min(shape) < 1:
    raise ValueError(f"--input_shape: expected H,W or D,H,W positive integers, got {text!r}")
  return shape


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``values`` (the global flags when run as a program)."""
  define = {"flag_values": values}
  flags.DEFINE_string("out", None, "New output directory (must not exist).", **define)
  flags.DEFINE_integer(
    "num_heads", 8, "imgfeatalign: attention heads of the trained model (BCRBench: 8).", **define
  )
  flags.DEFINE_float(
    "max_time", 5.0, "imgfeatalign: time-encoding range in years (BCRBench: 5.0).", **define
  )
  flags.DEFINE_string(
    "registration_hparams",
    "{}",
    "imgfeatalign/mammoregnet: JSON object of MammoRegNet sizes passed to import_mammoregnet "
    "(default: the reference sizes).",
    **define,
  )
  flags.DEFINE_string(
    "input_shape",
    "",
    "icon: spatial size the network was trained on, e.g. 175,175,175 (required). unetr: its "
    "img_size (default: a cube from the position embedding).",
    **define,
  )
  config_flags.DEFINE_config_file(
    "config", None, "fpn_mil: the FPN-MIL config the model was trained with.", **define
  )
  flags.DEFINE_string(
    "backbone", "", "fpn_mil: Mammo-CLIP .tar for a checkpoint trained on features.", **define
  )
  flags.DEFINE_bool(
    "include_head",
    False,
    "mammoclip: also keep the encoder's 1x1 head and the image projection head "
    "(params['image_projection']).",
    **define,
  )
  flags.DEFINE_integer(
    "vit_num_heads",
    0,
    "vit: attention heads (not stored in the weights; ViT-B/16: 12). 0 = hidden size // 64, "
    "the ViT-B convention.",
    **define,
  )
  flags.DEFINE_integer(
    "unetr_num_heads",
    12,
    "unetr: attention heads (not stored in the weights; MONAI's default 12).",
    **define,
  )
  flags.mark_flag_as_required("out", flag_values=values)


def convert(kind: str, path: str, f: flags.FlagValues) -> int:
  """Converts ``path`` as ``kind`` into ``f.out``; 0 on success, 1 (with one line on stderr) when
  the file cannot be converted."""
  from mammojax.convert.torch_files import load_torch_state_dict
  from mammojax.train.variable_store import save_variables

  if kind not in CONVERTERS:
    fail(f"unknown kind {kind!r}; choose one of {sorted(CONVERTERS)} (see --help)")
  try:
    state_dict = load_torch_state_dict(path)
    variables, details = CONVERTERS[kind](state_dict, f)
    source = {"kind": kind, "file": os.path.abspath(path), "sha256": file_sha256(path), **details}
    save_variables(f.out, variables, source)
  except (KeyError, ValueError, OSError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: cannot convert {path} as {kind}: {message}", file=sys.stderr)
    return 1
  print(f"wrote {f.out} ({kind} from {path})")
  return 0


def _kind_and_file(positional: Sequence[str]) -> tuple[str, str]:
  if len(positional) != 2:
    fail(f"expected <kind> <file>, got {list(positional)}; kinds: {sorted(CONVERTERS)}")
  return positional[0], positional[1]


def run(argv: Sequence[str]) -> int:
  """The command in-process: ``run(["mirai", "ckpt.pt", "--out=DIR"])``."""
  f, positional = command_flags(define_flags, argv, PROGRAM)
  return convert(*_kind_and_file(positional), f)


def main(argv: list[str]) -> None:
  raise SystemExit(convert(*_kind_and_file(argv[1:]), flags.FLAGS))


if __name__ == "__main__":
  run_program(main, define_flags, positional_args=True)
