"""The study's per-checkpoint computations (docs/method.md), each one compiled call.

Pure functions of (params, tokens) that wire the model's capture sites into the
`analysis` kernels: activations for CKA, weight spectra, gradient statistics, loss.
`checkpoint_metrics` gathers one checkpoint's results under the names of the tables
(`analysis.metric_table`); the sweep (`jax_pythia.sweep`) only moves them to files.

Gradients come one batch per call (`batch_gradient_fn`) and are reduced as they come
(`streamed.streamed_gradient_metrics`: `gradient_terms` per batch, then its summary), so a
device holds two batches' gradients whatever G; that is the sweep's way for one checkpoint.
`gradient_fn` and `gradient_metrics` take all G batches at once (the stacked path below,
and the benchmarks).

Each has a `batched_` twin for C checkpoints of one model stacked on a leading axis
(`stack_params`): the same function under `jax.vmap`, one compiled call for all C, so a
small model fills a large device. Their results equal C single calls (up to float32
rounding: summation order may differ).

Activation components (`analysis.ACTIVATION_COMPONENTS`), n = sequences x kept positions:
  ov_head [L, H, n, dh]  a token's own value through head h's W_O (the paper's OV
                         activation), stored in a d_head-dim basis that preserves every
                         inner product (see `analysis.ov_head_features`), so CKA is unchanged
  ov      [L, n, d]      the same summed over heads (whole-layer OV activation)
  mlp     [L, n, d]      dense_4h_to_h output
  resid   [L, n, d]      residual stream leaving the layer
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

import analysis
from analysis import protocol
from analysis.selection import Selection
from analysis.selection import default as default_selection
from jax_pythia.errors import ConfigError
from jax_pythia.models import model as model_lib
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.study.selected import (  # noqa: F401 - pairwise_*: where callers find them
  batched_gradient_entries,
  gather,
  gradient_entries,
  merge_gradient_entries,
  over_checkpoints,
  pairwise_matrix,
  pairwise_similarity,
  selected_activation_values,
  selected_floors,
  selected_similarities,
  selected_similarity,
  unstack,
)
from jax_pythia.study.streamed import by_layer, on_layers


def check_value_slice(config: Any, value_slice: str) -> None:
  """Refuses `--value_slice=reference` for a family without GPT-NeoX's fused qkv weight,
  whose last third the reference slice reads (docs/method.md)."""
  family = model_lib.family_of(config)
  if value_slice == "reference" and not family.fused_qkv:
    raise ConfigError(
      f"--value_slice=reference: only GPT-NeoX's fused query_key_value has the reference "
      f"code's value slice; this model is {family.title} (use per_head)"
    )


def activation_sites(value_slice: str) -> tuple[str, ...]:
  sites = ("blocks.*.attn.hook_v", "blocks.*.hook_mlp_out", "blocks.*.hook_resid_post")
  if value_slice == "reference":
    sites += ("blocks.*.attn.hook_q", "blocks.*.attn.hook_k")
  return sites


@functools.cache
def activation_fn(config: GPTNeoXConfig, value_slice: str, microbatch: int = 0):
  """jit fn(params, tokens [b, s], idx [b, k] | None) -> {component: array} (module doc).

  `microbatch` (dividing b; 0: all at once) runs the forward pass on that many sequences
  at a time, so its peak (one layer's attention scores) stays bounded; the result is the
  same.
  """
  check_value_slice(config, value_slice)
  request = model_lib.SiteRequest.parse(activation_sites(value_slice), config)

  def capture(params, tokens, idx):
    _, caps = model_lib.forward(params, tokens, config, request, idx, return_logits=False)
    # [L, b, k, ...] -> [L, n, ...] with n = b * k
    flat = {
      name: x.reshape(x.shape[0], -1, *x.shape[3:]).astype(jnp.float32) for name, x in caps.items()
    }
    values = analysis.value_vectors(
      flat.get("blocks.*.attn.hook_q"),
      flat.get("blocks.*.attn.hook_k"),
      flat["blocks.*.attn.hook_v"],
      value_slice,
    )
    out_kernel = params["layers"]["attn"]["out"]["kernel"].astype(jnp.float32)
    return {
      "ov_head": analysis.ov_head_features(values, out_kernel),
      "ov": analysis.ov_activations(values, out_kernel),
      "mlp": flat["blocks.*.hook_mlp_out"],
      "resid": flat["blocks.*.hook_resid_post"],
    }

  @jax.jit
  def fn(params, tokens, idx):
    return _in_microbatches(functools.partial(capture, params), microbatch, tokens, idx)

  return fn


@functools.cache
def batched_activation_fn(config: GPTNeoXConfig, value_slice: str, microbatch: int = 0):
  """jit fn(stacked params [C, ...], tokens [b, s], idx [b, k] | None) -> {component:
  [C, ...]}: `activation_fn` of C checkpoints on the same inputs."""
  single = activation_fn(config, value_slice, microbatch)
  return jax.jit(jax.vmap(single, in_axes=(0, None, None)))


def stack_params(params: list) -> Any:
  """C checkpoints' params (same config) as one pytree with leaves [C, ...]."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)


def _in_microbatches(fn, microbatch: int, tokens, idx):
  """fn(tokens [b, ...], idx None | [k] | [b, k]) -> {name: [..., b*k, e]}, run on
  microbatch sequences at a time (jax.lax.map) and joined along the token axis (second to
  last) in order."""
  b = tokens.shape[0]
  if not microbatch or microbatch >= b:
    return fn(tokens, idx)
  split = lambda x: x.reshape(b // microbatch, microbatch, *x.shape[1:])  # noqa: E731
  if idx is None or idx.ndim == 1:  # all positions, or the same [k] for every sequence
    out = jax.lax.map(lambda t: fn(t, idx), split(tokens))
  else:
    out = jax.lax.map(lambda a: fn(*a), (split(tokens), split(idx)))
  # [c, ..., mb*k, e] -> [..., c*mb*k, e]
  return {
    k: jnp.moveaxis(v, 0, -3).reshape(*v.shape[1:-2], -1, v.shape[-1]) for k, v in out.items()
  }


def checkpoint_metrics(
  acts: dict,
  reference: dict,
  layers: dict,
  value_slice: str,
  *,
  floor_key: jax.Array | None = None,
  weight_values: dict | None = None,
  grads: dict | None = None,
  gradient_values: dict | None = None,
  train_losses: Any = None,
  heldout_loss: Any = None,
  selection: Selection | None = None,
) -> dict[str, dict[str, Any]]:
  """The selected metrics of one checkpoint: {component: {metric: [L, H] | [L] | []}},
  named as in the tables (`analysis.metric_table`).

  Args:
    acts, reference: `activation_fn` outputs of this checkpoint and of the final one.
    layers: params['layers'] (leaves [L, ...]) for the weight spectra.
    floor_key: given (at the final checkpoint), CKA's noise floor is added from this key.
    weight_values: the weight spectra already computed (`spread_weight_metrics`); None:
      computed here from `layers`.
    grads, train_losses: `gradient_fn` outputs (gradient leaves [G, ...], losses [G]).
    gradient_values: instead of `grads`, their metrics already computed
      (`streamed.streamed_gradient_metrics`).
    heldout_loss: the loss on a batch no checkpoint trained on.
    selection: what to compute (analysis.selection; default: the paper's protocol).
  Values of metrics not selected may be present (the gradient statistics come together);
  the sweep writes only the selected rows (`Selection.keeps`).
  """
  selection = selection or default_selection()
  if grads is not None:
    gradient_values = gradient_metrics(grads, layers, value_slice)
  similar, floor = selected_similarities(acts, reference, floor_key, selection)
  return gather(
    similar,
    floor,
    weight_values
    if weight_values is not None
    else weight_metrics(layers, value_slice, protocol.plan_of(selection, "weights")),
    gradient_values,
    train_losses,
    heldout_loss,
    selected_activation_values(acts, protocol.plan_of(selection, "activations")),
  )


def batched_checkpoint_metrics(
  acts: dict,
  reference: dict,
  layers: dict,
  value_slice: str,
  *,
  grads: dict | None = None,
  train_losses: Any = None,
  heldout_loss: Any = None,
  selection: Selection | None = None,
) -> list[dict[str, dict[str, Any]]]:
  """`checkpoint_metrics` of C checkpoints stacked on a leading axis, one dict each.

  Args:
    acts: `batched_activation_fn` outputs ([C, ...]); reference: the final checkpoint's.
    layers: stacked params['layers'] (leaves [C, L, ...]).
    grads, train_losses: `batched_gradient_fn` outputs (leaves [C, G, ...], losses [C, G]).
    heldout_loss: [C].
  No noise floor: it belongs to the final checkpoint, which the sweep runs on its own.
  """
  selection = selection or default_selection()
  similarity_plan = protocol.plan_of(selection, "activations", "similarity")
  weight_plan = protocol.plan_of(selection, "weights")
  activation_plan = protocol.plan_of(selection, "activations")
  gradient_entries_plan = protocol.plan_of(selection, "gradients", "entries")
  gradient_values = None
  if grads is not None:
    gradient_values = batched_gradient_metrics(
      grads, layers, value_slice, selection.refines_gradients
    )
    if gradient_entries_plan:
      entries = batched_gradient_entries(grads, layers, value_slice, gradient_entries_plan)
      merge_gradient_entries(gradient_values, entries)

  def each(fn, plan, x):  # an empty plan computes nothing (vmap needs an input)
    return over_checkpoints(lambda a: fn(a, plan), x, protocol.refines(plan)) if plan else None

  parts = jax.device_get(
    (
      each(lambda a, plan: selected_similarity(a, reference, plan), similarity_plan, acts),
      each(lambda p, plan: weight_metrics(p, value_slice, plan), weight_plan, layers),
      gradient_values,
      train_losses,
      heldout_loss,
      each(selected_activation_values, activation_plan, acts),
    )
  )
  count = len(jax.tree.leaves(layers)[0])
  return [
    gather(similar, None, weights, grad, losses, heldout, act)
    for similar, weights, grad, losses, heldout, act in zip(
      *[[None] * count if p is None else unstack(p, count) for p in parts]
    )
  ]


@jax.jit
def cka_against(acts: dict, ref: dict) -> dict:
  """{(component, estimator): [L] or [L, H]}: CKA of each layer (head) against `ref`."""
  return {
    (c, name): analysis.linear_cka(acts[c], ref[c], debiased=debiased)
    for c in acts
    for name, debiased in analysis.CKA_ESTIMATORS.items()
  }


@jax.jit
def batched_cka_against(acts: dict, ref: dict) -> dict:
  """`cka_against` of stacked acts ([C, ...]) against one `ref`: values [C, ...]."""
  return jax.vmap(cka_against, in_axes=(0, None))(acts, ref)


@functools.partial(jax.jit, static_argnames=("num_permutations",))
def cka_noise_floor(ref: dict, key: jax.Array, num_permutations: int = 8) -> dict:
  """{(component, estimator): [L] or [L, H]}: mean CKA of `ref` against itself with rows
  permuted: what CKA reads when the inputs do not correspond (docs/method.md)."""
  out = {}
  for c, x in ref.items():
    for name, debiased in analysis.CKA_ESTIMATORS.items():
      floors = analysis.cka_noise_floor(
        x, key, debiased=debiased, num_permutations=num_permutations
      )
      out[(c, name)] = floors.mean(0)
  return out


def _weight_metrics(layers: dict, value_slice: str, plan: tuple | None) -> dict:
  plan = protocol.plan_of(default_selection(), "weights") if plan is None else plan
  return by_layer(lambda w: protocol.weight_values(w, value_slice, plan), layers)


@functools.partial(jax.jit, static_argnames=("value_slice", "plan"))
def weight_metrics(layers: dict, value_slice: str, plan: tuple | None = None) -> dict:
  """{component: {metric: [L, H] | [L]}} of the weights: the plan's metrics
  (analysis.protocol.weight_values; None: the paper's) one layer at a time
  (`streamed.by_layer`), of the leaves the spectra read (`spectra_weights`)."""
  return _weight_metrics(spectra_weights(layers, value_slice), value_slice, plan)


@functools.cache
def spread_weight_metrics(value_slice: str, mesh: jax.sharding.Mesh, plan: tuple | None = None):
  """jit fn(spectra_weights(layers)) -> `weight_metrics`, on a mesh with one axis 'layers'
  over which the leaves are split on L (see `streamed.spread_gradient_terms`): each device
  the spectra of its own layers, the outputs split alike. The same function as on one
  device, so the float64-refined condition numbers come out alike."""
  fn = functools.partial(_weight_metrics, value_slice=value_slice, plan=plan)
  return on_layers(fn, mesh, 1)


def gradient_weights(value_slice: str) -> tuple[str, ...]:
  wrt = ("attn.value.kernel", "attn.out.kernel", "mlp.fc_out.kernel")
  if value_slice == "reference":
    wrt += ("attn.query.kernel", "attn.key.kernel")
  return wrt


def spectra_weights(layers: dict, value_slice: str) -> dict:
  """The leaves of params['layers'] the weight and gradient spectra read (those
  `gradient_weights` names), in the same layout: what moves to the spectra's devices."""
  wrt = gradient_weights(value_slice)
  return model_lib.nest({p: model_lib.get_path(layers, p) for p in wrt})


def _batch_gradients(params, microbatches, config, wrt, remat, keep_dtype=False):
  """(mean loss [], gradients of `wrt`) of one batch, summed over its microbatches
  [m, mb, s+1] (jax.lax.scan) so memory holds one microbatch's backward pass; float32, or
  with `keep_dtype` the weights' dtype they were summed in (the same values)."""

  def accumulate(total, tokens):
    loss, grads = model_lib.loss_and_grads(params, tokens, config, wrt, remat=remat)
    return jax.tree.map(jnp.add, total, (loss, grads)), None

  zeros = (
    jnp.zeros((), jnp.float32),
    model_lib.nest({p: jnp.zeros_like(model_lib.get_path(params["layers"], p)) for p in wrt}),
  )
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, microbatches)
  m = microbatches.shape[0]
  grads = jax.tree.map(lambda g: g / m, grads)  # summed in the weights' dtype
  return loss / m, grads if keep_dtype else jax.tree.map(lambda g: g.astype(jnp.float32), grads)


@functools.cache
def batch_gradient_fn(config: GPTNeoXConfig, value_slice: str, remat: str = "none"):
  """jit fn(params, microbatches [m, mb, s+1]) -> (loss [], grads): one gradient batch (one
  training step's sequences, split into m microbatches of mb so memory stays bounded) gives
  one gradient of the weights `gradient_weights` names, leaves shaped like them, in the
  weights' dtype: the microbatch sum is accumulated in it, so its float32 copy holds the
  same values and is made one layer at a time by `streamed.gradient_terms` (no whole-model float32
  gradient on any device).

  The sweep calls it once per batch and reduces each batch's gradients at once
  (`streamed.streamed_gradient_metrics`), so a device holds one batch's gradients, not G.
  `remat` (model.REMAT_POLICIES) is what the backward pass recomputes to save memory;
  jax_pythia.scale.plan chooses mb and remat from the device's memory.
  """
  check_value_slice(config, value_slice)
  wrt = gradient_weights(value_slice)
  fn = functools.partial(_batch_gradients, config=config, wrt=wrt, remat=remat, keep_dtype=True)
  return jax.jit(fn)


@functools.cache
def gradient_fn(config: GPTNeoXConfig, value_slice: str, remat: str = "none"):
  """jit fn(params, batches [G, m, mb, s+1]) -> (losses [G], grads with leaves [G, ...]):
  `batch_gradient_fn` of G batches in one compiled call (jax.lax.map), all G gradients held
  at once. The stacked (`--checkpoints_per_call` > 1) path and the benchmarks use it."""
  check_value_slice(config, value_slice)
  wrt = gradient_weights(value_slice)

  @jax.jit
  def fn(params, batches):
    one_batch = functools.partial(_batch_gradients, params, config=config, wrt=wrt, remat=remat)
    return jax.lax.map(one_batch, batches)

  return fn


def registered_names() -> tuple:
  """The registered metric names: a static argument of the compiled calls that compute
  every registered metric of a family, so a metric registered later (--metrics_module)
  compiles them again instead of reusing a trace without it."""
  return tuple(analysis.METRICS)


def gradient_metrics(grads: dict, layers: dict, value_slice: str, refine: bool = True) -> dict:
  """`gradient_metrics_jit` (below) of the metrics registered now."""
  return gradient_metrics_jit(grads, layers, value_slice, refine, registered_names())


@functools.partial(jax.jit, static_argnames=("value_slice", "refine", "registered"))
def gradient_metrics_jit(grads, layers, value_slice, refine, registered) -> dict:
  """{component: {metric: ...}} of G gradients (docs/method.md: mean singular values over the
  batches, norms, consecutive cosine).

  A compiled call of its own, apart from `gradient_fn`: on a device mesh the gradients
  need collectives and the spectra LAPACK calls, and XLA:CPU can deadlock running both in
  one program; the stacked path runs this one on a single device.
  """
  layers = jax.tree.map(lambda x: x.astype(jnp.float32), model_lib.study_factors(layers))
  return analysis.gradient_spectra(grads, layers, value_slice, refine=refine)


@functools.cache
def batched_gradient_fn(config: GPTNeoXConfig, value_slice: str, remat: str = "none"):
  """jit fn(stacked params [C, ...], batches [C, G, m, mb, s+1]) -> (losses [C, G], grads
  with leaves [C, G, ...]): `gradient_fn` of C checkpoints, each on its own batches."""
  return jax.jit(jax.vmap(gradient_fn(config, value_slice, remat)))


def batched_gradient_metrics(grads: dict, layers: dict, value_slice: str, refine=True) -> dict:
  """`gradient_metrics` of C checkpoints (leaves [C, G, ...] and [C, L, ...])."""
  return _batched_gradient_metrics(grads, layers, value_slice, refine, registered_names())


@functools.partial(jax.jit, static_argnames=("value_slice", "refine", "registered"))
def _batched_gradient_metrics(grads, layers, value_slice, refine, registered) -> dict:
  fn = functools.partial(
    gradient_metrics_jit, value_slice=value_slice, refine=refine, registered=registered
  )
  return over_checkpoints(lambda g: fn(*g), (grads, layers), refine)


@functools.cache
def loss_fn(config: GPTNeoXConfig, microbatch: int = 0):
  """jit fn(params, tokens [b, s+1]) -> mean next-token loss, on `microbatch` sequences
  at a time (dividing b; 0: all at once)."""

  @jax.jit
  def fn(params, tokens):
    b = tokens.shape[0]
    if not microbatch or microbatch >= b:
      return model_lib.lm_loss(params, tokens, config)
    chunks = tokens.reshape(b // microbatch, microbatch, -1)
    return jax.lax.map(lambda t: model_lib.lm_loss(params, t, config), chunks).mean()

  return fn


@functools.cache
def batched_loss_fn(config: GPTNeoXConfig, microbatch: int = 0):
  """jit fn(stacked params [C, ...], tokens [b, s+1]) -> [C] losses on the same tokens."""
  return jax.jit(jax.vmap(loss_fn(config, microbatch), in_axes=(0, None)))
