"""torchvision and timm for the parity tests, or a pytest skip when they are not installed.

Tests only: the package never imports torchvision or timm.
"""

from __future__ import annotations

import types

import pytest

# Keeps the op schemas below declared for the life of the process (a Library undefines its ops
# when garbage-collected).
_TORCHVISION_OPS_LIBRARY = None


def import_torchvision() -> types.ModuleType:
  """The ``torchvision`` module; skips the calling test (module) when torch or it is missing."""
  global _TORCHVISION_OPS_LIBRARY
  torch = pytest.importorskip("torch")
  try:
    import torchvision  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.skip("torchvision is not installed (pip install mammojax[torch])")
  except RuntimeError as e:
    if "torchvision::nms" not in str(e) or _TORCHVISION_OPS_LIBRARY is not None:
      raise
    # The torchvision 0.28.0 wheel is a CUDA build: its C++ ops do not load beside the CPU torch
    # 2.13, and its import then fails registering fake kernels for ops that were never defined.
    # The models are pure Python; declaring the two schemas lets the import finish (calling the
    # ops themselves would still fail, and no test does).
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_OPS_LIBRARY = library
    import torchvision  # pylint: disable=import-outside-toplevel
  return torchvision


def import_timm() -> types.ModuleType:
  """The ``timm`` module (torchvision imported first, through :func:`import_torchvision`)."""
  import_torchvision()
  return pytest.importorskip("timm")
