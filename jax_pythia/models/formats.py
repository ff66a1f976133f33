"""Checkpoint file formats: safetensors and legacy torch .bin, single or sharded, and the
dtypes the project computes in. Generic: no model family is named here.

Reading is memory-mapped and torch-free for safetensors: the header is parsed here and
every tensor is an `np.frombuffer` view over a read-only mmap of its file, so reading a
checkpoint costs no copy; the one copy is the cast/transpose into the Flax layout
(`models.convert`). Legacy `pytorch_model.bin` files go through
`torch.load(weights_only=True, mmap=True)`, with torch imported only then.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from jax_pythia.errors import CheckpointError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG_FILE = "config.json"

_SAFETENSORS_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_BIN_SHARD_RE = re.compile(r"^pytorch_model-\d{5}-of-\d{5}\.bin$")

_ST_TO_NP: dict[str, np.dtype] = {
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F32": np.dtype(np.float32),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}

#: Compute dtypes a caller may ask for, by name.
DTYPES: dict[str, np.dtype] = {
  "float32": np.dtype(np.float32),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "float16": np.dtype(np.float16),
}

# Non-parameter buffers that old .bin files (transformers 4.x) carry: GPT-NeoX's causal
# mask and its fill value, any family's rotary frequencies. The models recompute them.
IGNORED_BUFFER_RE = re.compile(
  r"(^|\.)(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq"
  r"|rotary_emb\.original_inv_freq)$"
)


class StateDict(dict):
  """A `{name: np.ndarray}` dict that also remembers the file each tensor came from.

  The file names make the errors of `convert_state_dict` point at the right shard.
  """

  def __init__(self, *args, sources: Mapping[str, str] | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.sources: dict[str, str] = dict(sources or {})


def resolve_dtype(dtype: Any) -> np.dtype:
  """'float32' / 'bfloat16' / 'float16' (or an equivalent numpy/jax dtype) -> np.dtype."""
  if isinstance(dtype, str):
    if dtype.removeprefix("torch.") in DTYPES:
      return DTYPES[dtype.removeprefix("torch.")]
  else:
    try:
      resolved = np.dtype(dtype)
    except TypeError:
      resolved = None
    if resolved in DTYPES.values():
      return resolved
  raise CheckpointError(f"dtype={dtype!r}: supported are {', '.join(DTYPES)}")


def dtype_name(dtype: Any) -> str:
  resolved = resolve_dtype(dtype)
  return next(name for name, d in DTYPES.items() if d == resolved)


# --------------------------------------------------------------------------- safetensors


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file, as read-only views over an mmap of it."""
  path = os.fspath(path)
  try:
    size = os.path.getsize(path)
    f = open(path, "rb")
  except OSError as e:
    raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
  with f:
    if size < 8:
      raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
      raise CheckpointError(
        f"{path}: safetensors header length {header_len} exceeds the file size {size} "
        "(truncated or not a safetensors file)"
      )
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
      raise CheckpointError(
        f"{path}: safetensors header is not valid JSON ({type(e).__name__}: {e})"
      ) from None
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    # The mmap outlives the file object; the arrays keep it alive through their base.
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
  data_start = 8 + header_len
  tensors = {
    name: _header_tensor(path, name, info, mapped, data_start, size - data_start)
    for name, info in header.items()
    if name != "__metadata__"
  }
  _check_no_overlap(path, header, tensors)
  return tensors


def _check_no_overlap(path: str, header: dict, tensors: dict[str, np.ndarray]) -> None:
  """Two tensors over the same bytes: one of them is not what the header says."""
  spans = sorted(
    (*header[name]["data_offsets"], name) for name, array in tensors.items() if array.size
  )
  for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
    if begin < end:
      raise CheckpointError(
        f"{path}: tensors {first!r} and {second!r} overlap (data_offsets); the header is corrupt"
      )


def _header_tensor(path, name, info, mapped, data_start: int, data_len: int) -> np.ndarray:
  """One tensor of a safetensors header entry, as a view over the file's mmap, checked."""
  where = f"{path}: tensor {name!r}"
  try:
    st_dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    if not all(type(x) is int for x in (*shape, begin, end)):  # 2.5 or "3" are no sizes
      raise ValueError
    shape = tuple(shape)
  except (TypeError, KeyError, ValueError):
    raise CheckpointError(f"{where}: malformed header entry {info!r}") from None
  if st_dtype not in _ST_TO_NP:
    raise CheckpointError(
      f"{where}: unsupported dtype {st_dtype} (supported: {', '.join(_ST_TO_NP)})"
    )
  dtype = _ST_TO_NP[st_dtype]
  if any(s < 0 for s in shape) or not 0 <= begin <= end:
    raise CheckpointError(f"{where}: invalid shape {shape} or data_offsets {[begin, end]}")
  if end > data_len:
    raise CheckpointError(
      f"{where}: data_offsets [{begin}, {end}] run past the end of the data ({data_len} "
      "bytes); the file is truncated"
    )
  count = math.prod(shape)
  if count * dtype.itemsize != end - begin:
    raise CheckpointError(
      f"{where}: shape {list(shape)} of {st_dtype} needs {count * dtype.itemsize} bytes, "
      f"data_offsets span {end - begin}"
    )
  if count == 0:
    return np.empty(shape, dtype)
  return np.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)


def write_safetensors(
  path: str | os.PathLike,
  tensors: Mapping[str, np.ndarray],
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes `tensors` (F16/BF16/F32 numpy arrays) as one safetensors file, fsynced."""
  entries, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in _NP_TO_ST:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {arr.dtype}")
    entries[name] = {
      "dtype": _NP_TO_ST[arr.dtype],
      "shape": list(arr.shape),
      "data_offsets": [offset, offset + arr.nbytes],
    }
    offset += arr.nbytes
    arrays.append(arr)
  header = {"__metadata__": dict(metadata or {"format": "pt"}), **entries}
  raw = json.dumps(header, separators=(",", ":")).encode()
  # Pad with spaces so the data starts 8-byte aligned (what the reference writer does).
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for arr in arrays:
      if arr.size:
        f.write(arr.reshape(-1).view(np.uint8))
    f.flush()
    os.fsync(f.fileno())


# --------------------------------------------------------------------------- torch .bin


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A legacy pytorch_model.bin, through torch's weights_only unpickler only."""
  path = os.fspath(path)
  try:
    import torch
  except ImportError:
    raise CheckpointError(
      f"{path}: reading a legacy pytorch_model.bin needs torch, which is not installed; "
      "`pip install torch==2.13.0` (the 'legacy' extra), or convert the checkpoint to "
      "safetensors"
    ) from None
  import pickle

  def load(use_mmap):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)

  try:
    try:
      state = load(True)
    except RuntimeError as e:
      # Files from torch < 1.6 (not zip) cannot be mmapped; read them whole.
      if "mmap" not in str(e):
        raise
      state = load(False)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(
      f"{path}: refused: the pickle needs more than torch's weights_only loader allows "
      f"(it may run code); convert it to safetensors from a trusted copy ({first})"
    ) from None
  except (RuntimeError, OSError, EOFError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({e})") from None
  if not isinstance(state, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
  out = {}
  for name, t in state.items():
    if not isinstance(t, torch.Tensor):
      raise CheckpointError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
    t = t.detach()
    if not t.is_contiguous():
      t = t.contiguous()
    if t.dtype == torch.bfloat16:
      # numpy has no bfloat16; reinterpret the bits (no copy).
      out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    elif t.dtype in (torch.float16, torch.float32):
      out[name] = t.numpy()
    elif IGNORED_BUFFER_RE.search(name):
      out[name] = t.numpy()  # a buffer dropped later (bool/float mask); any dtype is fine
    else:
      raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype {t.dtype}")
  return out


# --------------------------------------------------------------------------- directory


def find_weight_files(directory: str | os.PathLike) -> tuple[str, list[str]]:
  """('safetensors' | 'bin', [file names]) of the weights in a HF-format directory.

  safetensors is preferred when both exist; a sharded checkpoint lists its index first,
  then the shards it names.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: no such checkpoint directory")
  for fmt, single, index in (
    ("safetensors", SAFETENSORS_SINGLE, SAFETENSORS_INDEX),
    ("bin", BIN_SINGLE, BIN_INDEX),
  ):
    if os.path.isfile(os.path.join(directory, single)):
      return fmt, [single]
    index_path = os.path.join(directory, index)
    if os.path.isfile(index_path):
      shards = _index_shards(index_path)
      return fmt, [index, *shards]
  raise CheckpointError(
    f"{directory}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
    f"{BIN_SINGLE} or {BIN_INDEX})"
  )


def choose_weight_files(filenames: Iterable[str]) -> list[str]:
  """From a revision's file listing, the weight files to fetch (one format only).

  Same preference as `find_weight_files`; for a sharded checkpoint the index and every
  shard listed next to it.
  """
  names = set(filenames)
  for single, index, shard_re in (
    (SAFETENSORS_SINGLE, SAFETENSORS_INDEX, _SAFETENSORS_SHARD_RE),
    (BIN_SINGLE, BIN_INDEX, _BIN_SHARD_RE),
  ):
    if single in names:
      return [single]
    if index in names:
      return [index, *sorted(n for n in names if shard_re.match(n))]
  return []


def _read_index(index_path: str) -> dict[str, str]:
  try:
    with open(index_path) as f:
      index = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(
      f"{index_path}: cannot read the shard index ({type(e).__name__}: {e})"
    ) from None
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(
    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
  ):
    raise CheckpointError(f"{index_path}: no weight_map {{tensor: shard file}} in the index")
  for shard in set(weight_map.values()):
    if os.path.basename(shard) != shard:
      raise CheckpointError(f"{index_path}: shard {shard!r} is not a plain file name")
  return weight_map


def _index_shards(index_path: str) -> list[str]:
  return sorted(set(_read_index(index_path).values()))


def read_state_dict(directory: str | os.PathLike) -> StateDict:
  """All tensors of the checkpoint in `directory`, by their stored (Hugging Face) names."""
  directory = os.fspath(directory)
  fmt, files = find_weight_files(directory)
  reader = read_safetensors if fmt == "safetensors" else read_torch_bin
  state = StateDict()
  if len(files) == 1:
    path = os.path.join(directory, files[0])
    for name, arr in reader(path).items():
      state[name] = arr
      state.sources[name] = path
    return state
  index_path = os.path.join(directory, files[0])
  weight_map = _read_index(index_path)
  missing = [s for s in files[1:] if not os.path.isfile(os.path.join(directory, s))]
  if missing:
    raise CheckpointError(f"{index_path}: shard file(s) {missing} named in the index are missing")
  for shard in files[1:]:
    path = os.path.join(directory, shard)
    for name, arr in reader(path).items():
      if name in state:
        raise CheckpointError(f"{path}: tensor {name!r} is also in {state.sources[name]}")
      if weight_map.get(name, shard) != shard:
        raise CheckpointError(
          f"{path}: tensor {name!r} is here, but {index_path} places it in {weight_map[name]}"
        )
      state[name] = arr
      state.sources[name] = path
  absent = sorted(set(weight_map) - set(state))
  if absent:
    raise CheckpointError(
      f"{index_path}: tensor(s) {few(absent)} named in the index are not in their shard"
    )
  return state


def few(names: list[str], n: int = 5) -> str:
  shown = ", ".join(names[:n])
  return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")
