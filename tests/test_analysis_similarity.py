"""CKA: checked against numpy formulas written out here, never against the code under test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import analysis

# ----- numpy references (float64) ---------------------------------------------------------


def np_feature_cka(x, y):
  """Kornblith et al. 2019 feature-space linear CKA."""
  x = x - x.mean(0)
  y = y - y.mean(0)
  return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def np_gram_cka(k, l):
  n = k.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def np_unbiased_hsic(k, l):
  """Song et al. (2007) U-statistic, sums written as explicit loops."""
  n = k.shape[0]
  kt = k.copy()
  lt = l.copy()
  np.fill_diagonal(kt, 0)
  np.fill_diagonal(lt, 0)
  trace_kl = sum(kt[i, j] * lt[j, i] for i in range(n) for j in range(n))
  sum_k = sum(kt[i, j] for i in range(n) for j in range(n))
  sum_l = sum(lt[i, j] for i in range(n) for j in range(n))
  k1 = [sum(kt[i, j] for j in range(n)) for i in range(n)]
  l1 = [sum(lt[i, j] for j in range(n)) for i in range(n)]
  k_l_sum = sum(k1[i] * l1[i] for i in range(n))  # 1' K~ L~ 1 (K~ symmetric)
  return (trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 * k_l_sum / (n - 2)) / (n * (n - 3))


def np_debiased_cka(x, y):
  k, l = x @ x.T, y @ y.T
  return np_unbiased_hsic(k, l) / np.sqrt(np_unbiased_hsic(k, k) * np_unbiased_hsic(l, l))


def rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape)


# ----- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("n,dx,dy", [(40, 7, 5), (6, 30, 20)])  # feature form, Gram form
def test_biased_cka_matches_feature_and_gram_formulas(n, dx, dy):
  x = rand(0, n, dx)
  y = rand(1, n, dy) + 0.5 * x[:, :1]
  expected = np_feature_cka(x, y)
  assert np.isclose(expected, np_gram_cka(x @ x.T, y @ y.T))  # the two textbook forms
  got = analysis.linear_cka(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  got_gram = analysis.linear_cka_gram(
    jnp.asarray(x @ x.T, jnp.float32), jnp.asarray(y @ y.T, jnp.float32)
  )
  np.testing.assert_allclose(got_gram, expected, rtol=1e-5)


@pytest.mark.parametrize("n,dx,dy", [(12, 3, 4), (9, 20, 25)])
def test_debiased_cka_matches_u_statistic(n, dx, dy):
  x = rand(2, n, dx) + 3.0  # an offset: the U-statistic is translation invariant
  y = rand(3, n, dy) + 0.8 * np.tile(x[:, :1], (1, dy))
  expected = np_debiased_cka(x, y)
  got = analysis.linear_cka(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), debiased=True)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  got_gram = analysis.linear_cka_gram(
    jnp.asarray(x @ x.T, jnp.float32), jnp.asarray(y @ y.T, jnp.float32), debiased=True
  )
  np.testing.assert_allclose(got_gram, expected, rtol=1e-4, atol=1e-6)
  k, l = x @ x.T, y @ y.T
  np.testing.assert_allclose(
    analysis.hsic(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), debiased=True),
    np_unbiased_hsic(k, l),
    rtol=1e-4,
  )


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariances(debiased):
  n, d = 50, 8
  x = rand(4, n, d)
  y = x @ rand(5, d, d) + 0.3 * rand(6, n, d)
  q, _ = np.linalg.qr(rand(7, d, d))
  base = float(analysis.linear_cka(jnp.asarray(x), jnp.asarray(y), debiased))
  rotated = float(analysis.linear_cka(jnp.asarray(x @ q), jnp.asarray(y), debiased))
  scaled = float(analysis.linear_cka(jnp.asarray(37.0 * x), jnp.asarray(y * 1e-3), debiased))
  assert rotated == pytest.approx(base, rel=1e-4)
  assert scaled == pytest.approx(base, rel=1e-4)
  stretch = np.diag(np.geomspace(1.0, 100.0, d)) @ rand(8, d, d)  # invertible, not orthogonal
  stretched = float(analysis.linear_cka(jnp.asarray(x @ stretch), jnp.asarray(y), debiased))
  assert abs(stretched - base) > 1e-2


@pytest.mark.parametrize("debiased", [False, True])
def test_streaming_equals_one_shot(debiased):
  batches, b, dx, dy = 6, 16, 12, 9
  x = rand(9, batches * b, dx) + 50.0  # large mean: the shifted accumulation must cope
  y = np.tanh(x[:, :dy] - 50) + 0.5 * rand(10, batches * b, dy) - 20.0
  expected = np_debiased_cka(x, y) if debiased else np_feature_cka(x, y)
  xs = jnp.asarray(x.reshape(batches, b, dx), jnp.float32)
  ys = jnp.asarray(y.reshape(batches, b, dy), jnp.float32)
  got = jax.jit(analysis.streaming_linear_cka, static_argnames="debiased")(xs, ys, debiased)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
  # Unequal batch sizes through the init/update/result API.
  acc = analysis.cka_stream_init(jnp.asarray(x[:5], jnp.float32), jnp.asarray(y[:5], jnp.float32))
  acc = analysis.cka_stream_update(
    acc, jnp.asarray(x[5:], jnp.float32), jnp.asarray(y[5:], jnp.float32)
  )
  np.testing.assert_allclose(
    analysis.cka_stream_result(acc, debiased), expected, rtol=2e-4, atol=2e-5
  )


def test_independent_gaussians_bias_method_numbers():
  # docs/method.md, the noise floor: n=128, d=512, mean of 3 draws: biased ~0.80, debiased ~0.00.
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  xs = jnp.stack([jax.random.normal(k, (128, 512)) for k in keys[:3]])
  ys = jnp.stack([jax.random.normal(k, (128, 512)) for k in keys[3:]])
  biased = float(jnp.mean(analysis.linear_cka(xs, ys)))
  debiased = float(jnp.mean(analysis.linear_cka(xs, ys, debiased=True)))
  assert biased == pytest.approx(0.80, abs=0.02)
  assert abs(debiased) < 0.01
  x, y = np.asarray(xs[0], np.float64), np.asarray(ys[0], np.float64)
  assert float(analysis.linear_cka(xs[0], ys[0])) == pytest.approx(np_feature_cka(x, y), rel=1e-5)


@pytest.mark.parametrize("debiased", [False, True])
def test_batched_reference_pairwise_and_per_head(debiased):
  f = np_debiased_cka if debiased else np_feature_cka
  c, layers, n, d = 3, 2, 10, 6
  acts = rand(11, c, layers, n, d)
  acts[:, :, :, :3] += acts[-1:, :, :, :3]  # some shared signal with the reference
  ref = acts[-1]
  got = analysis.cka_to_reference(
    jnp.asarray(acts, jnp.float32), jnp.asarray(ref, jnp.float32), debiased
  )
  expected = np.array([[f(acts[i, j], ref[j]) for j in range(layers)] for i in range(c)])
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  # Pairwise, in both code paths (Gram when n <= d, feature space otherwise).
  for n_samples, width in [(8, 12), (20, 5)]:
    a = rand(12, 4, n_samples, width) + rand(13, 1, n_samples, width)
    got = analysis.pairwise_cka(jnp.asarray(a, jnp.float32), debiased)
    expected = np.array([[f(a[i], a[j]) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  # Per head, in the capture layout [C, L, n, H, e].
  heads = rand(14, 2, 2, 12, 3, 4)
  heads_ref = heads[-1] + 0.5 * rand(15, 2, 12, 3, 4)
  got = analysis.per_head_cka_to_reference(
    jnp.asarray(heads, jnp.float32), jnp.asarray(heads_ref, jnp.float32), debiased
  )
  assert got.shape == (2, 2, 3)
  expected = np.array(
    [
      [[f(heads[i, j, :, h], heads_ref[j, :, h]) for h in range(3)] for j in range(2)]
      for i in range(2)
    ]
  )
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_noise_floor():
  x = jnp.asarray(rand(16, 64, 256), jnp.float32)
  floor = analysis.cka_noise_floor(x, jax.random.PRNGKey(1), num_permutations=3)
  assert floor.shape == (3,)
  # Permuted rows of the same matrix behave like independent data: biased CKA sits near the
  # n/d-driven floor (>0.5 here), debiased near 0, while unpermuted CKA is 1.
  assert float(jnp.min(floor)) > 0.5
  floor_debiased = analysis.cka_noise_floor(x, jax.random.PRNGKey(1), debiased=True)
  assert float(jnp.max(jnp.abs(floor_debiased))) < 0.05
  assert float(analysis.linear_cka(x, x)) == pytest.approx(1.0, abs=1e-5)
  # Leading axes are permuted alike and kept: [P, L].
  assert analysis.cka_noise_floor(
    jnp.stack([x, x]), jax.random.PRNGKey(2), num_permutations=2
  ).shape == (2, 2)


def test_bad_inputs():
  x = jnp.ones((10, 4))
  y = jnp.asarray(rand(17, 10, 3), jnp.float32)
  assert np.isnan(float(analysis.linear_cka(x, y)))  # zero variance -> documented NaN
  assert np.isnan(float(analysis.linear_cka(x, y, debiased=True)))
  with pytest.raises(ValueError, match=r"\(10, 3\)"):
    analysis.linear_cka(jnp.zeros((9, 4)), y)
  with pytest.raises(ValueError, match="n >= 4"):
    analysis.linear_cka(y[:3], y[:3], debiased=True)
  with pytest.raises(ValueError, match="empty"):
    analysis.linear_cka(jnp.zeros((0, 4)), jnp.zeros((0, 3)))
  with pytest.raises(ValueError, match="broadcast"):
    analysis.linear_cka(jnp.zeros((2, 10, 4)), jnp.zeros((3, 10, 4)))
  bad = np.asarray(y).copy()
  bad[0, 0] = np.nan
  assert np.isnan(float(analysis.linear_cka(jnp.asarray(bad), y)))  # NaN propagates
  with pytest.raises(ValueError, match="acts: 1 of 30"):
    analysis.check_finite("acts", bad)
  analysis.check_finite("fine", y)


def test_float64_path():
  with jax.enable_x64(True):
    x, y = rand(18, 30, 5), rand(19, 30, 4)
    got = analysis.linear_cka(jnp.asarray(x), jnp.asarray(y), debiased=True)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, np_debiased_cka(x, y), rtol=1e-10)


def test_jit_and_vmap_compose():
  x = jnp.asarray(rand(20, 3, 16, 5), jnp.float32)
  y = jnp.asarray(rand(21, 3, 16, 4), jnp.float32)
  expected = np.array(
    [np_feature_cka(np.asarray(x[i], np.float64), np.asarray(y[i], np.float64)) for i in range(3)]
  )
  vmapped = jax.vmap(analysis.linear_cka)(x, y)
  jitted = jax.jit(analysis.linear_cka, static_argnames="debiased")(x, y)
  np.testing.assert_allclose(vmapped, expected, rtol=1e-5)
  np.testing.assert_allclose(jitted, expected, rtol=1e-5)
  acts = jnp.stack([x[:, :, :4], y])  # [C=2, L=3, n, d]
  got = jax.jit(analysis.cka_to_reference, static_argnames=("debiased",))(acts, y, debiased=True)
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got[1], 1.0, rtol=1e-5)
  pair_feature = analysis.pairwise_cka(y, gram_budget=0)  # forced feature-space loop
  pair_gram = analysis.pairwise_cka(y)
  np.testing.assert_allclose(pair_feature, pair_gram, rtol=1e-5)


def test_half_precision_inputs_are_computed_in_float32():
  x, y = rand(22, 40, 6), rand(23, 40, 5) + rand(22, 40, 6)[:, :5]
  got = analysis.linear_cka(jnp.asarray(x, jnp.float16), jnp.asarray(y, jnp.bfloat16))
  assert got.dtype == jnp.float32
  x16 = np.asarray(jnp.asarray(x, jnp.float16), np.float64)
  y16 = np.asarray(jnp.asarray(y, jnp.bfloat16).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(got, np_feature_cka(x16, y16), rtol=1e-5)


def test_ov_head_features_keep_every_gram_matrix_of_the_per_head_ov_activations():
  rng = np.random.default_rng(7)
  values = rng.normal(size=(2, 10, 3, 4)).astype(np.float32)  # [L, n, H, dh]
  out_kernel = rng.normal(size=(2, 3, 4, 16)).astype(np.float32)  # [L, H, dh, d]
  features = np.asarray(analysis.ov_head_features(values, out_kernel))
  assert features.shape == (2, 3, 10, 4)
  for l in range(2):
    for h in range(3):
      full = values[l, :, h] @ out_kernel[l, h]  # [n, d]: the token's own value through W_O
      np.testing.assert_allclose(
        features[l, h] @ features[l, h].T, full @ full.T, rtol=1e-4, atol=1e-4
      )
