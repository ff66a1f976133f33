"""One-call summaries for the sweep, and the study's component x metric table.

`METRIC_TABLE` (via `metric_table()`) is the one list of every (component, metric) the
sweep writes; the study, these summaries and the report read it. Components:
'ov_head' -> arrays [L, H]; 'ov' -> [L]; 'mlp' -> [L] (weights, gradients, activations);
'resid' -> [L] (activations only); 'model' -> [] (losses). Weight metrics are the
registered 'spectral' metrics ('effective_rank', 'per', 'condition_number',
'stable_rank', 'frobenius_norm', 'spectral_norm', plus any registered later); gradient
metrics are the same of the mean gradient singular values, prefixed 'grad_', plus
'grad_norm' and 'grad_cosine'.

Rank bounds k (docs/method.md): d_head for a head's OV matrix, d for the whole OV and the MLP.
A head's OV *gradient* has rank <= 2 d_head (sum of two rank-d_head products), so its
default bound is 2 d_head; pass head_gradient_rank_bound=d_head to mimic the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from analysis import circuits
from analysis.gradients import factored_inner_product, mean_singular_values
from analysis.registry import metrics_in_family
from analysis.spectra import product_singular_values, singular_values, spectral_metrics

#: Components with weights (and gradients): the OV circuit per head and whole, the MLP.
COMPONENTS = ("ov_head", "ov", "mlp")
#: Components whose activations are compared by CKA.
ACTIVATION_COMPONENTS = (*COMPONENTS, "resid")
#: CKA estimators by metric name: whether each is the debiased one.
CKA_ESTIMATORS = {"cka": False, "cka_debiased": True}
#: Whole-model metrics (component 'model').
MODEL_METRICS = ("train_loss", "heldout_loss")


def noise_floor_name(estimator: str) -> str:
  """The metric name of an estimator's noise floor: 'cka' -> 'cka_floor'."""
  return f"{estimator}_floor"


def gradient_name(metric: str) -> str:
  """The metric name of a spectral metric of the gradients: 'per' -> 'grad_per'."""
  return f"grad_{metric}"


def metric_table() -> dict[str, tuple[str, ...]]:
  """{component: metric names}: every value the sweep writes (the module doc)."""
  cka = tuple(CKA_ESTIMATORS) + tuple(noise_floor_name(e) for e in CKA_ESTIMATORS)
  spectral = tuple(metrics_in_family("spectral"))
  gradient = tuple(gradient_name(m) for m in spectral) + ("grad_norm", "grad_cosine")
  table = {c: cka + spectral + gradient for c in COMPONENTS}
  table["resid"] = cka
  table["model"] = MODEL_METRICS
  return table


_HIGHEST = jax.lax.Precision.HIGHEST


def _dims(layers: dict):
  _, d, heads, head_dim = layers["attn"]["value"]["kernel"].shape
  return d, heads, head_dim


def weight_singular_values(layers: dict, value_slice: str = "per_head") -> dict[str, jax.Array]:
  """Singular values per component: {'ov_head': [L, H, dh], 'ov': [L, d], 'mlp': [L, d]}.

  Args:
    layers: the stacked params['layers'] dict (leaves with a leading L axis).
  """
  attn = layers["attn"]
  return {
    "ov_head": circuits.ov_head_singular_values(attn, value_slice),
    "ov": circuits.ov_singular_values(attn, value_slice),
    "mlp": circuits.mlp_singular_values(layers["mlp"]),
  }


def weight_spectra(layers: dict, value_slice: str = "per_head") -> dict[str, dict[str, jax.Array]]:
  """All spectral metrics of one checkpoint's weights.

  Args:
    layers: params['layers'] (leaves [L, ...]).
    value_slice: 'per_head' or 'reference' (see circuits).
  Returns:
    {'ov_head': {metric: [L, H]}, 'ov': {metric: [L]}, 'mlp': {metric: [L]}}.
  """
  d, _, head_dim = _dims(layers)
  d_mlp = min(layers["mlp"]["fc_out"]["kernel"].shape[-2:])
  s = weight_singular_values(layers, value_slice)
  return {
    "ov_head": spectral_metrics(s["ov_head"], head_dim),
    "ov": spectral_metrics(s["ov"], d),
    "mlp": spectral_metrics(s["mlp"], d_mlp),
  }


def _cosine(dot, norm_a, norm_b):
  return dot / (norm_a * norm_b)


def gradient_spectra(
  grads: dict,
  layers: dict,
  value_slice: str = "per_head",
  head_gradient_rank_bound: int | None = None,
  route: str = "auto",
) -> dict[str, dict[str, jax.Array]]:
  """All gradient metrics of one checkpoint from G gradient batches.

  Spectral metrics ('grad_per', ...) are of the singular values averaged over the G
  batches (docs/method.md); 'grad_norm' is the mean Frobenius norm of the component gradient,
  'grad_cosine' the mean cosine of consecutive batches (NaN if G == 1). Batches are
  processed one at a time (lax.scan), so memory holds two batches' d x d OV gradients, not G.

  Args:
    grads: gradients with the params['layers'] layout, every leaf with a leading G axis:
      attn.value.kernel [G, L, d, H, dh], attn.out.kernel [G, L, H, dh, d],
      mlp.fc_out.kernel [G, L, f, d] (and attn.query/key kernels for 'reference').
    layers: params['layers'] at the checkpoint (leaves [L, ...]).
    head_gradient_rank_bound: k for 'ov_head' (default 2 * d_head).
    route: how singular values are computed (analysis.spectra.singular_values; 'auto'
      picks per backend and shape, 'svd' is the plain SVD everywhere).
  Returns:
    {'ov_head': {metric: [L, H]}, 'ov': {metric: [L]}, 'mlp': {metric: [L]}}.
  """
  d, _, head_dim = _dims(layers)
  d_mlp = min(layers["mlp"]["fc_out"]["kernel"].shape[-2:])
  k_head = head_gradient_rank_bound or 2 * head_dim
  attn = layers["attn"]
  grad_value = grads["attn"]["value"]["kernel"]
  if grad_value.ndim != attn["value"]["kernel"].ndim + 1:
    raise ValueError(
      f"gradient leaves need a leading G axis: grad value kernel "
      f"{grad_value.shape} vs param {attn['value']['kernel'].shape}"
    )
  attn_keys = ("query", "key", "value", "out") if value_slice == "reference" else ("value", "out")
  xs = {
    "attn": {name: {"kernel": grads["attn"][name]["kernel"]} for name in attn_keys},
    "fc_out": grads["mlp"]["fc_out"]["kernel"],
  }

  def step(previous, grad):
    left, right = circuits.ov_head_gradient_factors(attn, grad["attn"], value_slice)
    whole = circuits.ov_gradients(attn, grad["attn"], value_slice)
    mlp = grad["fc_out"]
    s_head = product_singular_values(left, right, route=route)
    s_whole = singular_values(whole, route)
    s_mlp = singular_values(mlp, route)
    norms = {
      "ov_head": jnp.sqrt(jnp.sum(jnp.square(s_head), -1)),
      "ov": jnp.linalg.norm(whole, axis=(-2, -1)),
      "mlp": jnp.linalg.norm(mlp, axis=(-2, -1)),
    }
    dots = {
      "ov_head": factored_inner_product(previous["left"], previous["right"], left, right),
      "ov": jnp.sum(previous["whole"] * whole, axis=(-2, -1)),
      "mlp": jnp.sum(previous["mlp"] * mlp, axis=(-2, -1)),
    }
    cosines = {c: _cosine(dots[c], previous["norms"][c], norms[c]) for c in COMPONENTS}
    carry = {"left": left, "right": right, "whole": whole, "mlp": mlp, "norms": norms}
    return carry, ({"ov_head": s_head, "ov": s_whole, "mlp": s_mlp}, norms, cosines)

  first = jax.tree.map(lambda leaf: leaf[0], xs)
  # The first scan step pairs batch 0 with a zero carry; that cosine is dropped below.
  init = _zero_carry(attn, first, value_slice)
  _, (svals, norms, cosines) = jax.lax.scan(step, init, xs)
  num_batches = grad_value.shape[0]
  bounds = {"ov_head": k_head, "ov": d, "mlp": d_mlp}
  out = {}
  for component in COMPONENTS:
    spectral = spectral_metrics(mean_singular_values(svals[component]), bounds[component])
    metrics = {gradient_name(name): value for name, value in spectral.items()}
    metrics["grad_norm"] = jnp.mean(norms[component], axis=0)
    metrics["grad_cosine"] = (
      jnp.mean(cosines[component][1:], axis=0)
      if num_batches > 1
      else jnp.full_like(norms[component][0], jnp.nan)
    )
    out[component] = metrics
  return out


def _zero_carry(attn, first, value_slice):
  left, right = circuits.ov_head_gradient_factors(attn, first["attn"], value_slice)
  whole = circuits.ov_gradients(attn, first["attn"], value_slice)
  zeros = jnp.zeros_like
  norms = {
    "ov_head": jnp.ones(left.shape[:-2], left.dtype),
    "ov": jnp.ones(whole.shape[:-2], whole.dtype),
    "mlp": jnp.ones(first["fc_out"].shape[:-2], first["fc_out"].dtype),
  }
  return {
    "left": zeros(left),
    "right": zeros(right),
    "whole": zeros(whole),
    "mlp": zeros(first["fc_out"]),
    "norms": norms,
  }
