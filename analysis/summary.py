"""One-call summaries for the sweep, and the study's component x metric table.

`metric_table(selection)` is the list of every (component, metric) a sweep writes, read
from the registry (analysis.registry) and a selection (analysis.selection). Components:
'ov_head' -> arrays [L, H]; 'ov' -> [L]; 'mlp' -> [L] (weights, gradients, activations);
'resid' -> [L] (activations only); 'model' -> [] (losses). Weight metrics are the
registered 'spectral' metrics ('effective_rank', 'per', 'condition_number',
'stable_rank', 'frobenius_norm', 'spectral_norm', plus any registered later); gradient
metrics are the same of the mean gradient singular values, prefixed 'grad_', plus
'grad_norm' and 'grad_cosine'.

Rank bounds k (docs/method.md): d_head for a head's OV matrix, d for the whole OV (H_kv d_head
under grouped-query attention) and the MLP.
A head's OV *gradient* has rank <= 2 d_head (sum of two rank-d_head products), so its
default bound is 2 d_head; pass head_gradient_rank_bound=d_head to mimic the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from analysis import circuits, registry
from analysis.gradients import factored_inner_product, mean_singular_values
from analysis.registry import ACTIVATION_COMPONENTS, COMPONENTS, register_metric
from analysis.similarity import linear_cka
from analysis.spectra import (
  product_singular_values,
  refine_singular_values,
  singular_values,
  spectral_metrics,
)

__all__ = ["ACTIVATION_COMPONENTS", "COMPONENTS"]  # re-exported: where callers found them

#: CKA estimators by metric name: whether each is the debiased one.
CKA_ESTIMATORS = {"cka": False, "cka_debiased": True}
#: Whole-model metrics (component 'model').
MODEL_METRICS = ("train_loss", "heldout_loss")


@register_metric("cka", "similarity", default=("activations",))
def cka(x: jax.Array, y: jax.Array) -> jax.Array:
  """Linear CKA ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), columns centred (Kornblith 2019)."""
  return linear_cka(x, y)


@register_metric("cka_debiased", "similarity", default=("activations",))
def cka_debiased(x: jax.Array, y: jax.Array) -> jax.Array:
  """Linear CKA with each HSIC the unbiased U-statistic of Song et al. (2007)."""
  return linear_cka(x, y, debiased=True)


@register_metric("norm", "gradient", default=("gradients",))
def mean_norm(norms: jax.Array) -> jax.Array:
  """Mean over the G batches of the gradient's Frobenius norm. [G, ...] -> [...]."""
  return jnp.mean(norms, axis=0)


@register_metric("cosine", "gradient", default=("gradients",))
def mean_cosine(cosines: jax.Array) -> jax.Array:
  """Mean cosine of consecutive batches' gradients (NaN if G == 1). [G, ...] -> [...]; the
  first entry (against the zero carry) is dropped."""
  if cosines.shape[0] < 2:
    return jnp.full_like(cosines[0], jnp.nan)
  return jnp.mean(cosines[1:], axis=0)


@register_metric("train_loss", "model", default=("model",))
def train_loss(losses: jax.Array) -> jax.Array:
  """Mean next-token loss over the G gradient batches. [G] -> []."""
  return jnp.mean(losses)


@register_metric("heldout_loss", "model", default=("model",))
def heldout_loss(loss: jax.Array) -> jax.Array:
  """Next-token loss on the final step's batch, which no checkpoint trained on. [] -> []."""
  return loss


def noise_floor_name(estimator: str) -> str:
  """The metric name of an estimator's noise floor: 'cka' -> 'cka_floor'."""
  return f"{estimator}_floor"


def gradient_name(metric: str) -> str:
  """The metric name of a spectral metric of the gradients: 'per' -> 'grad_per'."""
  return f"grad_{metric}"


def metric_table(selection=None) -> dict[str, tuple[str, ...]]:
  """{component: metric names}: every value a sweep of `selection` writes (default: the
  paper's protocol), floors included."""
  from analysis.selection import default

  selection = selection or default()
  table: dict[str, list[str]] = {}
  for component, name, _ in selection.entries:
    names = table.setdefault(component, [])
    names.append(name)
    if name in CKA_ESTIMATORS:
      names.append(noise_floor_name(name))
  return {c: tuple(names) for c, names in table.items()}


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
  bounds = weight_rank_bounds(layers)
  s = weight_singular_values(layers, value_slice)
  return {c: spectral_metrics(s[c], bounds[c]) for c in ("ov_head", "ov", "mlp")}


def weight_rank_bounds(layers: dict) -> dict:
  """{component: k} of the weight spectra (module doc), from the study factors' shapes
  (value.kernel [L, d, H_kv, dh]: the family's key/value heads): d_head for a head's OV,
  min(d, H_kv d_head) for the whole OV, min(f, d) for the MLP."""
  d, kv_heads, head_dim = _dims(layers)
  d_mlp = min(layers["mlp"]["fc_out"]["kernel"].shape[-2:])
  # W_OV = sum_h W_O[:, h] W_V[kv(h)] factors through the H_kv * dh values: its rank
  # bound is d, or H_kv * dh under grouped-query attention (docs/method.md).
  return {"ov_head": head_dim, "ov": min(d, kv_heads * head_dim), "mlp": d_mlp}


def _cosine(dot, norm_a, norm_b):
  return dot / (norm_a * norm_b)


def _gradient_leaves(grads: dict, value_slice: str) -> dict:
  """The gradient leaves the statistics read, in the params['layers'] layout."""
  attn_keys = ("query", "key", "value", "out") if value_slice == "reference" else ("value", "out")
  return {
    "attn": {name: {"kernel": grads["attn"][name]["kernel"]} for name in attn_keys},
    "mlp": {"fc_out": {"kernel": grads["mlp"]["fc_out"]["kernel"]}},
  }


def first_gradient_carry(grad: dict, value_slice: str = "per_head") -> dict:
  """The carry `gradient_batch_terms` takes with the first batch: zero gradients (so the
  first cosine is 0 / norm, which `gradient_summary` drops) and unit norms.

  Args:
    grad: one batch's gradients (params['layers'] layout, no G axis); only shapes are read.
  Returns:
    {'grads': zeros of the leaves the statistics read, 'norms': {'ov_head': [L, H],
    'ov': [L], 'mlp': [L]} of ones}.
  """
  leaves = _gradient_leaves(grad, value_slice)
  out = leaves["attn"]["out"]["kernel"]  # [L, H, dh, d]: H query heads (H_kv <= H values)
  dtype = out.dtype
  layers, heads = out.shape[:-3], out.shape[-3]
  return {
    "grads": jax.tree.map(jnp.zeros_like, leaves),
    "norms": {
      "ov_head": jnp.ones((*layers, heads), dtype),
      "ov": jnp.ones(layers, dtype),
      "mlp": jnp.ones(layers, dtype),
    },
  }


def gradient_batch_terms(
  grad: dict,
  carry: dict,
  layers: dict,
  value_slice: str = "per_head",
  route: str = "auto",
  refine: bool = True,
) -> tuple[dict, dict, dict, dict]:
  """One gradient batch reduced to what the statistics need, and the carry for the next.

  The carry is the previous batch's gradients (and norms), not its derived OV matrices:
  two batches' gradients is all this holds between batches; the previous batch's OV
  gradients are formed again for the cosine.

  Args:
    grad: one batch's gradients, params['layers'] layout: attn.value.kernel [L, d, H, dh],
      attn.out.kernel [L, H, dh, d], mlp.fc_out.kernel [L, f, d] (and attn.query/key
      kernels for 'reference').
    carry: `first_gradient_carry(grad)` for the first batch, else what this returned for
      the previous one.
    layers: params['layers'] at the checkpoint (leaves [L, ...], float32).
    route: how singular values are computed (analysis.spectra.singular_values).
    refine: add svals['refined'], the singular values recomputed in float64 where float32
      cannot resolve the condition number (analysis.spectra.refine_singular_values).
  Returns:
    (singular values {'ov_head': [L, H, 2dh], 'ov': [L, d], 'mlp': [L, min(f, d)]}
    (and 'refined': the same, float64, with `refine`),
    Frobenius norms {'ov_head': [L, H], 'ov': [L], 'mlp': [L]},
    cosines with the previous batch (same shapes as the norms; 0 against the first carry),
    the carry for the next batch).
  """
  attn = layers["attn"]
  current = _gradient_leaves(grad, value_slice)
  previous = carry["grads"]
  left, right = circuits.ov_head_gradient_factors(attn, current["attn"], value_slice)
  whole = circuits.ov_gradients(attn, current["attn"], value_slice)
  mlp = current["mlp"]["fc_out"]["kernel"]
  s_head = product_singular_values(left, right, route=route)
  s_whole = singular_values(whole, route)
  s_mlp = singular_values(mlp, route)
  norms = {
    "ov_head": jnp.sqrt(jnp.sum(jnp.square(s_head), -1)),
    "ov": jnp.linalg.norm(whole, axis=(-2, -1)),
    "mlp": jnp.linalg.norm(mlp, axis=(-2, -1)),
  }
  left_p, right_p = circuits.ov_head_gradient_factors(attn, previous["attn"], value_slice)
  whole_p = circuits.ov_gradients(attn, previous["attn"], value_slice)
  dots = {
    "ov_head": factored_inner_product(left_p, right_p, left, right),
    "ov": jnp.sum(whole_p * whole, axis=(-2, -1)),
    "mlp": jnp.sum(previous["mlp"]["fc_out"]["kernel"] * mlp, axis=(-2, -1)),
  }
  cosines = {c: _cosine(dots[c], carry["norms"][c], norms[c]) for c in COMPONENTS}
  svals = {"ov_head": s_head, "ov": s_whole, "mlp": s_mlp}
  if refine:
    svals["refined"] = _refined(svals, (left, right), whole, mlp, layers, route)
  return svals, norms, cosines, {"grads": current, "norms": norms}


def _refined(svals, head_factors, whole, mlp, layers, route) -> dict:
  """svals recomputed in float64 where float32 cannot resolve the condition number
  (analysis.spectra.refine_singular_values), each from the matrices it came from."""
  bounds = gradient_rank_bounds(layers)
  redo = {
    "ov_head": (lambda lr: product_singular_values(*lr, route=route), head_factors),
    "ov": (lambda w: singular_values(w, route), whole),
    "mlp": (lambda w: singular_values(w, route), mlp),
  }
  return {c: refine_singular_values(svals[c], bounds[c], fn, x) for c, (fn, x) in redo.items()}


def gradient_rank_bounds(layers: dict, head_gradient_rank_bound: int | None = None) -> dict:
  """{component: k} of the gradient spectra (module doc): 2 d_head (or the given bound)
  for a head's OV gradient, d for the whole OV, min(f, d) for the MLP."""
  d, _, head_dim = _dims(layers)
  d_mlp = min(layers["mlp"]["fc_out"]["kernel"].shape[-2:])
  return {"ov_head": head_gradient_rank_bound or 2 * head_dim, "ov": d, "mlp": d_mlp}


def gradient_summary(
  svals: dict,
  norms: dict,
  cosines: dict,
  layers: dict,
  head_gradient_rank_bound: int | None = None,
) -> dict[str, dict[str, jax.Array]]:
  """The gradient metrics from G batches' `gradient_batch_terms`, stacked on a leading G
  axis: spectral metrics of the mean singular values, mean norm, mean cosine of consecutive
  batches (the first batch's cosine, against the zero carry, dropped; NaN if G == 1).

  Args:
    svals, norms, cosines: `gradient_batch_terms` outputs with a leading G axis
      (svals {'ov_head': [G, L, H, 2dh], 'ov': [G, L, d], 'mlp': [G, L, min(f, d)]},
      norms and cosines {'ov_head': [G, L, H], 'ov': [G, L], 'mlp': [G, L]}).
    layers: params['layers'] (leaves [L, ...]); only shapes are read (the rank bounds).
  Returns:
    {'ov_head': {metric: [L, H]}, 'ov': {metric: [L]}, 'mlp': {metric: [L]}}.
  """
  bounds = gradient_rank_bounds(layers, head_gradient_rank_bound)
  refined = svals.get("refined")
  statistics = registry.metrics_in_family("gradient")
  out = {}
  for component in COMPONENTS:
    mean = mean_singular_values(svals[component])
    wide = None
    if refined is not None and refined[component].dtype != mean.dtype:
      with jax.enable_x64(True):
        wide = mean_singular_values(refined[component])
    spectral = spectral_metrics(mean, bounds[component], wide)
    metrics = {gradient_name(name): value for name, value in spectral.items()}
    per_batch = {"norm": norms[component], "cosine": cosines[component]}
    for name, metric in statistics.items():
      metrics[gradient_name(name)] = metric.fn(per_batch[name])
    out[component] = metrics
  return out


def gradient_spectra(
  grads: dict,
  layers: dict,
  value_slice: str = "per_head",
  head_gradient_rank_bound: int | None = None,
  route: str = "auto",
  refine: bool = True,
) -> dict[str, dict[str, jax.Array]]:
  """All gradient metrics of one checkpoint from G gradient batches.

  Spectral metrics ('grad_per', ...) are of the singular values averaged over the G
  batches (docs/method.md); 'grad_norm' is the mean Frobenius norm of the component gradient,
  'grad_cosine' the mean cosine of consecutive batches (NaN if G == 1). Batches are
  processed one at a time (lax.scan of `gradient_batch_terms`, then `gradient_summary`), so
  the work beyond the input holds two batches' gradients, not G; a caller that computes the
  batches one at a time can drive the same two functions itself and never hold G
  (jax_pythia.sweep does).

  Args:
    grads: gradients with the params['layers'] layout, every leaf with a leading G axis:
      attn.value.kernel [G, L, d, H, dh], attn.out.kernel [G, L, H, dh, d],
      mlp.fc_out.kernel [G, L, f, d] (and attn.query/key kernels for 'reference').
    layers: params['layers'] at the checkpoint (leaves [L, ...]).
    head_gradient_rank_bound: k for 'ov_head' (default 2 * d_head).
    route: how singular values are computed (analysis.spectra.singular_values; 'auto'
      picks per backend and shape, 'svd' is the plain SVD everywhere).
    refine: condition numbers refined in float64 where float32 cannot resolve them.
  Returns:
    {'ov_head': {metric: [L, H]}, 'ov': {metric: [L]}, 'mlp': {metric: [L]}}.
  """
  grad_value = grads["attn"]["value"]["kernel"]
  if grad_value.ndim != layers["attn"]["value"]["kernel"].ndim + 1:
    raise ValueError(
      f"gradient leaves need a leading G axis: grad value kernel "
      f"{grad_value.shape} vs param {layers['attn']['value']['kernel'].shape}"
    )
  xs = _gradient_leaves(grads, value_slice)

  def step(carry, grad):
    svals, norms, cosines, carry = gradient_batch_terms(
      grad, carry, layers, value_slice, route, refine
    )
    return carry, (svals, norms, cosines)

  init = first_gradient_carry(jax.tree.map(lambda leaf: leaf[0], xs), value_slice)
  _, (svals, norms, cosines) = jax.lax.scan(step, init, xs)
  return gradient_summary(svals, norms, cosines, layers, head_gradient_rank_bound)
