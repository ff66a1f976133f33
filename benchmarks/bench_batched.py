"""Checkpoints per compiled call: C stacked checkpoints against C one at a time.

  python -m benchmarks.bench_batched [--counts 2,4 --repeats 3]

For a toy shape and a pythia-14m shape (6 layers, d_model 128, 4 heads, a small
vocabulary), random checkpoints of one model go through the sweep's per-checkpoint work
(`jax_pythia.study`: activations of the fixed batch at the last token, CKA against the
final checkpoint, weight spectra, gradients on 11 batches and their spectra, held-out
loss), once with one checkpoint per call and once with C stacked (`study.batched_*`), side
by side in this process, each compiled first and timed best of --repeats. Prints seconds
per checkpoint of both and the gain (C=1 time / stacked time). On a shared CPU the timings
are noisy: best-of-N hides some of it, not all.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks.shapes import DEFAULT_STUDY_SHAPES, STUDY_SHAPES
from jax_pythia.models import model as model
from jax_pythia.study import checkpoint as study
from jax_pythia.study import streamed

GRADIENT_BATCHES = 11  # a window of 5 steps either side, as the study
VALUE_SLICE = "per_head"


def one_at_a_time(config, params, tokens, batches, heldout, reference):
  """The C=1 sweep's calls for each checkpoint (its gradient batches streamed)."""
  out = []
  for i, p in enumerate(params):
    acts = study.activation_fn(config, VALUE_SLICE)(p, tokens, None)
    one_batch = study.batch_gradient_fn(config, VALUE_SLICE)
    losses = []

    def gradients(p=p, i=i, one_batch=one_batch, losses=losses):
      for batch in batches[i]:
        loss, grads = one_batch(p, batch)
        losses.append(loss)
        yield grads

    gradient_values = streamed.streamed_gradient_metrics(gradients(), p["layers"], VALUE_SLICE)
    loss = study.loss_fn(config)(p, heldout)
    values = study.checkpoint_metrics(
      acts,
      reference,
      p["layers"],
      VALUE_SLICE,
      gradient_values=gradient_values,
      train_losses=np.asarray(losses),
      heldout_loss=loss,
    )
    out.append(jax.device_get(values))
  return out


def stacked(config, params, tokens, batches, heldout, reference):
  """The batched sweep's calls for the same checkpoints."""
  p = study.stack_params(params)
  acts = study.batched_activation_fn(config, VALUE_SLICE)(p, tokens, None)
  losses, grads = study.batched_gradient_fn(config, VALUE_SLICE)(p, batches)
  loss = study.batched_loss_fn(config)(p, heldout)
  return study.batched_checkpoint_metrics(
    acts,
    reference,
    p["layers"],
    VALUE_SLICE,
    grads=grads,
    train_losses=losses,
    heldout_loss=loss,
  )


def best_of(fns, inputs, repeats):
  """(min, max) seconds of each fn(*inputs), compiled first, the fns interleaved so that
  the load other processes put on the CPU hits them alike."""
  for fn in fns:
    fn(*inputs)
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, t in zip(fns, times):
      start = time.perf_counter()
      fn(*inputs)
      t.append(time.perf_counter() - start)
  return [(min(t), max(t)) for t in times]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--counts", default="2,4", help="C values to compare against C=1")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--shapes",
    default=",".join(DEFAULT_STUDY_SHAPES),
    help=f"comma list of shape names among {', '.join(STUDY_SHAPES)}",
  )
  args = parser.parse_args()
  counts = [int(c) for c in args.counts.split(",")]
  rng = np.random.default_rng(0)
  print(
    f"devices {jax.devices()}; best of {args.repeats} after compiling; "
    f"{GRADIENT_BATCHES} gradient batches per checkpoint, last-token activations"
  )
  print(f"{'shape':6} {'C':>3} {'C=1 s/ckpt':>11} {'stacked s/ckpt':>15} {'gain':>6}  (spread)")
  for name in args.shapes.split(","):
    shape = STUDY_SHAPES[name]
    config, seq = shape["config"], shape["seq"]
    tokens = rng.integers(0, config.vocab_size, (shape["n_sequences"], seq)).astype(np.int32)
    heldout = rng.integers(0, config.vocab_size, (8, seq + 1)).astype(np.int32)
    reference = study.activation_fn(config, VALUE_SLICE)(
      model.init_params(config, jax.random.PRNGKey(999)), tokens, None
    )
    for c in counts:
      params = [model.init_params(config, jax.random.PRNGKey(i)) for i in range(c)]
      batches = rng.integers(
        0, config.vocab_size, (c, GRADIENT_BATCHES, 1, shape["gradient_sequences"], seq + 1)
      ).astype(np.int32)
      inputs = (config, params, tokens, batches, heldout, reference)
      (single, single_max), (batched, batched_max) = best_of(
        (one_at_a_time, stacked), inputs, args.repeats
      )
      print(
        f"{name:6} {c:>3} {single / c:>11.4f} {batched / c:>15.4f} {single / batched:>5.2f}x"
        f"  (max/min {single_max / single:.2f}, {batched_max / batched:.2f})",
        flush=True,
      )


if __name__ == "__main__":
  main()
