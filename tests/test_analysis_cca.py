"""SVCCA and PWCCA against CCA written out here in numpy float64 (covariance form)."""

import jax
import numpy as np
import pytest

from analysis import cca


def np_inv_sqrt(c):
  """Pseudo-inverse square root of a symmetric PSD matrix (eigenvalues below rank dropped)."""
  w, v = np.linalg.eigh(c)
  keep = w > w.max() * 1e-10
  return (v[:, keep] / np.sqrt(w[keep])) @ v[:, keep].T


def np_cca(x, y):
  """(rho descending, canonical variates of x [n, r]) by whitening the covariances."""
  x = x - x.mean(0)
  y = y - y.mean(0)
  wx, wy = np_inv_sqrt(x.T @ x), np_inv_sqrt(y.T @ y)
  u, rho, _ = np.linalg.svd(wx @ (x.T @ y) @ wy)
  # ranks at 1e-5 relative: the float32 inputs carry rounding noise at ~1e-7 of s_1
  r = min(np.linalg.matrix_rank(x, rtol=1e-5), np.linalg.matrix_rank(y, rtol=1e-5))
  return np.clip(rho[:r], 0, 1), x @ wx @ u[:, :r]


def np_svd_reduce(x, variance=0.99):
  x = x - x.mean(0)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  frac = np.cumsum(s**2) / np.sum(s**2)
  k = int(np.searchsorted(frac, variance) + 1)  # fewest directions reaching the fraction
  return u[:, :k] * s[:k]


def np_svcca(x, y):
  rho, _ = np_cca(np_svd_reduce(x), np_svd_reduce(y))
  return rho.mean()


def np_pwcca(x, y):
  if x.shape[1] > y.shape[1]:
    x, y = y, x
  rho, h = np_cca(x, y)
  p, _ = np.linalg.qr(h)
  alpha = np.abs(p.T @ (x - x.mean(0))).sum(1)
  return (alpha / alpha.sum() * rho).sum()


def inputs(kind, seed=0, n=300, dx=24, dy=32):
  rng = np.random.default_rng(seed)
  if kind == "random":
    x = rng.standard_normal((n, dx))
    y = x @ rng.standard_normal((dx, dy)) * 0.3 + rng.standard_normal((n, dy))
  elif kind == "low_rank":  # rank 6 and 9 in 24 and 32 features, distinct correlations
    # (equal canonical correlations would leave PWCCA's weights undefined: L1 weights
    # depend on the basis chosen inside a degenerate subspace)
    z, w = rng.standard_normal((n, 6)), rng.standard_normal((n, 9))
    x = z @ rng.standard_normal((6, dx))
    shared = z * np.array([3.0, 1.5, 1.0, 0.6, 0.3, 0.1]) + w[:, :6]
    y = np.concatenate([shared, w[:, 6:]], 1) @ rng.standard_normal((9, dy))
  else:  # decaying spectra: what the 99% cut actually trims
    x = rng.standard_normal((n, dx)) * np.logspace(0, -2, dx)
    y = (x @ rng.standard_normal((dx, dy))) * np.logspace(0, -1, dy)
    y = y + 0.1 * rng.standard_normal((n, dy))
  return x.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "low_rank", "decaying"])
def test_svcca_pwcca_match_numpy(kind):
  x, y = inputs(kind)
  xd, yd = x.astype(np.float64), y.astype(np.float64)
  assert abs(float(cca.svcca(x, y)) - np_svcca(xd, yd)) < 1e-4
  assert abs(float(cca.pwcca(x, y)) - np_pwcca(xd, yd)) < 1e-4
  assert abs(float(cca.pwcca(y, x)) - np_pwcca(yd, xd)) < 1e-4
  rho, _ = np_cca(xd, yd)
  assert abs(float(cca.cca_similarity(x, y)) - rho.mean()) < 1e-4


def test_identical_and_independent():
  x, _ = inputs("random", n=2000, dx=8)
  y = np.random.default_rng(5).standard_normal((2000, 8)).astype(np.float32)
  assert abs(float(cca.svcca(x, x)) - 1) < 1e-4
  scaled = 3 * x @ np.diag(np.arange(1.0, 9.0)).astype(np.float32)
  assert abs(float(cca.pwcca(x, scaled)) - 1) < 1e-4
  assert float(cca.svcca(x, y)) < 0.1  # independent: correlations ~ sqrt(d/n)


def test_batched_broadcast_and_jit():
  xs = np.stack([inputs("random", seed=s)[0] for s in range(3)])  # [3, n, dx]
  _, y = inputs("random", seed=9)
  out = jax.jit(cca.pwcca)(xs, y)
  assert out.shape == (3,)
  for i in range(3):
    assert abs(float(out[i]) - np_pwcca(xs[i].astype(np.float64), y.astype(np.float64))) < 1e-4
  out = jax.vmap(cca.svcca, in_axes=(0, None))(xs, y)
  assert abs(float(out[1]) - np_svcca(xs[1].astype(np.float64), y.astype(np.float64))) < 1e-4


@pytest.mark.parametrize("metric", ["svcca", "pwcca"])
def test_pairwise_matches_pairs(metric):
  rng = np.random.default_rng(2)
  base = rng.standard_normal((200, 16))
  acts = np.stack([base + 0.5 * i * rng.standard_normal((200, 16)) for i in range(4)])
  acts = acts.astype(np.float32)
  matrix = np.asarray(cca.pairwise_cca(acts, metric))
  ref = np_svcca if metric == "svcca" else np_pwcca
  for i in range(4):
    for j in range(4):
      assert abs(matrix[i, j] - ref(acts[i].astype(np.float64), acts[j].astype(np.float64))) < 1e-4


def test_n_not_above_dx_plus_dy_refused():
  x = np.ones((16, 8), np.float32)
  with pytest.raises(ValueError, match="n > dx \\+ dy"):
    cca.pwcca(x, x)
  with pytest.raises(ValueError, match="n=16, dx \\+ dy=17"):
    cca.svcca(x, np.ones((16, 9), np.float32))
  assert np.isfinite(float(cca.svcca(*inputs("random", n=17, dx=8, dy=8))))


def test_constant_input_is_nan():
  x, y = inputs("random")
  assert np.isnan(float(cca.svcca(np.ones_like(x), y)))
  assert np.isnan(float(cca.pwcca(np.ones_like(x), y)))
