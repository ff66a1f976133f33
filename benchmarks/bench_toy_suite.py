"""Wall time of building the default toy suite (jax_pythia.toy.build) on this machine.

Builds it from scratch in a temporary directory (or --out, which must not hold a suite)
and prints the time of the data, of each model (compile + training + checkpoints) and
the total, with the training throughput and final losses:

  python -m benchmarks.bench_toy_suite [--out DIR] [--preset default|tiny]

The machine's load average is printed too: other processes on the same cores slow every
number here in proportion.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="Build here (default: a temp dir).")
  parser.add_argument("--preset", choices=["default", "tiny"], default="default")
  args = parser.parse_args()

  from jax_pythia.toy import build as toy_suite

  options = toy_suite.TINY_OPTIONS if args.preset == "tiny" else toy_suite.DEFAULT_OPTIONS
  with tempfile.TemporaryDirectory(prefix="bench_toy_suite-") as tmp:
    out = args.out or os.path.join(tmp, "suite")
    if os.path.exists(os.path.join(out, toy_suite.MANIFEST_FILE)):
      raise SystemExit(f"{out} already holds a complete suite; give an empty --out")
    print(
      f"cpus: {os.cpu_count()}, load average before: "
      f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    start = time.perf_counter()
    result = toy_suite.build_toy_suite(out, options)
    total = time.perf_counter() - start
    tokens = options.n_steps * options.sequences_per_step * options.seq_len
    print(f"data (corpus, tokenizer, .bin/.idx): {result.seconds['data']:.1f} s")
    for model in result.manifest["models"]:
      seconds = result.seconds[model["name"]]
      print(
        f"{model['name']:>12}: {seconds:6.1f} s  ({options.n_steps / seconds:5.2f} steps/s, "
        f"{tokens / seconds / 1e3:6.1f} k tokens/s incl. compile and "
        f"{len(result.manifest['steps'])} checkpoints; lr {model['learning_rate']:g}, "
        f"final loss {model['final_train_loss_mean_last_10']:.3f})"
      )
    print(
      f"total: {total:.1f} s for {len(options.sizes)} models x {options.n_steps} steps x "
      f"{options.sequences_per_step} x {options.seq_len} tokens"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
