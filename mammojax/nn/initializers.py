"""Weight initialisers of the PyTorch layers our models port, as Flax initialisers.

Plain initialisers, without logical axes: wrap them with :mod:`mammojax.nn.partitioning` for a
parameter. Biases keep Flax's zeros everywhere (torch draws them uniformly), as every model here
always has.

* :data:`torch_default_kernel`: ``nn.Linear`` / ``nn.Conv*d`` default weights,
  ``kaiming_uniform_(a=sqrt(5))`` == ``uniform(+-1/sqrt(fan_in))`` == variance scaling 1/3 on
  fan-in, uniform.
* :data:`torch_default_transposed_kernel`: ``nn.ConvTranspose*d`` default weights: the same
  draw, but torch takes fan-in from the weight's second axis, i.e. the OUTPUT channels (and the
  kernel volume); on a Flax ``[*k, I, O]`` kernel that is ``in_axis=-1, out_axis=-2``.
* :data:`he_fan_out_normal`: ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``, i.e.
  ``normal(0, sqrt(2 / (k * k * out)))``, torchvision's ResNet and EfficientNet convs.
* :data:`torch_multihead_qkv_kernel`: ``nn.MultiheadAttention``'s ``in_proj_weight``
  (``xavier_uniform_``).
"""

from __future__ import annotations

from flax import linen as nn

Initializer = nn.initializers.Initializer

torch_default_kernel: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
torch_default_transposed_kernel: Initializer = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2
)
he_fan_out_normal: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
torch_multihead_qkv_kernel: Initializer = nn.initializers.xavier_uniform()
