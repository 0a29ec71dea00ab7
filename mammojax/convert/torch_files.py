"""Reading PyTorch checkpoints into plain ``{name: numpy array}`` state dicts.

Torch is an optional extra: it is imported inside :func:`load_torch_state_dict` only.
:func:`unwrap_state_dict` works on an already-loaded object (tensors or numpy arrays) without
importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# Keys under which training scripts commonly nest the model's state dict, tried in order.
NESTING_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes added by DataParallel/DistributedDataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Loads a ``torch.save`` checkpoint on CPU and returns its state dict as numpy arrays.

  Uses ``torch.load(weights_only=True)``: files that need arbitrary unpickling are refused
  rather than executed. Nesting and wrapper prefixes are removed as in :func:`unwrap_state_dict`.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading PyTorch checkpoints needs torch: pip install mammojax[torch]") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files.
    raise ValueError(
      f"could not read {path!r} as a PyTorch checkpoint with weights_only=True: "
      f"{e}. If it pickles Python objects besides tensors, re-save only the "
      "state dict (torch.save(model.state_dict(), path)) from a trusted "
      "environment"
    ) from e
  return unwrap_state_dict(obj)


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """Returns the state dict inside a loaded checkpoint object as ``{name: numpy array}``.

  Descends into ``obj['state_dict']``, ``obj['model']`` or ``obj['model_state_dict']`` (repeatedly)
  when ``obj`` is a mapping holding one of them, and strips leading ``module.`` / ``_orig_mod.``
  from every key. Values may be torch tensors (bfloat16 is widened to float32) or array-likes.
  """
  if not isinstance(obj, Mapping):
    raise ValueError(
      f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
    )
  while True:
    nested = next((k for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
    if nested is None:
      break
    obj = obj[nested]
  state = {}
  for key, value in obj.items():
    name = _strip_prefixes(str(key))
    if name in state:
      raise ValueError(
        f"state dict has two entries for {name!r} after removing wrapper "
        f"prefixes {WRAPPER_PREFIXES}"
      )
    state[name] = _to_numpy(name, value)
  return state


def _strip_prefixes(name: str) -> str:
  stripped = True
  while stripped:
    stripped = False
    for prefix in WRAPPER_PREFIXES:
      if name.startswith(prefix):
        name, stripped = name[len(prefix) :], True
  return name


def _to_numpy(name: str, value: Any) -> np.ndarray:
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # A torch tensor.
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  if isinstance(value, (np.ndarray, np.generic, int, float, bool)) or hasattr(value, "__array__"):
    return np.asarray(value)
  raise ValueError(
    f"state dict entry {name!r} is a {type(value).__name__}, not a tensor or "
    "array; pass the model's state dict (or a checkpoint nesting it under "
    f"one of {NESTING_KEYS})"
  )


def raise_if_mismatched(
  what: str, missing: list[str], unexpected: list[str], mismatched: list[str], hint: str
) -> None:
  """Raises one ``ValueError`` naming every missing key, unexpected key and shape mismatch of a
  checkpoint against the model (``what`` names the checkpoint, ``hint`` the likely fix)."""
  if not (missing or unexpected or mismatched):
    return
  parts = []
  if missing:
    parts.append(f"missing keys {missing}")
  if unexpected:
    parts.append(f"unexpected keys {unexpected}")
  if mismatched:
    parts.append(f"shape mismatches {mismatched}")
  raise ValueError(f"{what} does not match the model: " + "; ".join(parts) + f". {hint}")
