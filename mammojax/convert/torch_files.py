"""Reading PyTorch checkpoints into plain ``{name: numpy array}`` state dicts.

Torch is an optional extra: it is imported inside :func:`load_torch_state_dict` only.
:func:`unwrap_state_dict` works on an already-loaded object (tensors or numpy arrays) without
importing torch.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

# Keys under which training scripts commonly nest the model's state dict, tried in order.
NESTING_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes added by DataParallel/DistributedDataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# How many leading bytes a refusal shows of a file that is no checkpoint.
SHOWN_BYTES = 9
# A legacy (pre-zip) torch.save file starts with its magic number pickled with protocol 2.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Loads a ``torch.save`` checkpoint on CPU and returns its state dict as numpy arrays.

  Uses ``torch.load(weights_only=True)``: files that need arbitrary unpickling are refused
  rather than executed. Nesting and wrapper prefixes are removed as in :func:`unwrap_state_dict`.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file is not a readable checkpoint; the message says what the file is (empty,
      text or another format, a truncated zip archive or legacy file, a plain pickle) rather
      than torch's bare error (``'101'`` for a text file).
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
    found = describe_unreadable(path, e)
    if found:
      raise ValueError(f"could not read {path!r}: {found}") from e
    raise ValueError(
      f"could not read {path!r} as a PyTorch checkpoint with weights_only=True: "
      f"{type(e).__name__}: {e}. If it pickles Python objects besides tensors, re-save only "
      "the state dict (torch.save(model.state_dict(), path)) from a trusted "
      "environment"
    ) from e
  return unwrap_state_dict(obj)


def describe_unreadable(path: str, error: Exception) -> str:
  """What a file that ``torch.load`` refused is, from its bytes; '' when it looks like a whole
  torch checkpoint (torch's own error, e.g. about unpickling objects, is then the news).

  A ``torch.save`` file is a zip archive holding ``<name>/data.pkl`` (the format since torch
  1.6) or a pickle starting with torch's pickled magic number (the legacy format).
  """
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(len(LEGACY_MAGIC))
  except OSError as e:
    return f"cannot read the file ({type(e).__name__}: {e.strerror or e})"
  if size == 0:
    return "not a torch checkpoint: the file is empty (0 bytes)"
  if head.startswith(b"PK"):
    return _describe_zip(path, size)
  if head.startswith(LEGACY_MAGIC) or (size < len(LEGACY_MAGIC) and LEGACY_MAGIC.startswith(head)):
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, EOFError) or "EOF" in text or size <= len(LEGACY_MAGIC):
      return f"truncated torch checkpoint (legacy pickle format, {size} bytes): it ends early"
    if "weights only" in text.lower():
      return ""  # a whole file pickling objects: torch's message and the re-save hint say it
    return (
      f"damaged or truncated torch checkpoint (legacy pickle format, {size} bytes; torch "
      f"stopped with {_error_name(error)})"
    )
  if head.startswith(b"\x80"):
    return (
      "not a torch checkpoint: a Python pickle without torch's header (saved with pickle, "
      "not torch.save?)"
    )
  shown = head[:SHOWN_BYTES].decode("latin-1")
  return f"not a torch checkpoint: the file starts with {shown!r}"


def _error_name(error: Exception) -> str:
  kind = type(error)
  return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _describe_zip(path: str, size: int) -> str:
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      if not any(n.endswith("data.pkl") for n in names):
        return "not a torch checkpoint: a zip archive without a data.pkl record"
      damaged = archive.testzip()
  except zipfile.BadZipFile:
    return (
      f"truncated zip archive: no end-of-archive record in its {size} bytes (the file was cut "
      "short; copy it again)"
    )
  except (OSError, EOFError, RuntimeError) as e:
    return f"damaged zip archive ({type(e).__name__})"
  if damaged:
    return f"damaged zip archive: the record {damaged!r} fails its checksum"
  return ""


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
