"""Linear CKA (Kornblith et al. 2019): biased and debiased, one-shot, streaming, batched.

Conventions. Activations are `x [..., n, dx]`, `y [..., n, dy]`: n samples (tokens) in the
second-to-last axis, features last; leading axes broadcast (size-1 or missing axes are
re-used, not copied). Rows of x and y must be the same inputs.

Biased CKA (feature space; X, Y column-centred):
  CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
which equals the Gram form <HKH, HLH> / (||HKH|| ||HLH||) with K = X X^T, L = Y Y^T.

Debiased CKA replaces each HSIC by the unbiased U-statistic of Song et al. (2007):
  HSIC_u(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))
with K~, L~ the Gram matrices with zeroed diagonals. For linear kernels every term is a
function of X^T Y, X^T X, Y^T Y, row norms and column sums, so the debiased estimator is
computed in feature space too (O(n d^2), no n x n matrix) and can be accumulated exactly over
token batches (`cka_stream_*`). HSIC_u is invariant to adding a constant to all rows, so
centring first changes nothing mathematically; it is done for float32 accuracy.

Numerics (float32 throughout unless float64 inputs are given with x64 enabled): inputs are
centred, then divided by their Frobenius norm (CKA is scale invariant; the fourth powers in
||X^T Y||^2 would otherwise overflow float32 for large activations), and matmuls use
HIGHEST precision (no TF32/bf16 passes on accelerators).

Undefined cases: if x or y has zero variance in every feature (constant rows), CKA is 0/0
and the result is NaN, by design. NaN/Inf inputs propagate to NaN. Debiased CKA needs
n >= 4 and biased n >= 2; fewer samples raise ValueError at trace time. Debiased CKA can be
slightly negative (it is an unbiased estimate of a quantity that is 0 for independent data).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from analysis.validation import require_ndim, require_nonempty

_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def _check_pair(x, y, debiased: bool) -> int:
  require_ndim("x", x, 2)
  require_ndim("y", y, 2)
  if x.shape[-2] != y.shape[-2]:
    raise ValueError(f"x and y need the same number of samples (axis -2): x {x.shape}, y {y.shape}")
  require_nonempty("x", x)
  require_nonempty("y", y)
  n = x.shape[-2]
  min_n = 4 if debiased else 2
  if n < min_n:
    raise ValueError(
      f"{'debiased' if debiased else 'biased'} CKA needs n >= {min_n} "
      f"samples, got x {x.shape}, y {y.shape}"
    )
  return n


def _at_least_float32(x):
  # Checkpoints are stored in float16/bfloat16; their sums of squares need float32 at least.
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _centre_and_scale(x):
  """[n, d] -> [n, d] column-centred and scaled to unit Frobenius norm (NaN if constant)."""
  x = _at_least_float32(x)
  x = x - jnp.mean(x, axis=0, keepdims=True)
  return x / jnp.sqrt(jnp.sum(jnp.square(x)))


def _unbiased_hsic_from_terms(trace_kl, sum_k, sum_l, k1_dot_l1, n):
  """Song et al. U-statistic from tr(K~L~), 1'K~1, 1'L~1, 1'K~L~1 (scalars)."""
  return (trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * k1_dot_l1 / (n - 2)) / (
    n * (n - 3)
  )


def _feature_hsic(x, y, debiased: bool):
  """HSIC numerator for centred x [n, dx], y [n, dy] (scale as given), feature space."""
  n = x.shape[0]
  cross = jnp.sum(jnp.square(_mm(x.T, y)))  # ||X^T Y||_F^2 = tr(K L)
  if not debiased:
    return cross
  # Columns are centred, so X^T 1 = 0 and the terms reduce to row norms a_i = ||x_i||^2:
  # tr(K~L~) = tr(KL) - a.b; 1'K~1 = -sum(a); K~1 = -a, so 1'K~L~1 = a.b.
  a = jnp.sum(jnp.square(x), axis=1)
  b = jnp.sum(jnp.square(y), axis=1)
  a_dot_b = jnp.dot(a, b, precision=_HIGHEST)
  return _unbiased_hsic_from_terms(cross - a_dot_b, -jnp.sum(a), -jnp.sum(b), a_dot_b, n)


def _use_gram_form(n: int, dx: int, dy: int) -> bool:
  # Pick whichever form does fewer flops: feature space costs ~n (dx dy + dx^2 + dy^2),
  # Gram form ~n^2 (dx + dy) + 3 n^2.
  return n * n * (dx + dy + 3) < n * (dx * dy + dx * dx + dy * dy)


def _cka_single(x, y, debiased: bool):
  """CKA of x [n, dx], y [n, dy] -> scalar."""
  n = x.shape[0]
  x = _centre_and_scale(x)
  y = _centre_and_scale(y)
  if _use_gram_form(n, x.shape[1], y.shape[1]):
    return _gram_cka_single(_mm(x, x.T), _mm(y, y.T), debiased)
  xy = _feature_hsic(x, y, debiased)
  xx = _feature_hsic(x, x, debiased)
  yy = _feature_hsic(y, y, debiased)
  return xy / jnp.sqrt(xx * yy)


def _broadcast_apply(fn, x, y, core_ndim: int):
  """Apply fn(x_core, y_core) over broadcast leading axes with nested vmap (no copies)."""
  lead_x, lead_y = x.shape[:-core_ndim], y.shape[:-core_ndim]
  try:
    batch = jnp.broadcast_shapes(lead_x, lead_y)
  except ValueError as err:
    raise ValueError(f"leading axes do not broadcast: x {x.shape}, y {y.shape}") from err
  x = x.reshape((1,) * (len(batch) - len(lead_x)) + x.shape)
  y = y.reshape((1,) * (len(batch) - len(lead_y)) + y.shape)

  def rec(a, b, depth):
    if depth == len(batch):
      return fn(a, b)
    if batch[depth] == 1:
      return rec(a[0], b[0], depth + 1)[None]
    a_axis = 0 if a.shape[0] != 1 else None
    b_axis = 0 if b.shape[0] != 1 else None
    a_in = a if a_axis == 0 else a[0]
    b_in = b if b_axis == 0 else b[0]
    return jax.vmap(lambda u, v: rec(u, v, depth + 1), in_axes=(a_axis, b_axis))(a_in, b_in)

  return rec(x, y, 0)


def linear_cka(x: jax.Array, y: jax.Array, debiased: bool = False) -> jax.Array:
  """Linear CKA between activations of the same n inputs.

  Args:
    x: [..., n, dx]. y: [..., n, dy]; leading axes broadcast.
    debiased: use the unbiased HSIC (Song et al. 2007) estimator.
  Returns:
    [broadcast(...)]; NaN where x or y is constant over samples.
  Uses the feature-space form or the Gram form, whichever is cheaper for (n, dx, dy);
  both give the same value.
  """
  _check_pair(x, y, debiased)
  return _broadcast_apply(lambda a, b: _cka_single(a, b, debiased), x, y, 2)


def _zero_diagonal(k):
  return k - jnp.diag(jnp.diag(k))


def _unbiased_centre_gram(k):
  """Gram [n, n] -> [n, n] such that <U(K), U(L)> / (n(n-3)) = HSIC_u(K, L).

  (Kornblith et al. 2019's `center_gram(unbiased=True)`; an inner-product form of the
  Song et al. U-statistic, which makes pairwise matrices a single matmul.)
  """
  n = k.shape[0]
  k = _zero_diagonal(k)
  means = jnp.sum(k, axis=0) / (n - 2)
  means = means - jnp.sum(means) / (2 * (n - 1))
  k = k - means[:, None] - means[None, :]
  return _zero_diagonal(k)


def _centre_gram(k):
  """H K H for K [n, n]."""
  k = k - jnp.mean(k, axis=0, keepdims=True)
  return k - jnp.mean(k, axis=1, keepdims=True)


def _gram_cka_single(k, l, debiased: bool):
  k, l = _at_least_float32(k), _at_least_float32(l)
  if debiased:
    kc, lc = _unbiased_centre_gram(k), _unbiased_centre_gram(l)
  else:
    kc, lc = _centre_gram(k), _centre_gram(l)
  # Normalise each Gram first: CKA is scale invariant and this keeps the products in range.
  kc = kc / jnp.sqrt(jnp.sum(jnp.square(kc)))
  lc = lc / jnp.sqrt(jnp.sum(jnp.square(lc)))
  return jnp.sum(kc * lc) / jnp.sqrt(jnp.sum(kc * kc) * jnp.sum(lc * lc))


def linear_cka_gram(k: jax.Array, l: jax.Array, debiased: bool = False) -> jax.Array:
  """CKA from Gram matrices (any kernel; K = X X^T gives linear CKA).

  Args:
    k: [..., n, n]. l: [..., n, n]; leading axes broadcast. Need not be centred.
    debiased: unbiased HSIC (Song et al. 2007) instead of tr(HKHL).
  Returns:
    [...]; NaN where a centred Gram matrix is zero.
  """
  require_ndim("k", k, 2)
  require_ndim("l", l, 2)
  if k.shape[-1] != k.shape[-2] or l.shape[-2:] != k.shape[-2:]:
    raise ValueError(f"Gram matrices must be square and the same size: k {k.shape}, l {l.shape}")
  _check_pair(k, l, debiased)
  return _broadcast_apply(lambda a, b: _gram_cka_single(a, b, debiased), k, l, 2)


def hsic(x: jax.Array, y: jax.Array, debiased: bool = False) -> jax.Array:
  """Linear-kernel HSIC (unnormalised CKA numerator) on the raw scale.

  Biased: tr(K H L H) / (n-1)^2. Debiased: HSIC_u of Song et al. (2007).
  Args:
    x: [..., n, dx]. y: [..., n, dy].
  Returns:
    [...].
  """
  n = _check_pair(x, y, debiased)

  def single(a, b):
    a = a - jnp.mean(a, axis=0, keepdims=True)
    b = b - jnp.mean(b, axis=0, keepdims=True)
    value = _feature_hsic(a, b, debiased)
    return value if debiased else value / (n - 1) ** 2

  return _broadcast_apply(single, x, y, 2)


def cka_to_reference(
  acts: jax.Array, ref: jax.Array, debiased: bool = False, checkpoint_batch_size: int | None = 1
) -> jax.Array:
  """CKA of every layer at every checkpoint against a reference checkpoint.

  Args:
    acts: [C, L, n, d]. ref: [L, n, d] (e.g. the final checkpoint).
    checkpoint_batch_size: checkpoints evaluated in parallel (lax.map batch size); bounds
      memory to about batch * L * d^2 floats. None = all at once.
  Returns:
    [C, L].
  """
  require_ndim("acts", acts, 4)
  require_ndim("ref", ref, 3)
  if acts.shape[1:-1] != ref.shape[:-1]:
    raise ValueError(
      f"acts [C, L, n, d] and ref [L, n, d] disagree: acts {acts.shape}, ref {ref.shape}"
    )
  return _each_checkpoint_against(acts, ref, debiased, checkpoint_batch_size)


def per_head_cka_to_reference(
  acts: jax.Array, ref: jax.Array, debiased: bool = False, checkpoint_batch_size: int | None = 1
) -> jax.Array:
  """Per-head CKA against a reference, in the capture layout (hook_z, per-head OV outputs).

  Args:
    acts: [C, L, n, H, e]. ref: [L, n, H, e] (e = d_head for hook_z, d for per-head outputs).
  Returns:
    [C, L, H].
  """
  require_ndim("acts", acts, 5)
  require_ndim("ref", ref, 4)
  acts_heads = jnp.moveaxis(acts, -2, -3)  # [C, L, H, n, e]
  ref_heads = jnp.moveaxis(ref, -2, -3)  # [L, H, n, e]
  if acts_heads.shape[1:-1] != ref_heads.shape[:-1]:
    raise ValueError(
      f"acts [C, L, n, H, e] and ref [L, n, H, e] disagree: acts {acts.shape}, ref {ref.shape}"
    )
  return _each_checkpoint_against(acts_heads, ref_heads, debiased, checkpoint_batch_size)


def _each_checkpoint_against(acts, ref, debiased, checkpoint_batch_size):
  """linear_cka(acts[c], ref) for every c: vmapped, or lax.map'd to bound memory."""
  _check_pair(acts, ref, debiased)
  per_checkpoint = lambda a: linear_cka(a, ref, debiased)  # noqa: E731
  if checkpoint_batch_size is None:
    return jax.vmap(per_checkpoint)(acts)
  return jax.lax.map(per_checkpoint, acts, batch_size=checkpoint_batch_size)


def pairwise_cka(acts: jax.Array, debiased: bool = False, gram_budget: int = 2**27) -> jax.Array:
  """CKA between every pair of checkpoints (same layer, same inputs).

  Args:
    acts: [C, n, d] (vmap over a layer axis for [L, C, n, d]).
  Returns:
    [C, C], symmetric, ones on the diagonal (NaN rows for constant activations).
  When n <= d and the C Gram matrices fit in `gram_budget` floats, each checkpoint's
  (unbiased-)centred, normalised Gram matrix is flattened and the whole matrix is one
  [C, n^2] @ [n^2, C] product; otherwise pairs are evaluated in feature space one at a
  time (compiled loop; memory ~d^2 beyond the inputs).
  """
  require_ndim("acts", acts, 3)
  _check_pair(acts, acts, debiased)
  c, n, d = acts.shape
  centred = jax.vmap(_centre_and_scale)(acts)
  if n <= d and c * n * n <= gram_budget:
    grams = _mm(centred, jnp.swapaxes(centred, -1, -2))
    centre = _unbiased_centre_gram if debiased else _centre_gram
    flat = jax.vmap(centre)(grams).reshape(c, n * n)
    flat = flat / jnp.linalg.norm(flat, axis=1, keepdims=True)
    return _mm(flat, flat.T)
  self_hsic = jax.vmap(lambda a: _feature_hsic(a, a, debiased))(centred)
  row = lambda a: jax.lax.map(lambda b: _feature_hsic(a, b, debiased), centred)  # noqa: E731
  cross = jax.lax.map(row, centred)
  return cross / jnp.sqrt(self_hsic[:, None] * self_hsic[None, :])


def cka_noise_floor(
  x: jax.Array,
  key: jax.Array,
  y: jax.Array | None = None,
  debiased: bool = False,
  num_permutations: int = 8,
) -> jax.Array:
  """CKA against row-permuted activations: the value CKA takes when rows do not correspond.

  docs/method.md (the estimator's noise floor) asks every figure to show this floor: for
  biased CKA it is far above 0 when n is small relative to d. Each permutation shuffles the
  n rows of y (default: x itself), the same permutation for every leading index.
  Args:
    x: [..., n, dx]. key: PRNG key. y: [..., n, dy] or None (= x).
    num_permutations: P independent permutations.
  Returns:
    [P, ...]; average over axis 0 for the floor, use the spread for its uncertainty.
  """
  y = x if y is None else y
  _check_pair(x, y, debiased)
  n = y.shape[-2]
  keys = jax.random.split(key, num_permutations)

  def one(k):
    perm = jax.random.permutation(k, n)
    return linear_cka(x, jnp.take(y, perm, axis=-2), debiased)

  return jax.lax.map(one, keys)
