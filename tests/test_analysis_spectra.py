"""Spectra, OV circuits and the reference slice, checked against numpy written out here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import analysis

PYTHIA_70M = dict(layers=6, d=512, heads=8, head_dim=64)


def np_effective_rank(s):
  p = s / s.sum()
  p = p[p > 0]
  return np.exp(-(p * np.log(p)).sum())


def np_per(s, k):
  return np_effective_rank(np.sort(s)[::-1][:k]) / k


def random_layers(seed, layers, d, heads, head_dim, f=None, scale=0.05):
  """Random stacked params['layers'] in the project's Flax layout (no model import)."""
  rng = np.random.default_rng(seed)
  f = f or 4 * d
  w = lambda *shape: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)  # noqa: E731
  attn = {
    name: {"kernel": w(layers, d, heads, head_dim), "bias": w(layers, heads, head_dim)}
    for name in ("query", "key", "value")
  }
  attn["out"] = {"kernel": w(layers, heads, head_dim, d), "bias": w(layers, d)}
  mlp = {
    "fc_in": {"kernel": w(layers, d, f), "bias": w(layers, f)},
    "fc_out": {"kernel": w(layers, f, d), "bias": w(layers, d)},
  }
  return {"attn": attn, "mlp": mlp}


def np_head_ov(attn, layer, head):
  """W_OV,h = W_O[:, h] @ W_V[h, :] in torch convention, built by hand."""
  w_v = np.asarray(attn["value"]["kernel"][layer, :, head, :], np.float64).T  # dh x d
  w_o = np.asarray(attn["out"]["kernel"][layer, head], np.float64).T  # d x dh
  return w_o @ w_v


def np_fused_qkv(attn, layer):
  """The HF fused query_key_value weight [3d, d], row h*3*dh + j*dh + i, built with loops."""
  q = np.asarray(attn["query"]["kernel"][layer])
  _, heads, head_dim = q.shape
  d = heads * head_dim
  fused = np.zeros((3 * d, q.shape[0]), np.float32)
  for h in range(heads):
    for j, name in enumerate(("query", "key", "value")):
      kernel = np.asarray(attn[name]["kernel"][layer])
      for i in range(head_dim):
        fused[h * 3 * head_dim + j * head_dim + i, :] = kernel[:, h, i]
  return fused


# ----- spectral metrics ------------------------------------------------------------------


def test_per_identity_rank_one_and_formula():
  k = 16
  s_identity = analysis.singular_values(jnp.eye(k))
  assert float(analysis.proportional_effective_rank(s_identity, k)) == pytest.approx(1.0, 1e-6)
  rank_one = jnp.outer(jnp.arange(1.0, 21.0), jnp.linspace(-1, 2, 16))
  s_rank_one = analysis.singular_values(rank_one)
  assert float(analysis.proportional_effective_rank(s_rank_one, k)) == pytest.approx(
    1 / k, rel=1e-4
  )
  s = np.abs(np.random.default_rng(0).standard_normal((3, 4, 10)))
  np.testing.assert_allclose(
    analysis.proportional_effective_rank(jnp.asarray(s), 6),
    np.vectorize(lambda i, j: np_per(s[i, j], 6))(*np.indices((3, 4))),
    rtol=1e-5,
  )
  # Fewer singular values than k: zero-padded, i.e. ER unchanged and divided by k.
  np.testing.assert_allclose(
    analysis.proportional_effective_rank(jnp.asarray(s[0, 0]), 20),
    np_effective_rank(s[0, 0]) / 20,
    rtol=1e-5,
  )
  assert np.isnan(float(analysis.effective_rank(jnp.zeros(5))))  # zero matrix: documented NaN


def test_other_spectral_metrics():
  m = np.random.default_rng(1).standard_normal((5, 9, 7))
  s_np = np.linalg.svd(m, compute_uv=False)
  metrics = analysis.spectral_metrics(analysis.singular_values(jnp.asarray(m, jnp.float32)), 4)
  np.testing.assert_allclose(metrics["frobenius_norm"], np.linalg.norm(m, axis=(1, 2)), rtol=1e-5)
  np.testing.assert_allclose(metrics["spectral_norm"], np.linalg.norm(m, 2, axis=(1, 2)), rtol=1e-5)
  np.testing.assert_allclose(
    metrics["stable_rank"],
    np.linalg.norm(m, axis=(1, 2)) ** 2 / np.linalg.norm(m, 2, axis=(1, 2)) ** 2,
    rtol=1e-5,
  )
  np.testing.assert_allclose(metrics["condition_number"], s_np[:, 0] / s_np[:, 3], rtol=1e-5)
  np.testing.assert_allclose(
    metrics["effective_rank"], [np_effective_rank(row) for row in s_np], rtol=1e-5
  )
  np.testing.assert_allclose(metrics["per"], [np_per(row, 4) for row in s_np], rtol=1e-5)


@pytest.mark.parametrize("m,r,n", [(40, 5, 30), (17, 8, 60)])
def test_qr_core_spectrum_equals_full_svd(m, r, n):
  rng = np.random.default_rng(2)
  left, right = rng.standard_normal((3, m, r)), rng.standard_normal((3, r, n))
  expected = np.linalg.svd(left @ right, compute_uv=False)[:, :r]
  for method in ("core", "direct", "auto"):
    got = analysis.product_singular_values(
      jnp.asarray(left, jnp.float32), jnp.asarray(right, jnp.float32), method
    )
    np.testing.assert_allclose(got[:, :r], expected, rtol=1e-4, atol=1e-4 * expected.max())


def test_ov_head_and_whole_layer_spectra():
  layers = random_layers(3, layers=2, d=32, heads=4, head_dim=8)
  attn = layers["attn"]
  got_head = analysis.ov_head_singular_values(attn)  # QR core
  assert got_head.shape == (2, 4, 8)
  got_weights = analysis.ov_head_weights(attn)
  got_whole = analysis.ov_singular_values(attn)
  for layer in range(2):
    heads = [np_head_ov(attn, layer, h) for h in range(4)]
    for h in range(4):
      np.testing.assert_allclose(got_weights[layer, h], heads[h], rtol=1e-4, atol=1e-7)
      s = np.linalg.svd(heads[h], compute_uv=False)
      np.testing.assert_allclose(got_head[layer, h], s[:8], rtol=1e-4, atol=1e-7)
    whole = sum(heads)
    np.testing.assert_allclose(analysis.ov_weights(attn)[layer], whole, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
      got_whole[layer], np.linalg.svd(whole, compute_uv=False), rtol=1e-4, atol=1e-7
    )
    mlp = np.asarray(layers["mlp"]["fc_out"]["kernel"][layer], np.float64).T  # d x 4d
    np.testing.assert_allclose(analysis.mlp_weight(layers["mlp"])[layer], mlp, rtol=1e-6)
    np.testing.assert_allclose(
      analysis.mlp_singular_values(layers["mlp"])[layer],
      np.linalg.svd(mlp, compute_uv=False),
      rtol=1e-4,
    )


def test_ov_gradients_chain_rule_against_autodiff():
  layers = random_layers(4, layers=2, d=24, heads=3, head_dim=4)
  grads = random_layers(5, layers=2, d=24, heads=3, head_dim=4)
  value, out = layers["attn"]["value"]["kernel"], layers["attn"]["out"]["kernel"]
  d_value, d_out = grads["attn"]["value"]["kernel"], grads["attn"]["out"]["kernel"]

  def head_ov(value_kernel, out_kernel):  # W_OV[l, h, o, v] = sum_i O[l,h,i,o] V[l,v,h,i]
    return jnp.einsum("lhio,lvhi->lhov", out_kernel, value_kernel)

  _, expected = jax.jvp(head_ov, (value, out), (d_value, d_out))  # first-order change
  got = analysis.ov_head_gradients(layers["attn"], grads["attn"])
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
  got_whole = analysis.ov_gradients(layers["attn"], grads["attn"])
  np.testing.assert_allclose(got_whole, expected.sum(1), rtol=1e-4, atol=1e-7)
  # Finite differences agree as well (bilinear map: exact up to the eps^2 term).
  eps = 1e-3
  fd = (head_ov(value + eps * d_value, out + eps * d_out) - head_ov(value, out)) / eps
  np.testing.assert_allclose(got, fd, atol=2e-3 * float(jnp.abs(fd).max()))
  # The 2dh x 2dh core gives the spectrum of the d x d gradient.
  s_core = analysis.ov_head_gradient_singular_values(layers["attn"], grads["attn"])
  assert s_core.shape == (2, 3, 8)
  s_full = np.linalg.svd(np.asarray(expected, np.float64), compute_uv=False)[..., :8]
  np.testing.assert_allclose(s_core, s_full, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    analysis.ov_gradient_singular_values(layers["attn"], grads["attn"]),
    np.linalg.svd(np.asarray(expected.sum(1), np.float64), compute_uv=False),
    rtol=1e-4,
    atol=1e-6,
  )


def test_ov_activations():
  rng = np.random.default_rng(6)
  values = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)  # [L, n, H, dh]
  out_kernel = rng.standard_normal((2, 3, 4, 7)).astype(np.float32)  # [L, H, dh, d]
  per_head = analysis.ov_head_activations(jnp.asarray(values), jnp.asarray(out_kernel))
  assert per_head.shape == (2, 5, 3, 7)
  for layer in range(2):
    for h in range(3):
      w_o_h = out_kernel[layer, h].T  # torch W_O[:, h], d x dh
      np.testing.assert_allclose(
        per_head[layer, :, h], values[layer, :, h] @ w_o_h.T, rtol=1e-5, atol=1e-5
      )
    w_o = np.concatenate([out_kernel[layer, h].T for h in range(3)], axis=1)  # d x d_attn
    np.testing.assert_allclose(
      analysis.ov_activations(jnp.asarray(values), jnp.asarray(out_kernel))[layer],
      values[layer].reshape(5, 12) @ w_o.T,
      rtol=1e-5,
      atol=1e-5,
    )
  with pytest.raises(ValueError, match="head dims"):
    analysis.ov_head_activations(jnp.asarray(values), jnp.asarray(out_kernel[:, :2]))


def test_reference_slice_is_the_fused_last_third_and_differs_from_values():
  shape = PYTHIA_70M
  layers = random_layers(7, shape["layers"], shape["d"], shape["heads"], shape["head_dim"], f=8)
  attn = layers["attn"]
  d = shape["d"]
  for layer in (0, 5):
    fused = np_fused_qkv(attn, layer)
    np.testing.assert_array_equal(analysis.fused_qkv_weight(attn)[layer], fused)
    np.testing.assert_array_equal(analysis.reference_value_weight(attn)[layer], fused[-d:, :])
  # Activations: the fused Linear's output sliced [..., 2d:], from per-head q, k, v.
  rng = np.random.default_rng(8)
  x = rng.standard_normal((shape["layers"], 16, d)).astype(np.float32)  # [L, n, d] inputs
  proj = {
    name: np.einsum("lnd,ldhi->lnhi", x, np.asarray(attn[name]["kernel"]))
    for name in ("query", "key", "value")
  }
  ref_value = analysis.reference_value_activation(proj["query"], proj["key"], proj["value"])
  for layer in (0, 5):
    fused_out = x[layer] @ np_fused_qkv(attn, layer).T  # [n, 3d] as torch computes it
    np.testing.assert_allclose(ref_value[layer], fused_out[:, 2 * d :], rtol=1e-4, atol=1e-4)
  # OV activations from true per-head values vs the reference slice: different.
  out_kernel = attn["out"]["kernel"]
  true_ov = analysis.ov_activations(
    analysis.value_vectors(None, None, jnp.asarray(proj["value"])), out_kernel
  )
  ref_ov = analysis.ov_activations(
    analysis.value_vectors(
      jnp.asarray(proj["query"]), jnp.asarray(proj["key"]), jnp.asarray(proj["value"]), "reference"
    ),
    out_kernel,
  )
  relative = jnp.linalg.norm(true_ov - ref_ov) / jnp.linalg.norm(true_ov)
  assert float(relative) > 0.5
  # The reference's "value" contains only the last third of the heads' q, k, v: for H=8,
  # fused rows 2d..3d start at head 5, j=1 (key) part way (2d = 5*3*dh + 1*dh + 0).
  np.testing.assert_allclose(ref_value[0, :, :64], proj["key"][0, :, 5], rtol=1e-6)
  np.testing.assert_allclose(ref_value[0, :, -64:], proj["value"][0, :, 7], rtol=1e-6)
  # Weight-side OV spectra differ as well.
  s_true = analysis.ov_head_singular_values(attn)
  s_ref = analysis.ov_head_singular_values(attn, "reference")
  assert float(jnp.max(jnp.abs(s_true - s_ref))) > 1e-3
  with pytest.raises(ValueError, match="value_slice"):
    analysis.ov_weights(attn, "last_third")


def test_weight_spectra_summary():
  layers = random_layers(9, layers=2, d=16, heads=2, head_dim=8)
  out = jax.jit(analysis.weight_spectra, static_argnames="value_slice")(layers)
  assert set(out) == set(analysis.COMPONENTS) == {"ov_head", "ov", "mlp"}
  for component, shape in [("ov_head", (2, 2)), ("ov", (2,)), ("mlp", (2,))]:
    assert set(out[component]) == set(analysis.metrics_in_family("spectral"))
    for value in out[component].values():
      assert value.shape == shape
  attn = layers["attn"]
  head_s = np.linalg.svd(np_head_ov(attn, 1, 0), compute_uv=False)
  assert float(out["ov_head"]["per"][1, 0]) == pytest.approx(np_per(head_s, 8), rel=1e-4)
  whole_s = np.linalg.svd(np_head_ov(attn, 0, 0) + np_head_ov(attn, 0, 1), compute_uv=False)
  assert float(out["ov"]["per"][0]) == pytest.approx(np_per(whole_s, 16), rel=1e-4)
  mlp_s = np.linalg.svd(np.asarray(layers["mlp"]["fc_out"]["kernel"][1]), compute_uv=False)
  assert float(out["mlp"]["per"][1]) == pytest.approx(np_per(mlp_s, 16), rel=1e-4)


def test_reference_slice_on_gradients_and_summaries():
  layers = random_layers(10, layers=2, d=12, heads=3, head_dim=4)
  grads = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a + 0.1]), random_layers(11, 2, 12, 3, 4))
  ref = analysis.gradient_spectra(grads, layers, "reference")
  true = analysis.gradient_spectra(grads, layers)
  assert ref["ov_head"]["grad_per"].shape == (2, 3)
  assert float(jnp.max(jnp.abs(ref["ov"]["grad_per"] - true["ov"]["grad_per"]))) > 1e-4
  # The reference value kernel is the fused W[-d:, :] regrouped into the Flax layout.
  fused = np_fused_qkv(layers["attn"], 1)
  np.testing.assert_array_equal(
    analysis.value_kernel(layers["attn"], "reference")[1].reshape(12, 12), fused[-12:, :].T
  )
  weights_ref = analysis.weight_spectra(layers, "reference")
  s = np.linalg.svd(
    np.asarray(layers["attn"]["out"]["kernel"][1]).reshape(12, 12).T @ fused[-12:, :],
    compute_uv=False,
  )
  assert float(weights_ref["ov"]["per"][1]) == pytest.approx(np_per(s, 12), rel=1e-4)
