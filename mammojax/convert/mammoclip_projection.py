"""Mammo-CLIP's image projection head: importing it and applying it to the encoder's head map.

Mammo-CLIP's checkpoints hold it under ``image_projection.``: a ``LinearProjectionHead``
(``projection``) or an ``MLPProjectionHead`` (``projection``, ``fc``, ``layer_norm``).
``python -m mammojax.convert mammoclip --include_head`` stores it beside the EfficientNet
encoder as ``params['image_projection']``, which no Flax module reads: the encoder ignores it and
:func:`mammoclip_image_embedding` applies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mammojax.convert import layouts
from mammojax.convert.torch_files import select_prefix, unwrap_state_dict

MAMMOCLIP_PROJECTION_PREFIX = "image_projection."
# Where `import_mammoclip(include_head=True)` stores the image projection head: params[this].
MAMMOCLIP_PROJECTION_NAME = "image_projection"


def import_image_projection(
  state_dict: Mapping[str, Any], embedding_dim: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Converts Mammo-CLIP's image projection head (``image_projection.*``) to Flax parameters.

  ``LinearProjectionHead`` (``projection``: Linear E -> P) becomes ``{'projection': {'kernel':
  [E, P], 'bias': [P]}}``; ``MLPProjectionHead`` (``projection``, ``fc``: Linear P -> P,
  ``layer_norm``) adds ``'fc'`` (kernel [P, P], bias [P]) and ``'layer_norm'`` (scale [P], bias
  [P]). `mammoclip_image_embedding` applies them.

  Args:
    state_dict: a Mammo-CLIP checkpoint's state dict (or the loaded checkpoint).
    embedding_dim: the channels of the encoder's head map (1408 for B2) the projection must take,
      checked when given.

  Returns:
    ``(params, description)``: the parameter tree (float32 numpy) and ``{'type': 'linear' |
    'mlp', 'embedding_dim': E, 'projection_dim': P}``.

  Raises:
    ValueError: no ``image_projection.projection.weight``, keys of neither head, or shapes that
      do not fit together.
  """
  state = select_prefix(unwrap_state_dict(state_dict), MAMMOCLIP_PROJECTION_PREFIX)
  weight_key = MAMMOCLIP_PROJECTION_PREFIX + "projection.weight"
  if "projection.weight" not in state:
    raise ValueError(
      f"the checkpoint has no {weight_key} (Mammo-CLIP trained without a projection_head?); "
      "convert without --include_head"
    )
  mlp = any(k.startswith(("fc.", "layer_norm.")) for k in state)
  modules = ("projection", "fc", "layer_norm") if mlp else ("projection",)
  expected = {f"{m}.{leaf}" for m in modules for leaf in ("weight", "bias")}
  unexpected = sorted(MAMMOCLIP_PROJECTION_PREFIX + k for k in set(state) - expected)
  missing = sorted(MAMMOCLIP_PROJECTION_PREFIX + k for k in expected - set(state))
  if unexpected or missing:
    raise ValueError(
      f"image projection head: missing keys {missing}, unexpected keys {unexpected}; "
      "Mammo-CLIP's heads are LinearProjectionHead (projection) or MLPProjectionHead "
      "(projection, fc, layer_norm)"
    )
  weight = np.asarray(state["projection.weight"], np.float32)
  if weight.ndim != 2:
    raise ValueError(f"{weight_key} has shape {weight.shape}; a Linear weight is [out, in]")
  projection_dim, in_dim = weight.shape
  if embedding_dim is not None and in_dim != embedding_dim:
    raise ValueError(
      f"{weight_key} takes {in_dim} features but the encoder's head has {embedding_dim} "
      "channels; check the EfficientNet size (B2: 1408)"
    )
  shapes = {
    "projection.bias": (projection_dim,),
    "fc.weight": (projection_dim, projection_dim),
    "fc.bias": (projection_dim,),
    "layer_norm.weight": (projection_dim,),
    "layer_norm.bias": (projection_dim,),
  }
  wrong = [
    f"{MAMMOCLIP_PROJECTION_PREFIX}{k}: checkpoint {np.shape(state[k])}, expected {shapes[k]}"
    for k in expected
    if k in shapes and tuple(np.shape(state[k])) != shapes[k]
  ]
  if wrong:
    raise ValueError(f"image projection head shape mismatches {wrong}")

  def dense(name: str) -> dict[str, np.ndarray]:
    kernel = layouts.torch_dense_kernel(np.asarray(state[f"{name}.weight"], np.float32))
    bias = np.asarray(state[f"{name}.bias"], np.float32)
    return {"kernel": np.ascontiguousarray(kernel), "bias": bias}

  params: dict[str, Any] = {"projection": dense("projection")}
  if mlp:
    params["fc"] = dense("fc")
    params["layer_norm"] = {
      "scale": np.asarray(state["layer_norm.weight"], np.float32),
      "bias": np.asarray(state["layer_norm.bias"], np.float32),
    }
  description = {
    "type": "mlp" if mlp else "linear",
    "embedding_dim": int(in_dim),
    "projection_dim": int(projection_dim),
  }
  return params, description


def mammoclip_image_embedding(variables: Mapping[str, Any], head: jax.Array) -> jax.Array:
  """Mammo-CLIP's image embedding from the encoder's head map, as its ``image_projection`` does.

  Args:
    variables: a converted ``python -m mammojax.convert mammoclip --include_head`` checkpoint
      (``params['image_projection']`` read, the rest ignored).
    head: [B, H, W, E] the EfficientNet's ``'head'`` output (``include_head=True``).

  Returns:
    [B, P] embeddings before Mammo-CLIP's L2 normalisation: the head map averaged over H and W,
    then the Linear head, or the MLP head (Linear, exact GELU, Linear, plus the first Linear's
    output, LayerNorm with eps 1e-5; dropout is the identity at inference).
  """
  params = variables["params"].get(MAMMOCLIP_PROJECTION_NAME)
  if params is None:
    raise ValueError(
      f"the variables have no params/{MAMMOCLIP_PROJECTION_NAME}: convert the Mammo-CLIP "
      "checkpoint with --include_head (one trained without a projection_head has none; its "
      "embedding is the head map averaged over H and W)"
    )
  pooled = jnp.mean(jnp.asarray(head, jnp.float32), axis=(1, 2))

  def dense(x: jax.Array, p: Mapping[str, Any]) -> jax.Array:
    return x @ jnp.asarray(p["kernel"]) + jnp.asarray(p["bias"])

  projected = dense(pooled, params["projection"])
  if "fc" not in params:
    return projected
  x = dense(jax.nn.gelu(projected, approximate=False), params["fc"]) + projected
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  x = (x - mean) / jnp.sqrt(var + 1e-5)
  return x * jnp.asarray(params["layer_norm"]["scale"]) + jnp.asarray(params["layer_norm"]["bias"])
