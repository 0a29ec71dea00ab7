"""Computing a function in a region of its own, so that XLA:CPU can neither fuse its producers
into its consumers nor fuse it into them.

XLA fuses cheap elementwise producers into every consumer, and a gather consumer then redoes
that arithmetic per gathered element in scalar code. In a chain of dependent interpolations
(each step's coordinates feed the next step's gathers) the re-computation nests: step ``k``
re-derives all ``k`` earlier steps, and the cost grows quadratically (measured on the nine-step
ICON digits chain: 220 ms unrolled against 9 ms with a barrier per step).
``jax.lax.optimization_barrier`` does not help: XLA:CPU's compiler removes it before fusion.

On CPU, :func:`computed_apart` evaluates ``fn`` as the taken branch of a ``lax.cond`` whose
predicate is computed at run time (and never selects the other branch), which XLA can neither
fuse through nor remove. The branch writes its results straight into the conditional's
output buffers. (An earlier identity barrier built from a zero-trip ``while`` loop cost a copy
of every array passing through it: 386 copies, about 41 ms of a 130 ms ICON digits train step
on a 2-core CPU.) Elsewhere ``fn`` is called directly: GPU and TPU fusion does not have this
problem, and a device-side predicate would cost a host round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def computed_apart(fn: Callable[..., Any], *args: Any) -> Any:
  """``fn(*args)``, its results materialised as buffers of their own (see module docstring).

  Args:
    fn: a pure function of JAX arrays (pytrees allowed) returning a pytree of arrays.
    *args: its arguments; at least one array among them.
  Returns:
    ``fn(*args)``, same values. Differentiable (forward and reverse mode) wherever ``fn`` is.
  """
  return jax.lax.platform_dependent(*args, cpu=lambda *a: _cpu_region(fn, *a), default=fn)


def _cpu_region(fn, *args):
  leaves = jax.tree.leaves(args)
  if not leaves:
    raise ValueError("computed_apart needs at least one array argument")
  # A float, even for integer arrays: jnp.isnan of an integer is constant-folded to False.
  probe = jnp.asarray(leaves[0]).reshape(-1)[0].astype(jnp.float32)
  # Never true (a number is not both NaN and infinite), but XLA cannot prove it, so the
  # conditional and its branches stay. The other branch only has to differ from ``fn``.
  never = jnp.isnan(probe) & jnp.isinf(probe)
  shapes = jax.eval_shape(fn, *args)

  def zeros(*_):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  return jax.lax.cond(never, zeros, fn, *args)
