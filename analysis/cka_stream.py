"""Linear CKA accumulated over batches of inputs (`cka_stream_init`, `_update`, `_result`):
for activations of more inputs than fit in memory at once."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from analysis.similarity import _check_pair, _mm, _unbiased_hsic_from_terms
from analysis.validation import require_ndim, require_nonempty

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------
# Streaming: accumulate over token batches, exact for both biased and debiased CKA.


class CKAAccumulator(NamedTuple):
  """Sufficient statistics of linear CKA over the rows seen so far (a jax pytree).

  Rows are stored shifted by `shift_*` and divided by `scale_*` (both from the first batch):
  HSIC is translation invariant, so subtracting a fixed shift is exact, and it avoids the
  float32 cancellation of accumulating raw sums when activations have a large mean; the
  scale keeps fourth powers in range. Shapes: dx, dy = feature dims.
  """

  count: jax.Array  # [] number of rows
  shift_x: jax.Array  # [dx]
  shift_y: jax.Array  # [dy]
  scale_x: jax.Array  # []
  scale_y: jax.Array  # []
  sum_x: jax.Array  # [dx]   X^T 1
  sum_y: jax.Array  # [dy]
  xtx: jax.Array  # [dx, dx]
  yty: jax.Array  # [dy, dy]
  xty: jax.Array  # [dx, dy]
  sum_a: jax.Array  # []  sum of a_i = ||x_i||^2
  sum_b: jax.Array  # []
  sum_aa: jax.Array  # []
  sum_bb: jax.Array  # []
  sum_ab: jax.Array  # []
  xt_a: jax.Array  # [dx]  X^T a
  xt_b: jax.Array  # [dx]
  yt_a: jax.Array  # [dy]
  yt_b: jax.Array  # [dy]


def cka_stream_init(x_first: jax.Array, y_first: jax.Array) -> CKAAccumulator:
  """Start an accumulator from the first batch (which it also accumulates).

  Args:
    x_first: [b, dx]. y_first: [b, dy], b >= 1.
  Returns:
    CKAAccumulator.
  """
  require_ndim("x_first", x_first, 2)
  require_ndim("y_first", y_first, 2)
  if x_first.shape[0] != y_first.shape[0]:
    raise ValueError(f"x and y need the same rows: x {x_first.shape}, y {y_first.shape}")
  require_nonempty("x_first", x_first)
  require_nonempty("y_first", y_first)
  dtype = jnp.result_type(x_first.dtype, y_first.dtype, jnp.float32)
  x_first = x_first.astype(dtype)
  y_first = y_first.astype(dtype)

  def shift_and_scale(a):
    shift = jnp.mean(a, axis=0)
    rms = jnp.sqrt(jnp.mean(jnp.square(a - shift)))
    # A constant first batch would give scale 0; fall back to 1 (the scale is arbitrary).
    return shift, jnp.where(rms > 0, rms * jnp.sqrt(a.shape[1] * 1.0), 1.0)

  shift_x, scale_x = shift_and_scale(x_first)
  shift_y, scale_y = shift_and_scale(y_first)
  dx, dy = x_first.shape[1], y_first.shape[1]
  zeros = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731
  empty = CKAAccumulator(
    count=jnp.zeros((), dtype),
    shift_x=shift_x,
    shift_y=shift_y,
    scale_x=scale_x,
    scale_y=scale_y,
    sum_x=zeros(dx),
    sum_y=zeros(dy),
    xtx=zeros(dx, dx),
    yty=zeros(dy, dy),
    xty=zeros(dx, dy),
    sum_a=zeros(),
    sum_b=zeros(),
    sum_aa=zeros(),
    sum_bb=zeros(),
    sum_ab=zeros(),
    xt_a=zeros(dx),
    xt_b=zeros(dx),
    yt_a=zeros(dy),
    yt_b=zeros(dy),
  )
  return cka_stream_update(empty, x_first, y_first)


def cka_stream_update(acc: CKAAccumulator, x: jax.Array, y: jax.Array) -> CKAAccumulator:
  """Add a batch of rows. x: [b, dx], y: [b, dy] (b may differ between calls)."""
  require_ndim("x", x, 2)
  require_ndim("y", y, 2)
  if (
    x.shape[0] != y.shape[0] or x.shape[1] != acc.sum_x.shape[0] or y.shape[1] != acc.sum_y.shape[0]
  ):
    raise ValueError(
      f"batch shapes x {x.shape}, y {y.shape} do not match the accumulator "
      f"(dx={acc.sum_x.shape[0]}, dy={acc.sum_y.shape[0]})"
    )
  x = (x.astype(acc.xtx.dtype) - acc.shift_x) / acc.scale_x
  y = (y.astype(acc.yty.dtype) - acc.shift_y) / acc.scale_y
  a = jnp.sum(jnp.square(x), axis=1)
  b = jnp.sum(jnp.square(y), axis=1)
  return acc._replace(
    count=acc.count + x.shape[0],
    sum_x=acc.sum_x + jnp.sum(x, axis=0),
    sum_y=acc.sum_y + jnp.sum(y, axis=0),
    xtx=acc.xtx + _mm(x.T, x),
    yty=acc.yty + _mm(y.T, y),
    xty=acc.xty + _mm(x.T, y),
    sum_a=acc.sum_a + jnp.sum(a),
    sum_b=acc.sum_b + jnp.sum(b),
    sum_aa=acc.sum_aa + jnp.dot(a, a, precision=_HIGHEST),
    sum_bb=acc.sum_bb + jnp.dot(b, b, precision=_HIGHEST),
    sum_ab=acc.sum_ab + jnp.dot(a, b, precision=_HIGHEST),
    xt_a=acc.xt_a + _mm(x.T, a),
    xt_b=acc.xt_b + _mm(x.T, b),
    yt_a=acc.yt_a + _mm(y.T, a),
    yt_b=acc.yt_b + _mm(y.T, b),
  )


def cka_stream_result(acc: CKAAccumulator, debiased: bool = False) -> jax.Array:
  """CKA of all rows accumulated so far; exactly the one-shot value up to rounding.

  Returns a scalar; NaN if fewer than 2 (biased) or 4 (debiased) rows were seen or if
  x or y is constant (count is a traced value, so this cannot raise under jit).
  """
  n = acc.count
  if not debiased:
    xy = acc.xty - jnp.outer(acc.sum_x, acc.sum_y) / n
    xx = acc.xtx - jnp.outer(acc.sum_x, acc.sum_x) / n
    yy = acc.yty - jnp.outer(acc.sum_y, acc.sum_y) / n
    value = jnp.sum(jnp.square(xy)) / jnp.sqrt(jnp.sum(jnp.square(xx)) * jnp.sum(jnp.square(yy)))
    return jnp.where(n >= 2, value, jnp.nan)

  sx, sy = acc.sum_x, acc.sum_y

  # General (uncentred) terms, K = X X^T, a = diag K, s = X^T 1:
  #   tr(K~L~) = ||X^T Y||^2 - a.b ;  1'K~1 = ||s_x||^2 - sum a ;
  #   1'K~L~1 = (X s_x - a).(Y s_y - b) = s_x' X'Y s_y - s_x' X'b - s_y' Y'a + a.b
  def terms(xty, s1, s2, x1_b, y2_a, sum_a, sum_b, a_dot_b):
    trace = jnp.sum(jnp.square(xty)) - a_dot_b
    k_sum = _mm(s1, s1) - sum_a
    l_sum = _mm(s2, s2) - sum_b
    k1_l1 = _mm(s1, _mm(xty, s2)) - _mm(s1, x1_b) - _mm(s2, y2_a) + a_dot_b
    return _unbiased_hsic_from_terms(trace, k_sum, l_sum, k1_l1, n)

  xy = terms(acc.xty, sx, sy, acc.xt_b, acc.yt_a, acc.sum_a, acc.sum_b, acc.sum_ab)
  xx = terms(acc.xtx, sx, sx, acc.xt_a, acc.xt_a, acc.sum_a, acc.sum_a, acc.sum_aa)
  yy = terms(acc.yty, sy, sy, acc.yt_b, acc.yt_b, acc.sum_b, acc.sum_b, acc.sum_bb)
  return jnp.where(n >= 4, xy / jnp.sqrt(xx * yy), jnp.nan)


def streaming_linear_cka(
  x_batches: jax.Array, y_batches: jax.Array, debiased: bool = False
) -> jax.Array:
  """CKA over B equally sized token batches with memory independent of B.

  Args:
    x_batches: [B, b, dx]. y_batches: [B, b, dy] (e.g. produced lazily by the caller and
      fed to cka_stream_update instead, for data that does not fit at once).
  Returns:
    scalar, equal to linear_cka(x_batches.reshape(B*b, dx), ...).
  """
  require_ndim("x_batches", x_batches, 3)
  require_ndim("y_batches", y_batches, 3)
  if x_batches.shape[:2] != y_batches.shape[:2]:
    raise ValueError(f"batch axes differ: x {x_batches.shape}, y {y_batches.shape}")
  _check_pair(
    x_batches.reshape(-1, x_batches.shape[-1]), y_batches.reshape(-1, y_batches.shape[-1]), debiased
  )
  acc = cka_stream_init(x_batches[0], y_batches[0])
  acc, _ = jax.lax.scan(
    lambda s, xy: (cka_stream_update(s, *xy), None), acc, (x_batches[1:], y_batches[1:])
  )
  return cka_stream_result(acc, debiased)
