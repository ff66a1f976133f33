"""Token sources a sweep or a capture reads: the training stream (`MMapTokenSource`, the
batch of any step), fixed input arrays (`ArrayTokenSource`) and tokenized text
(`TextTokenSource`), all behind `TokenSource`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from jax_pythia.data.indexed import (
  DataError,
  DataFileNotFoundError,
  IndexedStream,
  MMapIndexedDataset,
  batch_of_step,
  to_int32_tokens,
)
from jax_pythia.suite import FINAL_STEP, SEQUENCE_LENGTH, SEQUENCES_PER_STEP


@runtime_checkable
class TokenSource(Protocol):
  """Where the sweep takes its tokens from.

  `seq_len` is the model's input length; `batch` rows carry one more token (the next-token
  target of the last position), as Pythia's 2,049-token training sequences do.
  """

  name: str
  seq_len: int
  #: False when the source has no training order, so `batch` raises (check before a sweep).
  has_training_steps: bool

  def batch(self, step: int, n_sequences: int) -> np.ndarray:
    """The batch of training step `step` (first `n_sequences`): int32 [n, seq_len + 1]."""
    ...

  def fixed_inputs(self, n_sequences: int) -> np.ndarray:
    """The inputs activations are compared on, the same for every checkpoint: int32 [n, seq_len]."""
    ...


def _take_rows(rows: np.ndarray, n_sequences: int, source_name: str) -> np.ndarray:
  if not 1 <= n_sequences <= len(rows):
    raise DataError(f"{source_name} holds {len(rows)} sequences; {n_sequences} were requested")
  return rows[:n_sequences]


def _checked_seq_len(seq_len: int | None, available: int, source_name: str) -> int:
  """`seq_len` if the source's sequences are long enough (they are cut to it), else error."""
  if seq_len is None:
    return available
  if not 1 <= seq_len <= available:
    raise DataError(
      f"{source_name} has sequences of {available} input tokens; seq_len={seq_len} asks for "
      f"more (or is < 1)"
    )
  return seq_len


class MMapTokenSource:
  """Pythia's training stream (or a toy suite's, written by `write_mmap_indexed_dataset`),
  from a local `.bin/.idx` pair or any `IndexedStream` (jax_pythia.streams: the Hub, fsspec
  URLs, a folder of unjoined shards).

  `batch(step, n)` is exactly what the model trained on at `step`. `fixed_inputs(n)` are the
  inputs of the batch of `fixed_step`; by default the last step whose batch the file holds,
  but never past Pythia's last training step 142,999 (the reference study's choice).
  A `seq_len` shorter than the file's keeps the first `seq_len + 1` tokens of each sequence.
  """

  has_training_steps = True

  def __init__(
    self,
    dataset: MMapIndexedDataset | str | os.PathLike,
    sequences_per_step: int = SEQUENCES_PER_STEP,
    seq_len: int | None = None,
    fixed_step: int | None = None,
  ):
    self.dataset: IndexedStream = (
      MMapIndexedDataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    )
    self.name = self.dataset.name
    if sequences_per_step < 1:
      raise DataError(f"sequences_per_step must be >= 1, got {sequences_per_step}")
    self.sequences_per_step = sequences_per_step
    if not len(self.dataset):
      raise DataError(f"data file {self.name} holds no items")
    # Item 0 stands for all: batch_of_step checks each batch's lengths when it reads it.
    self.seq_len = _checked_seq_len(seq_len, int(self.dataset.item_sizes(0, 1)[0]) - 1, self.name)
    self.n_steps = len(self.dataset) // sequences_per_step
    if fixed_step is None:
      fixed_step = min(self.n_steps, FINAL_STEP) - 1
    self.fixed_step = fixed_step

  def batch(self, step: int, n_sequences: int) -> np.ndarray:
    tokens = batch_of_step(self.dataset, step, n_sequences, self.sequences_per_step)
    return tokens[:, : self.seq_len + 1]

  def fixed_inputs(self, n_sequences: int) -> np.ndarray:
    if self.fixed_step < 0:
      raise DataError(
        f"data file {self.name} holds {len(self.dataset)} items, less than one step of "
        f"{self.sequences_per_step} sequences"
      )
    return self.batch(self.fixed_step, n_sequences)[:, :-1]

  def __repr__(self) -> str:
    return (
      f"MMapTokenSource({self.name!r}, sequences_per_step={self.sequences_per_step}, "
      f"seq_len={self.seq_len}, fixed_step={self.fixed_step})"
    )


class _NoTrainingSteps:
  """Shared by sources that are plain token arrays: they have no training order."""

  has_training_steps = False
  name: str

  def batch(self, step: int, n_sequences: int) -> np.ndarray:
    # Handing out some slice for every step would let gradient metrics run on batches that
    # are not the step's, and look fine; refusing is the honest answer.
    raise DataError(
      f"token source {self.name} has no training-step order, so it has no batch of step "
      f"{step}; gradient metrics need the training stream (a Megatron .bin/.idx pair, "
      f"see write_mmap_indexed_dataset)"
    )


class ArrayTokenSource(_NoTrainingSteps):
  """A `.npy` int array [n_sequences, seq_len] of input sequences, used as given.

  `fixed_inputs(n)` is its first n rows (cut to `seq_len` columns if given); `batch` raises.
  """

  def __init__(self, path: str | os.PathLike, seq_len: int | None = None):
    self.name = os.fspath(path)
    try:
      array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
      raise DataFileNotFoundError(f"token array {self.name} not found") from None
    except (ValueError, EOFError) as error:  # EOFError: an empty file (/dev/null)
      why = error or "it is empty"
      raise DataError(f"token array {self.name} is not a readable .npy file: {why}") from None
    if array.ndim != 2 or 0 in array.shape:
      raise DataError(
        f"token array {self.name} has shape {array.shape}; expected [n_sequences, seq_len], "
        f"both at least 1"
      )
    self.tokens = to_int32_tokens(np.asarray(array), f"token array {self.name}")
    self.seq_len = _checked_seq_len(seq_len, self.tokens.shape[1], self.name)

  def fixed_inputs(self, n_sequences: int) -> np.ndarray:
    return _take_rows(self.tokens, n_sequences, self.name)[:, : self.seq_len]


class TextTokenSource(_NoTrainingSteps):
  """A text file tokenized whole with a `tokenizer.json`, cut into sequences.

  The token stream is chopped into consecutive, non-overlapping rows of `seq_len + 1`
  tokens (the tail that does not fill a row is dropped); `fixed_inputs(n)` is the first
  `seq_len` tokens of the first n rows. No special tokens are added: Pythia trained on raw
  concatenated text with no BOS. `batch` raises.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    tokenizer,
    seq_len: int = SEQUENCE_LENGTH,
  ):
    self.name = os.fspath(path)
    if seq_len < 1:
      raise DataError(f"seq_len must be >= 1, got {seq_len}")
    self.seq_len = seq_len
    if not Path(path).is_file():
      raise DataFileNotFoundError(f"text file {self.name} not found")
    self.tokenizer = load_tokenizer(tokenizer)
    text = Path(path).read_text(encoding="utf-8")
    ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    row_len = seq_len + 1
    n_rows = len(ids) // row_len
    if n_rows == 0:
      raise DataError(
        f"text file {self.name} tokenizes to {len(ids)} tokens, fewer than one sequence "
        f"of seq_len + 1 = {row_len}"
      )
    self.rows = ids[: n_rows * row_len].reshape(n_rows, row_len)

  def fixed_inputs(self, n_sequences: int) -> np.ndarray:
    return _take_rows(self.rows, n_sequences, self.name)[:, :-1]


def load_tokenizer(tokenizer):
  """A `tokenizers.Tokenizer`, given one or the path of a `tokenizer.json`."""
  import tokenizers

  if isinstance(tokenizer, tokenizers.Tokenizer):
    return tokenizer
  if tokenizer is None:
    raise DataError("a text token source needs a tokenizer (the model's tokenizer.json)")
  path = Path(tokenizer)
  if not path.is_file():
    raise DataFileNotFoundError(f"tokenizer file {path} not found")
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as error:  # tokenizers raises a bare Exception for malformed files
    raise DataError(f"tokenizer file {path} does not load: {error}") from None
