"""OLMo's training batches, read by byte range as its trainer composed them (docs/suites.md).

The format, from allenai/OLMo's public code (olmo/data/memmap_dataset.py, olmo/data/
iterable_dataset.py and its README's "Inspecting training data"; checked, never run):

- Token files: the training config's `data.paths`, in order; each a flat array of token
  ids with no header (numpy memmap, `data.memmap_dtype`, default uint16).
- Instances: each file is cut into consecutive chunks of `model.max_sequence_length` (L)
  tokens, `n_tokens // L` of them (the remainder is dropped); instances are numbered
  across the files in the config's order.
- Data order: `global_indices.npy`, a flat uint32 array with no header: instance ids in
  the order they are trained.
- The batch of step s (0-based: the batch the (s+1)-th optimizer step trains on, so
  checkpoint `step{N}` has seen batches 0..N-1, as with Pythia) is the instances
  `global_indices[s * B : (s + 1) * B]`, B = `global_train_batch_size`. Each rank takes a
  strided share of that slice, so the slice is the global batch whatever the world size.

An instance of L tokens is one training row: the model reads its first L - 1 and predicts
its last L - 1, so this source's `seq_len` is L - 1 (rows of seq_len + 1 tokens, as every
`TokenSource`'s).

`--data=olmo:CONFIG.yaml[,GLOBAL_INDICES]` opens one (default: `global_indices.npy` beside
the config). Paths may be local, http(s) or any fsspec URL; `r2://olmo-data/...` is read at
its public mirror `https://olmo-data.org/...` (OLMo's README), relative paths from the
config's folder.

Batches read are cached as `.npy` under `$JAX_PYTHIA_DATA_CACHE/olmo/<key>/` (the streams'
cache; key: the order file and token files), so the sweep's up-front check and its
gradient windows read each row from the network once, and a rerun not at all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from jax_pythia.data import streams, transports
from jax_pythia.data.indexed import DataError, step_items
from jax_pythia.files import atomic_write

PREFIX = "olmo:"
INDICES_FILE = "global_indices.npy"
_INDEX_DTYPE = np.dtype(np.uint32)
_PUBLIC = {"r2://olmo-data/": "https://olmo-data.org/"}


def is_olmo_location(location: str) -> bool:
  return location.startswith(PREFIX)


class RemoteFile:
  """Byte ranges of one local or remote file, with the streams' retries and one-line errors."""

  def __init__(self, location: str):
    for private, public in _PUBLIC.items():
      if location.startswith(private):
        location = public + location[len(private) :]
    self.location = location
    base, _, self.file = location.rstrip("/").rpartition("/")
    if location.startswith(("http://", "https://")):
      transport = transports.HttpTransport(base)
    else:
      import fsspec

      protocol, sep, _ = location.partition("://")
      try:
        fs = fsspec.filesystem(protocol if sep else "file")
      except (ImportError, ValueError) as e:
        raise DataError(f"{location}: no filesystem for {protocol}:// ({e})") from None
      folder = base[len(protocol) + 3 :] if sep else os.path.abspath(base or ".")
      transport = transports.FsspecTransport(fs, folder, base)
    self._remote = transports.Retrying(transport)
    self._size: int | None = None

  @property
  def size(self) -> int:
    if self._size is None:
      self._size = self._remote.size(self.file)
    return self._size

  def read(self, start: int, stop: int) -> bytes:
    return self._remote.read(self.file, start, stop)


class OlmoTokenSource:
  """The batches OLMo trained on (see the module doc): `batch(step, n)` is the first n
  instances of step's batch, int32 [n, L]; `fixed_inputs(n)` those of `fixed_step`."""

  has_training_steps = True

  def __init__(
    self,
    paths: Sequence[str],
    global_indices: str,
    batch_size: int,
    instance_tokens: int,
    dtype: str = "uint16",
    fixed_step: int | None = None,
    cache_dir: str | None = "default",
  ):
    if not paths:
      raise DataError("OLMo data: the config names no data.paths")
    if batch_size < 1 or instance_tokens < 2:
      raise DataError(
        f"OLMo data: global_train_batch_size={batch_size} and max_sequence_length="
        f"{instance_tokens} must be >= 1 and >= 2"
      )
    self.files = [RemoteFile(p) for p in paths]
    self.indices = RemoteFile(global_indices)
    self.batch_size, self.instance_tokens = batch_size, instance_tokens
    self.dtype = _token_dtype(dtype)
    self.seq_len = instance_tokens - 1
    self.name = f"OLMo data ordered by {self.indices.location}"
    self._starts: list[int] = [0]  # first instance of each file whose size is known
    if cache_dir == "default":
      cache_dir = os.path.join(streams.default_cache_dir(), "olmo")
    key = "\n".join([global_indices, *paths, str(batch_size), str(instance_tokens), dtype])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    self.cache = os.path.join(cache_dir, digest) if cache_dir else None
    self.n_steps = self.indices.size // _INDEX_DTYPE.itemsize // batch_size
    self.fixed_step = self.n_steps - 1 if fixed_step is None else fixed_step

  def identity(self) -> dict:
    """What names this source for a sweep's record (its batches' content hashes too)."""
    return {
      "indices": self.indices.location,
      "files": [f.location for f in self.files],
      "batch_size": self.batch_size,
      "instance_tokens": self.instance_tokens,
      "dtype": self.dtype.name,
    }

  def instance_ids(self, step: int, n_sequences: int) -> np.ndarray:
    """The instance ids of the first `n_sequences` rows of step's batch: uint32 [n]."""
    start, stop = step_items(step, n_sequences, self.batch_size)
    if step >= self.n_steps:
      raise DataError(
        f"{self.indices.location} orders {self.n_steps} batches of {self.batch_size}; "
        f"step {step} is past its end"
      )
    raw = self.indices.read(start * _INDEX_DTYPE.itemsize, stop * _INDEX_DTYPE.itemsize)
    return np.frombuffer(raw, _INDEX_DTYPE)

  def _locate(self, instance: int) -> tuple[int, int]:
    """(file, instance within it) of a global instance id: the files' sizes are read in
    order, only as far as needed."""
    while self._starts[-1] <= instance:
      i = len(self._starts) - 1
      if i == len(self.files):
        raise DataError(
          f"{self.indices.location}: instance {instance} is past the {self._starts[-1]} "
          f"instances of the {len(self.files)} data files"
        )
      f = self.files[i]
      count = f.size // (self.dtype.itemsize * self.instance_tokens)
      self._starts.append(self._starts[-1] + count)
    i = int(np.searchsorted(self._starts, instance, side="right")) - 1
    return i, instance - self._starts[i]

  def read_instance(self, instance: int) -> np.ndarray:
    i, local = self._locate(int(instance))
    width = self.dtype.itemsize * self.instance_tokens
    raw = self.files[i].read(local * width, (local + 1) * width)
    return np.frombuffer(raw, self.dtype)

  def batch(self, step: int, n_sequences: int) -> np.ndarray:
    path = os.path.join(self.cache, f"step-{step}.npy") if self.cache else None
    if path and os.path.isfile(path):
      try:
        cached = np.load(path)
        if len(cached) >= n_sequences and cached.shape[1:] == (self.instance_tokens,):
          return cached[:n_sequences].astype(np.int32)
      except (OSError, ValueError):
        pass  # unreadable: read again, and the write replaces it
    rows = [self.read_instance(i) for i in self.instance_ids(step, n_sequences)]
    tokens = np.stack(rows)
    if path:
      atomic_write(path, lambda tmp: _save_npy(tmp, tokens), ".npy")
    return tokens.astype(np.int32)

  def fixed_inputs(self, n_sequences: int) -> np.ndarray:
    return self.batch(self.fixed_step, n_sequences)[:, :-1]

  # The rows in training order as a stream of items (row i of step s is item s * B + i),
  # what `staged.stage` copies: tools.fetch_data stages OLMo's batches as it does Pythia's.

  def __len__(self) -> int:
    return self.n_steps * self.batch_size

  def read_items(self, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of the training order: [stop - start, L] in the files' dtype."""
    raw = self.indices.read(start * _INDEX_DTYPE.itemsize, stop * _INDEX_DTYPE.itemsize)
    return np.stack([self.read_instance(i) for i in np.frombuffer(raw, _INDEX_DTYPE)])

  def __repr__(self) -> str:
    return (
      f"OlmoTokenSource({len(self.files)} files, indices={self.indices.location!r}, "
      f"batch_size={self.batch_size}, instance_tokens={self.instance_tokens})"
    )


def _save_npy(path: str, array: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.save(f, array)


def _token_dtype(name: str) -> np.dtype:
  short = str(name).rsplit(".", 1)[-1]
  if short not in ("uint8", "uint16", "uint32", "uint64"):
    raise DataError(f"OLMo data: memmap_dtype {name!r} is not one of uint8/16/32/64")
  return np.dtype(short)


def open_olmo(location: str, fixed_step: int | None = None) -> OlmoTokenSource:
  """`olmo:CONFIG.yaml[,GLOBAL_INDICES]`: the source OLMo's training config describes."""
  import yaml

  text = location.removeprefix(PREFIX)
  config_path, _, indices = text.partition(",")
  folder = os.path.dirname(os.path.abspath(config_path))
  try:
    with open(config_path) as f:
      config = yaml.safe_load(f)
    data, model = config["data"], config["model"]
    paths = [_relative_to(folder, p) for p in data["paths"]]
    batch_size = int(config["global_train_batch_size"])
    tokens = int(model["max_sequence_length"])
  except FileNotFoundError:
    raise DataError(f"--data={location}: no OLMo config {config_path}") from None
  except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
    raise DataError(
      f"{config_path}: not an OLMo training config with data.paths, "
      f"global_train_batch_size and model.max_sequence_length ({type(e).__name__}: {e})"
    ) from None
  indices = _relative_to(folder, indices.strip() or INDICES_FILE)
  dtype = data.get("memmap_dtype") or "uint16"
  return OlmoTokenSource(paths, indices, batch_size, tokens, dtype, fixed_step)


def _relative_to(folder: str, path: str) -> str:
  path = str(path)
  return path if "://" in path or os.path.isabs(path) else os.path.join(folder, path)
