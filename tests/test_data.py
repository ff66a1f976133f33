"""Token sources: the Megatron format is written byte by byte from docs/pythia.md's description
(independently of the project's writer), and tokenization is checked against `tokenizers`."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from jax_pythia import data
from jax_pythia.data import (
  ArrayTokenSource,
  DataError,
  DataFileNotFoundError,
  MMapIndexedDataset,
  MMapTokenSource,
  TextTokenSource,
  TokenSource,
  batch_of_step,
  check_token_ids,
  open_token_source,
  write_mmap_indexed_dataset,
)
from jax_pythia.errors import JaxPythiaError

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER_JSON = SHARED / "data" / "20B_tokenizer.json"

UINT16_CODE = 8
INT32_CODE = 4


def write_megatron_by_hand(
  prefix: Path,
  items: list[list[int]],
  dtype_code: int = UINT16_CODE,
  token_format: str = "<H",
  magic: bytes = b"MMIDIDX\x00\x00",
  version: int = 1,
) -> None:
  """The format of docs/pythia.md, spelled out with struct: no numpy, no project code."""
  token_size = struct.calcsize(token_format)
  bin_bytes = b"".join(struct.pack(token_format, t) for item in items for t in item)
  sizes = [len(item) for item in items]
  pointers, offset = [], 0
  for size in sizes:
    pointers.append(offset)
    offset += size * token_size
  doc_idx = list(range(len(items) + 1))
  idx_bytes = (
    magic
    + struct.pack("<Q", version)
    + struct.pack("<B", dtype_code)
    + struct.pack("<Q", len(items))
    + struct.pack("<Q", len(doc_idx))
    + struct.pack(f"<{len(sizes)}i", *sizes)
    + struct.pack(f"<{len(pointers)}q", *pointers)
    + struct.pack(f"<{len(doc_idx)}q", *doc_idx)
  )
  Path(f"{prefix}.bin").write_bytes(bin_bytes)
  Path(f"{prefix}.idx").write_bytes(idx_bytes)


def stream_items(n_items: int, item_len: int) -> list[list[int]]:
  """Item i holds 1000*i, 1000*i + 1, ...: every token says which item it came from."""
  return [[1000 * i + j for j in range(item_len)] for i in range(n_items)]


def test_reader_reads_hand_written_file(tmp_path):
  items = [[5, 6, 7], [65535, 0], [], [42] * 5]
  write_megatron_by_hand(tmp_path / "toy", items)
  dataset = MMapIndexedDataset(tmp_path / "toy")
  assert len(dataset) == 4
  assert dataset.dtype == np.uint16
  assert list(dataset.sizes) == [3, 2, 0, 5]
  assert list(dataset.pointers) == [0, 6, 10, 10]
  assert list(dataset.doc_idx) == [0, 1, 2, 3, 4]
  for i, item in enumerate(items):
    assert dataset[i].tolist() == item
  assert dataset[-1].tolist() == [42] * 5
  with pytest.raises(IndexError):
    dataset[4]
  # Either companion file or the bare prefix opens the same dataset.
  assert MMapIndexedDataset(tmp_path / "toy.bin")[1].tolist() == [65535, 0]
  assert MMapIndexedDataset(f"{tmp_path}/toy.idx")[0].tolist() == [5, 6, 7]


def test_reader_reads_int32_tokens(tmp_path):
  items = [[-1, 2**31 - 1], [70000]]
  write_megatron_by_hand(tmp_path / "wide", items, dtype_code=INT32_CODE, token_format="<i")
  dataset = MMapIndexedDataset(tmp_path / "wide")
  assert dataset.dtype == np.int32
  assert [dataset[i].tolist() for i in range(2)] == items


def test_writer_matches_hand_written_bytes(tmp_path):
  items = [[1, 2, 3], [50276, 0], [9]]
  write_megatron_by_hand(tmp_path / "by_hand", items)
  count = write_mmap_indexed_dataset(tmp_path / "written", (np.array(i) for i in items))
  assert count == 3
  for suffix in (".bin", ".idx"):
    assert (tmp_path / f"written{suffix}").read_bytes() == (
      tmp_path / f"by_hand{suffix}"
    ).read_bytes()
  # No temporary files are left behind.
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    "by_hand.bin",
    "by_hand.idx",
    "written.bin",
    "written.idx",
  ]


def test_writer_round_trips_int32(tmp_path):
  rng = np.random.default_rng(0)
  items = [rng.integers(0, 100_000, size=n) for n in (7, 1, 0, 300)]
  write_mmap_indexed_dataset(tmp_path / "x", items, dtype=np.int32)
  dataset = MMapIndexedDataset(tmp_path / "x")
  assert dataset.dtype == np.int32
  for i, item in enumerate(items):
    np.testing.assert_array_equal(dataset[i], item)


def test_writer_refuses_ids_beyond_dtype_and_leaves_nothing(tmp_path):
  with pytest.raises(DataError, match=r"sequence 1 .*outside the range of uint16"):
    write_mmap_indexed_dataset(tmp_path / "bad", [np.array([1]), np.array([70000])])
  with pytest.raises(DataError, match="1-D integer"):
    write_mmap_indexed_dataset(tmp_path / "bad", [np.array([1.5])])
  assert list(tmp_path.iterdir()) == []


def test_batch_of_step_picks_items_of_the_step(tmp_path):
  sequences_per_step, item_len = 4, 6
  write_megatron_by_hand(tmp_path / "stream", stream_items(12, item_len))
  dataset = MMapIndexedDataset(tmp_path / "stream")
  batch = batch_of_step(dataset, step=2, n_sequences=3, sequences_per_step=sequences_per_step)
  assert batch.dtype == np.int32 and batch.shape == (3, item_len)
  # Step 2 with 4 sequences a step is items 8, 9, 10.
  expected = [[1000 * i + j for j in range(item_len)] for i in (8, 9, 10)]
  assert batch.tolist() == expected
  first = batch_of_step(dataset, 0, 4, sequences_per_step)
  assert first[:, 0].tolist() == [0, 1000, 2000, 3000]


def test_batch_of_step_too_short_names_file_and_items(tmp_path):
  write_megatron_by_hand(tmp_path / "short", stream_items(10, 3))
  dataset = MMapIndexedDataset(tmp_path / "short")
  message = rf"data file {tmp_path}/short\.bin holds 10 items; step 2 needs items 8\.\.11"
  with pytest.raises(DataError, match=message):
    batch_of_step(dataset, 2, 4, sequences_per_step=4)
  with pytest.raises(DataError, match="n_sequences"):
    batch_of_step(dataset, 0, 5, sequences_per_step=4)


def test_batch_of_step_unequal_lengths(tmp_path):
  write_megatron_by_hand(tmp_path / "ragged", [[1, 2, 3], [4, 5]])
  dataset = MMapIndexedDataset(tmp_path / "ragged")
  with pytest.raises(DataError, match=r"ragged\.bin.*unequal lengths \(2\.\.3 tokens\)"):
    batch_of_step(dataset, 0, 2, sequences_per_step=2)


def test_bad_magic_names_idx_file(tmp_path):
  write_megatron_by_hand(tmp_path / "m", [[1, 2]], magic=b"NOTMAGIC!")
  with pytest.raises(DataError, match=rf"{tmp_path}/m\.idx does not start with the .*magic"):
    MMapIndexedDataset(tmp_path / "m")


def test_bad_version_and_dtype_code(tmp_path):
  write_megatron_by_hand(tmp_path / "v", [[1]], version=2)
  with pytest.raises(DataError, match=r"v\.idx has format version 2"):
    MMapIndexedDataset(tmp_path / "v")
  write_megatron_by_hand(tmp_path / "d", [[1]], dtype_code=9)
  with pytest.raises(DataError, match=r"d\.idx has unknown dtype code 9"):
    MMapIndexedDataset(tmp_path / "d")


def test_truncated_bin_names_bin_file(tmp_path):
  write_megatron_by_hand(tmp_path / "t", stream_items(3, 4))
  bin_path = tmp_path / "t.bin"
  bin_path.write_bytes(bin_path.read_bytes()[:-2])  # lose the last uint16 token
  with pytest.raises(DataError, match=rf"data file {bin_path} is too short.*22 bytes"):
    MMapIndexedDataset(tmp_path / "t")


def test_truncated_idx_names_idx_file(tmp_path):
  write_megatron_by_hand(tmp_path / "i", stream_items(3, 4))
  idx_path = tmp_path / "i.idx"
  idx_path.write_bytes(idx_path.read_bytes()[:-8])
  with pytest.raises(DataError, match=rf"index file {idx_path} is truncated"):
    MMapIndexedDataset(tmp_path / "i")
  idx_path.write_bytes(b"MMIDIDX")
  with pytest.raises(DataError, match="shorter than the 34-byte"):
    MMapIndexedDataset(tmp_path / "i")


def test_missing_companion_file(tmp_path):
  write_megatron_by_hand(tmp_path / "c", [[1]])
  (tmp_path / "c.bin").unlink()
  with pytest.raises(DataFileNotFoundError, match=rf"{tmp_path}/c\.bin not found"):
    MMapIndexedDataset(tmp_path / "c")
  assert issubclass(DataFileNotFoundError, FileNotFoundError)
  assert issubclass(DataFileNotFoundError, ValueError)
  assert issubclass(DataFileNotFoundError, JaxPythiaError)


def test_mmap_token_source(tmp_path):
  write_megatron_by_hand(tmp_path / "toy_stream", stream_items(10, 5))
  source = open_token_source(tmp_path / "toy_stream", sequences_per_step=3)
  assert isinstance(source, MMapTokenSource) and isinstance(source, TokenSource)
  assert source.has_training_steps and source.seq_len == 4
  assert source.batch(1, 2).tolist() == [
    [3000, 3001, 3002, 3003, 3004],
    [4000, 4001, 4002, 4003, 4004],
  ]
  # 10 items of 3 a step hold steps 0..2: fixed inputs come from step 2 (items 6, 7).
  assert source.fixed_step == 2
  assert source.fixed_inputs(2).tolist() == [[6000, 6001, 6002, 6003], [7000, 7001, 7002, 7003]]
  short = open_token_source(tmp_path / "toy_stream.bin", seq_len=2, sequences_per_step=3)
  assert short.batch(0, 1).tolist() == [[0, 1, 2]]
  assert short.fixed_inputs(1).tolist() == [[6000, 6001]]
  with pytest.raises(DataError, match="seq_len=5"):
    open_token_source(tmp_path / "toy_stream.idx", seq_len=5)


def test_mmap_source_fixed_step_never_passes_pythias_last_step(tmp_path):
  # A file with one sequence a step and more steps than Pythia: the reference study's
  # activation batch is step 142,999, the last one Pythia trained on.
  n_items = 143_002
  write_mmap_indexed_dataset(tmp_path / "long", (np.array([i % 60000, 1]) for i in range(n_items)))
  source = MMapTokenSource(tmp_path / "long", sequences_per_step=1)
  assert source.fixed_step == 142_999
  assert source.fixed_inputs(1).tolist() == [[142_999 % 60000]]


def test_npy_source(tmp_path):
  tokens = np.arange(24, dtype=np.int64).reshape(4, 6)
  np.save(tmp_path / "inputs.npy", tokens)
  source = open_token_source(tmp_path / "inputs.npy")
  assert isinstance(source, ArrayTokenSource) and not source.has_training_steps
  inputs = source.fixed_inputs(3)
  assert inputs.dtype == np.int32 and inputs.tolist() == tokens[:3].tolist()
  assert open_token_source(tmp_path / "inputs.npy", seq_len=2).fixed_inputs(1).tolist() == [[0, 1]]
  with pytest.raises(DataError, match=r"inputs\.npy has no training-step order.*step 7"):
    source.batch(7, 2)
  with pytest.raises(DataError, match="holds 4 sequences; 5 were requested"):
    source.fixed_inputs(5)
  np.save(tmp_path / "flat.npy", np.arange(5))
  with pytest.raises(DataError, match=r"flat\.npy has shape \(5,\)"):
    open_token_source(tmp_path / "flat.npy")
  np.save(tmp_path / "float.npy", np.ones((2, 2)))
  with pytest.raises(DataError, match="float64 values"):
    open_token_source(tmp_path / "float.npy")


def test_factory_errors_name_the_path(tmp_path):
  with pytest.raises(DataFileNotFoundError, match=rf"{tmp_path}/nothing not found"):
    open_token_source(tmp_path / "nothing")
  with pytest.raises(DataFileNotFoundError, match=rf"{tmp_path}/nothing\.npy not found"):
    open_token_source(tmp_path / "nothing.npy")
  (tmp_path / "weights.parquet").write_bytes(b"x")
  with pytest.raises(DataError, match=rf"{tmp_path}/weights\.parquet is of an unknown kind"):
    open_token_source(tmp_path / "weights.parquet")
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(DataError, match="needs a tokenizer"):
    open_token_source(tmp_path / "notes.txt")
  with pytest.raises(DataFileNotFoundError, match=rf"{tmp_path}/tok\.json not found"):
    open_token_source(tmp_path / "notes.txt", tokenizer=tmp_path / "tok.json")


def test_check_token_ids():
  check_token_ids(np.array([[0, 50303]]), 50304, "batch")
  with pytest.raises(DataError, match=r"my\.npy: token id 50304 at index \(1, 0\).*\[0, 50304\)"):
    check_token_ids(np.array([[0, 1], [50304, 2]]), 50304, "my.npy")
  with pytest.raises(DataError, match=r"token id -1 at index \(2,\)"):
    check_token_ids(np.array([3, 4, -1]), 10, "x")
  check_token_ids(np.zeros((0, 5), np.int32), 10, "empty")


@pytest.fixture(scope="module")
def pythia_tokenizer():
  if not TOKENIZER_JSON.is_file():
    pytest.skip(f"{TOKENIZER_JSON} is absent (needs ../shared beside the checkout)")
  tokenizers = pytest.importorskip("tokenizers")
  return tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))


def test_text_source_matches_tokenizers(tmp_path, pythia_tokenizer):
  text = (
    "The Pythia suite trains sixteen models on the same data in the same order.\n"
    "Small models get worse late in training, while large ones keep improving. "
  ) * 4
  (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
  expected_ids = pythia_tokenizer.encode(text, add_special_tokens=False).ids
  seq_len = 9
  source = open_token_source(tmp_path / "corpus.txt", tokenizer=TOKENIZER_JSON, seq_len=seq_len)
  assert isinstance(source, TextTokenSource) and not source.has_training_steps
  n_rows = len(expected_ids) // (seq_len + 1)
  assert source.rows.shape == (n_rows, seq_len + 1)
  assert source.rows.ravel().tolist() == expected_ids[: n_rows * (seq_len + 1)]
  inputs = source.fixed_inputs(2)
  assert inputs.dtype == np.int32
  assert inputs.tolist() == [expected_ids[0:9], expected_ids[10:19]]
  # Independent anchor: "The" is id 510 in the GPT-NeoX-20B vocabulary.
  assert pythia_tokenizer.token_to_id("The") == 510 and expected_ids[0] == 510
  check_token_ids(source.rows, 50_304, source.name)
  # A Tokenizer object works as well as a path.
  same = data.TextTokenSource(tmp_path / "corpus.txt", pythia_tokenizer, seq_len)
  np.testing.assert_array_equal(same.rows, source.rows)


def test_text_source_too_short(tmp_path, pythia_tokenizer):
  (tmp_path / "tiny.txt").write_text("Hi", encoding="utf-8")
  with pytest.raises(DataError, match=r"tiny\.txt tokenizes to 1 tokens"):
    TextTokenSource(tmp_path / "tiny.txt", pythia_tokenizer, seq_len=8)
