"""Token sources: the Megatron memory-mapped stream Pythia trained on (`indexed`), the same
stream read by byte range from the Hub, HTTP or any fsspec URL, and folders staged for a pod
(`streams`), fixed input arrays and text. `open_token_source` picks one from a path or URL."""

from __future__ import annotations

import os
from pathlib import Path

from jax_pythia.data import streams
from jax_pythia.data.indexed import (
  DEFAULT_N_SEQUENCES,
  DataError,
  DataFileNotFoundError,
  IndexHeader,
  MMapIndexedDataset,
  batch_of_step,
  check_sequence_length,
  check_token_ids,
  parse_index_header,
  step_items,
  write_mmap_indexed_dataset,
)
from jax_pythia.data.sources import (
  ArrayTokenSource,
  MMapTokenSource,
  TextTokenSource,
  TokenSource,
  load_tokenizer,
)
from jax_pythia.suite import SEQUENCE_LENGTH, SEQUENCES_PER_STEP

__all__ = [
  "DEFAULT_N_SEQUENCES",
  "ArrayTokenSource",
  "DataError",
  "DataFileNotFoundError",
  "IndexHeader",
  "MMapIndexedDataset",
  "MMapTokenSource",
  "TextTokenSource",
  "TokenSource",
  "batch_of_step",
  "check_sequence_length",
  "check_token_ids",
  "load_tokenizer",
  "open_token_source",
  "parse_index_header",
  "step_items",
  "streams",
  "write_mmap_indexed_dataset",
]


def open_token_source(
  path: str | os.PathLike,
  tokenizer=None,
  seq_len: int | None = None,
  sequences_per_step: int = SEQUENCES_PER_STEP,
  fixed_step: int | None = None,
  timeout_s: float | None = None,
) -> TokenSource:
  """Opens a token source by its path or URL.

  - a URL (`hf://datasets/EleutherAI/pile-deduped-pythia-preshuffled`, `gs://...`, any
    fsspec URL, or `http(s)://.../document-00000-of-00020.bin`) or a local folder of
    unjoined shards: the training stream read by byte range (`streams`);
  - a folder staged by `tools.fetch_data`: the batches it holds (`streams`);

  - `<prefix>.bin`, `<prefix>.idx` or `<prefix>` (with `<prefix>.idx` beside it): the
    training stream, `MMapTokenSource` (`sequences_per_step` and `fixed_step` apply).
  - `*.npy`: an int array [n, seq_len] of inputs, `ArrayTokenSource`.
  - `*.txt`: text plus `tokenizer` (a tokenizer.json path or Tokenizer), `TextTokenSource`
    (`seq_len` defaults to Pythia's 2,048).
  Only the training stream has `batch(step)`; the others raise there. `timeout_s`: how
  long a remote stream's read may wait for its server (each attempt; `streams`).
  """
  text = os.fspath(path)
  if streams.is_stream_location(text):
    options = {} if timeout_s is None else {"timeout_s": timeout_s}
    return streams.open_stream_source(
      text, sequences_per_step=sequences_per_step, seq_len=seq_len, fixed_step=fixed_step, **options
    )
  if text.endswith(".npy"):
    return ArrayTokenSource(path, seq_len)
  if text.endswith(".txt"):
    return TextTokenSource(path, tokenizer, SEQUENCE_LENGTH if seq_len is None else seq_len)
  if text.endswith((".bin", ".idx")) or Path(f"{text}.idx").exists():
    return MMapTokenSource(path, sequences_per_step, seq_len, fixed_step)
  if not Path(text).exists():
    raise DataFileNotFoundError(
      f"token source {text} not found (nor {text}.idx): expected a Megatron <prefix>.bin/"
      f".idx pair or its prefix, a .npy token array, or a .txt file"
    )
  raise DataError(
    f"token source {text} is of an unknown kind: expected a Megatron <prefix>.bin/.idx "
    f"pair or its prefix, a .npy token array, or a .txt file (with a tokenizer.json)"
  )
