"""One checkpoint's gradient batches reduced as they come, layer by layer.

Each batch's gradients (`checkpoint.batch_gradient_fn`, in the weights' dtype) are
reduced by `gradient_terms` to singular values, norms and the cosine with the previous
batch, one layer at a time (`by_layer`: that layer's float32 copies and SVD workspace
only), then dropped; the previous batch's gradients are carried for the cosine.
`streamed_gradient_metrics` drives it over G batches and `gradient_summary` gives the
metrics, equal to `checkpoint.gradient_metrics` of all G stacked. On a mesh the same
reduction runs split by layer (`spread_gradient_terms`: jax.shard_map over a 'layers'
axis, jax_pythia.scale.sharding.layer_mesh), so no device holds the whole model's
gradients or weights.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

import analysis
from analysis import protocol
from jax_pythia.study import selected


def by_layer(fn, *trees):
  """fn of each layer's slice (leaves [1, ...], cast to float32) one layer after another
  (jax.lax.map over the leading L axis), outputs stacked [L, ...]: only one layer's float32
  copies and SVD workspace exist at a time, whatever L."""

  def one(slices):
    # The barrier keeps XLA from hoisting the casts out of the loop (a float32 copy of
    # every layer at once, seen with bfloat16 weights).
    slices = jax.lax.optimization_barrier(slices)
    one_layer = jax.tree.map(lambda x: x[None].astype(jnp.float32), slices)
    return jax.tree.map(lambda x: x[0], fn(*one_layer))

  return jax.lax.map(one, trees)


def on_layers(fn, mesh: jax.sharding.Mesh, inputs: int, donate: tuple = ()):
  """fn under jax.shard_map over `mesh`'s 'layers' axis, every input and output split on
  its leading (layer) axis: no collective, each device reduces its own layers."""
  spec = jax.sharding.PartitionSpec("layers")
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * inputs, out_specs=spec)
  return jax.jit(mapped, donate_argnums=donate)


@functools.partial(jax.jit, static_argnames=("value_slice",))
def first_gradient_carry(grads: dict, value_slice: str) -> dict:
  """The carry `gradient_terms` takes with the first batch (analysis.first_gradient_carry):
  zeros shaped like one batch's gradients `grads` (whose values are not read), float32
  unit norms."""
  carry = analysis.first_gradient_carry(grads, value_slice)
  return {**carry, "norms": jax.tree.map(lambda x: x.astype(jnp.float32), carry["norms"])}


def _gradient_terms(grads, carry, layers, value_slice: str, refine: bool = True) -> tuple:
  def one_layer(grad, previous, norms, weights):
    terms = analysis.gradient_batch_terms(
      grad, {"grads": previous, "norms": norms}, weights, value_slice, refine=refine
    )
    return terms[:3]

  svals, norms, cosines = by_layer(one_layer, grads, carry["grads"], carry["norms"], layers)
  return svals, norms, cosines, {"grads": grads, "norms": norms}


@functools.partial(jax.jit, static_argnames=("value_slice", "refine"), donate_argnames=("grads",))
def gradient_terms(grads, carry, layers, value_slice: str, refine: bool = True) -> tuple:
  """One batch's gradients reduced (analysis.gradient_batch_terms) layer by layer
  (`by_layer`): (singular values, norms, cosines with the previous batch, carry for the
  next batch). Each layer's gradients, the previous batch's and its weights are cast to
  float32 in turn, so beyond its inputs the call holds one layer's float32 matrices and
  SVD workspace, whatever L; with `refine`, the singular values recomputed in float64 where
  float32 cannot resolve the condition number (analysis.spectra.refine_singular_values).

  `grads` (one batch, leaves shaped like the weights, in their dtype) is donated: the
  returned carry is those buffers, so a device holds the previous and the current batch's
  gradients and no copy; the caller must not read `grads` again. A compiled call apart from
  the gradient call (collectives and LAPACK in one XLA:CPU program can deadlock); on a mesh
  `spread_gradient_terms` runs it split by layer.
  """
  return _gradient_terms(grads, carry, layers, value_slice, refine)


@functools.cache
def spread_gradient_terms(value_slice: str, mesh: jax.sharding.Mesh, refine: bool = True):
  """jit fn(grads, carry, layers) -> `gradient_terms`, on a mesh with one axis 'layers':
  every input's leaves are split on their leading L axis (L a multiple of the axis), each
  device reduces its own layers (no collective), the outputs and the carry stay split
  alike. So the previous batch's gradients live beside the current ones, L / n layers per
  device, and no device holds the whole model's gradients or weights. `grads` donated."""
  fn = functools.partial(_gradient_terms, value_slice=value_slice, refine=refine)
  return on_layers(fn, mesh, 3, donate=(0,))


@functools.cache
def spread_first_carry(value_slice: str, mesh: jax.sharding.Mesh):
  """jit fn(grads) -> `first_gradient_carry`, created split on L over `mesh`'s 'layers'
  axis (never whole on one device)."""
  out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("layers"))
  return jax.jit(lambda grads: first_gradient_carry(grads, value_slice), out_shardings=out)


def gradient_summary(terms: list, layers: dict) -> dict:
  """{component: {metric: ...}} from G batches' `gradient_terms` outputs [(singular values,
  norms, cosines)], stacked here (analysis.gradient_summary). `layers`: only the shapes are
  read (`layer_shapes` will do)."""
  # Stacked with float64 on: the float64-refined singular values (host arrays by now) would
  # otherwise enter the compiled summary as float32, and their condition numbers be NaN.
  with jax.enable_x64(True):
    stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *terms)
  return _gradient_summary(*stacked, layers, tuple(analysis.METRICS))


# `registered` (the registry's metric names) keys the compiled summary: a user metric
# registered later must not reuse a summary traced without it.
@functools.partial(jax.jit, static_argnames=("registered",))
def _gradient_summary(svals, norms, cosines, layers: dict, registered: tuple) -> dict:
  return analysis.gradient_summary(svals, norms, cosines, layers)


def layer_shapes(layers: dict) -> dict:
  """Empty stand-ins ([0, ...]) for the leaves whose shapes `gradient_summary` reads, so a
  summary on one device never moves the weights there."""
  stand_in = lambda x: np.zeros((0, *x.shape[1:]), np.float32)  # noqa: E731
  return {
    "attn": {"value": {"kernel": stand_in(layers["attn"]["value"]["kernel"])}},
    "mlp": {"fc_out": {"kernel": stand_in(layers["mlp"]["fc_out"]["kernel"])}},
  }


def streamed_gradient_metrics(
  batches: Iterable[dict],
  layers: dict,
  value_slice: str,
  mesh: jax.sharding.Mesh | None = None,
  to_host=jax.device_get,
  carry_on_host: bool = False,
  selection=None,
) -> dict:
  """`gradient_metrics` of gradient batches that arrive one at a time: each is reduced
  (`gradient_terms`) as it comes and dropped, so memory holds two batches' gradients
  whatever G. No host sync until the end: the calls queue behind one another.

  Args:
    batches: one batch's gradients at a time (leaves shaped like the weights, where
      `layers` are), e.g. a generator calling `batch_gradient_fn`. Each is donated.
    layers: params['layers'] (leaves [L, ...]), in their own dtype, on one device, or
      split on L over `mesh`.
    mesh: a mesh with one axis 'layers' that `layers` and every batch are split over
      (`spread_gradient_terms`); None: one device.
    to_host: moves arrays to the host (the sweep's for several processes).
    carry_on_host: keep the previous batch's gradients in host memory between batches
      (moved down after each reduction and up for the next), so the gradient call runs
      beside no carry: two transfers of a batch's gradients per batch for one batch's
      device memory (jax_pythia.scale.plan chooses it when nothing else fits).
    selection: what is computed beyond the gradient statistics (analysis.selection): the
      'entries' metrics (grad_gini, ...) only when selected, averaged over the batches, and
      the float64 refinement only with a selected refined metric (grad_condition_number).
  Returns:
    {component: {metric: [L, H] | [L]}}, as `gradient_metrics` of the stacked batches.
  """
  refine = selection is None or selection.refines_gradients
  reduce = (
    functools.partial(gradient_terms, value_slice=value_slice, refine=refine)
    if mesh is None
    else spread_gradient_terms(value_slice, mesh, refine)
  )
  entries_plan = protocol.plan_of(selection, "gradients", "entries") if selection else ()
  carry, terms, entries = None, [], []
  for grads in batches:
    if entries_plan:  # before the reduction, which takes (donates) the buffers
      entries.append(selected.gradient_entries(grads, layers, value_slice, entries_plan))
    shardings = jax.tree.map(lambda x: x.sharding, grads)
    if carry is None:
      first = first_gradient_carry if mesh is None else spread_first_carry(value_slice, mesh)
      carry = first(grads, value_slice) if mesh is None else first(grads)
    elif carry_on_host:
      carry = {**carry, "grads": jax.tree.map(jax.device_put, carry["grads"], shardings)}
    *batch_terms, carry = reduce(grads, carry, layers)
    terms.append(tuple(batch_terms))
    if carry_on_host:
      carry = {**carry, "grads": jax.tree.map(to_host, carry["grads"])}
  if not terms:
    raise ValueError("streamed_gradient_metrics needs at least one gradient batch")
  terms = [jax.tree.map(to_host, t) for t in terms]
  out = gradient_summary(terms, layer_shapes(layers))
  if entries:
    mean = jax.tree.map(lambda *xs: jnp.mean(jnp.stack([to_host(x) for x in xs]), 0), *entries)
    selected.merge_gradient_entries(out, mean)
  return out
