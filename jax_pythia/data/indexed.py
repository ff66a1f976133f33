"""Token sources: Pythia's training stream (Megatron MMapIndexedDataset), .npy arrays, text.

The training stream is the pre-shuffled, pre-tokenized Pile in Megatron's
"MMapIndexedDataset" format (docs/pythia.md: the training data and the batch of a step):

- `<prefix>.idx`: magic `MMIDIDX\\x00\\x00` (9 bytes), version u64 LE (= 1), dtype code u8,
  item count u64, doc count u64, then `sizes` int32[count], `pointers` int64[count] (byte
  offsets into .bin), `doc_idx` int64[doc count].
- `<prefix>.bin`: the tokens of all items back to back.

Each item is one training sequence of `seq_len + 1` tokens and the batch of step s is items
`s * sequences_per_step ...`. Files are memory-mapped: the Pile's .bin is hundreds of GB,
so nothing here reads more than the items asked for.

The sweep consumes every source through `TokenSource`: `batch(step, n)` is the training
batch of a step (gradient metrics), `fixed_inputs(n)` the inputs every checkpoint's
activations are taken on.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import DTypeLike

from jax_pythia.errors import JaxPythiaError
from jax_pythia.suite import SEQUENCES_PER_STEP

#: How many sequences of a batch the reference study feeds the model (docs/method.md).
DEFAULT_N_SEQUENCES = 128

MMAP_INDEX_MAGIC = b"MMIDIDX\x00\x00"
MMAP_INDEX_VERSION = 1
# magic, version u64, dtype code u8, item count u64, doc count u64
_INDEX_HEADER = struct.Struct("<9sQBQQ")
INDEX_HEADER_SIZE = _INDEX_HEADER.size

#: dtype codes of the .idx header, as docs/pythia.md documents them. (Megatron-core's own enum
#: has 6 = float64 and 7 = float32; float codes never occur in token files, and the
#: reader refuses float tokens anyway, so the difference cannot bite.)
DTYPE_CODES: dict[int, np.dtype] = {
  1: np.dtype(np.uint8),
  2: np.dtype(np.int8),
  3: np.dtype(np.int16),
  4: np.dtype(np.int32),
  5: np.dtype(np.int64),
  6: np.dtype(np.float32),
  7: np.dtype(np.float64),
  8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

_INT32_INFO = np.iinfo(np.int32)


class DataError(JaxPythiaError, ValueError):
  """A token file or token array that cannot be used as documented; names the file."""


class DataFileNotFoundError(DataError, FileNotFoundError):
  """A token file (or its .idx/.bin companion) that does not exist."""


# ----------------------------------------------------------------------------------------
# Megatron MMapIndexedDataset


def _dataset_prefix(path: str | os.PathLike) -> Path:
  """`x.bin`, `x.idx` or `x` -> `x` (names like `pile_0.87_deduped` keep their dots)."""
  text = os.fspath(path)
  for suffix in (".bin", ".idx"):
    if text.endswith(suffix):
      return Path(text[: -len(suffix)])
  return Path(text)


@dataclasses.dataclass(frozen=True)
class IndexHeader:
  """The fixed-size head of a `.idx` file and where its arrays lie (byte offsets)."""

  dtype: np.dtype
  count: int  # items
  doc_count: int

  @property
  def sizes_offset(self) -> int:
    return INDEX_HEADER_SIZE

  @property
  def pointers_offset(self) -> int:
    return self.sizes_offset + 4 * self.count

  @property
  def doc_idx_offset(self) -> int:
    return self.pointers_offset + 8 * self.count

  @property
  def nbytes(self) -> int:
    """The size of the whole .idx file this header announces."""
    return self.doc_idx_offset + 8 * self.doc_count


def parse_index_header(head: bytes, idx_name: str, idx_size: int | None = None) -> IndexHeader:
  """Checks the first `INDEX_HEADER_SIZE` bytes of a `.idx` (and, given `idx_size`, that the
  file is as long as the header announces); errors name `idx_name`. Shared by the local
  memory-mapped reader and the byte-range reader of remote streams (jax_pythia.data.streams)."""
  if len(head) < INDEX_HEADER_SIZE or (idx_size is not None and idx_size < INDEX_HEADER_SIZE):
    size = len(head) if idx_size is None else idx_size
    raise DataError(
      f"index file {idx_name} is {size} bytes, shorter than the "
      f"{INDEX_HEADER_SIZE}-byte MMapIndexedDataset header"
    )
  magic, version, dtype_code, count, doc_count = _INDEX_HEADER.unpack(head[:INDEX_HEADER_SIZE])
  if magic != MMAP_INDEX_MAGIC:
    raise DataError(
      f"index file {idx_name} does not start with the MMapIndexedDataset magic "
      f"{MMAP_INDEX_MAGIC!r} (found {magic!r}); is it a Megatron .idx file?"
    )
  if version != MMAP_INDEX_VERSION:
    raise DataError(
      f"index file {idx_name} has format version {version}; only version "
      f"{MMAP_INDEX_VERSION} is supported"
    )
  if dtype_code not in DTYPE_CODES:
    raise DataError(
      f"index file {idx_name} has unknown dtype code {dtype_code} (known: {sorted(DTYPE_CODES)})"
    )
  header = IndexHeader(DTYPE_CODES[dtype_code], count, doc_count)
  if idx_size is not None and idx_size < header.nbytes:
    raise DataError(
      f"index file {idx_name} is truncated: its header announces {count} items and "
      f"{doc_count} documents, which need {header.nbytes} bytes, but the file has {idx_size}"
    )
  return header


class MMapIndexedDataset:
  """Read-only, memory-mapped reader of a Megatron `<prefix>.idx` / `<prefix>.bin` pair.

  `dataset[i]` is item i's tokens (a read-only view into the mapped .bin, in the file's
  dtype). Opening checks the header and that the .bin holds the last item; reading an item
  checks that item's bounds, so a corrupt index never yields garbage silently.
  """

  def __init__(self, prefix: str | os.PathLike):
    self.prefix = _dataset_prefix(prefix)
    self.idx_path = Path(f"{self.prefix}.idx")
    self.bin_path = Path(f"{self.prefix}.bin")
    for path in (self.idx_path, self.bin_path):
      if not path.is_file():
        raise DataFileNotFoundError(
          f"Megatron dataset file {path} not found (a dataset is a <prefix>.idx and "
          f"<prefix>.bin pair)"
        )
    self._read_index()
    self._map_bin()

  def _read_index(self) -> None:
    idx_size = self.idx_path.stat().st_size
    with open(self.idx_path, "rb") as f:
      head = f.read(INDEX_HEADER_SIZE)
    header = parse_index_header(head, str(self.idx_path), idx_size)
    self.dtype = header.dtype
    # np.memmap cannot map an empty region; a header-only file has nothing to map.
    if header.nbytes > INDEX_HEADER_SIZE:
      buffer = np.memmap(self.idx_path, dtype=np.uint8, mode="r", shape=(header.nbytes,))
    else:
      buffer = np.zeros(header.nbytes, np.uint8)
    self._idx_buffer = buffer
    self.sizes: np.ndarray = np.frombuffer(buffer, np.int32, header.count, header.sizes_offset)
    self.pointers: np.ndarray = np.frombuffer(
      buffer, np.int64, header.count, header.pointers_offset
    )
    self.doc_idx: np.ndarray = np.frombuffer(
      buffer, np.int64, header.doc_count, header.doc_idx_offset
    )

  def _map_bin(self) -> None:
    self.bin_size = self.bin_path.stat().st_size
    if len(self) and self.bin_size:
      self._bin_buffer = np.memmap(self.bin_path, dtype=np.uint8, mode="r")
    else:
      self._bin_buffer = np.zeros(0, np.uint8)
    # Megatron writes items back to back, so the last item ends last; checking it is O(1)
    # where checking every pointer would read gigabytes of index for the Pile.
    if len(self):
      self._check_item_bounds(len(self) - 1)

  def _check_item_bounds(self, i: int) -> None:
    size, pointer = int(self.sizes[i]), int(self.pointers[i])
    end = pointer + size * self.dtype.itemsize
    if size < 0 or pointer < 0 or end > self.bin_size:
      raise DataError(
        f"data file {self.bin_path} is too short or its index {self.idx_path} is corrupt: "
        f"item {i} ({size} tokens at byte {pointer}) ends at byte {end}, but the .bin has "
        f"{self.bin_size} bytes"
      )

  def __len__(self) -> int:
    return len(self.sizes)

  def __getitem__(self, i: int) -> np.ndarray:
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f"item {i} is out of range: {self.bin_path} holds {len(self)} items")
    i %= len(self)
    self._check_item_bounds(i)
    return np.frombuffer(self._bin_buffer, self.dtype, int(self.sizes[i]), int(self.pointers[i]))

  def items(self, start: int, stop: int) -> list[np.ndarray]:
    return [self[i] for i in range(start, stop)]

  # What `batch_of_step` asks of any indexed stream (see `IndexedStream`).

  @property
  def name(self) -> str:
    return str(self.bin_path)

  def item_sizes(self, start: int, stop: int) -> np.ndarray:
    return np.asarray(self.sizes[start:stop])

  def read_items(self, start: int, stop: int) -> np.ndarray:
    return np.stack(self.items(start, stop))

  def __repr__(self) -> str:
    return f"MMapIndexedDataset({str(self.prefix)!r}, items={len(self)}, dtype={self.dtype})"


def write_mmap_indexed_dataset(
  prefix: str | os.PathLike,
  sequences: Iterable[np.ndarray],
  dtype: DTypeLike = np.uint16,
) -> int:
  """Writes `sequences` (1-D integer arrays) as `<prefix>.bin` + `<prefix>.idx`.

  Each sequence becomes one item and one document (doc_idx = 0, 1, ..., count). Both files
  are written under temporary names and renamed into place, .bin first, so a reader never
  sees an index without its complete data. Returns the number of items.
  """
  dtype = np.dtype(dtype)
  if dtype not in _CODE_OF_DTYPE or dtype.kind not in "iu":
    raise DataError(
      f"cannot write tokens as {dtype}: use an integer dtype of "
      f"{sorted(str(d) for d in DTYPE_CODES.values() if d.kind in 'iu')}"
    )
  prefix = _dataset_prefix(prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
  tag = f".tmp-{os.getpid()}"
  bin_tmp, idx_tmp = Path(f"{bin_path}{tag}"), Path(f"{idx_path}{tag}")
  limits = np.iinfo(dtype)
  sizes: list[int] = []
  try:
    with open(bin_tmp, "wb") as bin_file:
      for i, sequence in enumerate(sequences):
        tokens = np.asarray(sequence)
        if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
          raise DataError(
            f"writing {bin_path}: sequence {i} must be a 1-D integer array, got "
            f"shape {tokens.shape} dtype {tokens.dtype}"
          )
        if tokens.size and (tokens.min() < limits.min or tokens.max() > limits.max):
          raise DataError(
            f"writing {bin_path}: sequence {i} holds ids in [{tokens.min()}, "
            f"{tokens.max()}], outside the range of {dtype}"
          )
        bin_file.write(tokens.astype(dtype).tobytes())
        sizes.append(tokens.size)
    count = len(sizes)
    sizes_array = np.asarray(sizes, np.int32)
    pointers = np.zeros(count, np.int64)
    pointers[1:] = np.cumsum(sizes_array[:-1], dtype=np.int64) * dtype.itemsize
    doc_idx = np.arange(count + 1, dtype=np.int64)
    with open(idx_tmp, "wb") as idx_file:
      idx_file.write(
        _INDEX_HEADER.pack(
          MMAP_INDEX_MAGIC, MMAP_INDEX_VERSION, _CODE_OF_DTYPE[dtype], count, len(doc_idx)
        )
      )
      idx_file.write(sizes_array.astype("<i4").tobytes())
      idx_file.write(pointers.astype("<i8").tobytes())
      idx_file.write(doc_idx.astype("<i8").tobytes())
    os.replace(bin_tmp, bin_path)
    os.replace(idx_tmp, idx_path)
  finally:
    for leftover in (bin_tmp, idx_tmp):
      leftover.unlink(missing_ok=True)
  return count


def to_int32_tokens(tokens: np.ndarray, source_name: str) -> np.ndarray:
  """Casts token ids to int32 (what the model's embedding lookup takes), refusing floats
  and ids that int32 cannot hold rather than wrapping them around."""
  if tokens.dtype.kind not in "iu":
    raise DataError(f"{source_name} holds {tokens.dtype} values; token ids must be integers")
  if tokens.dtype.itemsize >= 4 and tokens.size and tokens.dtype != np.int32:
    low, high = tokens.min(), tokens.max()
    if low < _INT32_INFO.min or high > _INT32_INFO.max:
      raise DataError(f"{source_name} holds ids in [{low}, {high}], beyond int32")
  return tokens.astype(np.int32)


@runtime_checkable
class IndexedStream(Protocol):
  """A Megatron-indexed stream of items, local (`MMapIndexedDataset`) or read by byte range
  (`jax_pythia.data.streams.ShardedStream`): what `batch_of_step` needs."""

  name: str

  def __len__(self) -> int: ...

  def item_sizes(self, start: int, stop: int) -> np.ndarray:
    """Tokens of items start .. stop-1."""
    ...

  def read_items(self, start: int, stop: int) -> np.ndarray:
    """Items start .. stop-1 (of equal length), in the file's dtype: [stop - start, length]."""
    ...


def step_items(
  step: int, n_sequences: int, sequences_per_step: int = SEQUENCES_PER_STEP
) -> tuple[int, int]:
  """Items [start, stop) of the first `n_sequences` sequences of training step `step`.

  Step s trained on items `s * sequences_per_step ... (s + 1) * sequences_per_step - 1`
  (Pythia: 1024 a step, so step 142,999 is items 146,430,976 ...).
  """
  if step < 0:
    raise DataError(f"step must be >= 0, got {step}")
  if not 1 <= n_sequences <= sequences_per_step:
    raise DataError(
      f"n_sequences must be in 1..{sequences_per_step} (the sequences of one step), "
      f"got {n_sequences}"
    )
  start = step * sequences_per_step
  return start, start + n_sequences


def batch_of_step(
  dataset: IndexedStream,
  step: int,
  n_sequences: int = DEFAULT_N_SEQUENCES,
  sequences_per_step: int = SEQUENCES_PER_STEP,
) -> np.ndarray:
  """The first `n_sequences` sequences of training step `step`: int32 [n, seq_len + 1]
  (items `step_items(step, n_sequences, sequences_per_step)`)."""
  start, stop = step_items(step, n_sequences, sequences_per_step)
  if stop > len(dataset):
    raise DataError(
      f"data file {dataset.name} holds {len(dataset)} items; step {step} needs items "
      f"{start}..{stop - 1} ({sequences_per_step} sequences a step)"
    )
  sizes = dataset.item_sizes(start, stop)
  if sizes.min() != sizes.max():
    raise DataError(
      f"data file {dataset.name}: items {start}..{stop - 1} (step {step}) have unequal "
      f"lengths ({sizes.min()}..{sizes.max()} tokens); training sequences must all have "
      f"seq_len + 1 tokens"
    )
  return to_int32_tokens(dataset.read_items(start, stop), f"data file {dataset.name}")


def check_token_ids(tokens: np.ndarray, vocab_size: int, source_name: str) -> None:
  """Raises DataError if any id is outside [0, vocab_size), naming the source and the id.

  An embedding lookup (jnp.take) clamps or wraps out-of-range ids silently, so a tokenizer
  or file that does not match the model would otherwise give plausible-looking nonsense.
  """
  tokens = np.asarray(tokens)
  if tokens.size and tokens.dtype.kind not in "iu":
    raise DataError(f"{source_name}: token ids must be integers, got {tokens.dtype}")
  if not tokens.size:
    return
  bad = (tokens < 0) | (tokens >= vocab_size)
  if bad.any():
    position = tuple(int(i) for i in np.argwhere(bad)[0])
    raise DataError(
      f"{source_name}: token id {tokens[position]} at index {position} is outside the "
      f"model's vocabulary [0, {vocab_size}) ({int(bad.sum())} ids out of range); does "
      f"the data match the model's tokenizer?"
    )


def check_sequence_length(
  tokens: np.ndarray, max_seq_len: int, model_name: str, source_name: str
) -> None:
  """Raises DataError if sequences are longer than the model's max_position_embeddings.

  Rotary attention would run on them, but the model never saw such positions in training.
  """
  length = np.shape(tokens)[-1]
  if length > max_seq_len:
    raise DataError(
      f"{source_name}: sequences of {length} tokens; {model_name} takes at most "
      f"{max_seq_len} (max_position_embeddings)"
    )
