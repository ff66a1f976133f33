"""OLMo's training batches (jax_pythia.data.olmo) against files written in OLMo's documented
format: headerless token memmaps cut into max_sequence_length instances, a headerless uint32
global_indices.npy, and batch s = global_indices[s*B:(s+1)*B] (docs/suites.md)."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import yaml

from jax_pythia.checkpoints import sources
from jax_pythia.data import DataError, olmo

L = 8  # max_sequence_length
B = 3  # global_train_batch_size
# Tokens per file: 5 instances + 3 left over, 2 exactly, 4 + 7 left over (dropped).
FILE_TOKENS = (5 * L + 3, 2 * L, 4 * L + 7)


def _expected_instances(files: list[np.ndarray]) -> np.ndarray:
  """Every instance [N, L], numbered across the files in order (written from the format)."""
  return np.concatenate([f[: len(f) // L * L].reshape(-1, L) for f in files])


@pytest.fixture
def olmo_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PYTHIA_DATA_CACHE", str(tmp_path / "cache"))
  rng = np.random.default_rng(0)
  files = [rng.integers(0, 50_000, n).astype(np.uint16) for n in FILE_TOKENS]
  for i, tokens in enumerate(files):
    tokens.tofile(tmp_path / f"part-{i:03d}-00000.npy")  # raw, no .npy header (np.memmap)
  order = np.concatenate([rng.permutation(11), [4, 9]]).astype(np.uint32)  # padded to 13
  order.tofile(tmp_path / "global_indices.npy")
  config = {
    "model": {"max_sequence_length": L, "d_model": 16},
    "global_train_batch_size": B,
    "data": {"paths": [f"part-{i:03d}-00000.npy" for i in range(3)], "memmap_dtype": "uint16"},
  }
  (tmp_path / "OLMo-tiny.yaml").write_text(yaml.safe_dump(config))
  return tmp_path, files, order


def test_batches_of_steps(olmo_dir):
  root, files, order = olmo_dir
  table = _expected_instances(files)
  assert len(table) == 11
  source = sources.open_data(f"olmo:{root / 'OLMo-tiny.yaml'}", [], None, None)
  assert (source.seq_len, source.n_steps, source.has_training_steps) == (L - 1, 4, True)
  for step in range(4):
    np.testing.assert_array_equal(source.batch(step, B), table[order[step * B : step * B + B]])
  np.testing.assert_array_equal(source.batch(2, 2), table[order[6:8]])
  # The batch of step 1 by hand: instances order[3], order[4], order[5].
  assert source.batch(1, B).dtype == np.int32
  np.testing.assert_array_equal(source.fixed_inputs(2), table[order[9:11], :-1])
  with pytest.raises(DataError, match="orders 4 batches of 3; step 4 is past its end"):
    source.batch(4, 1)
  with pytest.raises(DataError, match="n_sequences must be in 1..3"):
    source.batch(0, 4)
  # Read once: with the token files gone, a rerun's batches come from the cache.
  for i in range(3):
    (root / f"part-{i:03d}-00000.npy").unlink()
  again = sources.open_data(f"olmo:{root / 'OLMo-tiny.yaml'}", [], None, None)
  np.testing.assert_array_equal(again.batch(1, 2), table[order[3:5]])
  assert len(list((root / "cache" / "olmo").glob("*/step-*.npy"))) == 4


def test_byte_ranges_through_fsspec_and_an_explicit_order(olmo_dir):
  root, files, order = olmo_dir
  memory = fsspec.filesystem("memory")
  for i, tokens in enumerate(files):
    memory.pipe(f"/olmo/part-{i}.npy", tokens.tobytes())
  reversed_order = order[::-1].copy()
  memory.pipe("/olmo/order.npy", reversed_order.tobytes())
  paths = [f"memory://olmo/part-{i}.npy" for i in range(3)]
  source = olmo.OlmoTokenSource(paths, "memory://olmo/order.npy", B, L)
  table = _expected_instances(files)
  np.testing.assert_array_equal(source.batch(3, B), table[reversed_order[9:12]])
  config = yaml.safe_load((root / "OLMo-tiny.yaml").read_text())
  config["data"]["paths"] = paths
  (root / "remote.yaml").write_text(yaml.safe_dump(config))
  opened = olmo.open_olmo(f"olmo:{root / 'remote.yaml'},memory://olmo/order.npy")
  np.testing.assert_array_equal(opened.batch(0, B), table[reversed_order[:3]])


def test_public_mirror_and_refusals(olmo_dir, tmp_path):
  root, _, _ = olmo_dir
  mirror = olmo.RemoteFile("r2://olmo-data/preprocessed/olmo-mix/v1_5/part-000-00000.npy")
  assert mirror.location == "https://olmo-data.org/preprocessed/olmo-mix/v1_5/part-000-00000.npy"
  (tmp_path / "bad.yaml").write_text("data: {paths: [a.npy]}\n")
  with pytest.raises(DataError, match="bad.yaml: not an OLMo training config") as e:
    olmo.open_olmo(f"olmo:{tmp_path / 'bad.yaml'}")
  assert "\n" not in str(e.value)
  with pytest.raises(DataError, match="no OLMo config"):
    olmo.open_olmo(f"olmo:{tmp_path / 'missing.yaml'}")
  config = yaml.safe_load((root / "OLMo-tiny.yaml").read_text())
  config["data"]["memmap_dtype"] = "float32"
  (root / "f.yaml").write_text(yaml.safe_dump(config))
  with pytest.raises(DataError, match="memmap_dtype 'float32'"):
    olmo.open_olmo(f"olmo:{root / 'f.yaml'}")
  # An order naming an instance past the files' end.
  np.array([0, 1, 99], np.uint32).tofile(root / "past.npy")
  source = olmo.open_olmo(f"olmo:{root / 'OLMo-tiny.yaml'},past.npy")
  with pytest.raises(DataError, match="instance 99 is past the 11 instances of the 3 data"):
    source.batch(0, 3)
