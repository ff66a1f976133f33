"""Streamed gradient statistics against all G batches at once, for one checkpoint.

  python -m benchmarks.bench_stream [--repeats 3 --shapes toy,14m]   (also: --shapes 70m)

For the shapes of benchmarks/bench_batched.py, one random checkpoint's gradient work on 11
batches two ways, side by side in this process, each compiled first and timed best of
--repeats, interleaved:

- at once: `study.gradient_fn` (all G batches' gradients in one call), then
  `study.gradient_metrics` (the stacked path's calls);
- streamed: `study.batch_gradient_fn` per batch, each reduced at once by
  `streaming.streamed_gradient_metrics` (the sweep's calls for one checkpoint).

Prints seconds of both and the ratio (at once / streamed), XLA's bytes of each way's
largest call (`compiled.memory_analysis()`: temp + argument + output, less outputs
aliasing donated inputs; streamed: the one-batch gradient call plus the previous batch's
gradients kept beside it, or the per-batch spectra call) and the largest relative
difference of the metrics (condition numbers apart: float32 rounding moves them by up to
eps x kappa^2). On a shared CPU timings are noisy: best-of-N hides some of it, not all.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_batched import GRADIENT_BATCHES, VALUE_SLICE, best_of
from benchmarks.shapes import DEFAULT_STUDY_SHAPES, STUDY_SHAPES
from jax_pythia.models import model as model
from jax_pythia.study import checkpoint as study
from jax_pythia.study import streamed as streaming


# bench_batched's shapes, and (on request: minutes on CPU) bench_sweep's 70m one.
def at_once(config, params, batches):
  losses, grads = study.gradient_fn(config, VALUE_SLICE)(params, batches)
  return jax.device_get((study.gradient_metrics(grads, params["layers"], VALUE_SLICE), losses))


def streamed(config, params, batches):
  one_batch = study.batch_gradient_fn(config, VALUE_SLICE)
  losses = []

  def gradients():
    for batch in batches:
      loss, grads = one_batch(params, batch)
      losses.append(loss)
      yield grads

  values = streaming.streamed_gradient_metrics(gradients(), params["layers"], VALUE_SLICE)
  return jax.device_get((values, jnp.stack(losses)))


def _bytes(compiled) -> int:
  a = compiled.memory_analysis()
  return (
    a.temp_size_in_bytes + a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes
  )


def largest_calls(config, params, batches) -> tuple[int, int]:
  """XLA bytes of the largest call: (at once, streamed)."""
  gradient = study.gradient_fn(config, VALUE_SLICE).lower(params, batches).compile()
  _, grads = jax.eval_shape(study.gradient_fn(config, VALUE_SLICE), params, batches)
  metrics = study.gradient_metrics.lower(grads, params["layers"], VALUE_SLICE).compile()
  one_batch = study.batch_gradient_fn(config, VALUE_SLICE)
  _, grad = jax.eval_shape(one_batch, params, batches[0])
  carry = jax.eval_shape(lambda g: streaming.first_gradient_carry(g, VALUE_SLICE), grad)
  carried = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry["grads"]))
  terms = streaming.gradient_terms.lower(grad, carry, params["layers"], VALUE_SLICE).compile()
  batch_call = one_batch.lower(params, batches[0]).compile()
  return (
    max(_bytes(gradient), _bytes(metrics)),
    max(_bytes(batch_call) + carried, _bytes(terms)),
  )


def largest_difference(a: dict, b: dict) -> float:
  worst = 0.0
  for component, metrics in a.items():
    for metric, x in metrics.items():
      if metric == "grad_condition_number":
        continue
      x, y = np.asarray(x), np.asarray(b[component][metric])
      ok = ~np.isnan(x)
      assert (ok == ~np.isnan(y)).all(), (component, metric)
      rel = np.abs(x[ok] - y[ok]) / np.maximum(np.abs(x[ok]), 1e-30)
      worst = max(worst, float(rel.max(initial=0.0)))
  return worst


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--shapes",
    default=",".join(DEFAULT_STUDY_SHAPES),
    help=f"comma list of shape names among {', '.join(STUDY_SHAPES)}",
  )
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  print(
    f"devices {jax.devices()}; best of {args.repeats} after compiling; "
    f"{GRADIENT_BATCHES} gradient batches"
  )
  print(
    f"{'shape':6} {'at once s':>10} {'streamed s':>11} {'ratio':>6}  "
    f"{'at once bytes':>14} {'streamed bytes':>15}  max rel diff  (spread)"
  )
  for name in args.shapes.split(","):
    shape = STUDY_SHAPES[name]
    config, seq = shape["config"], shape["seq"]
    params = model.init_params(config, jax.random.PRNGKey(0))
    batches = rng.integers(
      0, config.vocab_size, (GRADIENT_BATCHES, 1, shape["gradient_sequences"], seq + 1)
    ).astype(np.int32)
    inputs = (config, params, batches)
    (once, once_max), (stream, stream_max) = best_of((at_once, streamed), inputs, args.repeats)
    once_bytes, stream_bytes = largest_calls(config, params, batches)
    (a, a_losses), (b, b_losses) = at_once(*inputs), streamed(*inputs)
    np.testing.assert_allclose(b_losses, a_losses, rtol=1e-6)
    print(
      f"{name:6} {once:>10.4f} {stream:>11.4f} {once / stream:>5.2f}x  "
      f"{once_bytes / 1e6:>11.2f} MB {stream_bytes / 1e6:>12.2f} MB  "
      f"{largest_difference(a, b):>12.2e}  (max/min {once_max / once:.2f}, "
      f"{stream_max / stream:.2f})",
      flush=True,
    )


if __name__ == "__main__":
  main()
