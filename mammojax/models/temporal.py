"""Temporal-GradCam classifiers over a patient's sequence of frozen per-image features.

Every model here has one call signature::

  logits = model.apply(variables, features, mask, time_offsets, train=..., rngs=...)

* ``features [B, L, D]``: the newest ``L`` images of the patient up to and including the current
  one, oldest first, zeros at padding. The padding may come first (newest image last) or last
  (images from index 0, as the reference's ``collate_fn`` does): both work.
* ``mask [B, L]`` bool or int, 1 = real image.
* ``time_offsets [B, L]`` float: years BEFORE the current image (>= 0; 0 for the current image and
  at padding).
* Returns ``logits [B, num_classes]`` float32.

Models: :class:`LinearHead` (the current image alone), :class:`TemporalDNN` (the reference's
model), :class:`TemporalGRU` and :class:`TemporalTransformer`; :func:`build_temporal_model`
picks one by name. In the GRU and the transformer, padded positions never influence the logits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mammojax.nn import initializers, partitioning
from mammojax.nn.time_encoding import interpolate_table, sinusoid_table
from mammojax.nn.transformer import TransformerBlock

# torch.nn.GRU draws every weight from uniform(+-1/sqrt(hidden)): fan-out of a [in, hidden] kernel.
_TORCH_GRU_KERNEL = partitioning.dense_kernel_init(
  nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")
)


def current_index(mask: jax.Array) -> jax.Array:
  """Index of the newest real image, i.e. the last 1 in ``mask [B, L]`` -> ``[B]`` int32.

  Works for start and end padding (and holes); a row without any real image gives ``L - 1``.
  """
  valid = jnp.asarray(mask).astype(bool)
  length = valid.shape[1]
  return (length - 1 - jnp.argmax(valid[:, ::-1], axis=1)).astype(jnp.int32)


def gather_current(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """The token of the current (newest real) image: ``[B, L, D], [B, L] -> [B, D]``."""
  index = current_index(mask)
  return jnp.take_along_axis(tokens, index[:, None, None], axis=1)[:, 0]


def encode_time_offsets(
  time_offsets: jax.Array, dim: int, max_time: float, num_steps: int
) -> jax.Array:
  """Continuous sinusoidal encoding of every offset: ``[B, L]`` years -> ``[B, L, dim]`` float32.

  The table of :func:`mammojax.nn.time_encoding.sinusoid_table` over ``[0, max_time]`` years,
  read by linear interpolation; offsets beyond ``max_time`` are clipped.
  """
  offsets = jnp.asarray(time_offsets, jnp.float32)
  table = jnp.asarray(sinusoid_table(dim, max_time, num_steps))
  encoded = interpolate_table(table, offsets.reshape(-1), max_time)
  return encoded.reshape(*offsets.shape, dim)


def gru_params_from_torch(
  weight_ih: np.ndarray, weight_hh: np.ndarray, bias_ih: np.ndarray, bias_hh: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
  """One ``torch.nn.GRU`` layer's parameters -> a Flax ``nn.GRUCell`` param dict.

  torch stacks the gates (r, z, n) along the rows: ``weight_ih [3H, I]``, ``weight_hh [3H, H]``,
  ``bias_ih [3H]``, ``bias_hh [3H]`` (e.g. ``weight_ih_l0``). Flax's cell computes the same
  equations with one Dense per gate (kernels ``[in, H]``); its r and z gates have one bias, the sum
  ``b_i + b_h``, and only ``hn`` keeps a hidden bias (inside ``r * (W_hn h + b_hn)``).
  """
  w_ir, w_iz, w_in = np.split(np.asarray(weight_ih, np.float32), 3, axis=0)
  w_hr, w_hz, w_hn = np.split(np.asarray(weight_hh, np.float32), 3, axis=0)
  b_ir, b_iz, b_in = np.split(np.asarray(bias_ih, np.float32), 3)
  b_hr, b_hz, b_hn = np.split(np.asarray(bias_hh, np.float32), 3)
  return {
    "ir": {"kernel": w_ir.T, "bias": b_ir + b_hr},
    "iz": {"kernel": w_iz.T, "bias": b_iz + b_hz},
    "in": {"kernel": w_in.T, "bias": b_in},
    "hr": {"kernel": w_hr.T},
    "hz": {"kernel": w_hz.T},
    "hn": {"kernel": w_hn.T, "bias": b_hn},
  }


class TorchBatchNorm1d(nn.Module):
  """torch ``nn.BatchNorm1d`` on ``[B, C]``, running statistics included.

  Unlike ``flax.linen.BatchNorm``, the running variance is updated with the UNBIASED batch
  variance (``* n / (n - 1)``), as torch does; normalisation in training uses the biased one.
  Variables carry Flax's names: params ``scale``, ``bias``; batch_stats ``mean``, ``var``.
  Calling one instance several times shares its parameters and updates its statistics once per
  call, in order (as a torch module reused in ``forward``).

  Attributes:
    momentum: torch's convention (weight of the new batch), 0.1 == Flax momentum 0.9.
    epsilon: added to the variance.
    dtype: computation dtype of the output.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """``[B, C] -> [B, C]``; ``train`` uses and updates batch statistics."""
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      mean = jnp.mean(x32, axis=0)
      var = jnp.mean(jnp.square(x32 - mean), axis=0)
      if not self.is_initializing():
        count = x.shape[0]
        unbiased = var * (count / max(count - 1, 1))
        ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


def _dense(features: int, name: str, dtype: jnp.dtype) -> nn.Dense:
  """``nn.Dense`` with torch's default Linear weights (biases zero, as everywhere here)."""
  return partitioning.dense(
    features, name, kernel_init=initializers.torch_default_kernel, dtype=dtype
  )


class LinearHead(nn.Module):
  """The seed's "image" model: a linear classifier on the current image's frozen features.

  ``logits = Dense(num_classes)(features[b, current_index(mask)[b]])``; earlier images and the
  time offsets are ignored. Submodule: ``head``.
  """

  num_classes: int = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, features: jax.Array, mask: jax.Array, time_offsets: jax.Array, *, train: bool
  ) -> jax.Array:
    """Args: features ``[B, L, D]``, mask ``[B, L]``, time_offsets ``[B, L]`` (unused).

    Returns ``[B, num_classes]`` float32 logits.
    """
    del time_offsets, train
    current = gather_current(features, mask)
    return _dense(self.num_classes, "head", self.dtype)(current).astype(jnp.float32)


class TemporalDNN(nn.Module):
  """The reference's temporal "DNN" (Temporal-GradCam ``run_temporal.py``), exactly.

  ``x = input(flatten(features))`` (``[B, L*D] -> [B, hidden]``); then ``num_layers - 1`` times
  ``x = layers_i(dropout(bn(x)))`` (``Linear(hidden, hidden)``); then
  ``logits = projection(dropout(bn(x)))``. The single BatchNorm ``bn`` (torch ``BatchNorm1d``
  defaults, :class:`TorchBatchNorm1d`) and the dropout rate are SHARED by every layer, as in the
  reference, where one ``self.bn`` is applied before each hidden Linear and before the projection
  (so with ``num_layers > 1`` its running statistics are updated several times per step).

  There is NO non-linearity: in eval mode the model is an affine map of the zero-padded,
  flattened sequence. The mask and the time offsets are ignored (padded positions are zeros,
  so the padding side changes the result: the reference pads at the end). ``L`` is fixed at init.

  Attributes:
    num_classes: logits.
    hidden_dim: hidden width (reference ``hidden_size`` 64).
    dropout_rate: the reference's class default and README say 0.1, its CLI default and every
      shipped config 0.01.
    num_layers: 1 in the reference (no hidden ``layers_i``).
    dtype: computation dtype.
  Submodules: ``input``, ``layers_{i}``, ``bn``, ``projection`` (the torch names).
  """

  num_classes: int = 2
  hidden_dim: int = 64
  dropout_rate: float = 0.1
  num_layers: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, features: jax.Array, mask: jax.Array, time_offsets: jax.Array, *, train: bool
  ) -> jax.Array:
    """Args: features ``[B, L, D]``; mask, time_offsets ``[B, L]`` (unused); train: batch
    statistics (``mutable=['batch_stats']``) and dropout (rng ``'dropout'``).

    Returns ``[B, num_classes]`` float32 logits.
    """
    del mask, time_offsets
    batch_norm = TorchBatchNorm1d(momentum=0.1, epsilon=1e-5, dtype=self.dtype, name="bn")
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    x = _dense(self.hidden_dim, "input", self.dtype)(features.reshape(features.shape[0], -1))
    for i in range(self.num_layers - 1):
      x = _dense(self.hidden_dim, f"layers_{i}", self.dtype)(dropout(batch_norm(x, train)))
    logits = _dense(self.num_classes, "projection", self.dtype)(dropout(batch_norm(x, train)))
    return logits.astype(jnp.float32)


class TemporalGRU(nn.Module):
  """A GRU over the visits, oldest to newest, classifying from the state after the current one.

  Step input: ``features`` (or ``Dense(input_dim)(features)`` when ``input_dim`` is set),
  concatenated with the continuous time encoding of the step's offset when ``time_dim > 0``.
  ``num_layers`` stacked ``nn.GRUCell`` layers (torch ``nn.GRU``'s gates and equations,
  ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) * n + z * h``; no dropout
  between layers) start from zeros; at a padded step every state stays unchanged, so the final
  state is the state after the current image whatever the padding side. Then dropout and
  ``Dense(num_classes)``. Weights start as torch's (uniform +-1/sqrt(hidden)), biases zero.

  Attributes:
    num_classes: logits.
    hidden_dim: GRU state width.
    num_layers: stacked GRU layers.
    input_dim: optional width of a Dense projection of the features before the GRU.
    time_dim: width of the time encoding (even; 0 = none).
    max_time: years covered by the time-encoding table (larger offsets are clipped).
    time_steps: rows of that table.
    dropout_rate: dropout on the final state.
    dtype: computation dtype.
  Submodules: ``input_proj`` (optional), ``gru_{k}`` (Flax ``GRUCell``: ``ir``, ``iz``, ``in``,
  ``hr``, ``hz``, ``hn``; see :func:`gru_params_from_torch`), ``head``.
  """

  num_classes: int = 2
  hidden_dim: int = 64
  num_layers: int = 1
  input_dim: int | None = None
  time_dim: int = 16
  max_time: float = 10.0
  time_steps: int = 240
  dropout_rate: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, features: jax.Array, mask: jax.Array, time_offsets: jax.Array, *, train: bool
  ) -> jax.Array:
    """Args: features ``[B, L, D]``, mask ``[B, L]``, time_offsets ``[B, L]`` years; train:
    dropout (rng ``'dropout'``).

    Returns ``[B, num_classes]`` float32 logits.
    """
    x = features.astype(self.dtype)
    if self.input_dim is not None:
      x = _dense(self.input_dim, "input_proj", self.dtype)(x)
    if self.time_dim > 0:
      encoding = encode_time_offsets(time_offsets, self.time_dim, self.max_time, self.time_steps)
      x = jnp.concatenate([x, encoding.astype(x.dtype)], axis=-1)
    valid = jnp.asarray(mask).astype(bool)
    cells = [
      nn.GRUCell(
        self.hidden_dim,
        kernel_init=_TORCH_GRU_KERNEL,
        recurrent_kernel_init=_TORCH_GRU_KERNEL,
        dtype=self.dtype,
        name=f"gru_{k}",
      )
      for k in range(self.num_layers)
    ]
    states = [jnp.zeros((x.shape[0], self.hidden_dim), self.dtype) for _ in cells]
    # L is short (a few visits): an unrolled loop, oldest -> newest.
    for t in range(x.shape[1]):
      step = x[:, t]
      keep = valid[:, t, None]
      for k, cell in enumerate(cells):
        new_state, _ = cell(states[k], step)
        states[k] = jnp.where(keep, new_state, states[k])
        step = states[k]
    final = nn.Dropout(self.dropout_rate)(states[-1], deterministic=not train)
    return _dense(self.num_classes, "head", self.dtype)(final).astype(jnp.float32)


class TemporalTransformer(nn.Module):
  """Self-attention over the real visits; the current image's token is classified.

  ``tokens = Dense(model_dim)(features) + time_encoding(time_offsets)`` (continuous sinusoidal
  encoding over ``[0, max_time]`` years, optional) ``+ distance_embedding[d]`` (optional, learned;
  ``d`` = number of real images after the visit, so 0 for the current one), dropout, then
  ``num_layers`` pre-norm :class:`~mammojax.nn.transformer.TransformerBlock` s whose attention
  never reads padded keys (every query also attends to itself, so a fully padded row stays
  finite), a final LayerNorm, and ``Dense(num_classes)`` on the current image's token. Nothing
  depends on absolute positions, so start and end padding give the same logits.

  Attributes:
    num_classes: logits.
    model_dim: token width.
    num_layers: transformer blocks.
    num_heads: attention heads (divide ``model_dim``).
    mlp_dim: MLP hidden width.
    dropout_rate: dropout on the embedded tokens, in the blocks (attention weights included)
      and before the head.
    use_time_encoding: add the time encoding of each visit's offset.
    position_embedding: add the learned distance-from-current embedding (``[L, model_dim]``).
    max_time: years covered by the time-encoding table.
    time_steps: rows of that table.
    dtype: computation dtype.
  Submodules: ``embed``, ``distance_embedding`` (param), ``block_{i}``, ``norm``, ``head``.
  """

  num_classes: int = 2
  model_dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout_rate: float = 0.1
  use_time_encoding: bool = True
  position_embedding: bool = False
  max_time: float = 10.0
  time_steps: int = 240
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, features: jax.Array, mask: jax.Array, time_offsets: jax.Array, *, train: bool
  ) -> jax.Array:
    """Args: features ``[B, L, D]``, mask ``[B, L]``, time_offsets ``[B, L]`` years; train:
    dropout (rng ``'dropout'``).

    Returns ``[B, num_classes]`` float32 logits.
    """
    valid = jnp.asarray(mask).astype(bool)
    length = features.shape[1]
    tokens = _dense(self.model_dim, "embed", self.dtype)(features)
    if self.use_time_encoding:
      encoding = encode_time_offsets(time_offsets, self.model_dim, self.max_time, self.time_steps)
      tokens = tokens + encoding.astype(tokens.dtype)
    if self.position_embedding:
      table = self.param(
        "distance_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "mlp")),
        (length, self.model_dim),
      )
      as_int = valid.astype(jnp.int32)
      later = jnp.cumsum(as_int[:, ::-1], axis=1)[:, ::-1] - as_int  # real images after each
      tokens = tokens + table[jnp.clip(later, 0, length - 1)].astype(tokens.dtype)
    tokens = nn.Dropout(self.dropout_rate)(tokens, deterministic=not train)
    eye = jnp.eye(length, dtype=bool)
    attention_mask = valid[:, None, None, :] | eye[None, None]  # [B, 1, L, L]
    for i in range(self.num_layers):
      tokens = TransformerBlock(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        pre_norm=True,
        attention_dropout_rate=self.dropout_rate,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name=f"block_{i}",
      )(tokens, deterministic=not train, mask=attention_mask)
    tokens = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, name="norm")(
      tokens
    )
    current = nn.Dropout(self.dropout_rate)(gather_current(tokens, valid), deterministic=not train)
    return _dense(self.num_classes, "head", self.dtype)(current).astype(jnp.float32)


TEMPORAL_MODELS: dict[str, type[nn.Module]] = {
  "image": LinearHead,
  "dnn": TemporalDNN,
  "gru": TemporalGRU,
  "transformer": TemporalTransformer,
}


def build_temporal_model(kind: str, num_classes: int = 2, **fields: Any) -> nn.Module:
  """A temporal model by name (``image``, ``dnn``, ``gru``, ``transformer``).

  Args:
    kind: key of :data:`TEMPORAL_MODELS`.
    num_classes: logits.
    **fields: further dataclass fields of that model (e.g. ``hidden_dim``, ``dropout_rate``).
  Raises:
    ValueError: unknown kind (the message lists the kinds).
  """
  if kind not in TEMPORAL_MODELS:
    raise ValueError(
      f"unknown temporal model kind {kind!r}; expected one of {', '.join(TEMPORAL_MODELS)}"
    )
  return TEMPORAL_MODELS[kind](num_classes=num_classes, **fields)
