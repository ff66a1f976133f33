"""Condition numbers float32 cannot resolve, refined in float64: against scipy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import analysis
from analysis import spectra


def matrix_with_condition(kappa, m=256, n=128, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, n)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return ((u * np.logspace(0, -np.log10(kappa), n)) @ v.T).astype(np.float32)


def scipy_condition(a, k):
  s = scipy.linalg.svdvals(np.asarray(a, np.float64))  # the float32 entries, in float64
  return s[0] / s[k - 1]


@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e6, 1e8])
def test_resolved_condition_number_matches_scipy(kappa):
  a = matrix_with_condition(kappa)
  got = float(jax.jit(spectra.resolved_condition_number, static_argnums=1)(a, 128))
  assert abs(got / scipy_condition(a, 128) - 1) < 1e-2


def test_float32_alone_is_nan_above_its_resolution():
  a = matrix_with_condition(1e6)
  s = analysis.singular_values(jnp.asarray(a))
  assert np.isnan(float(spectra.condition_number(s, 128)))


def test_refined_in_a_batch_and_only_where_needed():
  # [3, m, n]: 1e2 (float32 resolves it: values untouched), 1e6 and 1e8 refined.
  a = np.stack([matrix_with_condition(k, seed=i) for i, k in enumerate([1e2, 1e6, 1e8])])

  @jax.jit
  def metrics(a):
    s = analysis.singular_values(a)
    refined = spectra.refine_singular_values(s, 128, analysis.singular_values, a)
    return spectra.spectral_metrics(s, 128, refined), s, refined

  out, s, refined = metrics(a)
  assert refined.dtype == jnp.float64 and out["condition_number"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(refined[0], np.float32), np.asarray(s[0]))
  for i in range(3):
    assert abs(float(out["condition_number"][i]) / scipy_condition(a[i], 128) - 1) < 1e-2
  # the other metrics still read the float32 values
  np.testing.assert_array_equal(out["per"], spectra.proportional_effective_rank(s, 128))


def test_product_route_refined():
  # A head's OV circuit: singular values from the d_head core; refined from the factors.
  a = matrix_with_condition(1e7, m=64, n=16)
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.standard_normal((64, 16)))
  left, right = a, q.T.astype(np.float32)  # [64, 16] @ [16, 64]: rank 16, kappa 1e7
  fn = lambda lr: analysis.product_singular_values(*lr)  # noqa: E731

  @jax.jit
  def cond(left, right):
    s = fn((left, right))
    refined = spectra.refine_singular_values(s, 16, fn, (left, right))
    return spectra.spectral_metrics(s, 16, refined)["condition_number"]

  want = scipy_condition(np.asarray(left, np.float64) @ np.asarray(right, np.float64), 16)
  assert abs(float(cond(left, right)) / want - 1) < 1e-2


def test_beyond_float64_stays_nan():
  s = jnp.asarray(np.r_[1.0, 1e-15], np.float32)  # what even float64 cannot resolve
  a = np.diag(np.asarray(s)).astype(np.float32)
  assert np.isnan(float(spectra.resolved_condition_number(a, 2)))


def test_activation_spectra_match_numpy():
  rng = np.random.default_rng(4)
  acts = rng.standard_normal((2, 3, 40, 8)).astype(np.float32) @ np.diag(
    np.logspace(0, -7, 8)
  ).astype(np.float32)
  out = jax.jit(spectra.activation_spectra)(acts)
  for i in range(2):
    for j in range(3):
      s = scipy.linalg.svdvals(acts[i, j].astype(np.float64))
      p = s / s.sum()
      assert abs(float(out["effective_rank"][i, j]) - np.exp(-(p * np.log(p)).sum())) < 1e-4
      assert abs(float(out["condition_number"][i, j]) / (s[0] / s[-1]) - 1) < 1e-2
      assert abs(float(out["nuclear_norm"][i, j]) / s.sum() - 1) < 1e-5
