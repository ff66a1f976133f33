"""Convergence statistics over a checkpoint axis, and the PER <-> convergence link.

Convention: the checkpoint axis is last, `values [..., C]`, with `steps [C]` ascending
training steps (step 0 = initialisation is allowed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from analysis.validation import require_ndim, require_nonempty

PAPER_PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0)


def _check_steps(values, steps):
  require_ndim("values", values, 1)
  require_nonempty("values", values)
  if steps.ndim != 1 or steps.shape[0] != values.shape[-1]:
    raise ValueError(
      f"steps must be [C] matching values [..., C]: values {values.shape}, steps {steps.shape}"
    )


def percentile_bands(values: jax.Array, percentiles=PAPER_PERCENTILES) -> jax.Array:
  """Percentiles across layers for every checkpoint (the paper's Figure 1 bands).

  Args:
    values: [C, L] (e.g. CKA per checkpoint and layer; layers last).
    percentiles: P numbers in [0, 100] (default 10/25/50/75/90).
  Returns:
    [P, C]; linear interpolation (numpy's default). NaN in a row propagates to its bands.
  """
  require_ndim("values", values, 2)
  require_nonempty("values", values)
  return jnp.percentile(values, jnp.asarray(percentiles, dtype=values.dtype), axis=-1)


def convergence_step(values: jax.Array, steps: jax.Array, threshold: float = 0.9) -> jax.Array:
  """The first step from which the value stays >= threshold at every later checkpoint.

  Args:
    values: [..., C] (e.g. CKA against the final checkpoint). steps: [C] ascending.
  Returns:
    [...] float step; NaN if the last value is below the threshold (never converged) or
    any value is NaN from that point on (NaN compares false).
  """
  _check_steps(values, steps)
  above = values >= threshold
  # stays[t] = all(above[t:]): reverse cumulative AND.
  stays = jnp.flip(jnp.cumprod(jnp.flip(above, -1).astype(jnp.int32), axis=-1), -1) > 0
  first = jnp.argmax(stays, axis=-1)
  step = jnp.asarray(steps, dtype=jnp.result_type(values.dtype, jnp.float32))[first]
  return jnp.where(stays[..., -1], step, jnp.nan)


def log_step_axis(steps: jax.Array) -> jax.Array:
  """x = log(1 + step): finite at step 0 (initialisation) and ~log(step) later."""
  return jnp.log1p(jnp.asarray(steps, dtype=jnp.float32))


def area_under_log_step_curve(
  values: jax.Array, steps: jax.Array, normalise: bool = True
) -> jax.Array:
  """Trapezoidal area under the curve over x = log(1 + step) (step 0 maps to x = 0).

  Args:
    values: [..., C]. steps: [C] ascending, C >= 2.
    normalise: divide by the x-range, so the result is the curve's mean over log-steps
      (1.0 = similar to the reference from the start).
  Returns:
    [...]; NaN if any value is NaN.
  """
  _check_steps(values, steps)
  if values.shape[-1] < 2:
    raise ValueError(f"need at least 2 checkpoints, got values {values.shape}")
  x = log_step_axis(steps).astype(values.dtype)
  widths = x[1:] - x[:-1]
  area = jnp.sum(widths * (values[..., 1:] + values[..., :-1]) / 2, axis=-1)
  return area / (x[-1] - x[0]) if normalise else area


def pearson(x: jax.Array, y: jax.Array) -> jax.Array:
  """Pearson correlation over the last axis. x, y: [..., m] -> [...]; NaN if constant."""
  xc = x - jnp.mean(x, axis=-1, keepdims=True)
  yc = y - jnp.mean(y, axis=-1, keepdims=True)
  return jnp.sum(xc * yc, axis=-1) / jnp.sqrt(jnp.sum(xc * xc, axis=-1) * jnp.sum(yc * yc, axis=-1))


def average_ranks(x: jax.Array) -> jax.Array:
  """Ranks 1..m over the last axis, ties get their average rank (scipy.stats.rankdata).

  O(m^2) comparisons, meant for layer counts (m <= a few hundred). x: [..., m] -> [..., m].
  """
  less = jnp.sum(x[..., None, :] < x[..., :, None], axis=-1)
  equal = jnp.sum(x[..., None, :] == x[..., :, None], axis=-1)
  return (less + (equal + 1) / 2).astype(jnp.result_type(x.dtype, jnp.float32))


def spearman(x: jax.Array, y: jax.Array) -> jax.Array:
  """Spearman rank correlation (Pearson of average ranks). [..., m] -> [...]."""
  return pearson(average_ranks(x), average_ranks(y))


def per_convergence_correlation(
  per: jax.Array,
  convergence: jax.Array,
  key: jax.Array,
  num_bootstrap: int = 1000,
  confidence: float = 0.95,
) -> dict[str, jax.Array]:
  """Correlation between a layer's PER and its convergence, with a bootstrap over layers.

  Args:
    per: [L] (e.g. PER per layer at a checkpoint or averaged). convergence: [L] (e.g.
      `cka_auc` or `convergence_step` per layer). key: PRNG key.
    num_bootstrap: B resamples of the L layers with replacement.
    confidence: central interval mass (percentile bootstrap).
  Returns:
    {'pearson', 'spearman', 'pearson_low', 'pearson_high', 'spearman_low',
     'spearman_high'}: scalars. Resamples that draw a constant vector (undefined
    correlation) are ignored by the interval (nanpercentile); NaN layers propagate.
  """
  require_ndim("per", per, 1)
  if per.shape != convergence.shape:
    raise ValueError(f"per and convergence must be [L] alike: {per.shape} vs {convergence.shape}")
  if per.shape[0] < 3:
    raise ValueError(f"need at least 3 layers to correlate, got {per.shape}")
  n = per.shape[0]
  idx = jax.random.randint(key, (num_bootstrap, n), 0, n)
  boot_pearson = pearson(per[idx], convergence[idx])
  boot_spearman = spearman(per[idx], convergence[idx])
  tail = 100 * (1 - confidence) / 2
  bounds = jnp.asarray([tail, 100 - tail])
  p_lo, p_hi = jnp.nanpercentile(boot_pearson, bounds)
  s_lo, s_hi = jnp.nanpercentile(boot_spearman, bounds)
  return {
    "pearson": pearson(per, convergence),
    "spearman": spearman(per, convergence),
    "pearson_low": p_lo,
    "pearson_high": p_hi,
    "spearman_low": s_lo,
    "spearman_high": s_hi,
  }
