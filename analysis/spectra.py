"""Singular values and the spectral metrics of the study, batched over any leading axes.

Every metric takes singular values `s [..., m]` (any order; they are sorted where order
matters) and returns `[...]`. A zero matrix (all s = 0) has no defined spectrum
distribution: effective rank, PER and stable rank return NaN for it, condition number
returns inf or NaN; these NaN are documented values, not errors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from analysis.registry import metrics_in_family, register_metric
from analysis.validation import require_ndim, require_nonempty, require_rank_bound

_HIGHEST = jax.lax.Precision.HIGHEST
# Matrices at least this large (smaller side) are decomposed one at a time; see below.
_SEQUENTIAL_SVD_MIN_DIM = 128


def singular_values(matrices: jax.Array) -> jax.Array:
  """Singular values, descending, of a batch of matrices.

  Args:
    matrices: [..., a, b].
  Returns:
    [..., min(a, b)], descending.
  """
  require_ndim("matrices", matrices, 2)
  require_nonempty("matrices", matrices)
  # float16/bfloat16 weights (as stored on the Hub) are decomposed in float32.
  matrices = matrices.astype(jnp.promote_types(matrices.dtype, jnp.float32))
  *lead, a, b = matrices.shape
  count = math.prod(lead)
  if count <= 1 or min(a, b) < _SEQUENTIAL_SVD_MIN_DIM:
    return jnp.linalg.svd(matrices, compute_uv=False)
  # Measured on CPU (jax 0.10): one batched SVD call over large matrices is ~10x slower than
  # the same SVDs one by one, so large batches go through lax.map (a compiled loop).
  flat = matrices.reshape(count, a, b)
  values = jax.lax.map(lambda m: jnp.linalg.svd(m, compute_uv=False), flat)
  return values.reshape(*lead, min(a, b))


def _r_factor(tall: jax.Array) -> jax.Array:
  """R of a reduced QR: [..., m, r] -> [..., r, r] (only R is needed; Q is orthonormal)."""
  return jnp.linalg.qr(tall, mode="r")


def product_singular_values(left: jax.Array, right: jax.Array, method: str = "auto") -> jax.Array:
  """Singular values of the product left @ right without forming it when that is cheaper.

  With left = Q_l R_l and right^T = Q_r R_r (reduced QR), left @ right = Q_l (R_l R_r^T) Q_r^T,
  and Q_l, Q_r have orthonormal columns, so the singular values of the product are those of
  the small r x r core R_l R_r^T. For a head's OV circuit (r = d_head) this replaces a d x d
  SVD by two thin QRs and a d_head x d_head SVD.

  Args:
    left: [..., m, r].
    right: [..., r, n].
    method: 'core' (QR core), 'direct' (SVD of the formed product) or 'auto' (core when
      r < min(m, n), i.e. when it is smaller; otherwise direct, since a square core is
      no cheaper than the product it replaces).
  Returns:
    [..., min(m, n, r)] for 'core', [..., min(m, n)] for 'direct' (the extra values are
    zero up to rounding, since the product has rank <= r). Descending.
  """
  require_ndim("left", left, 2)
  require_ndim("right", right, 2)
  if left.shape[-1] != right.shape[-2]:
    raise ValueError(f"inner dims differ: left {left.shape} @ right {right.shape}")
  dtype = jnp.promote_types(jnp.result_type(left, right), jnp.float32)
  left, right = left.astype(dtype), right.astype(dtype)
  m, r = left.shape[-2:]
  n = right.shape[-1]
  if method == "auto":
    method = "core" if r < min(m, n) else "direct"
  if method == "direct":
    return singular_values(jnp.matmul(left, right, precision=_HIGHEST))
  if method != "core":
    raise ValueError(f"method must be 'auto', 'core' or 'direct', got {method!r}")
  if r > m or r > n:
    raise ValueError(f"'core' needs r <= min(m, n); got left {left.shape}, right {right.shape}")
  r_left = _r_factor(left)
  r_right = _r_factor(jnp.swapaxes(right, -1, -2))
  core = jnp.matmul(r_left, jnp.swapaxes(r_right, -1, -2), precision=_HIGHEST)
  return singular_values(core)


def top_k(s: jax.Array, k: int) -> jax.Array:
  """The k largest singular values, descending; zero-padded if fewer than k are given.

  Args:
    s: [..., m]. k: static int.
  Returns:
    [..., k].
  """
  k = require_rank_bound(k)
  s = -jnp.sort(-s, axis=-1)
  m = s.shape[-1]
  if m >= k:
    return s[..., :k]
  # A rank-deficient factorisation returns fewer than k values; the missing ones are zero.
  return jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, k - m)])


@register_metric("effective_rank", "spectral")
def effective_rank(s: jax.Array) -> jax.Array:
  """Effective rank (Roy & Vetterli 2007): exp of the entropy of p_i = s_i / sum(s).

  Args:
    s: [..., m] singular values (>= 0).
  Returns:
    [...], in [1, m]; NaN where all s are 0.
  """
  require_ndim("s", s, 1)
  require_nonempty("s", s)
  total = jnp.sum(s, axis=-1, keepdims=True)
  p = s / total  # 0/0 -> NaN for a zero matrix, propagated on purpose.
  # 0 log 0 = 0; the inner where keeps log away from 0 so no -inf * 0 = NaN appears.
  safe_p = jnp.where(p > 0, p, 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(safe_p), 0.0), axis=-1)
  entropy = jnp.where(jnp.isnan(total[..., 0]), jnp.nan, entropy)
  entropy = jnp.where(total[..., 0] == 0, jnp.nan, entropy)
  return jnp.exp(entropy)


@register_metric("per", "spectral", needs_rank_bound=True)
def proportional_effective_rank(s: jax.Array, k: int) -> jax.Array:
  """Proportional effective rank PER = ER(top-k singular values) / k (docs/method.md).

  k is the rank bound: d_head for a head's OV matrix, d for the whole OV and the MLP.
  Args:
    s: [..., m] singular values. k: static int.
  Returns:
    [...], in [1/k, 1]; NaN for a zero matrix.
  """
  k = require_rank_bound(k)
  return effective_rank(top_k(s, k)) / k


@register_metric("condition_number", "spectral", needs_rank_bound=True)
def condition_number(s: jax.Array, k: int) -> jax.Array:
  """s_1 / s_k over the top-k singular values (k = rank bound, so a head's d x d OV
  matrix, which has rank <= d_head, is not trivially infinite).

  Args:
    s: [..., m]. k: static int.
  Returns:
    [...]; inf where s_k = 0 < s_1, NaN for a zero matrix.
  """
  top = top_k(s, k)
  return top[..., 0] / top[..., -1]


@register_metric("stable_rank", "spectral")
def stable_rank(s: jax.Array) -> jax.Array:
  """Stable rank ||A||_F^2 / ||A||_2^2 = sum(s^2) / max(s)^2.

  Args:
    s: [..., m].
  Returns:
    [...]; NaN for a zero matrix.
  """
  require_ndim("s", s, 1)
  s_max = jnp.max(s, axis=-1)
  # Divide by s_max first so that squaring cannot overflow float32 for large weights.
  return jnp.sum(jnp.square(s / s_max[..., None]), axis=-1)


@register_metric("frobenius_norm", "spectral")
def frobenius_norm(s: jax.Array) -> jax.Array:
  """Frobenius norm sqrt(sum(s^2)). s: [..., m] -> [...]."""
  require_ndim("s", s, 1)
  s_max = jnp.max(s, axis=-1)
  scale = jnp.where(s_max > 0, s_max, 1.0)  # scaled to avoid overflow in the squares
  return scale * jnp.sqrt(jnp.sum(jnp.square(s / scale[..., None]), axis=-1))


@register_metric("spectral_norm", "spectral")
def spectral_norm(s: jax.Array) -> jax.Array:
  """Spectral norm max(s). s: [..., m] -> [...]."""
  require_ndim("s", s, 1)
  return jnp.max(s, axis=-1)


def spectral_metrics(s: jax.Array, k: int) -> dict[str, jax.Array]:
  """Every registered 'spectral' metric of a batch of singular values, in one call.

  Args:
    s: [..., m] singular values. k: static int, the rank bound (used by metrics that
      take one, e.g. 'per' and 'condition_number').
  Returns:
    {metric name: [...]}, one entry per registered spectral metric.
  """
  k = require_rank_bound(k)
  out = {}
  for name, metric in metrics_in_family("spectral").items():
    out[name] = metric.fn(s, k) if metric.needs_rank_bound else metric.fn(s)
  return out
