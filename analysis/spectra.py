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

# ----- routes to the singular values ------------------------------------------------------
#
# Three routes give the singular values of an m x n matrix (k = min(m, n)):
#   'svd'       the backend's SVD (LAPACK gesdd on CPU; on GPU a batched Jacobi SVD for
#               small matrices, looped otherwise; on TPU a slow Jacobi/polar solver).
#   'qr_svd'    R = qr(A) (k x k, Householder, backward stable) then the SVD of R: the same
#               accuracy as 'svd', less work when max(m, n) >> k.
#   'gram_eigh' eigh of the k x k Gram matrix (A^T A or A A^T, float32 HIGHEST), s = sqrt(l).
#               A matmul and a symmetric eigensolver: the fastest route on every backend for
#               tall matrices, but it squares the condition number, so small singular values
#               lose accuracy. It is therefore GUARDED: per matrix, its values are used only
#               when they are provably accurate enough (see `_gram_is_accurate`); otherwise
#               that matrix falls back to 'qr_svd' (tall) or 'svd' (square).
ROUTES = ("auto", "svd", "qr_svd", "gram_eigh")

# Measured by `python -m benchmarks.bench_spectra --routes` (jax 0.10.2, float32) on
# U diag(s) V^T with log-spaced s (2048x512, 512x512, 512x128, 1024x64; kappa 1e1..1e6):
# |eigvalsh(A^T A) - s^2| <= 2.85 eps s_max^2, so 10 keeps a margin of ~3.5x;
GRAM_EIGENVALUE_ERROR = 10.0
# |svd(A) - s| <= 0.42 sqrt(k) eps s_max (0.8 in an earlier probe at 512x512), so 2.
SVD_ERROR_PER_SQRT_DIM = 2.0
# Accuracy the routes promise: effective rank / PER within this relative error, and every
# singular value that `condition_number` reports within CONDITION_RELATIVE_ERROR.
ER_RELATIVE_ERROR = 5e-5
CONDITION_RELATIVE_ERROR = 1e-2
# Measured (bench_spectra --routes, CPU, process-CPU seconds per matrix, two runs on a
# loaded 2-core host): 2048x512: gesdd 1.30 | 2.21, QR+SVD 1.12 | 1.87, Gram+eigh 0.33 |
# 0.57 (an earlier probe of the same routes: 512x512 gesdd 0.30, Gram+eigh 0.21; 128x128
# gesdd 0.018, Gram+eigh 0.019). The Gram route is ~4x faster on tall matrices, but on the
# study's real gradients its guard refuses them (a 70m MLP gradient: bound 6e-4 on the ER
# error, because LayerNorm leaves it an exact null direction and its spectrum spans two
# decades; bench_spectra prints how many it accepts: 0 of 12), and eigh + fallback costs
# more than the SVD alone. QR+SVD does the very operations LAPACK's gesdd does for a tall
# matrix (its path for m >> n is geqrf, then the SVD of R): the values come out bit-equal
# and the timings differ only by noise (side by side on 70m gradients: 1.16x wall, 0.67x
# process CPU). So on CPU the rule takes gesdd for every shape; 'qr_svd' is the Gram
# route's fallback on accelerators, whose SVDs of tall matrices do not reduce first.
# From this aspect ratio a matrix counts as tall/wide (its Gram fallback is QR+SVD).
TALL_ASPECT = 2.0
# On CPU, a batch of matrices at least this large (smaller side) is decomposed one at a time
# (lax.map): one batched LAPACK call over large matrices was ~10x slower than a loop.
_SEQUENTIAL_MIN_DIM = 128
# GPU: cuSOLVER's batched Jacobi SVD covers matrices up to 32 x 32; larger SVDs are looped
# on the host, so above that the Gram route (batched syevd) is preferred.
GPU_BATCHED_SVD_MAX_DIM = 32


def choose_route(shape: tuple[int, ...], dtype=jnp.float32, platform: str | None = None) -> str:
  """The route `singular_values(route='auto')` takes for matrices [..., m, n].

  CPU: 'svd' (LAPACK gesdd; measured, see above).
  GPU: 'svd' up to 32 x 32 (truly batched), else 'gram_eigh'.
  TPU: 'gram_eigh' (its SVD is a slow Jacobi solver; eigh-based routes are recommended).
  'gram_eigh' is always guarded, so the rule trades only speed, never accuracy. On GPU and
  TPU the rule follows the documented facts above; benchmarks/bench_spectra.py --routes is
  the measurement to rerun there.
  Args:
    shape: the matrices' shape; dtype: their dtype (unused today: float64 Gram matrices are
      resolved by the guard's eps); platform: 'cpu' | 'gpu' | 'tpu' (default: jax's backend).
  """
  del dtype
  platform = platform or jax.default_backend()
  m, n = shape[-2:]
  small = min(m, n)
  if platform == "tpu":
    return "gram_eigh"
  if platform in ("gpu", "cuda", "rocm"):
    return "svd" if small <= GPU_BATCHED_SVD_MAX_DIM else "gram_eigh"
  return "svd"


def _accurate_route(shape) -> str:
  m, n = shape[-2:]
  return "qr_svd" if max(m, n) >= TALL_ASPECT * min(m, n) else "svd"


def _svd_values(matrices: jax.Array) -> jax.Array:
  return jnp.linalg.svd(matrices, compute_uv=False)


def _qr_svd_values(matrices: jax.Array) -> jax.Array:
  """SVD of the k x k R factor of the tall orientation. [..., m, n] -> [..., k]."""
  if matrices.shape[-2] < matrices.shape[-1]:
    matrices = jnp.swapaxes(matrices, -1, -2)
  return _svd_values(jnp.linalg.qr(matrices, mode="r"))


def _gram_values(matrices: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Singular values from the k x k Gram matrix, and whether they are accurate.

  Returns:
    (s [..., k] descending, accurate [...] bool).
  """
  if matrices.shape[-2] < matrices.shape[-1]:
    matrices = jnp.swapaxes(matrices, -1, -2)
  gram = jnp.matmul(jnp.swapaxes(matrices, -1, -2), matrices, precision=_HIGHEST)
  eigenvalues = jnp.linalg.eigvalsh(gram)[..., ::-1]  # descending
  return jnp.sqrt(jnp.maximum(eigenvalues, 0.0)), _gram_is_accurate(eigenvalues)


def _gram_is_accurate(eigenvalues: jax.Array) -> jax.Array:
  """Whether Gram eigenvalues l [..., k] (descending) give accurate singular values.

  Each l_i is within d = GRAM_EIGENVALUE_ERROR * eps * l_max of s_i^2, so s_i lies in
  [sqrt(l_i - d), sqrt(l_i + d)]. Accurate means both:
  - the smallest value, hence every value, is within CONDITION_RELATIVE_ERROR
    (d / (2 l_min) <= 1e-2): a condition number computed from them is right;
  - the first-order bound sum_i |log p_i + H| ds_i / sum(s) on the relative error of the
    effective rank exp(H) (p = s / sum(s)) is at most ER_RELATIVE_ERROR.
  Zero, NaN or inf matrices are never accurate (the fallback route handles them).
  """
  eps = jnp.finfo(eigenvalues.dtype).eps
  top = eigenvalues[..., :1]
  slack = GRAM_EIGENVALUE_ERROR * eps * top
  low = jnp.sqrt(jnp.maximum(eigenvalues - slack, 0.0))
  high = jnp.sqrt(jnp.maximum(eigenvalues, 0.0) + slack)
  s = jnp.sqrt(jnp.maximum(eigenvalues, 0.0))
  total = jnp.sum(s, axis=-1, keepdims=True)
  p = jnp.maximum(s / total, jnp.finfo(s.dtype).tiny)
  entropy = -jnp.sum(p * jnp.log(p), axis=-1, keepdims=True)
  er_bound = jnp.sum(jnp.abs(jnp.log(p) + entropy) * (high - low), axis=-1) / total[..., 0]
  resolved = eigenvalues[..., -1] * 2 * CONDITION_RELATIVE_ERROR >= slack[..., 0]
  return resolved & (er_bound <= ER_RELATIVE_ERROR) & (top[..., 0] > 0) & jnp.isfinite(er_bound)


def _per_matrix(fn, matrices: jax.Array, sequential: bool) -> jax.Array:
  """fn over the flattened batch [c, m, n]: one call, or a compiled loop (lax.map)."""
  return jax.lax.map(fn, matrices) if sequential else fn(matrices)


def singular_values(matrices: jax.Array, route: str = "auto") -> jax.Array:
  """Singular values, descending, of a batch of matrices, by the route for this backend.

  Every route returns the same values to float32 accuracy: the Gram route is guarded and
  falls back per matrix (a real conditional inside lax.map on CPU, one batch-level
  conditional elsewhere; under a caller's vmap both branches run, so pass the batch here
  rather than vmapping this function). Inputs are promoted to at least float32.

  Args:
    matrices: [..., a, b].
    route: 'auto' (`choose_route`), 'svd', 'qr_svd' or 'gram_eigh' (guarded).
  Returns:
    [..., min(a, b)], descending.
  """
  require_ndim("matrices", matrices, 2)
  require_nonempty("matrices", matrices)
  if route not in ROUTES:
    raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
  # float16/bfloat16 weights (as stored on the Hub) are decomposed in float32.
  matrices = matrices.astype(jnp.promote_types(matrices.dtype, jnp.float32))
  *lead, a, b = matrices.shape
  if route == "auto":
    route = choose_route(matrices.shape, matrices.dtype)
  count = math.prod(lead)
  flat = matrices.reshape(count, a, b)
  sequential = jax.default_backend() == "cpu" and count > 1 and min(a, b) >= _SEQUENTIAL_MIN_DIM
  accurate = _qr_svd_values if _accurate_route((a, b)) == "qr_svd" else _svd_values
  if route == "svd":
    values = _per_matrix(_svd_values, flat, sequential)
  elif route == "qr_svd":
    values = _per_matrix(_qr_svd_values, flat, sequential)
  elif sequential:

    def guarded(matrix):
      s, ok = _gram_values(matrix)
      return jax.lax.cond(ok, lambda: s, lambda: accurate(matrix))

    values = jax.lax.map(guarded, flat)
  else:
    s, ok = _gram_values(flat)
    values = jax.lax.cond(jnp.all(ok), lambda: s, lambda: jnp.where(ok[:, None], s, accurate(flat)))
  return values.reshape(*lead, min(a, b))


def _r_factor(tall: jax.Array) -> jax.Array:
  """R of a reduced QR: [..., m, r] -> [..., r, r] (only R is needed; Q is orthonormal)."""
  return jnp.linalg.qr(tall, mode="r")


def product_singular_values(
  left: jax.Array, right: jax.Array, method: str = "auto", route: str = "auto"
) -> jax.Array:
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
    route: how the core (or the product) is decomposed, see `singular_values`.
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
    return singular_values(jnp.matmul(left, right, precision=_HIGHEST), route)
  if method != "core":
    raise ValueError(f"method must be 'auto', 'core' or 'direct', got {method!r}")
  if r > m or r > n:
    raise ValueError(f"'core' needs r <= min(m, n); got left {left.shape}, right {right.shape}")
  r_left = _r_factor(left)
  r_right = _r_factor(jnp.swapaxes(right, -1, -2))
  core = jnp.matmul(r_left, jnp.swapaxes(r_right, -1, -2), precision=_HIGHEST)
  return singular_values(core, route)


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


@register_metric("effective_rank", "spectral", default=("weights", "gradients"))
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


@register_metric("per", "spectral", needs_rank_bound=True, default=("weights", "gradients"))
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


def condition_resolution(s: jax.Array) -> jax.Array:
  """Smallest s_k / s_1 that float SVDs of a matrix with m = s.shape[-1] values resolve to
  CONDITION_RELATIVE_ERROR: SVD_ERROR_PER_SQRT_DIM * sqrt(m) * eps / 1e-2 (float32, m = 512:
  5.4e-4, i.e. condition numbers up to ~1800; float64: ~1e12). A scalar."""
  eps = jnp.finfo(s.dtype).eps
  return SVD_ERROR_PER_SQRT_DIM * math.sqrt(s.shape[-1]) * eps / CONDITION_RELATIVE_ERROR


@register_metric(
  "condition_number",
  "spectral",
  needs_rank_bound=True,
  refined=True,
  default=("weights", "gradients"),
  description="s_1 / s_k over the top-k singular values (k the rank bound), refined in float64",
)
def condition_number(s: jax.Array, k: int) -> jax.Array:
  """s_1 / s_k over the top-k singular values (k = rank bound, so a head's d x d OV
  matrix, which has rank <= d_head, is not trivially infinite).

  NaN where 0 < s_k < s_1 * condition_resolution(s): the SVD of a matrix stored in this
  dtype cannot resolve so small an s_k to 1e-2 relative (its absolute error is about
  sqrt(m) eps s_1), so the ratio would be noise; NaN says "unresolved", never a wrong
  number. In float32 that is a condition number above ~1800 for m = 512.
  Args:
    s: [..., m]. k: static int.
  Returns:
    [...]; inf where s_k = 0 < s_1 (k exceeds the values given), NaN for a zero matrix or
    an unresolved s_k.
  """
  top = top_k(s, k)
  first, last = top[..., 0], top[..., -1]
  unresolved = (last > 0) & (last < first * condition_resolution(s))
  return jnp.where(unresolved, jnp.nan, first / last)


@register_metric("stable_rank", "spectral", default=("weights", "gradients"))
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


@register_metric("frobenius_norm", "spectral", default=("weights", "gradients"))
def frobenius_norm(s: jax.Array) -> jax.Array:
  """Frobenius norm sqrt(sum(s^2)). s: [..., m] -> [...]."""
  require_ndim("s", s, 1)
  s_max = jnp.max(s, axis=-1)
  scale = jnp.where(s_max > 0, s_max, 1.0)  # scaled to avoid overflow in the squares
  return scale * jnp.sqrt(jnp.sum(jnp.square(s / scale[..., None]), axis=-1))


@register_metric("spectral_norm", "spectral", default=("weights", "gradients"))
def spectral_norm(s: jax.Array) -> jax.Array:
  """Spectral norm max(s). s: [..., m] -> [...]."""
  require_ndim("s", s, 1)
  return jnp.max(s, axis=-1)


@register_metric("nuclear_norm", "spectral", default=("weights", "gradients"))
def nuclear_norm(s: jax.Array) -> jax.Array:
  """Nuclear (trace) norm sum(s). s: [..., m] -> [...]."""
  require_ndim("s", s, 1)
  return jnp.sum(s, axis=-1)


# ----- condition numbers float32 cannot resolve -------------------------------------------
#
# A float32 SVD resolves s_k only down to ~sqrt(m) eps32 s_1 (`condition_resolution`), so a
# condition number above ~1800 (m = 512) is NaN from float32 values. `refine_singular_values`
# recomputes, for the matrices where that happens, their singular values in float64 from
# the same (float32) entries. float64 normally needs jax_enable_x64 for the whole process,
# which would change every default dtype; instead the recomputation is traced inside
# `jax.enable_x64(True)`, a context that switches x64 on for that part of the trace only:
# it works inside a jitted float32 program (one compiled program, a float64 island), under
# vmap and lax.map. It runs under lax.cond, so only when some matrix of the batch needs it
# (under vmap both branches run). TPUs have no float64: there the values are left as they
# are and an unresolved condition number stays NaN (`float64_supported`). Even float64
# resolves s_k only to ~sqrt(m) eps64 s_1 (a condition number ~1e12 for m = 512); beyond
# that it stays NaN.


def float64_supported(platform: str | None = None) -> bool:
  """Whether the backend computes float64 SVDs (CPU, GPU: yes; TPU: no)."""
  return (platform or jax.default_backend()) != "tpu"


def unresolved(s: jax.Array, k: int) -> jax.Array:
  """Where condition_number(s, k) is NaN because s_k is below this dtype's resolution.
  s: [..., m] -> [...] bool."""
  top = top_k(s, k)
  first, last = top[..., 0], top[..., -1]
  return (last > 0) & (last < first * condition_resolution(s))


def refine_singular_values(s: jax.Array, k: int, fn, inputs) -> jax.Array:
  """s where float32 resolves the condition number, else fn(inputs in float64): float64.

  Args:
    s: [..., m] float32 singular values of some matrices; k: the rank bound (static int).
    fn: inputs -> [..., m], how s was computed (e.g. `singular_values`), traced again on
      `inputs` (a pytree of arrays) cast to float64.
  Returns:
    [..., m] float64 (x64 on for that part of the trace only, see above); s itself,
    unchanged, where float64 is not supported (TPU).
  """
  if not float64_supported():
    return s
  need = unresolved(s, k)
  with jax.enable_x64(True):
    wide = s.astype(jnp.float64)

    def recompute():
      s64 = fn(jax.tree.map(lambda x: x.astype(jnp.float64), inputs))
      return jnp.where(need[..., None], s64, wide)

    return jax.lax.cond(jnp.any(need), recompute, lambda: wide)


def spectral_metrics(
  s: jax.Array, k: int, refined: jax.Array | None = None
) -> dict[str, jax.Array]:
  """Every registered 'spectral' metric of a batch of singular values, in one call.

  Args:
    s: [..., m] singular values. k: static int, the rank bound (used by metrics that
      take one, e.g. 'per' and 'condition_number').
    refined: `refine_singular_values(s, ...)` (float64, [..., m]) or None; the metrics
      registered with `refined=True` (the condition number) read it instead of s, in
      float64, and return s's dtype.
  Returns:
    {metric name: [...]}, one entry per registered spectral metric.
  """
  k = require_rank_bound(k)
  out = {}
  for name, metric in metrics_in_family("spectral").items():
    if metric.refined and refined is not None and refined.dtype != s.dtype:
      with jax.enable_x64(True):
        out[name] = _call(metric, refined, k).astype(s.dtype)
    else:
      out[name] = _call(metric, s, k)
  return out


def _call(metric, s, k):
  return metric.fn(s, k) if metric.needs_rank_bound else metric.fn(s)


def resolved_condition_number(matrices: jax.Array, k: int, route: str = "auto") -> jax.Array:
  """s_1 / s_k of a batch of matrices, refined in float64 where float32 cannot resolve s_k
  (`refine_singular_values`). matrices: [..., a, b] float32; k: static int -> [...] float32;
  NaN only where float64 cannot resolve it either (or on TPU, where float32's limit holds)."""
  s = singular_values(matrices, route)
  refined = refine_singular_values(s, k, lambda m: singular_values(m, route), matrices)
  if refined.dtype == s.dtype:
    return condition_number(s, k)
  with jax.enable_x64(True):
    return condition_number(refined, k).astype(s.dtype)


def activation_spectra(acts: jax.Array, route: str = "auto") -> dict[str, jax.Array]:
  """The spectral metrics of captured activation matrices, as they are (not centred, like
  the weights' and gradients'), with the rank bound k = min(n, d) and the condition number
  refined in float64 where float32 cannot resolve it.

  Args:
    acts: [..., n, d] (n tokens; e.g. [L, H, n, dh] per head, [L, n, d] per layer).
  Returns:
    {metric: [...]}, one per registered spectral metric.
  """
  require_ndim("acts", acts, 2)
  k = min(acts.shape[-2:])
  s = singular_values(acts, route)
  refined = refine_singular_values(s, k, lambda a: singular_values(a, route), acts)
  return spectral_metrics(s, k, refined)
