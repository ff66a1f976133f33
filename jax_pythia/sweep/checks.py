"""What the sweep checks of its inputs before it claims --out: a run refused for its flags
must not record them there (the corrected rerun would be refused as other options). Each
refusal is one line naming the flag or file at fault."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from jax_pythia.checkpoints.sources import ModelSource
from jax_pythia.errors import JaxPythiaError, SweepError
from jax_pythia.models import model as model
from jax_pythia.sweep.options import SweepOptions


def check_value_slice(models: Sequence[ModelSource], o: SweepOptions) -> None:
  """--value_slice=reference on a model of another family than GPT-NeoX is refused, its
  family read from the final checkpoint's config.json (a Hub model's: cached, or fetched
  alone)."""
  if o.value_slice != "reference":
    return
  from jax_pythia.checkpoints import hub
  from jax_pythia.models import family
  from jax_pythia.study import checkpoint as study

  for m in models:
    if m.is_hub:
      path = hub.fetch_config(m.location, m.revision(m.final_step))
    else:
      path = os.path.join(m.location, m.revision(m.final_step), "config.json")
    if path and os.path.isfile(path):
      try:
        study.check_value_slice(family.load_config(path), "reference")
      except JaxPythiaError as e:
        raise SweepError(f"{m.name}: {e}") from None


def check_data_axis(
  o: SweepOptions, models: Sequence[ModelSource], layouts: Mapping, n: int
) -> None:
  """Every batch a call splits over the mesh's data axis of `n` devices divides by it
  (found here, not at the final checkpoint's first call)."""
  counts = [(f"--n_sequences={o.n_sequences}", o.n_sequences)]
  if o.loss_sequences:
    counts.append((f"--loss_sequences={o.loss_sequences}", o.loss_sequences))
  for m in models if o.gradients else ():
    layout = layouts.get(m.name)
    chosen = (layout.gradient_microbatch if layout else 0) or o.gradient_sequences
    if o.gradient_microbatch:
      counts.append((f"--gradient_microbatch={o.gradient_microbatch}", o.gradient_microbatch))
    else:  # the microbatch chosen to fit memory, or the whole batch
      what = f"--gradient_sequences={o.gradient_sequences} (microbatches of {chosen})"
      counts.append((what, chosen))
  for what, count in counts:
    if count % n:
      raise SweepError(
        f"{what}: {count} sequences cannot be split over the data axis of {n} devices "
        f"(--mesh); choose a multiple of {n}"
      )


def check_positions(o: SweepOptions, seq_len: int) -> None:
  """--positions within sequences of `seq_len` tokens, giving the debiased CKA its 4
  samples (found here, not by the estimator after compiling)."""
  try:
    model.position_index(o.positions, seq_len, n=o.n_sequences, seed=o.seed, what="--positions")
  except ValueError as e:
    raise SweepError(str(e)) from None
  kind, k = model.parse_positions(o.positions, "--positions")
  per_sequence = {"last": 1, "all": seq_len, "random": k}.get(kind)
  samples = o.n_sequences * (len(k) if per_sequence is None else per_sequence)
  if samples < 4:
    raise SweepError(
      f"--n_sequences={o.n_sequences}: with --positions={o.positions} it gives {samples} "
      "samples; the debiased CKA needs at least 4"
    )


def check_training_data(o: SweepOptions, source) -> None:
  """Gradients and --loss_sequences need a token source with training steps."""
  if o.computes_gradients and not source.has_training_steps:
    raise SweepError(
      f"gradients need the training batch of each step, which {source.name} does not "
      "have; pass --nogradients or give --data a .bin/.idx training stream"
    )
  if o.loss_sequences and not source.has_training_steps:
    raise SweepError(
      f"--loss_sequences needs a .bin/.idx training stream; {source.name} is not one"
    )
