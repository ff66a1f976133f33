"""Gradient statistics over a stack of G gradient batches (axis 0).

docs/method.md: gradients at a checkpoint's weights on the batches of the 11 steps around it;
gradient PER uses the singular values averaged over those batches; also recorded are
Frobenius norms and the mean cosine similarity of consecutive gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from analysis.spectra import proportional_effective_rank
from analysis.validation import require_ndim, require_rank_bound

_HIGHEST = jax.lax.Precision.HIGHEST


def _flatten_features(g, feature_ndim: int):
  if g.ndim < feature_ndim:
    raise ValueError(f"expected at least {feature_ndim} feature dims, got shape {g.shape}")
  lead = g.shape[: g.ndim - feature_ndim]
  return g.reshape(lead + (-1,))


def gradient_norms(grads: jax.Array, feature_ndim: int = 2) -> jax.Array:
  """Frobenius norm over the trailing `feature_ndim` axes. [..., *f] -> [...]."""
  flat = _flatten_features(grads, feature_ndim)
  return jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1))


def mean_gradient_norm(grads: jax.Array, feature_ndim: int = 2) -> jax.Array:
  """Mean over G batches of the Frobenius norm. [G, ..., *f] -> [...]."""
  return jnp.mean(gradient_norms(grads, feature_ndim), axis=0)


def cosine_similarity(a: jax.Array, b: jax.Array, feature_ndim: int = 2) -> jax.Array:
  """Cosine of the flattened trailing axes. a, b: [..., *f] -> [...]; NaN if either is 0."""
  fa, fb = _flatten_features(a, feature_ndim), _flatten_features(b, feature_ndim)
  dot = jnp.sum(fa * fb, axis=-1)
  return dot / (jnp.linalg.norm(fa, axis=-1) * jnp.linalg.norm(fb, axis=-1))


def mean_consecutive_cosine(grads: jax.Array, feature_ndim: int = 2) -> jax.Array:
  """Mean cosine similarity of consecutive gradients g_t, g_{t+1} over t = 0..G-2.

  Args:
    grads: [G, ..., *f], G >= 2 (ordered by training step).
  Returns:
    [...].
  """
  require_ndim("grads", grads, feature_ndim + 1)
  if grads.shape[0] < 2:
    raise ValueError(f"need at least 2 gradient batches on axis 0, got shape {grads.shape}")
  return jnp.mean(cosine_similarity(grads[:-1], grads[1:], feature_ndim), axis=0)


def mean_singular_values(s: jax.Array) -> jax.Array:
  """Singular values averaged over G batches (each sorted descending first). [G, ..., m] ->
  [..., m]."""
  require_ndim("s", s, 2)
  return jnp.mean(-jnp.sort(-s, axis=-1), axis=0)


def mean_singular_value_per(s: jax.Array, k: int) -> jax.Array:
  """PER of the mean singular values over G gradient batches. s: [G, ..., m] -> [...]."""
  k = require_rank_bound(k)
  return proportional_effective_rank(mean_singular_values(s), k)


def factored_inner_product(left_a, right_a, left_b, right_b) -> jax.Array:
  """<A, B>_F for A = left_a @ right_a, B = left_b @ right_b without forming them.

  <A, B> = sum((left_a^T left_b) * (right_a right_b^T)): r x r work instead of m x n.
  left_*: [..., m, r], right_*: [..., r, n] -> [...].
  """
  gram_left = jnp.matmul(jnp.swapaxes(left_a, -1, -2), left_b, precision=_HIGHEST)
  gram_right = jnp.matmul(right_a, jnp.swapaxes(right_b, -1, -2), precision=_HIGHEST)
  return jnp.sum(gram_left * gram_right, axis=(-2, -1))
