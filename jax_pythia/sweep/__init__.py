"""The run over checkpoints: the resumable, prefetching sweep (`run`: the queue, its chunks
and prefetch; `options`: what it computes and reads; `loading`; `compute`: the compiled work
of a chunk), what `--out` records and checks (`outdir`), the per-checkpoint and finished
tables (`results`), the report and figures (`report`, with the published evaluations in
`evals`), and the stall watchdog (`watchdog`)."""

from jax_pythia.sweep.loading import parameter_count
from jax_pythia.sweep.options import (
  MATMUL_PRECISIONS,
  SweepOptions,
  batches_needed,
  gradient_steps,
  selected_steps,
)
from jax_pythia.sweep.run import Sweep

__all__ = [
  "MATMUL_PRECISIONS",
  "Sweep",
  "SweepOptions",
  "batches_needed",
  "gradient_steps",
  "parameter_count",
  "selected_steps",
]
