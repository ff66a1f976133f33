"""Gradient statistics, sparsity, convergence statistics and the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import analysis


def np_per(s, k):
  s = np.sort(s)[::-1][:k]
  p = s / s.sum()
  p = p[p > 0]
  return np.exp(-(p * np.log(p)).sum()) / k


def test_gradient_statistics():
  rng = np.random.default_rng(0)
  grads = rng.standard_normal((5, 3, 6, 4))  # [G, L, m, n]
  grads[1:] += 0.7 * grads[:-1]  # correlated consecutive batches
  cos = [
    [
      np.dot(grads[t, l].ravel(), grads[t + 1, l].ravel())
      / (np.linalg.norm(grads[t, l]) * np.linalg.norm(grads[t + 1, l]))
      for l in range(3)
    ]
    for t in range(4)
  ]
  g32 = jnp.asarray(grads, jnp.float32)
  np.testing.assert_allclose(analysis.mean_consecutive_cosine(g32), np.mean(cos, axis=0), rtol=1e-5)
  np.testing.assert_allclose(
    analysis.mean_gradient_norm(g32), np.mean(np.linalg.norm(grads, axis=(2, 3)), axis=0), rtol=1e-5
  )
  s = np.linalg.svd(grads, compute_uv=False)  # [G, L, 4]
  np.testing.assert_allclose(
    analysis.mean_singular_value_per(analysis.singular_values(g32), 4),
    [np_per(s[:, l].mean(0), 4) for l in range(3)],
    rtol=1e-4,
  )
  with pytest.raises(ValueError, match="at least 2"):
    analysis.mean_consecutive_cosine(g32[:1])
  a, b = rng.standard_normal((2, 2, 9, 3)), rng.standard_normal((2, 2, 3, 7))
  np.testing.assert_allclose(
    analysis.factored_inner_product(
      jnp.asarray(a[0]), jnp.asarray(b[0]), jnp.asarray(a[1]), jnp.asarray(b[1])
    ),
    np.sum((a[0] @ b[0]) * (a[1] @ b[1]), axis=(1, 2)),
    rtol=1e-4,
  )


def test_gradient_spectra_summary():
  rng = np.random.default_rng(1)
  num_layers, d, heads, head_dim, f, g = 2, 12, 2, 3, 20, 3
  w = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  layers = {
    "attn": {
      "value": {"kernel": w(num_layers, d, heads, head_dim)},
      "out": {"kernel": w(num_layers, heads, head_dim, d)},
    },
    "mlp": {"fc_out": {"kernel": w(num_layers, f, d)}},
  }
  grads = {
    "attn": {
      "value": {"kernel": w(g, num_layers, d, heads, head_dim)},
      "out": {"kernel": w(g, num_layers, heads, head_dim, d)},
    },
    "mlp": {"fc_out": {"kernel": w(g, num_layers, f, d)}},
  }
  out = jax.jit(analysis.gradient_spectra)(grads, layers)
  # numpy: per gradient batch, dW_OV,h = dW_O[:, h] W_V[h, :] + W_O[:, h] dW_V[h, :].
  value, outk = (
    np.asarray(layers["attn"]["value"]["kernel"]),
    np.asarray(layers["attn"]["out"]["kernel"]),
  )
  dvalue, doutk = (
    np.asarray(grads["attn"]["value"]["kernel"]),
    np.asarray(grads["attn"]["out"]["kernel"]),
  )
  for l in range(num_layers):
    heads_g = np.array(
      [
        [
          doutk[t, l, h].T @ value[l, :, h].T + outk[l, h].T @ dvalue[t, l, :, h].T
          for h in range(heads)
        ]
        for t in range(g)
      ]
    )  # [G, H, d, d]
    for h in range(heads):
      s = np.linalg.svd(heads_g[:, h], compute_uv=False)
      assert float(out["ov_head"]["grad_per"][l, h]) == pytest.approx(
        np_per(s.mean(0), 2 * head_dim), rel=1e-4
      )
      norms = np.linalg.norm(heads_g[:, h], axis=(1, 2))
      assert float(out["ov_head"]["grad_norm"][l, h]) == pytest.approx(norms.mean(), rel=1e-4)
      cos = [
        np.sum(heads_g[t, h] * heads_g[t + 1, h]) / (norms[t] * norms[t + 1]) for t in range(g - 1)
      ]
      assert float(out["ov_head"]["grad_cosine"][l, h]) == pytest.approx(np.mean(cos), abs=1e-5)
    whole = heads_g.sum(1)
    s = np.linalg.svd(whole, compute_uv=False)
    assert float(out["ov"]["grad_per"][l]) == pytest.approx(np_per(s.mean(0), d), rel=1e-4)
    mlp = np.asarray(grads["mlp"]["fc_out"]["kernel"])[:, l]
    s = np.linalg.svd(mlp, compute_uv=False)
    assert float(out["mlp"]["grad_per"][l]) == pytest.approx(np_per(s.mean(0), d), rel=1e-4)
    cos = [
      np.sum(mlp[t] * mlp[t + 1]) / (np.linalg.norm(mlp[t]) * np.linalg.norm(mlp[t + 1]))
      for t in range(g - 1)
    ]
    assert float(out["mlp"]["grad_cosine"][l]) == pytest.approx(np.mean(cos), abs=1e-5)
  assert out["ov_head"]["grad_per"].shape == (num_layers, heads)


def test_gini_and_hoyer_against_formulas():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 50)) * rng.exponential(size=(4, 50))
  a = np.abs(x)
  m = x.shape[1]
  # Gini as the mean absolute difference (Hurley & Rickard's sorted form is equivalent).
  gini_np = np.abs(a[:, :, None] - a[:, None, :]).sum((1, 2)) / (2 * m * a.sum(1))
  np.testing.assert_allclose(analysis.gini(jnp.asarray(x)), gini_np, rtol=1e-5)
  hoyer_np = (np.sqrt(m) - a.sum(1) / np.sqrt((x**2).sum(1))) / (np.sqrt(m) - 1)
  np.testing.assert_allclose(analysis.hoyer(jnp.asarray(x)), hoyer_np, rtol=1e-5)
  one_hot = jnp.zeros(10).at[3].set(2.0)
  assert float(analysis.gini(one_hot)) == pytest.approx(0.9)
  assert float(analysis.hoyer(one_hot)) == pytest.approx(1.0)
  assert float(analysis.gini(jnp.ones(10))) == pytest.approx(0.0, abs=1e-7)
  assert np.isnan(float(analysis.hoyer(jnp.zeros(10))))


def test_percentile_bands():
  values = np.random.default_rng(3).uniform(size=(7, 12)).astype(np.float32)  # [C, L]
  got = analysis.percentile_bands(jnp.asarray(values))
  assert got.shape == (5, 7)
  np.testing.assert_allclose(got, np.percentile(values, [10, 25, 50, 75, 90], axis=1), rtol=1e-6)


def test_convergence_step_and_auc():
  steps = np.array([0, 1, 2, 4, 1000, 3000, 13000, 143000])
  cka = np.array(
    [
      [0.1, 0.2, 0.95, 0.5, 0.92, 0.96, 0.97, 1.0],  # dips, then stays from 1000
      [0.1, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 1.0],  # stays from step 1
      [0.1, 0.95, 0.9, 0.95, 0.95, 0.95, 0.8, 1.0],
    ]
  )  # last dip at 13000
  got = analysis.convergence_step(jnp.asarray(cka), jnp.asarray(steps), 0.9)
  np.testing.assert_array_equal(got, [1000.0, 1.0, 143000.0])
  assert np.isnan(
    float(analysis.convergence_step(jnp.asarray(cka[0, :-1] * 0.5), jnp.asarray(steps[:-1]), 0.9))
  )
  x = np.log(steps + 1.0)
  area = np.array([np.sum((x[1:] - x[:-1]) * (row[1:] + row[:-1]) / 2) for row in cka])
  np.testing.assert_allclose(
    analysis.area_under_log_step_curve(jnp.asarray(cka), jnp.asarray(steps)),
    area / (x[-1] - x[0]),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    analysis.area_under_log_step_curve(jnp.asarray(cka), jnp.asarray(steps), normalise=False),
    area,
    rtol=1e-5,
  )


def test_correlations_against_scipy():
  rng = np.random.default_rng(4)
  per = rng.uniform(size=24)
  conv = 2 * per + rng.normal(scale=0.3, size=24)
  conv[:4] = conv[4]  # ties
  per[10] = per[11]
  out = analysis.per_convergence_correlation(
    jnp.asarray(per), jnp.asarray(conv), jax.random.PRNGKey(0), num_bootstrap=500
  )
  assert float(out["pearson"]) == pytest.approx(scipy.stats.pearsonr(per, conv)[0], rel=1e-5)
  assert float(out["spearman"]) == pytest.approx(scipy.stats.spearmanr(per, conv)[0], rel=1e-5)
  np.testing.assert_allclose(
    analysis.average_ranks(jnp.asarray(conv)), scipy.stats.rankdata(conv), rtol=1e-6
  )
  for name in ("pearson", "spearman"):
    assert float(out[f"{name}_low"]) <= float(out[name]) <= float(out[f"{name}_high"])
    assert float(out[f"{name}_high"]) - float(out[f"{name}_low"]) > 0.01
  again = analysis.per_convergence_correlation(
    jnp.asarray(per), jnp.asarray(conv), jax.random.PRNGKey(0), num_bootstrap=500
  )
  assert float(again["pearson_low"]) == float(out["pearson_low"])  # deterministic in the key


def test_registry():
  # The registry says what exists; the default protocol is the paper's (and nuclear norm).
  spectral = set(analysis.metrics_in_family("spectral"))
  assert {"per", "effective_rank", "condition_number", "stable_rank", "nuclear_norm"} <= spectral
  assert {"gini", "hoyer"} == set(analysis.metrics_in_family("entries"))
  assert {"cka", "cka_debiased", "svcca", "pwcca"} == set(analysis.metrics_in_family("similarity"))
  assert analysis.METRICS["svcca"].default == () and analysis.METRICS["cka"].default
  assert analysis.METRICS["per"].fn is analysis.proportional_effective_rank
  with pytest.raises(TypeError):
    analysis.METRICS["per"] = None  # read-only mapping
  with pytest.raises(ValueError, match="already registered"):
    analysis.register_metric("per", "spectral")(lambda s: s)
  name = "test_only_top_singular_value_share"
  try:

    @analysis.register_metric(name, "spectral")
    def top_share(s):
      return jnp.max(s, -1) / jnp.sum(s, -1)

    got = analysis.spectral_metrics(jnp.array([[3.0, 1.0]]), 2)
    assert float(got[name][0]) == pytest.approx(0.75)
  finally:
    from analysis import registry

    registry._REGISTRY.pop(name, None)
