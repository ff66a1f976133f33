"""SVCCA (Raghu et al. 2017) and PWCCA (Morcos et al. 2018): CCA-based similarity of two
activation matrices of the same n inputs, batched, jit- and vmap-able.

Conventions as in `analysis.similarity`: x [..., n, dx], y [..., n, dy], samples (tokens) on
axis -2, features last; leading axes broadcast.

CCA. Columns are centred (X_c, Y_c). An orthonormal basis of each column space comes from
the SVD X_c = U S V^T: Q_x = the columns of U that are kept. The canonical correlations
rho_1 >= ... >= rho_r, r = min(k_x, k_y), are the singular values of Q_x^T Q_y
(Bjorck & Golub 1973), and with Q_x^T Q_y = A diag(rho) B^T the canonical variates of x are
the columns of H = Q_x A (orthonormal, n-dim).

Which directions are kept (k_x of them):
  cca_similarity, pwcca: every direction with s_i > max(n, d) * eps * s_1 (numpy's
    matrix_rank rule): the column space of x, so a rank-deficient x is handled exactly.
  svcca: the fewest leading directions that explain 99% of the variance (Raghu et al.):
    direction i is kept while sum_{j<i} s_j^2 < 0.99 * sum_j s_j^2.

  SVCCA = (1/r) sum_{i<=r} rho_i  (the mean canonical correlation after the SVD step).
  PWCCA = sum_{i<=r} alpha_i rho_i, alpha_i = a_i / sum_j a_j, a_i = sum_j |<h_i, x_j>|
    (Morcos et al.'s projection weights: how much of the neurons x_j, the centred columns
    of X, canonical variate h_i accounts for). Like their code, the weights are taken on
    the side with fewer features: x when dx <= dy, else y (PWCCA is not symmetric).

n <= dx + dy is refused (ValueError at trace time, shapes are static): the two column
spaces live in the (n-1)-dim space of centred samples, so they share at least dx + dy - n + 1
directions and that many canonical correlations are 1 whatever the data; PWCCA's weights
are then not even defined (L1 weights change with the basis chosen inside the repeated
correlations). Raghu et al. ask for n >> d.
A constant x or y (no variance) gives NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from analysis.registry import register_metric
from analysis.similarity import _broadcast_apply
from analysis.validation import require_ndim, require_nonempty

_HIGHEST = jax.lax.Precision.HIGHEST
#: Variance the SVD step of SVCCA keeps (Raghu et al. 2017).
SVCCA_VARIANCE = 0.99


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def _check(x, y) -> None:
  require_ndim("x", x, 2)
  require_ndim("y", y, 2)
  require_nonempty("x", x)
  require_nonempty("y", y)
  n = x.shape[-2]
  if y.shape[-2] != n:
    raise ValueError(f"x and y need the same number of samples (axis -2): x {x.shape}, y {y.shape}")
  d = x.shape[-1] + y.shape[-1]
  if n <= d:
    raise ValueError(
      f"CCA needs more samples than features of x and y together (n > dx + dy): n={n}, "
      f"dx + dy={d} (x {x.shape}, y {y.shape}); with fewer, dx + dy - n + 1 canonical "
      "correlations are 1 whatever the data"
    )


def _basis(x, variance: float | None):
  """Orthonormal basis of centred x [n, d]: (Q [n, min(n, d)] with dropped columns zeroed,
  kept count []). variance None: the column space (rank rule); else the SVCCA rule."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  x = x - jnp.mean(x, axis=0, keepdims=True)
  u, s, _ = jnp.linalg.svd(x, full_matrices=False)
  if variance is None:
    eps = jnp.finfo(s.dtype).eps
    keep = s > max(x.shape) * eps * s[0]
  else:
    energy = jnp.square(s)
    before = jnp.cumsum(energy) - energy  # variance of the directions before i
    keep = (before < variance * jnp.sum(energy)) & (s > 0)
  return u * keep, jnp.sum(keep), x


def _correlations(qx, qy, kx, ky):
  """(rho [min], A [kx_max, min], mask [min]) of bases qx [n, a], qy [n, b]."""
  a, rho, _ = jnp.linalg.svd(_mm(qx.T, qy), full_matrices=False)
  r = jnp.minimum(kx, ky)
  mask = jnp.arange(rho.shape[-1]) < r
  return jnp.clip(rho, 0.0, 1.0), a, mask


def _mean_from_bases(bx, by):
  (qx, kx, _), (qy, ky, _) = bx, by
  rho, _, mask = _correlations(qx, qy, kx, ky)
  return jnp.sum(jnp.where(mask, rho, 0.0)) / jnp.sum(mask)


def _pwcca_from_bases(bx, by):
  """bx: the basis of the side the weights are taken on."""
  (qx, kx, xc), (qy, ky, _) = bx, by
  rho, a, mask = _correlations(qx, qy, kx, ky)
  h = _mm(qx, a)  # [n, min]: canonical variates of x
  weights = jnp.sum(jnp.abs(_mm(h.T, xc)), axis=-1)  # a_i = sum_j |<h_i, x_j>|
  weights = jnp.where(mask, weights, 0.0)
  return jnp.sum(weights * rho) / jnp.sum(weights)


def _mean_correlation(x, y, variance):
  return _mean_from_bases(_basis(x, variance), _basis(y, variance))


def _pwcca_single(x, y):
  if x.shape[-1] > y.shape[-1]:  # weights on the side with fewer features
    x, y = y, x
  return _pwcca_from_bases(_basis(x, None), _basis(y, None))


def cca_similarity(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean canonical correlation of x and y over their column spaces (no SVD truncation).

  Args:
    x: [..., n, dx]. y: [..., n, dy]; leading axes broadcast; n > dx + dy.
  Returns:
    [...], in [0, 1]; NaN for a constant x or y.
  """
  _check(x, y)
  return _broadcast_apply(lambda a, b: _mean_correlation(a, b, None), x, y, 2)


@register_metric(
  "svcca",
  "similarity",
  description="SVCCA: mean canonical correlation of the SVD directions explaining 99% of "
  "the variance (Raghu et al. 2017)",
)
def svcca(x: jax.Array, y: jax.Array, variance: float = SVCCA_VARIANCE) -> jax.Array:
  """SVCCA (Raghu et al. 2017): mean canonical correlation of the leading SVD directions of
  x and y that explain `variance` of each one's variance (module doc for the rule).

  Args:
    x: [..., n, dx]. y: [..., n, dy]; leading axes broadcast; n > dx + dy.
    variance: fraction of variance kept by the SVD step (static float in (0, 1]).
  Returns:
    [...], in [0, 1]; symmetric in x and y; NaN for a constant x or y.
  """
  _check(x, y)
  if not 0.0 < variance <= 1.0:
    raise ValueError(f"svcca variance must be in (0, 1], got {variance!r}")
  return _broadcast_apply(lambda a, b: _mean_correlation(a, b, variance), x, y, 2)


@register_metric(
  "pwcca",
  "similarity",
  description="PWCCA: sum_i alpha_i rho_i, alpha_i ~ sum_j |<h_i, x_j>| (Morcos et al. 2018)",
)
def pwcca(x: jax.Array, y: jax.Array) -> jax.Array:
  """PWCCA (Morcos et al. 2018): canonical correlations weighted by how much of the
  neurons each canonical variate accounts for (module doc for the formula).

  Args:
    x: [..., n, dx]. y: [..., n, dy]; leading axes broadcast; n > dx + dy.
  Returns:
    [...], in [0, 1]; NaN for a constant x or y. Weights come from x if dx <= dy, else
    from y.
  """
  _check(x, y)
  return _broadcast_apply(_pwcca_single, x, y, 2)


#: The CCA similarities by metric name, for the study and the registry.
CCA_METRICS = {"svcca": svcca, "pwcca": pwcca}


def pairwise_cca(acts: jax.Array, metric: str = "svcca") -> jax.Array:
  """A CCA similarity between every pair of checkpoints (same layer, same inputs).

  Each checkpoint's SVD is taken once ([C] SVDs of n x d), then every pair costs one
  d x d SVD (compiled loop over rows, vmapped over columns).
  Args:
    acts: [C, n, d] (vmap over a layer axis for [L, C, n, d]); n > 2d.
    metric: 'svcca' or 'pwcca'.
  Returns:
    [C, C]: entry (i, j) = metric(acts[i], acts[j]); ones on the diagonal up to rounding.
    SVCCA is symmetric; PWCCA is not (its weights come from entry i's activations).
  """
  require_ndim("acts", acts, 3)
  if metric not in CCA_METRICS:
    raise ValueError(f"pairwise_cca metric must be one of {tuple(CCA_METRICS)}, got {metric!r}")
  _check(acts[0], acts[0])
  variance = SVCCA_VARIANCE if metric == "svcca" else None
  bases = jax.vmap(lambda a: _basis(a, variance))(acts)
  pair = _mean_from_bases if metric == "svcca" else _pwcca_from_bases
  row = lambda bi: jax.vmap(lambda bj: pair(bi, bj))(bases)  # noqa: E731
  return jax.lax.map(row, bases)
