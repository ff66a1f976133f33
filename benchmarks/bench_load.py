"""Checkpoint loading speed: jax_pythia.load_checkpoint vs transformers.from_pretrained.

Writes a random pythia-70m-shaped checkpoint as the Hub stores it (float16 safetensors,
via transformers' save_pretrained) to a temp dir, then times, in one process, reading it
into float32 parameters on the device both ways, taking turns:

  python -m benchmarks.bench_load [--repeats 5] [--size 70m]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time


def write_checkpoint(directory: str, size: str) -> None:
  import torch
  import transformers

  from jax_pythia import suite

  s = suite.SIZES[size]
  config = transformers.GPTNeoXConfig(
    vocab_size=suite.VOCAB_SIZE,
    hidden_size=s.d_model,
    num_hidden_layers=s.n_layers,
    num_attention_heads=s.n_heads,
    intermediate_size=s.d_mlp,
    max_position_embeddings=2048,
    rotary_pct=0.25,
    use_parallel_residual=True,
    tie_word_embeddings=False,
  )
  torch.manual_seed(0)
  model = transformers.GPTNeoXForCausalLM(config).to(torch.float16)
  model.save_pretrained(directory)


def time_interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds of each fn per repeat, the fns taking turns within every repeat so that a
  change in the machine's load (it is shared) falls on all of them alike."""
  for fn in fns.values():
    fn()  # warm-up: imports, jit of device_put, page cache
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      gc.collect()
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--size", default="70m")
  args = parser.parse_args()

  import jax
  import torch
  import transformers

  from jax_pythia.checkpoints.hub import load_checkpoint

  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  with tempfile.TemporaryDirectory() as directory:
    write_checkpoint(directory, args.size)

    def ours():
      _, params = load_checkpoint(directory, dtype="float32")
      jax.block_until_ready(params)

    def theirs():
      transformers.GPTNeoXForCausalLM.from_pretrained(directory, dtype=torch.float32)

    results = time_interleaved(
      {"jax_pythia.load_checkpoint": ours, "transformers.from_pretrained": theirs}, args.repeats
    )
  print(
    f"pythia-{args.size}-shaped fp16 safetensors -> float32, {args.repeats} repeats, "
    f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
    f"transformers {transformers.__version__}"
  )
  for name, times in results.items():
    print(
      f"  {name:30s} median {statistics.median(times):.3f} s/checkpoint "
      f"(min {min(times):.3f}, max {max(times):.3f})"
    )
  ours_t, theirs_t = (statistics.median(t) for t in results.values())
  print(f"  ratio transformers / jax_pythia: {theirs_t / ours_t:.2f}x")


if __name__ == "__main__":
  main()
