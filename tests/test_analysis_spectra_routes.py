"""Every route to the singular values against scipy in float64, on ill-conditioned matrices.

Matrices are built as U diag(s) V^T (random orthonormal U, V; s log-spaced from 1 down to
1/kappa, or a few small values under a flat top) in float64, stored in float32 as the study
stores weights and gradients; ground truth is scipy.linalg.svdvals of the float64 matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import analysis
from analysis import spectra

KAPPAS = (1e1, 1e2, 1e3, 1e4, 1e6)
SHAPES = ((160, 64), (64, 160), (64, 64))
ROUTES = ("svd", "qr_svd", "gram_eigh", "auto")


def np_effective_rank(s):
  p = s / s.sum()
  p = p[p > 0]
  return float(np.exp(-(p * np.log(p)).sum()))


def np_per(s, k):
  return np_effective_rank(np.sort(s)[::-1][:k]) / k


def spectrum(kind, n, kappa):
  if kind == "log":
    return np.logspace(0, -np.log10(kappa), n)
  s = np.ones(n)  # flat top, a tail of 4 small values down to 1/kappa
  s[-4:] = np.logspace(-1, -np.log10(kappa), 4)
  return s


def built(shape, s, seed):
  m, n = shape
  k = min(m, n)
  rng = np.random.default_rng(seed)
  u = scipy.stats.ortho_group.rvs(m, random_state=rng)[:, :k]
  v = scipy.stats.ortho_group.rvs(n, random_state=rng)[:, :k]
  return (u * s) @ v.T


@pytest.mark.parametrize("kind", ["log", "tail"])
@pytest.mark.parametrize("shape", SHAPES)
def test_routes_match_scipy_float64(shape, kind):
  k = min(shape)
  matrices = np.stack([built(shape, spectrum(kind, k, kappa), i) for i, kappa in enumerate(KAPPAS)])
  truth = np.stack([scipy.linalg.svdvals(a) for a in matrices])  # float64
  stored = jnp.asarray(matrices, jnp.float32)
  for route in ROUTES:
    got = np.asarray(jax.jit(lambda a, r=route: spectra.singular_values(a, r))(stored))
    for i, kappa in enumerate(KAPPAS):
      where = f"route={route} shape={shape} {kind} kappa={kappa:g}"
      for bound in (k, k // 2):
        want = np_per(truth[i], bound)
        per = float(analysis.proportional_effective_rank(jnp.asarray(got[i]), bound))
        assert abs(per - want) <= 1e-4 * want, where
      want = np_effective_rank(truth[i])
      er = float(analysis.effective_rank(jnp.asarray(got[i])))
      assert abs(er - want) <= 1e-4 * want, where
      cond = float(spectra.condition_number(jnp.asarray(got[i]), k))
      want = truth[i][0] / truth[i][k - 1]
      if kappa <= 1e2:
        assert not np.isnan(cond), where  # resolvable in float32: must be reported
      assert np.isnan(cond) or abs(cond - want) <= 1e-2 * want, (where, cond, want)


def test_gram_guard_accepts_well_conditioned_and_refuses_ill_conditioned():
  """Both branches of the guarded Gram route are taken (else the test above proves little)."""
  shape = (160, 64)
  well = built(shape, spectrum("log", 64, 10.0), 0)
  ill = built(shape, spectrum("log", 64, 1e6), 1)
  _, ok = spectra._gram_values(jnp.asarray(np.stack([well, ill]), jnp.float32))
  assert np.asarray(ok).tolist() == [True, False]
  # and the accepted Gram values are accurate to float32 in every singular value
  s, _ = spectra._gram_values(jnp.asarray(well, jnp.float32))
  np.testing.assert_allclose(s, scipy.linalg.svdvals(well), rtol=1e-2)


def test_sequential_guarded_route_mixed_batch():
  """The CPU path for large batches (lax.map with a per-matrix conditional), one matrix on
  each side of the guard, and under vmap (both branches, selected)."""
  shape = (256, 128)
  mats = np.stack(
    [built(shape, spectrum("log", 128, kappa), i) for i, kappa in enumerate((10.0, 1e6))]
  )
  truth = np.stack([scipy.linalg.svdvals(a) for a in mats])
  stored = jnp.asarray(mats, jnp.float32)
  for got in (
    spectra.singular_values(stored, "gram_eigh"),
    jax.vmap(lambda a: spectra.singular_values(a, "gram_eigh"))(stored),
  ):
    for i in range(2):
      er = float(analysis.effective_rank(got[i]))
      assert er == pytest.approx(np_effective_rank(truth[i]), rel=1e-4)


def test_route_rule_per_backend():
  assert spectra.choose_route((2048, 512), platform="cpu") == "svd"
  assert spectra.choose_route((512, 2048), platform="cpu") == "svd"
  assert spectra.choose_route((512, 512), platform="cpu") == "svd"
  assert spectra.choose_route((32, 32), platform="gpu") == "svd"
  assert spectra.choose_route((512, 512), platform="gpu") == "gram_eigh"
  assert spectra.choose_route((64, 64), platform="tpu") == "gram_eigh"
  with pytest.raises(ValueError, match="route"):
    spectra.singular_values(jnp.eye(3), "lapack")


def test_condition_number_nan_only_when_unresolved():
  s = jnp.asarray([1.0, 0.5, 1e-6], jnp.float32)
  assert np.isnan(float(spectra.condition_number(s, 3)))  # 1e6 is below float32 resolution
  assert float(spectra.condition_number(s, 2)) == pytest.approx(2.0)
  assert float(spectra.condition_number(s.astype(jnp.float32) * 0 + 1, 3)) == 1.0
  assert np.isinf(float(spectra.condition_number(jnp.asarray([1.0, 0.0]), 2)))
