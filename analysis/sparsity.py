"""Sparsity measures over the last axis: Gini index (Hurley & Rickard 2009) and Hoyer.

Both use |x|; to measure a whole matrix, reshape it to [..., m] first (the study does:
registered as 'entries' metrics, they run on weights, gradients and activations). An all-zero vector
has no defined sparsity and returns NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from analysis.registry import register_metric
from analysis.validation import require_ndim, require_nonempty


@register_metric(
  "gini", "entries", description="Gini index of |x|: sum_i (2i - m - 1) c_(i) / (m sum c)"
)
def gini(x: jax.Array) -> jax.Array:
  """Gini index of |x|: sum_i (2i - m - 1) c_(i) / (m sum c), c sorted ascending, i = 1..m.

  0 for a constant vector, (m-1)/m for a one-hot vector. x: [..., m] -> [...]; NaN if all 0.
  """
  require_ndim("x", x, 1)
  require_nonempty("x", x)
  c = jnp.sort(jnp.abs(x), axis=-1)
  m = c.shape[-1]
  weights = 2 * jnp.arange(1, m + 1, dtype=c.dtype) - m - 1
  return jnp.sum(weights * c, axis=-1) / (m * jnp.sum(c, axis=-1))


@register_metric(
  "hoyer", "entries", description="Hoyer: (sqrt(m) - ||x||_1 / ||x||_2) / (sqrt(m) - 1)"
)
def hoyer(x: jax.Array) -> jax.Array:
  """Hoyer sparsity (sqrt(m) - ||x||_1 / ||x||_2) / (sqrt(m) - 1), in [0, 1].

  x: [..., m] with m >= 2 -> [...]; NaN if all 0.
  """
  require_ndim("x", x, 1)
  m = x.shape[-1]
  if m < 2:
    raise ValueError(f"hoyer needs at least 2 entries on the last axis, got shape {x.shape}")
  l1 = jnp.sum(jnp.abs(x), axis=-1)
  l2 = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))
  root_m = jnp.sqrt(jnp.asarray(m, dtype=l1.dtype))
  return (root_m - l1 / l2) / (root_m - 1)
