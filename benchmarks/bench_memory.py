"""The sweep held under a small --device_memory: a smaller microbatch, a peak under the
limit, the same tables.

  python -m benchmarks.bench_memory [--device_memory 300MB,120MB --checkpoints 2]

Writes a local suite of random 14m-shaped checkpoints (6 layers, d_model 128, 4 heads,
d_mlp 512; a 512-token vocabulary keeps it fast) and a token stream of 256-token
sequences, 64 per training batch, then sweeps it with the paper's protocol otherwise
(11 gradient batches of 64 x 256 tokens, 64 fixed sequences):

- unconstrained: --device_memory of 1 TB (the whole gradient batch at once);
- constrained: each --device_memory given.

Prints each run's layout (gradient microbatch, remat, capture microbatch, planned peak),
XLA's own peak of the compiled calls under that layout (`compiled.memory_analysis()`: temp +
argument + output bytes, less outputs aliasing donated inputs): the streamed one-batch
gradient call (plus the previous batch's float32 gradients, which the device keeps beside
it for the spectra), the per-batch spectra call and the capture call, against the limit, the
largest relative difference from the unconstrained run's table (the gradients'
condition numbers apart: float32 rounding moves their smallest singular value by up to
eps x the largest, so they are shown as |change| / (eps x kappa^2), at most 1), and the
time ratio against the unconstrained run (CPU timings here are noisy: other work shares
the cores).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import GPTNeoXConfig as HFConfig
from transformers import GPTNeoXForCausalLM

from jax_pythia import data, sweep
from jax_pythia.checkpoints import sources
from jax_pythia.models import model as model
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.scale import plan
from jax_pythia.study import checkpoint as study
from jax_pythia.study import streamed
from jax_pythia.sweep import results

SHAPE_14M = dict(
  vocab_size=512,
  hidden_size=128,
  num_hidden_layers=6,
  num_attention_heads=4,
  intermediate_size=512,
  max_position_embeddings=256,
)
SEQ = 256
SEQUENCES_PER_STEP = 64


def write_suite(root: str, n_checkpoints: int) -> None:
  steps = list(range(n_checkpoints))
  rng = np.random.default_rng(0)
  n_items = (n_checkpoints + 11) * SEQUENCES_PER_STEP
  data.write_mmap_indexed_dataset(
    os.path.join(root, "data", "train"), (rng.integers(0, 512, SEQ + 1) for _ in range(n_items))
  )
  for step in steps:
    torch.manual_seed(step)
    m = GPTNeoXForCausalLM(HFConfig(**SHAPE_14M))
    m.save_pretrained(os.path.join(root, "m14", f"step{step}"))


def xla_peaks(config: GPTNeoXConfig, layout: plan.Layout, options: sweep.SweepOptions) -> dict:
  """XLA's bytes of the compiled gradient (one batch, plus the carried previous batch's
  gradients), spectra (one batch's terms) and capture calls."""
  params = jax.eval_shape(lambda: model.init_params(config, jax.random.PRNGKey(0)))

  def total(compiled):
    a = compiled.memory_analysis()
    return (
      a.temp_size_in_bytes
      + a.argument_size_in_bytes
      + a.output_size_in_bytes
      - a.alias_size_in_bytes
    )

  vs = options.value_slice
  mb = layout.gradient_microbatch
  batch = jax.ShapeDtypeStruct((options.gradient_sequences // mb, mb, SEQ + 1), jnp.int32)
  one_batch = study.batch_gradient_fn(config, vs, layout.remat)
  _, grads = jax.eval_shape(one_batch, params, batch)
  carry = jax.eval_shape(lambda g: streamed.first_gradient_carry(g, vs), grads)
  carried = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry["grads"]))
  terms = streamed.gradient_terms.lower(grads, carry, params["layers"], vs)
  n = options.n_sequences
  capture = study.activation_fn(config, vs, layout.capture_microbatch).lower(
    params, jax.ShapeDtypeStruct((n, SEQ), jnp.int32), jax.ShapeDtypeStruct((n, 1), jnp.int32)
  )
  return {
    "gradients": total(one_batch.lower(params, batch).compile()) + carried,
    "spectra": total(terms.compile()),
    "capture": total(capture.compile()),
  }


def run(root: str, out: str, device_bytes: float, options: sweep.SweepOptions):
  models = sources.resolve_models([os.path.join(root, "m14")])
  source = data.open_token_source(
    os.path.join(root, "data", "train"), sequences_per_step=SEQUENCES_PER_STEP
  )
  runner = sweep.Sweep(models, "all", source, out, options, device_memory=device_bytes)
  runner.prepare()
  start = time.perf_counter()
  runner.run()
  seconds = time.perf_counter() - start
  return runner.layouts["m14"], results.collect(out)[0], seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device_memory", default="300MB,120MB")
  parser.add_argument("--checkpoints", type=int, default=2)
  args = parser.parse_args()
  limits = [(text, plan.parse_bytes(text)) for text in args.device_memory.split(",")]
  options = sweep.SweepOptions(n_sequences=64, gradient_sequences=64, gradient_window=5)
  with tempfile.TemporaryDirectory() as tmp:
    write_suite(tmp, args.checkpoints)
    config = GPTNeoXConfig.from_json_file(os.path.join(tmp, "m14", "step0", "config.json"))
    base = None
    for name, device_bytes in [("1TB", 1e12)] + limits:
      layout, table, seconds = run(tmp, os.path.join(tmp, name), device_bytes, options)
      peaks = xla_peaks(config, layout, options)
      print(f"--device_memory={name}: {layout.describe()}")
      for call, measured in peaks.items():
        print(
          f"  XLA peak of the {call} call {plan.format_bytes(measured)} "
          f"(plan {plan.format_bytes(layout.peaks[call])}; "
          f"{measured / device_bytes:.1%} of --device_memory)"
        )
      if base is None:
        base = (table, seconds)
        continue
      a, b = base[0], table
      assert a.drop(columns="value").equals(b.drop(columns="value")), "tables differ in rows"
      x, y = a["value"].to_numpy(), b["value"].to_numpy()
      kappa = (a["metric"] == "grad_condition_number").to_numpy()
      same = (x == y) | (np.isnan(x) & np.isnan(y))
      rel = np.where(same, 0.0, np.abs(y - x) / np.abs(x))
      weyl = np.abs(y - x)[kappa] / (np.finfo(np.float32).eps * x[kappa] ** 2)
      weyl = weyl[~same[kappa]]  # NaN (unresolved) in both, or equal: nothing to bound
      bound = f"within {weyl.max():.2g} of" if weyl.size else "equal (or unresolved in both) at"
      print(
        f"  table: {len(a)} rows; largest relative difference {rel[~kappa].max():.2e}; "
        f"gradient condition numbers {bound} the float32 bound"
      )
      print(
        f"  time / unconstrained: {seconds / base[1]:.2f} ({seconds:.0f} s / {base[1]:.0f} s, "
        f"{args.checkpoints} checkpoints; CPU, noisy)"
      )


if __name__ == "__main__":
  main()
