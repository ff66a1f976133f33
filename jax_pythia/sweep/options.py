"""What a sweep computes and reads: its options (everything that changes the numbers), the
checkpoints it selects, and the training batches it needs (what `tools.fetch_data` stages
and `tools.plan` counts)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from analysis.selection import Selection
from analysis.selection import default as default_selection
from jax_pythia import data, suite
from jax_pythia.checkpoints.sources import ModelSource
from jax_pythia.errors import SweepError
from jax_pythia.models import model as model


@dataclasses.dataclass(frozen=True)
class SweepOptions:
  """Everything that changes the numbers. A rerun into the same --out must match."""

  n_sequences: int = data.DEFAULT_N_SEQUENCES
  positions: str = "last"  # last | all | random:K
  data_step: int | None = None  # None: the step before the final checkpoint
  gradients: bool = True
  gradient_window: int = 5  # batches of steps s-w .. s+w
  gradient_sequences: int = data.DEFAULT_N_SEQUENCES
  gradient_microbatch: int = 0  # 0: chosen from the device's memory (jax_pythia.scale.plan)
  value_slice: str = "per_head"
  loss_sequences: int = 0  # held-out loss on this many sequences (0: off)
  dtype: str = "float32"  # forward/backward compute dtype (metric inputs: float32, HIGHEST)
  matmul_precision: str = "default"  # of the forward/backward: default | high | highest
  seed: int = 0
  # What is computed (analysis.selection: --metrics, --components, --analysis); None: the
  # paper's protocol. Recorded in --out as 'metrics': a rerun with another is refused.
  selection: Selection | None = None

  def __post_init__(self):
    if self.n_sequences < 2:
      raise SweepError(
        f"--n_sequences={self.n_sequences}: CKA needs at least 2 (4 for the debiased estimator)"
      )
    if self.value_slice not in ("per_head", "reference"):
      raise SweepError(f"--value_slice={self.value_slice!r}: per_head or reference")
    if self.gradient_window < 0 or self.gradient_sequences < 1:
      raise SweepError("--gradient_window must be >= 0 and --gradient_sequences >= 1")
    mb = self.gradient_microbatch
    if mb < 0 or (mb and self.gradient_sequences % mb):
      raise SweepError(
        f"--gradient_microbatch={mb} must divide --gradient_sequences={self.gradient_sequences}"
      )
    try:
      model.parse_positions(self.positions, "--positions")
    except ValueError as e:
      raise SweepError(str(e)) from None
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise SweepError(
        f"--matmul_precision={self.matmul_precision!r}: one of {', '.join(MATMUL_PRECISIONS)}"
      )
    if self.loss_sequences < 0:
      raise SweepError(f"--loss_sequences={self.loss_sequences}: must be >= 0 (0: off)")
    if self.data_step is not None and self.data_step < 0:
      raise SweepError(f"--data_step={self.data_step}: must be >= 0")
    if not 0 <= self.seed < 2**63:  # found here, not after --out is claimed
      raise SweepError(f"--seed={self.seed}: must be in 0 .. 2**63 - 1 (a 64-bit PRNG key)")

  def check_batch_counts(self, sequences_per_step: int, where: str) -> None:
    """Each sequence count fits a training batch of `where`, refused naming its own flag."""
    if sequences_per_step < 1:
      raise SweepError(f"--sequences_per_step={sequences_per_step}: must be >= 1")
    counts = [("--n_sequences", self.n_sequences), ("--loss_sequences", self.loss_sequences)]
    if self.gradients:
      counts.append(("--gradient_sequences", self.gradient_sequences))
    for flag, n in counts:
      if n > sequences_per_step:
        raise SweepError(
          f"{flag}={n}: a training batch of {where} holds {sequences_per_step} sequences "
          f"(--sequences_per_step)"
        )

  def fingerprint(self) -> dict[str, Any]:
    options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if options["matmul_precision"] == "default":  # runs from before the option still resume
      del options["matmul_precision"]
    # Recorded as --metrics: the selection's (component, metric, layers) entries.
    del options["selection"]
    chosen = self.chosen
    options["metrics"] = "default" if chosen == default_selection() else chosen.record()
    return options

  @property
  def chosen(self) -> Selection:
    """The selection (the paper's protocol when none was given)."""
    return self.selection or default_selection()

  @property
  def computes_gradients(self) -> bool:
    """Whether a gradient pass runs: --gradients and a selected metric that needs it."""
    return self.gradients and self.chosen.needs_gradients


# jax.default_matmul_precision values for the model's forward/backward. 'default' is the
# backend's own (float32 on CPU; one bfloat16 pass on TPU, TF32 on recent GPUs); analysis
# kernels always use Precision.HIGHEST on float32 inputs, whatever this says.
MATMUL_PRECISIONS = ("default", "high", "highest")


def gradient_steps(step: int, window: int, last_batch_step: int) -> list[int]:
  """The training steps whose batches give a checkpoint's gradients: s-w .. s+w, shifted
  to lie within the batches that exist (0 .. the step before the final checkpoint).

  Always 2w+1 batches (fewer only if the stream is shorter): the gradient statistics of
  every checkpoint average the same number of batches, and compile once.
  """
  count = min(2 * window + 1, last_batch_step + 1)
  start = min(max(step - window, 0), last_batch_step + 1 - count)
  return list(range(start, start + count))


def selected_steps(m: ModelSource, spec: str) -> list[int]:
  """The checkpoints of `m` a sweep processes for `--steps=spec`, the final one first."""
  try:
    steps = suite.parse_steps(spec, m.steps)
  except ValueError as e:
    raise SweepError(f"--steps for {m.name}: {e}") from None
  # The final checkpoint is the reference of every CKA, so it is always swept, first.
  return [m.final_step] + [s for s in steps if s != m.final_step]


def fixed_input_step(options: SweepOptions, m: ModelSource) -> int:
  """The training step whose batch gives `m`'s fixed inputs (--data_step, else the step
  before the final checkpoint: 142,999 for Pythia)."""
  return options.data_step if options.data_step is not None else max(m.final_step - 1, 0)


def batches_needed(
  models: Sequence[ModelSource], steps: str, options: SweepOptions
) -> dict[int, int]:
  """{training step: sequences} of every batch a sweep reads from a training stream: the
  fixed inputs, each checkpoint's gradient window and the held-out loss batch. What
  `tools.fetch_data` stages and `tools.plan` counts."""
  needs: dict[int, int] = {}

  def need(step: int, n: int) -> None:
    needs[step] = max(needs.get(step, 0), n)

  for m in models:
    need(fixed_input_step(options, m), options.n_sequences)
    if options.computes_gradients:
      for s in selected_steps(m, steps):
        for g in gradient_steps(s, options.gradient_window, m.final_step - 1):
          need(g, options.gradient_sequences)
    if options.loss_sequences:
      need(m.final_step, options.loss_sequences)
  return dict(sorted(needs.items()))
