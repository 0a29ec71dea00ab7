"""Reading PyTorch checkpoints into plain ``{name: numpy array}`` state dicts.

Torch is an optional extra: it is imported inside :func:`load_torch_state_dict` only.
:func:`unwrap_state_dict` works on an already-loaded object (tensors or numpy arrays) without
importing torch.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
import re
import zipfile
from collections.abc import Iterator, Mapping
from types import ModuleType
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
  rather than executed. Besides tensors and plain Python containers, the unpickler accepts the
  harmless values training scripts store next to the weights (:func:`checkpoint_safe_globals`:
  numpy scalars and arrays of numeric dtypes, e.g. BCRBench's ``best_c_index`` or FPN-MIL's
  metrics, and ``pathlib`` paths), for this call only. Nesting and wrapper prefixes are removed
  as in :func:`unwrap_state_dict`.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file is not a readable checkpoint; the message says what the file is (empty,
      text or another format, a truncated zip archive or legacy file, a plain pickle) rather
      than torch's bare error (``'101'`` for a text file), or names the globals (classes,
      functions) it would need unpickled beyond the allowed ones.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading PyTorch checkpoints needs torch: pip install mammojax[torch]") from e
  try:
    with _allowed_globals(torch):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files.
    found = describe_unreadable(path, e)
    if found:
      raise ValueError(f"could not read {path!r}: {found}") from e
    refused = _refused_globals(torch, path, e)
    if refused:
      raise ValueError(
        f"could not read {path!r}: it pickles {', '.join(refused)}, which mammojax does not "
        "unpickle: it loads only weights (torch.load(weights_only=True), plus numpy numbers and "
        "arrays and pathlib paths) and never falls back to weights_only=False; re-save the state "
        "dict (torch.save(model.state_dict(), path)) from a trusted environment"
      ) from e
    raise ValueError(
      f"could not read {path!r} as a PyTorch checkpoint with weights_only=True: "
      f"{type(e).__name__}: {_unpickler_reason(str(e))}. mammojax loads only weights; if the file "
      "pickles Python objects besides tensors, re-save only the state dict "
      "(torch.save(model.state_dict(), path)) from a trusted environment"
    ) from e
  return unwrap_state_dict(obj)


def checkpoint_safe_globals() -> list[Any]:
  """The globals :func:`load_torch_state_dict` lets ``torch.load(weights_only=True)`` use, in the
  form ``torch.serialization.safe_globals`` takes (an object, or ``(object, 'module.name')`` for
  another spelling of its name in old or foreign files).

  * numpy scalars (``np.float64(0.71)``: ``multiarray.scalar``) and arrays (0-d or not:
    ``multiarray._reconstruct``, ``numpy.ndarray``) of bool, integer, float and complex dtypes
    (``numpy.dtype`` and those dtypes' classes, e.g. ``numpy.dtypes.Float64DType``). Object,
    string, structured and datetime dtypes stay refused. Files written under numpy 1 name
    ``numpy.core.multiarray``, under numpy 2 ``numpy._core.multiarray``; both names map to the
    installed numpy's functions.
  * ``pathlib.PosixPath`` / ``PurePosixPath`` / ``WindowsPath`` / ``PureWindowsPath`` (a path
    of the other operating system comes back as its pure path).

  None of them runs code or touches files when rebuilt.
  """
  multiarray = _numpy_multiarray()
  allowed: list[Any] = [np.dtype, np.ndarray]
  allowed += sorted({type(np.dtype(t)) for t in _NUMERIC_TYPES}, key=lambda c: c.__qualname__)
  for name in ("scalar", "_reconstruct"):
    function = getattr(multiarray, name)
    allowed += [
      (function, f"{module}.multiarray.{name}") for module in ("numpy._core", "numpy.core")
    ]
  posix = os.name == "posix"
  allowed += [
    (pathlib.PosixPath if posix else pathlib.PurePosixPath, "pathlib.PosixPath"),
    (pathlib.PureWindowsPath if posix else pathlib.WindowsPath, "pathlib.WindowsPath"),
    (pathlib.PurePosixPath, "pathlib.PurePosixPath"),
    (pathlib.PureWindowsPath, "pathlib.PureWindowsPath"),
  ]
  return allowed


# Numeric numpy scalar types whose dtypes a checkpoint may hold (C-type spellings included: the
# dtype classes differ, e.g. Int64DType and LongLongDType, though both are 64-bit on Linux).
_NUMERIC_TYPES = (
  np.bool_,
  np.byte,
  np.short,
  np.intc,
  np.int_,
  np.longlong,
  np.ubyte,
  np.ushort,
  np.uintc,
  np.uint,
  np.ulonglong,
  np.half,
  np.single,
  np.double,
  np.longdouble,
  np.csingle,
  np.cdouble,
  np.clongdouble,
)


def _numpy_multiarray() -> ModuleType:
  """``numpy._core.multiarray`` (numpy 2, and 1.26's alias) or ``numpy.core.multiarray``."""
  for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
    try:
      return importlib.import_module(name)
    except ImportError:
      continue
  raise ImportError("numpy has neither numpy._core.multiarray nor numpy.core.multiarray")


@contextlib.contextmanager
def _allowed_globals(torch: ModuleType) -> Iterator[None]:
  """:func:`checkpoint_safe_globals` allowed for the duration of the block only; globals the
  caller had allowed already (``torch.serialization.add_safe_globals``) stay allowed after it."""
  before = set(torch.serialization.get_safe_globals())
  added = [g for g in checkpoint_safe_globals() if g not in before]
  with torch.serialization.safe_globals(added):
    yield


def _refused_globals(torch: ModuleType, path: str, error: Exception) -> list[str]:
  """The ``module.name`` globals of a checkpoint that the weights-only unpickler refuses: all of
  them for a zip checkpoint (read from its pickle without running it), else the one torch's
  error names (a global, or a class it would have to rebuild, e.g. an object-dtype array's
  ``numpy.dtypes.ObjectDType``); [] when the error is about something else."""
  text = str(error)
  if "GLOBAL" not in text and "Weights only load failed" not in text:
    return []
  try:
    with _allowed_globals(torch):
      refused = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  except Exception:  # a legacy (non-zip) file; torch's message names the first global.
    refused = []
  if not refused:
    match = re.search(r"GLOBAL (\S+)", text) or re.search(r"but got <class '([^']+)'>", text)
    refused = [match.group(1)] if match else []
  # torch's message drops the module of builtins ('eval' for builtins.eval).
  return sorted(name if "." in name else f"builtins.{name}" for name in refused)


def _unpickler_reason(text: str) -> str:
  """torch's unpickling error on one line, without its advice to use weights_only=False."""
  reason = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
  return " ".join(reason.split())


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


def select_prefix(
  state: Mapping[str, np.ndarray],
  prefix: str,
  ignored_suffixes: tuple[str, ...] = ("num_batches_tracked",),
) -> dict[str, np.ndarray]:
  """The entries of ``state`` under ``prefix``, the prefix removed, without BatchNorm's counters
  (``ignored_suffixes``)."""
  return {
    k[len(prefix) :]: v
    for k, v in state.items()
    if k.startswith(prefix) and not k.endswith(ignored_suffixes)
  }


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
