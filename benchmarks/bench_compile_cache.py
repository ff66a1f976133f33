"""What the persistent compilation cache saves a second process (jax_pythia.compile_cache).

  python -m benchmarks.bench_compile_cache [--shape 14m]

Runs two fresh processes, one after the other, on one new empty cache directory; each
lowers and compiles one checkpoint's calls of a benchmarks.shapes study shape (activations, one
gradient batch, its reduction layer by layer, the loss and the weight spectra), timing
compile alone. Prints both
processes' compile seconds and the ratio second / first: what a rerun, a resumed sweep, a
second model of the same shapes or another host of a pod pays, against the first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def compile_calls(shape_name: str, cache: str) -> float:
  """Seconds spent compiling one checkpoint's calls of `shape_name` with the cache on."""
  from jax_pythia import compile_cache

  compile_cache.enable(cache)
  import jax
  import numpy as np

  from benchmarks.shapes import STUDY_SHAPES as SHAPES
  from jax_pythia.models import model
  from jax_pythia.study import checkpoint as study
  from jax_pythia.study import streamed

  shape = SHAPES[shape_name]
  config, seq = shape["config"], shape["seq"]
  params = model.init_params(config, jax.random.PRNGKey(0))
  tokens = np.zeros((shape["n_sequences"], seq), np.int32)
  batch = np.zeros((1, shape["gradient_sequences"], seq + 1), np.int32)
  one_batch = study.batch_gradient_fn(config, "per_head")
  _, grads = jax.eval_shape(one_batch, params, batch)
  carry = jax.eval_shape(lambda g: streamed.first_gradient_carry(g, "per_head"), grads)
  calls = [
    (study.activation_fn(config, "per_head"), (params, tokens, None)),
    (one_batch, (params, batch)),
    (streamed.gradient_terms, (grads, carry, params["layers"], "per_head")),
    (study.loss_fn(config), (params, batch[0])),
    (study.weight_metrics, (params["layers"], "per_head")),
  ]
  total = 0.0
  for fn, args in calls:
    lowered = fn.lower(*args)
    start = time.perf_counter()
    lowered.compile()
    total += time.perf_counter() - start
  return total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="14m", help="a benchmarks.shapes study shape")
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(compile_calls(*args.child)))
    return
  with tempfile.TemporaryDirectory(prefix="bench_compile_cache_") as cache:
    seconds = []
    for _ in range(2):
      cmd = [sys.executable, "-m", "benchmarks.bench_compile_cache", "--child", args.shape, cache]
      out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
      seconds.append(json.loads(out.strip().splitlines()[-1]))
  first, second = seconds
  print(f"shape {args.shape}: compile {first:.2f} s in a first process, {second:.2f} s in a second")
  print(f"second / first: {second / first:.3f}x")


if __name__ == "__main__":
  main()
