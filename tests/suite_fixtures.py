"""A small local suite in Hugging Face format, written with transformers' save_pretrained.

  root/
    suite.json                      models, data prefix, sequences per step
    data/train.{bin,idx}            MMapIndexedDataset: batch of step s = items s*B ...
    <model>/step<N>/config.json + model.safetensors

The data files are written byte by byte here from the documented format (docs/pythia.md),
independently of the project's writer.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from tests import hf_fixtures, llama_fixtures

SUITE_MODELS = {
  "small-2l": dict(
    num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128
  ),
  "large-3l": dict(
    num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=256
  ),
}
#: A two-family suite: a GPT-NeoX model beside Llama-family ones (a "family" key picks
#: the transformers class, llama_fixtures.tiny_llama), with grouped-query attention.
FAMILY_SUITE_MODELS = {
  "neox-2l": SUITE_MODELS["small-2l"],
  "llama-gqa-2l": dict(
    family="llama", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=48,
  ),
  "olmo2-gqa-2l": dict(
    family="olmo2", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
    num_key_value_heads=1, intermediate_size=40, tie_word_embeddings=True,
  ),
}  # fmt: skip
SUITE_STEPS = (0, 1, 2, 4, 8)
VOCAB = 97
SEQ_LEN = 16
SEQUENCES_PER_STEP = 8


def write_token_stream(prefix: Path, items: np.ndarray) -> None:
  """items [n, seq+1] as uint16 .bin + .idx (magic, version 1, dtype code 8)."""
  prefix.parent.mkdir(parents=True, exist_ok=True)
  items = np.asarray(items, np.uint16)
  n, width = items.shape
  prefix.with_suffix(".bin").write_bytes(items.tobytes())
  sizes = np.full(n, width, np.int32)
  pointers = np.arange(n, dtype=np.int64) * width * 2
  header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, n + 1)
  prefix.with_suffix(".idx").write_bytes(
    header + sizes.tobytes() + pointers.tobytes() + np.arange(n + 1, dtype=np.int64).tobytes()
  )


def write_suite(
  root: Path, models=SUITE_MODELS, steps=SUITE_STEPS, extra_batches: int = 2, seed: int = 0
) -> Path:
  """Writes the suite; each checkpoint is a different random model (seeded by step)."""
  root = Path(root)
  rng = np.random.default_rng(seed)
  n_items = (max(steps) + 1 + extra_batches) * SEQUENCES_PER_STEP
  write_token_stream(root / "data" / "train", rng.integers(0, VOCAB, (n_items, SEQ_LEN + 1)))
  for i, (name, shape) in enumerate(models.items()):
    for step in steps:
      model = _tiny(seed=1000 * i + step, vocab_size=VOCAB, max_position_embeddings=64, **shape)
      hf_fixtures.write_safetensors(model, root / name / f"step{step}")
  manifest = {
    "models": [{"name": n} for n in models],
    "data_prefix": "data/train",
    "sequences_per_step": SEQUENCES_PER_STEP,
  }
  (root / "suite.json").write_text(json.dumps(manifest))
  return root


def _tiny(family: str = "gpt_neox", **kwargs):
  """A random torch model of `family` (GPT-NeoX: hf_fixtures; else llama_fixtures)."""
  if family == "gpt_neox":
    return hf_fixtures.tiny_model(**kwargs)
  return llama_fixtures.tiny_llama(family, **kwargs)
