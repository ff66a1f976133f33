"""What a selection of the registry computes at one checkpoint, one compiled call per data
type (the jitted forms of `analysis.protocol`; `checkpoint.checkpoint_metrics` gathers them).

Plans are static: ((component, (registry names...)), ...) from `protocol.plan_of`, so each
selection compiles once and an unselected metric costs nothing.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import analysis
from analysis import protocol


def _f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


@functools.partial(jax.jit, static_argnames=("plan",))
def selected_similarity(acts: dict, ref: dict, plan: tuple) -> dict:
  """{component: {name: [L] | [L, H]}}: the plan's similarity metrics against `ref`."""
  return protocol.similarity_values(acts, ref, plan)


@functools.partial(jax.jit, static_argnames=("plan", "num_permutations"))
def selected_floors(ref: dict, key: jax.Array, plan: tuple, num_permutations: int = 8) -> dict:
  """{component: {'<name>_floor': ...}} of the plan's CKA estimators (docs/method.md)."""
  return protocol.floor_values(ref, key, plan, num_permutations)


@functools.partial(jax.jit, static_argnames=("plan",))
def selected_activation_values(acts: dict, plan: tuple) -> dict:
  """{component: {name: ...}} of the activation matrices themselves (spectra, sparsity)."""
  return protocol.activation_values(acts, plan)


@functools.partial(jax.jit, static_argnames=("value_slice", "plan"))
def gradient_entries(grads: dict, layers: dict, value_slice: str, plan: tuple) -> dict:
  """{component: {name: ...}} of one batch's gradient matrices (protocol.gradient_entries)."""
  return protocol.gradient_entries(grads, _f32(layers), value_slice, plan)


@functools.partial(jax.jit, static_argnames=("value_slice", "plan"))
def batched_gradient_entries(grads: dict, layers: dict, value_slice: str, plan: tuple) -> dict:
  """The G-batch mean of `gradient_entries` for C checkpoints (leaves [C, G, ...])."""

  def one(g, p):
    per_batch = jax.lax.map(lambda b: protocol.gradient_entries(b, _f32(p), value_slice, plan), g)
    return jax.tree.map(lambda x: x.mean(0), per_batch)

  return jax.vmap(one)(grads, layers)


def merge_gradient_entries(values: dict, entries: dict) -> None:
  """Adds the gradient entries metrics (registry names) under their table names."""
  for component, metrics in entries.items():
    for name, value in metrics.items():
      values[component][analysis.gradient_name(name)] = value


def over_checkpoints(fn, xs, refines: bool):
  """fn over the leading (checkpoint) axis of xs: vmap, or, when fn refines in float64, a
  compiled loop (lax.map). vmap batches a jaxpr after it was traced, outside the
  `jax.enable_x64` island the float64 refinement is traced in (analysis.spectra), and its
  float64 operations would come out float32; lax.map traces fn once, as it is."""
  return jax.lax.map(fn, xs) if refines else jax.vmap(fn)(xs)


@functools.partial(jax.jit, static_argnames=("debiased",))
def pairwise_matrix(acts: jax.Array, debiased: bool) -> jax.Array:
  """CKA between every pair of checkpoints: acts [C, *lead, n, e] -> [*lead, C, C]."""
  x = jnp.moveaxis(acts, 0, -3)  # [*lead, C, n, e]
  fn = functools.partial(analysis.pairwise_cka, debiased=debiased)
  for _ in range(x.ndim - 3):
    fn = jax.vmap(fn)
  return fn(x)


@functools.partial(jax.jit, static_argnames=("name",))
def pairwise_similarity(acts: jax.Array, name: str) -> jax.Array:
  """A registered similarity metric between every pair of checkpoints: acts
  [C, *lead, n, e] -> [*lead, C, C], entry (i, j) = metric(acts[i], acts[j]). CKA by
  `pairwise_matrix`; SVCCA / PWCCA by analysis.pairwise_cca (one SVD per checkpoint; NaN
  where n <= 2e, as against the final checkpoint); any other metric pair by pair."""
  if name in analysis.CKA_ESTIMATORS:
    return pairwise_matrix(acts, analysis.CKA_ESTIMATORS[name])
  c, *lead, n, e = acts.shape
  if name in analysis.CCA_METRICS:
    if n <= 2 * e:
      return jnp.full((*lead, c, c), jnp.nan, jnp.float32)
    fn = functools.partial(analysis.pairwise_cca, metric=name)
    x = jnp.moveaxis(acts, 0, -3)
    for _ in range(x.ndim - 3):
      fn = jax.vmap(fn)
    return fn(x)
  metric = analysis.METRICS[name].fn
  rows = jax.lax.map(lambda a: jax.vmap(lambda b: metric(a, b))(acts), acts)  # [C, C, *lead]
  return jnp.moveaxis(rows, (0, 1), (-2, -1))


def selected_similarities(acts, reference, floor_key, selection) -> tuple[dict, dict | None]:
  """({component: {name: ...}} against the reference, the noise floors or None)."""
  plan = protocol.plan_of(selection, "activations", "similarity")
  floor = None if floor_key is None else selected_floors(reference, floor_key, plan)
  return selected_similarity(acts, reference, plan), floor


def unstack(tree: Any, count: int) -> list:
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(count)]


def gather(similar, floor, weights, grads, train_losses, heldout_loss, activations=None) -> dict:
  """One checkpoint's results under the tables' names: {component: {metric: value}}."""
  out: dict[str, dict[str, Any]] = {}
  for part in (similar, floor):
    for component, metrics in (part or {}).items():
      out.setdefault(component, {}).update(metrics)
  for component, metrics in (weights or {}).items():
    out.setdefault(component, {}).update(metrics)
  if grads is not None:
    for component, metrics in grads.items():
      out.setdefault(component, {}).update(metrics)
  for component, metrics in (activations or {}).items():
    named = {analysis.METRICS[n].table_name("activations"): v for n, v in metrics.items()}
    out.setdefault(component, {}).update(named)
  model = {}
  if train_losses is not None:
    model["train_loss"] = np.mean(np.asarray(train_losses))
  if heldout_loss is not None:
    model["heldout_loss"] = heldout_loss
  if model:
    out["model"] = model
  return out
