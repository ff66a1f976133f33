"""What a selection of the registry computes from one checkpoint's arrays (pure, jit-able).

Each function takes a `plan`: ((component, (registry names...)), ...), the part of an
`analysis.selection.Selection` on one data type (`plan_of`), hashable so it can be a
static argument of jit. Only the named components are touched, and only the work a named
metric needs is done: no SVD without a spectral metric, no float64 refinement without a
`refined` one (the condition number), no formed matrices without an 'entries' metric.

Shapes (L layers, H heads, n tokens, d width, f MLP width, dh head width):
  weights     ov_head [L, H, d, d] (spectra from the dh x dh core), ov [L, d, d], mlp [L, f, d]
  activations ov_head [L, H, n, dh], ov / mlp / resid [L, n, d]
  values      {component: {registry name: [L, H] | [L]}}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from analysis import circuits, registry
from analysis.cca import CCA_METRICS
from analysis.similarity import cka_noise_floor
from analysis.spectra import refine_singular_values, singular_values, spectral_metrics
from analysis.summary import weight_rank_bounds


def plan_of(selection, data: str, family: str | None = None) -> tuple:
  """The hashable plan ((component, names), ...) of `selection` on `data`."""
  return tuple(sorted(selection.of(data, family).items()))


def refines(plan: tuple) -> bool:
  """Whether the plan has a metric that reads float64-refined singular values."""
  return any(_split(names)[2] for _, names in plan)


def _split(names) -> tuple[list, list, bool]:
  """(spectral names, entries names, whether a refined metric is among them)."""
  metrics = [registry.METRICS[n] for n in names]
  spectral = [m.name for m in metrics if m.family == "spectral"]
  entries = [m.name for m in metrics if m.family == "entries"]
  return spectral, entries, any(m.refined for m in metrics if m.family == "spectral")


def _spectral(names, k, s_fn, inputs) -> dict:
  """The named spectral metrics of the singular values s_fn(inputs), refined if needed."""
  spectral, _, refine = _split(names)
  if not spectral:
    return {}
  s = s_fn(inputs)
  refined = refine_singular_values(s, k, s_fn, inputs) if refine else None
  values = spectral_metrics(s, k, refined)
  return {n: values[n] for n in spectral}


def _entries(names, matrices) -> dict:
  """The named 'entries' metrics of matrices [..., a, b] (flattened to [..., a*b])."""
  _, entries, _ = _split(names)
  if not entries:
    return {}
  flat = matrices.reshape(*matrices.shape[:-2], -1)
  return {n: registry.METRICS[n].fn(flat) for n in entries}


def _weight_routes(layers: dict, value_slice: str) -> dict:
  """{component: (singular values fn of layers, matrices fn of layers, rank bound k)}."""
  k = weight_rank_bounds(layers)  # the whole OV's is H_kv * dh under grouped-query attention
  return {
    "ov_head": (
      lambda p: circuits.ov_head_singular_values(p["attn"], value_slice),
      lambda p: circuits.ov_head_weights(p["attn"], value_slice),
      k["ov_head"],
    ),
    "ov": (
      lambda p: circuits.ov_singular_values(p["attn"], value_slice),
      lambda p: circuits.ov_weights(p["attn"], value_slice),
      k["ov"],
    ),
    "mlp": (
      lambda p: circuits.mlp_singular_values(p["mlp"]),
      lambda p: circuits.mlp_weight(p["mlp"]),
      k["mlp"],
    ),
  }


def weight_values(layers: dict, value_slice: str, plan: tuple) -> dict:
  """{component: {name: ...}} of the weights: the plan's spectral and entries metrics.

  Args:
    layers: params['layers'] (leaves [L, ...], float32).
  """
  routes = _weight_routes(layers, value_slice)
  out = {}
  for component, names in plan:
    s_fn, matrix_fn, k = routes[component]
    values = _spectral(names, k, s_fn, layers)
    if _split(names)[1]:
      # One layer at a time: a head's d x d OV matrices of every layer at once could be
      # L * H * d^2 floats (pythia-12b: 150 GB).
      one = lambda p, names=names, fn=matrix_fn: _entries(names, fn(_one_layer(p)))  # noqa: E731
      per_layer = jax.lax.map(one, layers)
      values.update({n: v[:, 0] for n, v in per_layer.items()})
    out[component] = values
  return out


def _one_layer(layer_params):
  """params of one layer (no L axis) as a stack of one ([1, ...])."""
  return jax.tree.map(lambda x: x[None], layer_params)


def activation_values(acts: dict, plan: tuple) -> dict:
  """{component: {name: ...}} of the captured activation matrices (as captured, not
  centred): spectral metrics with k = min(n, e), and entries metrics.

  Args:
    acts: {component: [L, H, n, dh] | [L, n, d]} (jax_pythia.study.activation_fn).
  """
  out = {}
  for component, names in plan:
    x = acts[component]
    values = _spectral(names, min(x.shape[-2:]), singular_values, x)
    values.update(_entries(names, x))
    out[component] = values
  return out


def similarity_values(acts: dict, reference: dict, plan: tuple) -> dict:
  """{component: {name: [L, H] | [L]}}: each selected similarity metric of a checkpoint's
  activations against the reference's (the final checkpoint's).

  SVCCA and PWCCA need n > dx + dy (analysis.cca); where a component has fewer they give NaN
  (docs/metrics.md), the other metrics their values.
  """
  out = {}
  for component, names in plan:
    x, y = acts[component], reference[component]
    out[component] = {n: _similarity(n, x, y) for n in names}
  return out


def _similarity(name: str, x, y):
  if name in CCA_METRICS and x.shape[-2] <= x.shape[-1] + y.shape[-1]:
    return jnp.full(jnp.broadcast_shapes(x.shape[:-2], y.shape[:-2]), jnp.nan, jnp.float32)
  return registry.METRICS[name].fn(x, y)


#: The similarity metrics with a noise floor, and whether each is the debiased CKA.
FLOORS = {"cka": False, "cka_debiased": True}


def floor_values(reference: dict, key: jax.Array, plan: tuple, num_permutations: int = 8):
  """{component: {'<name>_floor': ...}}: mean CKA of the reference against itself with rows
  permuted (docs/method.md), for the CKA estimators in the plan."""
  out = {}
  for component, names in plan:
    x = reference[component]
    out[component] = {
      f"{n}_floor": cka_noise_floor(
        x, key, debiased=FLOORS[n], num_permutations=num_permutations
      ).mean(0)
      for n in names
      if n in FLOORS
    }
  return out


def gradient_entries(grad: dict, layers: dict, value_slice: str, plan: tuple) -> dict:
  """{component: {name: ...}} of one batch's gradient matrices (the 'entries' metrics of
  the plan; the sweep averages them over the G batches).

  Args:
    grad: one batch's gradients, params['layers'] layout (leaves [L, ...]).
    layers: params['layers'] at the checkpoint (float32).
  """
  attn = layers["attn"]
  matrices = {
    "ov_head": lambda: circuits.ov_head_gradients(attn, grad["attn"], value_slice),
    "ov": lambda: circuits.ov_gradients(attn, grad["attn"], value_slice),
    "mlp": lambda: grad["mlp"]["fc_out"]["kernel"],
  }
  return {c: _entries(names, matrices[c]()) for c, names in plan if _split(names)[1]}
