"""Cost of the checkpoint content hash (jax_pythia.checkpoints.integrity) next to loading.

Writes a random Pythia-shaped checkpoint as the Hub stores it (float16 safetensors, torch
free: jax_pythia.models.weights.write_safetensors) and times, side by side in one process:
  load = weights.read_state_dict + weights.convert_state_dict (what the sweep does
         per checkpoint, from the page cache),
  hash = integrity.content_hash of the same state dict,
and prints hash / load. In the sweep the hash runs in the prefetch thread, before the
conversion, overlapping the previous checkpoint's compute (hashlib releases the GIL).
CPU timings here are noisy: other work shares the cores.

  python -m benchmarks.bench_hash [--size 70m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def write_checkpoint(directory: str, size: str) -> None:
  from jax_pythia import suite
  from jax_pythia.models import weights
  from jax_pythia.models.config import GPTNeoXConfig

  s = suite.SIZES[size]
  config = GPTNeoXConfig(
    vocab_size=suite.VOCAB_SIZE,
    d_model=s.d_model,
    n_layers=s.n_layers,
    n_heads=s.n_heads,
    d_mlp=s.d_mlp,
    max_seq_len=2048,
  )
  rng = np.random.default_rng(0)
  tensors = {
    name: rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    for name, shape in weights.hf_shapes(config).items()
  }
  weights.write_safetensors(f"{directory}/model.safetensors", tensors)
  with open(f"{directory}/config.json", "w") as f:
    f.write(_config_json(config))


def _config_json(config) -> str:
  import json

  return json.dumps(
    {
      "model_type": "gpt_neox",
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "num_hidden_layers": config.n_layers,
      "num_attention_heads": config.n_heads,
      "intermediate_size": config.d_mlp,
      "max_position_embeddings": config.max_seq_len,
      "rotary_pct": 0.25,
      "rotary_emb_base": 10000,
      "use_parallel_residual": True,
      "tie_word_embeddings": False,
      "hidden_act": "gelu",
      "layer_norm_eps": 1e-5,
      "torch_dtype": "float16",
    }
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="70m")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  from jax_pythia.checkpoints import integrity
  from jax_pythia.models import weights
  from jax_pythia.models.config import GPTNeoXConfig

  with tempfile.TemporaryDirectory() as directory:
    write_checkpoint(directory, args.size)
    config = GPTNeoXConfig.from_json_file(f"{directory}/config.json")

    def load():
      return weights.convert_state_dict(weights.read_state_dict(directory), config, "float32")

    def digest():
      return integrity.content_hash(weights.read_state_dict(directory))

    load(), digest()  # warm-up: page cache, imports
    loads, hashes = [], []
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits both
      for fn, times in ((load, loads), (digest, hashes)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    load_s, hash_s = statistics.median(loads), statistics.median(hashes)
    size = sum(a.nbytes for a in weights.read_state_dict(directory).values())
    print(f"pythia-{args.size} shape, {size / 1e6:.0f} MB of fp16 weights")
    print(f"hash / load (read + convert to float32) = {hash_s / load_s:.2f}")
    print(f"hash throughput / load throughput: {load_s / hash_s:.1f}x")


if __name__ == "__main__":
  main()
