"""The compiled work of a chunk: one checkpoint (`one`: gradients streamed batch by batch)
or C stacked checkpoints of one model (`stacked`: one vmapped call each), from loaded
parameters to the tidy rows of its metrics and the activations pairwise CKA needs."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import pandas as pd

from analysis import protocol
from jax_pythia import data
from jax_pythia.checkpoints.sources import ModelSource
from jax_pythia.errors import ConfigError, SweepError
from jax_pythia.models import model as model
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.scale import plan, sharding
from jax_pythia.study import checkpoint as study
from jax_pythia.study import streamed
from jax_pythia.sweep import results, watchdog
from jax_pythia.sweep.loading import Loaded
from jax_pythia.sweep.options import SweepOptions, gradient_steps


class ChunkWork:
  """Computes checkpoints of the sweep's models on fixed inputs and training batches.

  `inputs(m)` gives a model's fixed inputs; the final checkpoint's activations (every
  CKA's reference) are kept in `references`, or read from `reference_file(m)` when an
  earlier run computed them.
  """

  def __init__(
    self,
    options: SweepOptions,
    source: data.TokenSource,
    placement: sharding.Placement,
    heartbeat: watchdog.Heartbeat,
    layouts: dict[str, plan.Layout],
    inputs: Callable[[ModelSource], np.ndarray],
    reference_file: Callable[[ModelSource], str],
  ):
    self.options, self.source, self.placement = options, source, placement
    self.heartbeat, self.layouts = heartbeat, layouts
    self.inputs, self.reference_file = inputs, reference_file
    self.references: dict[str, dict[str, np.ndarray]] = {}

  def reference(self, m: ModelSource) -> dict[str, np.ndarray]:
    if m.name in self.references:  # computed here (split=shard: only process 0 writes)
      return self.references[m.name]
    return results.load_activations(self.reference_file(m))

  def one(self, m: ModelSource, loaded: Loaded) -> tuple[pd.DataFrame, dict]:
    """All metrics of one checkpoint: (tidy rows, activations to store).

    The gradient batches stream (`_gradient_values`), so a device holds two batches'
    gradients (split by layer over the mesh), not G.
    """
    o, config, step = self.options, loaded.config, loaded.step
    place = self.placement
    beat = lambda phase: self.heartbeat.beat(m.name, step, phase)  # noqa: E731
    beat("activations")
    params = place.params(loaded.params, config)
    where = loaded.directory or f"{m.name} step {step}"
    layout = self.layouts.get(m.name)
    acts = self._activations(m, config, params, where)
    if step == m.final_step:
      self.references[m.name] = acts
    reference = acts if step == m.final_step else self.reference(m)
    check_like_reference(acts, reference, where)
    # The spectra run split by layer over the mesh's devices (each its own layers' SVDs),
    # never gathered on one device.
    spread = place.layer_mesh(config.n_layers)
    layers = place.onto_layers(study.spectra_weights(params["layers"], o.value_slice), spread)
    weight_values = None
    if spread is not None:
      weight_plan = protocol.plan_of(o.chosen, "weights")
      weight_values = study.spread_weight_metrics(o.value_slice, spread, weight_plan)(layers)
      weight_values = jax.tree.map(place.host, weight_values)
    gradient_values = losses = heldout = None
    if o.computes_gradients:
      gradient_values, losses = self._gradient_values(m, step, config, params, layers, spread)
    if o.loss_sequences:
      beat("heldout loss")
      heldout = study.loss_fn(config, layout.loss_microbatch if layout else 0)(
        params, place.batch(self.heldout_tokens(m), 0, "--loss_sequences")
      )
    beat("metrics (CKA, spectra, gradient statistics)")
    values = study.checkpoint_metrics(
      acts,
      reference,
      layers,
      o.value_slice,
      floor_key=jax.random.PRNGKey(o.seed) if step == m.final_step else None,
      weight_values=weight_values,
      gradient_values=gradient_values,
      train_losses=losses,
      heldout_loss=heldout,
      selection=o.chosen,
    )
    return self._rows(m, step, values), acts

  def _gradient_values(self, m, step, config, params, layers, spread) -> tuple[dict, np.ndarray]:
    """(gradient metrics, losses [G]) of one checkpoint, its batches streamed: each batch's
    gradients are computed on the mesh, split by layer over `spread` (None: one device) and
    reduced there layer by layer before the next batch's are asked for. The previous batch's
    gradients, for the cosine, stay split by layer beside them: on the devices, not the
    host, since each holds only L / n layers of them and a host round trip per batch
    would cost two transfers of the whole gradient."""
    o, place = self.options, self.placement
    layout = self.layouts.get(m.name)
    batches = self._gradient_batches(m, step, config)
    one_batch = study.batch_gradient_fn(config, o.value_slice, layout.remat if layout else "none")
    batch_losses = []

    def batch_gradients():
      # Calls are queued (no host sync): the device works through them while this loop
      # runs ahead.
      for g, batch in enumerate(batches):
        self.heartbeat.beat(m.name, step, f"gradients, batch {g + 1} of {len(batches)} queued")
        loss, grads = one_batch(
          params, place.batch(batch, 1, "--gradient_microbatch (or _sequences)")
        )
        batch_losses.append(loss)
        yield place.onto_layers(grads, spread)

    values = streamed.streamed_gradient_metrics(
      batch_gradients(),
      layers,
      o.value_slice,
      spread,
      place.host,
      carry_on_host=bool(layout and layout.carry == "host"),
      selection=o.chosen,
    )
    self.heartbeat.beat(m.name, step, f"gradients, {len(batches)} batches: waiting for the device")
    return values, np.array([place.host(loss) for loss in batch_losses])

  def _activations(self, m: ModelSource, config, params, where: str) -> dict:
    """{component: array} captured on the fixed inputs (on the host); none when no
    selected metric reads activations (no forward pass then)."""
    if not self.options.chosen.needs_activations:
      return {}
    tokens, idx = self._fixed_inputs(m, config, where)
    layout, place = self.layouts.get(m.name), self.placement
    microbatch = layout.capture_microbatch if layout else 0
    fn = study.activation_fn(config, self.options.value_slice, microbatch)
    acts = fn(params, place.batch(tokens, 0, "--n_sequences"), place.replicate(idx))
    return {k: place.host(v) for k, v in acts.items()}

  def stacked(self, m: ModelSource, chunk: list[Loaded]) -> list[tuple[pd.DataFrame, dict]]:
    """`one` of C non-final checkpoints of `m` (one config) stacked, one compiled call
    each for activations, gradients, loss and metrics, on one device: [(rows, acts)].

    Unlike `one` the gradients are not streamed: the stacked gradient call holds all
    C x G batches' gradients at once (`plan` counts them so for C > 1).
    """
    o, config, steps = self.options, chunk[0].config, [loaded.step for loaded in chunk]
    place, layout = self.placement, self.layouts.get(m.name)
    beat = lambda phase: self.heartbeat.beat(m.name, steps[0], f"{phase}, {len(steps)} stacked")  # noqa: E731
    beat("activations")
    params = study.stack_params([place.params(loaded.params, config) for loaded in chunk])
    where = chunk[0].directory or f"{m.name} step {steps[0]}"
    tokens, idx = self._fixed_inputs(m, config, where)
    acts = {}
    if o.chosen.needs_activations:
      fn = study.batched_activation_fn(
        config, o.value_slice, layout.capture_microbatch if layout else 0
      )
      acts = {k: place.host(v) for k, v in fn(params, tokens, idx).items()}
    reference = self.reference(m)
    for i, loaded in enumerate(chunk):
      here = loaded.directory or f"{m.name} step {loaded.step}"
      check_like_reference({k: a[i] for k, a in acts.items()}, reference, here)
    grads = losses = heldout = None
    if o.computes_gradients:
      beat("gradients")
      batches = np.stack([self._gradient_batches(m, step, config) for step in steps])
      remat = layout.remat if layout else "none"
      losses, grads = study.batched_gradient_fn(config, o.value_slice, remat)(params, batches)
    if o.loss_sequences:
      beat("heldout loss")
      fn = study.batched_loss_fn(config, layout.loss_microbatch if layout else 0)
      heldout = fn(params, self.heldout_tokens(m))
    beat("metrics (CKA, spectra, gradient statistics)")
    values = study.batched_checkpoint_metrics(
      acts,
      reference,
      params["layers"],
      o.value_slice,
      grads=grads,
      train_losses=losses,
      heldout_loss=heldout,
      selection=o.chosen,
    )
    return [
      (self._rows(m, step, v), {k: a[i] for k, a in acts.items()})
      for i, (step, v) in enumerate(zip(steps, values))
    ]

  def _fixed_inputs(self, m: ModelSource, config: GPTNeoXConfig, where: str) -> tuple:
    """(tokens [b, s], kept positions [b, k] | None) every checkpoint of `m` runs on."""
    o = self.options
    tokens = self.inputs(m)
    data.check_token_ids(tokens, config.vocab_size, self.source.name)
    data.check_sequence_length(tokens, config.max_seq_len, where, self.source.name)
    try:
      idx = model.position_index(
        o.positions, tokens.shape[1], n=len(tokens), seed=o.seed, what="--positions"
      )
    except ValueError as e:
      raise SweepError(str(e)) from None
    return tokens, idx

  def _gradient_batches(self, m: ModelSource, step: int, config: GPTNeoXConfig) -> np.ndarray:
    """The training batches of `step`'s gradients: [G, microbatches, mb, s+1]."""
    o, layout = self.options, self.layouts.get(m.name)
    batches = np.stack(
      [
        self.source.batch(s, o.gradient_sequences)
        for s in gradient_steps(step, o.gradient_window, m.final_step - 1)
      ]
    )
    mb = (layout and layout.gradient_microbatch) or o.gradient_microbatch or o.gradient_sequences
    batches = batches.reshape(batches.shape[0], -1, mb, batches.shape[-1])
    data.check_token_ids(batches, config.vocab_size, self.source.name)
    return batches

  def _rows(self, m: ModelSource, step: int, values: dict) -> pd.DataFrame:
    """The selected rows (metric and layers: `Selection.keeps`) of one checkpoint."""
    keeps = self.options.chosen.keeps
    frames = [
      results.metric_rows(m.name, step, component, metric, self.placement.host(value))
      for component, metrics in values.items()
      for metric, value in metrics.items()
    ]
    rows = pd.concat(frames, ignore_index=True)
    kept = [keeps(c, n, layer) for c, n, layer in zip(rows.component, rows.metric, rows.layer)]
    return rows[np.asarray(kept, bool)].reset_index(drop=True)

  def heldout_tokens(self, m: ModelSource) -> np.ndarray:
    """The batch of the final step: in the stream, but no checkpoint trained on it."""
    return self.source.batch(m.final_step, self.options.loss_sequences)


def check_like_reference(acts: dict, reference: dict, where: str) -> None:
  """CKA against the final checkpoint needs the same sites and shapes (architecture)."""
  for name, value in acts.items():
    expected = reference.get(name)
    if expected is None or expected.shape != value.shape:
      shape = None if expected is None else expected.shape
      raise ConfigError(
        f"{where}: its {name} activations have shape {value.shape}, the final checkpoint's "
        f"{shape}: a different architecture (config.json), which CKA against it cannot compare"
      )
