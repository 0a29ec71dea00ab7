"""The model-randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

An attribution method that explains the model must give different maps once the model's learned
weights are gone. The check re-draws the parameters layer by layer, from the output back to the
input (the cascade: the top layer, then it and the next, ...), recomputes the maps after each
step and reports their Spearman rank correlation with the trained model's maps, on absolute
values and with sign, as the paper does. A method whose maps stay correlated while the layers
that produced the prediction are random (the paper found this for guided backpropagation) shows
the input more than the model.

* :func:`cascading_layers`: the top-level parameter names, output first (in definition order,
  which ``jax.tree`` functions lose: see there).
* :func:`randomize_params`: those subtrees re-drawn (``batch_stats`` kept, see there).
* :func:`rank_correlation`: per-example Spearman correlation (average ranks for ties).
* :func:`model_randomization_check`: the cascade, for any attribution function of the variables.

The paper's SSIM is not included: no reference implementation is installed to test one against.
"""

from __future__ import annotations

import re
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from mammojax.interpret.adapter import ModelAdapter

Variables = Mapping[str, Any]


def cascading_layers(model: Variables | ModelAdapter, images: Any = None) -> list[str]:
  """Top-level ``params`` names from the output back to the input: the cascade's order.

  Flax creates parameters in the order of the module's definition (for
  :class:`~mammojax.nn.resnet.ResNet`: ``conv1``, ``bn1``, ``layer1_0`` .. ``layer4_1``, ``fc``),
  and the cascade is its reverse: ``['fc', 'layer4_1', ..., 'bn1', 'conv1']``. But every
  ``jax.tree`` function rebuilds dicts with sorted keys (``adapter.variables`` are sorted:
  ``bn1``, ``conv1``, ``fc``, ``layer1_0``, ...; a ViT's ``encoder_layer_10`` before ``_2``),
  so the order is read from where it survives:

  Args:
    model: a :class:`~mammojax.interpret.adapter.ModelAdapter`, whose module is initialised
      abstractly (shapes only, nothing computed) to see the creation order; or variables
      straight from ``module.init``, whose dict order is used as it is (a sorted order warns: it
      is most likely not the definition's).
    images: with an adapter, images ``[B, H, W, C]`` (or their ``jax.ShapeDtypeStruct``) the
      model accepts.
  """
  if isinstance(model, ModelAdapter):
    if images is None:
      raise ValueError("cascading_layers of an adapter needs images (shapes only) to trace init")
    return list(reversed(_definition_order(model, images)))
  names = list(_params(model))
  if len(names) > 1 and names == sorted(names):
    warnings.warn(
      f"parameter names are in sorted order {names}, as jax.tree functions leave them, which is "
      "most likely not the model's definition order: pass the adapter and images to "
      "cascading_layers, or the layers explicitly",
      stacklevel=2,
    )
  return list(reversed(names))


def _definition_order(adapter: ModelAdapter, images: Any) -> list[str]:
  """Top-level parameter names in creation order, from ``module.init`` traced on shapes only
  (the dict is read inside the trace, before any ``jax.tree`` function sorts it)."""
  order: list[str] = []
  images = jax.ShapeDtypeStruct(np.shape(images), getattr(images, "dtype", jnp.float32))

  def init(key: jax.Array, images: jax.Array) -> Any:
    variables = adapter.module.init(key, images, **dict(adapter.apply_kwargs))
    order.extend(variables["params"])
    return variables

  jax.eval_shape(init, jax.random.key(0), images)
  return order


def _params(variables: Variables) -> Mapping[str, Any]:
  if "params" not in variables:
    raise ValueError(f"variables have no 'params' collection (collections: {list(variables)})")
  return variables["params"]


def _resolve(params: Mapping[str, Any], name: str) -> list[str]:
  """Top-level names selected by ``name``: itself, or else its blocks ``name_0``, ``name_1``, ...
  (torchvision's stage ``layer4`` is our ``layer4_0``, ``layer4_1``)."""
  if name in params:
    return [name]
  blocks = [key for key in params if re.fullmatch(re.escape(name) + r"_\d+", key)]
  if not blocks:
    raise ValueError(f"no parameters named {name!r} (or {name}_<i>); top level: {list(params)}")
  return blocks


def _redraw(leaf: Any, rng: np.random.Generator) -> Any:
  """Zero-mean normal values of ``leaf``'s shape and dtype whose root mean square is the leaf's.

  The RMS, not the standard deviation: a trained BatchNorm scale is about 1 with a small spread,
  and drawing it with that spread would shrink every feature after it towards zero; matching the
  RMS keeps each layer's output at its trained magnitude while the values and signs that were
  learned are gone. A zero leaf (an unused bias) stays zero. Non-float leaves are kept.
  """
  if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
    return leaf
  values = np.asarray(leaf)
  rms = np.sqrt(np.mean(np.square(values, dtype=np.float64)))
  return jnp.asarray((rms * rng.standard_normal(values.shape)).astype(values.dtype))


def _redraw_tree(tree: Any, key: jax.Array) -> Any:
  """Every leaf of ``tree`` re-drawn on the host, from a numpy generator seeded by ``key``: JAX's
  own draws would compile a program per leaf shape, tens of seconds for a ResNet on a CPU."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [_redraw(leaf, rng) for leaf in leaves])


def randomize_params(
  variables: Variables,
  key: jax.Array,
  *,
  layers: Sequence[str] | None = None,
) -> dict[str, Any]:
  """``variables`` with the named top-level parameter subtrees re-drawn.

  Every float leaf of a selected subtree is replaced by zero-mean normal values with the leaf's
  shape, dtype and root mean square (see :func:`_redraw` for why the RMS). Each subtree's draws
  come from ``key`` and its name only, so a subtree gets the same values whichever others are
  selected with it: the cascade's steps differ only by the layer they add.

  Only ``params`` change. ``batch_stats`` (BatchNorm's running mean and variance) are kept: they
  are measured statistics of the activations, not learned weights (the paper re-initialises
  weights), and a re-drawn variance could be negative. Other collections are kept too.

  Args:
    variables: the model's variables, e.g. ``adapter.variables``; boxed leaves (logical
      partitioning) keep their boxes.
    key: a JAX PRNG key.
    layers: top-level ``params`` names (:func:`cascading_layers`); a name that is not one
      selects its numbered blocks (``'layer4'`` -> ``layer4_0``, ``layer4_1``). None = all.
  Returns:
    A new variables dict: selected subtrees re-drawn (drawn on the host, so new arrays on the
    default device, whatever sharding the old ones had), every other leaf the same object.
  """
  params = _params(variables)
  names = list(params) if layers is None else [n for name in layers for n in _resolve(params, name)]
  redrawn = {
    name: _redraw_tree(value, jax.random.fold_in(key, zlib.crc32(name.encode())))
    for name, value in params.items()
    if name in names
  }
  return {
    **variables,
    "params": {name: redrawn.get(name, value) for name, value in params.items()},
  }


def rank_correlation(a: Any, b: Any, *, absolute: bool = True) -> np.ndarray:
  """Spearman rank correlation of each example's ``a`` with its ``b``.

  Args:
    a: ``[B, ...]`` maps.
    b: ``[B, ...]`` maps of the same shape.
    absolute: rank ``|a|`` and ``|b|`` (the paper's main figure: is the same evidence strong,
      whatever its sign); False ranks the signed values.
  Returns:
    float64 ``[B]``: the Pearson correlation of the average ranks (ties share their mean rank,
    as ``scipy.stats.spearmanr``); NaN for an example whose map is constant or non-finite.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim < 2:
    raise ValueError(f"expected two [B, ...] arrays of one shape, got {a.shape} and {b.shape}")
  a = a.reshape(a.shape[0], -1)
  b = b.reshape(b.shape[0], -1)
  if absolute:
    a, b = np.abs(a), np.abs(b)
  finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
  ranks_a = stats.rankdata(np.where(finite[:, None], a, 0.0), axis=1)
  ranks_b = stats.rankdata(np.where(finite[:, None], b, 0.0), axis=1)
  ranks_a -= ranks_a.mean(axis=1, keepdims=True)
  ranks_b -= ranks_b.mean(axis=1, keepdims=True)
  scale = np.sqrt(np.sum(ranks_a**2, axis=1) * np.sum(ranks_b**2, axis=1))
  defined = finite & (scale > 0)
  return np.where(
    defined, np.sum(ranks_a * ranks_b, axis=1) / np.where(defined, scale, 1.0), np.nan
  )


def _mean(values: np.ndarray) -> float | None:
  """Mean over the defined (non-NaN) examples, None when there is none (JSON has no NaN)."""
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else None


def model_randomization_check(
  attribution_fn: Callable[[Variables], Any],
  variables: Variables,
  key: jax.Array,
  *,
  layers: Sequence[str] | None = None,
  cascade: bool = True,
) -> dict[str, Any]:
  """Model randomisation: maps of the trained model against maps after each step.

  Args:
    attribution_fn: variables -> maps ``[B, ...]``, closing over the model, images and method,
      e.g. ``lambda v: gradcam(adapter.replace(variables=v), images, target, "layer4")`` or
      ``lambda v: guided_backprop(adapter.replace(variables=v), images, target).attributions``
      (the adapter is a pytree over its variables: new weights of the same shapes do not
      recompile the method).
    variables: the trained variables (``adapter.variables``).
    key: a JAX PRNG key for :func:`randomize_params`.
    layers: the cascade's steps, output first, each a name :func:`randomize_params` accepts,
      e.g. ``cascading_layers(adapter, images)`` (one step per top-level parameter) or
      ``['fc', 'layer4', 'layer3', 'layer2', 'layer1', 'bn1', 'conv1']`` (torchvision's
      stages); None = :func:`cascading_layers` of ``variables``, right only for variables
      straight from ``module.init`` (see there).
    cascade: True = each step adds its layer to those already random (the paper's cascade);
      False = each step randomises its layer alone (the paper's independent randomisation).
  Returns:
    ``{"steps": [...]}``, one entry per step in order: ``randomized`` (the names random at
    that step: the steps so far, or the step's own name without ``cascade``),
    ``spearman_abs`` and ``spearman_signed`` (:func:`rank_correlation` of the trained and the
    randomised maps, averaged over the examples where it is defined; None if it is nowhere:
    constant maps have no ranks). The last step of the default cascade is the fully random
    model.
  """
  steps = cascading_layers(variables) if layers is None else list(layers)
  trained = np.asarray(attribution_fn(variables))
  results = []
  for index in range(len(steps)):
    randomized = steps[: index + 1] if cascade else steps[index : index + 1]
    maps = np.asarray(attribution_fn(randomize_params(variables, key, layers=randomized)))
    results.append(
      {
        "randomized": list(randomized),
        "spearman_abs": _mean(rank_correlation(trained, maps, absolute=True)),
        "spearman_signed": _mean(rank_correlation(trained, maps, absolute=False)),
      }
    )
  return {"steps": results}
