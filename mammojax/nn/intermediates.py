"""Exposing a layer's output for attribution: sown for reading, perturbed for gradients."""

from __future__ import annotations

import jax
from flax import linen as nn


def expose(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
  """Sows ``x`` into ``'intermediates'`` under ``name`` and returns it through
  ``module.perturb(name, x)``; call inside the module's compact method.

  ``perturb`` adds the ``'perturbations'`` variable ``name`` to ``x`` when the caller passes that
  collection, so that the gradient with respect to the variable is the gradient with respect to
  ``x`` (what :mod:`mammojax.interpret` takes GradCAM from, without hooks); otherwise it returns
  ``x`` unchanged. It is skipped at ``init``, where every collection is mutable: the
  batch-shaped zeros would otherwise enter the model state and checkpoints.
  """
  module.sow("intermediates", name, x)
  if module.is_initializing():
    return x
  return module.perturb(name, x)
