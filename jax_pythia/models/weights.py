"""Hugging Face GPT-NeoX weights <-> the Flax parameter tree of this project.

Reading is memory-mapped and torch-free for safetensors: the header is parsed here and
every tensor is an `np.frombuffer` view over a read-only mmap of its file, so reading a
checkpoint costs no copy; the one copy is the cast/transpose into the Flax layout, done
by `convert_state_dict` on the device (XLA) or, for CPU devices, by numpy threads.
Legacy `pytorch_model.bin` files go through `torch.load(weights_only=True, mmap=True)`,
with torch imported only then.

The layout (which HF tensor feeds which Flax leaf, shapes, transforms, the dimension split
over a model axis) is the one table PARAMS; both directions of conversion, the shapes and
`sharding.param_specs` derive from it. The fused torch `query_key_value.weight` [3d, d]
is laid out per head: its rows reshape to [H, 3, dh] (index 1: 0 query, 1 key, 2 value),
so the value of head h is NOT the last third of the rows (docs/pythia.md: the weight
layout).
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from jax_pythia import files
from jax_pythia.errors import CheckpointError
from jax_pythia.models.config import GPTNeoXConfig

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

# Non-parameter buffers that old Pythia .bin files (transformers 4.x) carry: the causal
# mask, its fill value and the rotary frequencies. The model recomputes all of them.
_IGNORED_BUFFER_RE = re.compile(
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
  data_len = size - data_start
  tensors: dict[str, np.ndarray] = {}
  spans: list[tuple[int, int, str]] = []  # (begin, end, name): no two may share a byte
  for name, info in header.items():
    if name == "__metadata__":
      continue
    where = f"{path}: tensor {name!r}"
    st_dtype, shape, begin, end = _header_entry(where, info)
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
    if count:
      spans.append((begin, end, name))
    if count == 0:
      tensors[name] = np.empty(shape, dtype)
    else:
      tensors[name] = np.frombuffer(
        mapped, dtype=dtype, count=count, offset=data_start + begin
      ).reshape(shape)
  _check_no_overlap(path, spans)
  return tensors


def _header_entry(where: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
  """(dtype, shape, begin, end) of one safetensors header entry, all sizes integers."""
  try:
    st_dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    if not all(type(x) is int for x in (*shape, begin, end)):  # 2.5 or "3" are no sizes
      raise ValueError
  except (TypeError, KeyError, ValueError):
    raise CheckpointError(f"{where}: malformed header entry {info!r}") from None
  if st_dtype not in _ST_TO_NP:
    raise CheckpointError(
      f"{where}: unsupported dtype {st_dtype} (supported: {', '.join(_ST_TO_NP)})"
    )
  return st_dtype, tuple(shape), begin, end


def _check_no_overlap(path: str, spans: list[tuple[int, int, str]]) -> None:
  """Two tensors over the same bytes: one of them is not what the header says."""
  spans = sorted(spans)
  for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
    if begin < end:
      raise CheckpointError(
        f"{path}: tensors {first!r} and {second!r} overlap (data_offsets); the header is corrupt"
      )


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
    elif _IGNORED_BUFFER_RE.search(name):
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
      f"{index_path}: tensor(s) {_few(absent)} named in the index are not in their shard"
    )
  return state


# --------------------------------------------------------------------------- layout
#
# One table, PARAMS, is the Hugging Face <-> Flax layout; everything else derives from it:
# `hf_shapes`, `param_shapes`, `param_tree`, `convert_state_dict` (HF -> Flax),
# `params_to_state_dict` (Flax -> HF) and `sharding.param_specs` (its `model_dim` column).

#: Dimension symbols used in the shape columns of PARAMS.
DIM_SYMBOLS = ("L", "V", "d", "3d", "H", "dh", "f")


def dim_sizes(config: GPTNeoXConfig) -> dict[str, int]:
  """Each symbol of DIM_SYMBOLS -> its size in `config`."""
  d = config.d_model
  return {
    "L": config.n_layers,
    "V": config.vocab_size,
    "d": d,
    "3d": 3 * d,
    "H": config.n_heads,
    "dh": config.d_head,
    "f": config.d_mlp,
  }


@dataclasses.dataclass(frozen=True)
class Transform:
  """How one layer's HF tensor becomes a Flax leaf slice, and back.

  `to_flax(w, H, dh, part)` takes a numpy or jax array (methods only, so it runs under
  jit); `to_hf(parts, H, dh)` takes the numpy slices of every Flax leaf that one HF tensor
  feeds, in `part` order (three for the fused query_key_value, else one).
  """

  name: str
  to_flax: Callable[..., Any]
  to_hf: Callable[..., np.ndarray]


COPY = Transform("copy", lambda w, H, dh, j: w, lambda parts, H, dh: parts[0])
TRANSPOSE = Transform("transpose", lambda w, H, dh, j: w.T, lambda parts, H, dh: parts[0].T)
# attention.dense.weight [d out, (H, dh) in] -> kernel [H, dh, d].
HEADS_IN = Transform(
  "transpose, split the input per head",
  lambda w, H, dh, j: w.T.reshape(H, dh, w.shape[0]),
  lambda parts, H, dh: parts[0].reshape(H * dh, -1).T,
)
# The fused query_key_value rows are [H, 3, dh] (docs/pythia.md: the weight layout): part j
# (0 query, 1 key, 2 value) of each head, NOT the j-th third of the rows.
QKV_KERNEL = Transform(
  "qkv split per head, transpose",
  lambda w, H, dh, j: w.reshape(H, 3, dh, w.shape[1])[:, j].transpose(2, 0, 1),
  lambda parts, H, dh: np.stack([k.transpose(1, 2, 0) for k in parts], axis=1).reshape(
    3 * H * dh, -1
  ),
)
QKV_BIAS = Transform(
  "qkv split per head",
  lambda b, H, dh, j: b.reshape(H, 3, dh)[:, j],
  lambda parts, H, dh: np.stack(parts, axis=1).reshape(3 * H * dh),
)


@dataclasses.dataclass(frozen=True)
class Param:
  """One Flax parameter: where it comes from in a HF checkpoint and how it is laid out.

  A `{l}` in `hf_name` makes it per-layer: the Flax leaf stacks the L layers' tensors on a
  leading axis. Shapes are dim symbols (DIM_SYMBOLS) of one layer. `model_dim` is the
  dimension split over the mesh's model axis (None: replicated).
  """

  path: str
  hf_name: str
  shape: str
  hf_shape: str
  transform: Transform
  model_dim: str | None = None
  part: int = 0

  @property
  def per_layer(self) -> bool:
    return "{l}" in self.hf_name

  @property
  def dims(self) -> tuple[str, ...]:
    """Dim symbols of the whole Flax leaf (the layer axis first when per-layer)."""
    return ("L",) * self.per_layer + tuple(self.shape.split())

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(self.path.split("/"))

  def hf_names(self, n_layers: int) -> list[str]:
    """The source tensors, one per layer (per-layer) or one."""
    if not self.per_layer:
      return [self.hf_name]
    return [self.hf_name.format(l=l) for l in range(n_layers)]


_L = "gpt_neox.layers.{l}."

# Kernels are (in, out): y = x @ kernel + bias. The unembedding keeps HF's [V, d] layout (an
# embedding table, read as x @ E.T), so loading copies it instead of transposing V x d.
PARAMS: tuple[Param, ...] = (
  # Flax path, HF name, Flax shape (one layer), HF shape, transform, model_dim, part
  Param("embed_in/embedding", "gpt_neox.embed_in.weight", "V d", "V d", COPY, "V"),
  Param("layers/ln_1/scale", _L + "input_layernorm.weight", "d", "d", COPY),
  Param("layers/ln_1/bias", _L + "input_layernorm.bias", "d", "d", COPY),
  *(
    Param(f"layers/attn/{name}/kernel", _L + "attention.query_key_value.weight",
          "d H dh", "3d d", QKV_KERNEL, "H", j)  # fmt: skip
    for j, name in enumerate(("query", "key", "value"))
  ),
  *(
    Param(f"layers/attn/{name}/bias", _L + "attention.query_key_value.bias",
          "H dh", "3d", QKV_BIAS, "H", j)  # fmt: skip
    for j, name in enumerate(("query", "key", "value"))
  ),
  Param("layers/attn/out/kernel", _L + "attention.dense.weight", "H dh d", "d d", HEADS_IN, "H"),
  Param("layers/attn/out/bias", _L + "attention.dense.bias", "d", "d", COPY),
  Param("layers/ln_2/scale", _L + "post_attention_layernorm.weight", "d", "d", COPY),
  Param("layers/ln_2/bias", _L + "post_attention_layernorm.bias", "d", "d", COPY),
  Param("layers/mlp/fc_in/kernel", _L + "mlp.dense_h_to_4h.weight", "d f", "f d", TRANSPOSE, "f"),
  Param("layers/mlp/fc_in/bias", _L + "mlp.dense_h_to_4h.bias", "f", "f", COPY, "f"),
  Param("layers/mlp/fc_out/kernel", _L + "mlp.dense_4h_to_h.weight", "f d", "d f", TRANSPOSE, "f"),
  Param("layers/mlp/fc_out/bias", _L + "mlp.dense_4h_to_h.bias", "d", "d", COPY),
  Param("ln_f/scale", "gpt_neox.final_layer_norm.weight", "d", "d", COPY),
  Param("ln_f/bias", "gpt_neox.final_layer_norm.bias", "d", "d", COPY),
  Param("embed_out/embedding", "embed_out.weight", "V d", "V d", COPY, "V"),
)  # fmt: skip


def param_tree(leaf: Callable[[Param], Any]) -> dict[str, Any]:
  """The Flax parameter tree with `leaf(param)` at each leaf."""
  tree: dict[str, Any] = {}
  for p in PARAMS:
    node = tree
    for key in p.keys[:-1]:
      node = node.setdefault(key, {})
    node[p.keys[-1]] = leaf(p)
  return tree


def param_shapes(config: GPTNeoXConfig) -> dict[str, Any]:
  """The Flax parameter tree of `config`, with shape tuples as leaves."""
  sizes = dim_sizes(config)
  return param_tree(lambda p: tuple(sizes[s] for s in p.dims))


def hf_shapes(config: GPTNeoXConfig) -> dict[str, tuple[int, ...]]:
  """Expected torch shapes, by HF name (with the `gpt_neox.` prefix), of a checkpoint."""
  sizes = dim_sizes(config)
  shapes = {}
  for p in PARAMS:
    for name in p.hf_names(config.n_layers):
      shapes[name] = tuple(sizes[s] for s in p.hf_shape.split())
  return shapes


def _canonical(name: str) -> str:
  """The HF name this project writes: `gpt_neox.` prefix, `embed_out.weight` head."""
  if name == "lm_head.weight":  # transformers 5's in-memory name of embed_out
    return "embed_out.weight"
  if name == "embed_out.weight" or name.startswith("gpt_neox."):
    return name
  return "gpt_neox." + name


def _few(names: list[str], n: int = 5) -> str:
  shown = ", ".join(names[:n])
  return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _validated(state_dict: Mapping[str, np.ndarray], config: GPTNeoXConfig):
  """({canonical name: (stored name, array)}, where(name) -> location text), after
  checking names and shapes against `config`."""
  sources = getattr(state_dict, "sources", {})

  def where(name):
    return f"{sources[name]}: tensor {name!r}" if name in sources else f"tensor {name!r}"

  tensors: dict[str, tuple[str, np.ndarray]] = {}
  for name, arr in state_dict.items():
    if _IGNORED_BUFFER_RE.search(name):
      continue
    canon = _canonical(name)
    if canon in tensors:
      raise CheckpointError(f"{where(name)} duplicates {where(tensors[canon][0])}")
    tensors[canon] = (name, arr)
  expected = hf_shapes(config)
  unexpected = sorted(tensors[c][0] for c in set(tensors) - set(expected))
  if unexpected:
    files = sorted({sources[n] for n in unexpected if n in sources})
    raise CheckpointError(
      f"{', '.join(files) + ': ' if files else ''}unexpected tensor(s) {_few(unexpected)} "
      "that a GPT-NeoX of this config does not have"
    )
  missing = [c for c in expected if c not in tensors]
  if missing:
    files = sorted(set(sources.values()))
    raise CheckpointError(
      f"{', '.join(files[:3]) + ': ' if files else ''}missing tensor(s) {_few(missing)}"
    )
  for canon, shape in expected.items():
    name, arr = tensors[canon]
    if tuple(arr.shape) != shape:
      raise CheckpointError(
        f"{where(name)}: expected shape {list(shape)} from the config "
        f"(d_model={config.d_model}, n_heads={config.n_heads}, d_mlp={config.d_mlp}, "
        f"vocab_size={config.vocab_size}), found {list(arr.shape)}"
      )

  return tensors, where


def _cast_keeps_finite(source: Any, target: np.dtype) -> bool:
  """Whether every finite value of `source` stays finite in `target` (no overflow)."""
  source = np.dtype(source)
  if not np.issubdtype(source, np.floating) and source != DTYPES["bfloat16"]:
    return False
  return float(ml_dtypes.finfo(target).max) >= float(ml_dtypes.finfo(source).max)


def _layout(config: GPTNeoXConfig, target: np.dtype, paths: tuple[str, ...] | None = None):
  """A jax function {canonical HF name: array} -> (params, {Flax path: finite flag(s)}).

  A per-layer leaf has one flag per layer, so a failure names the layer's tensor. Given
  `paths`, only those leaves, as {path: leaf}, and no flags (`_host_convert` checks).
  """
  import jax.numpy as jnp

  L, H, dh = config.n_layers, config.n_heads, config.d_head

  def layout(src):
    flags = {}

    def leaf(p):
      raw = [src[n] for n in p.hf_names(L)]
      parts = [p.transform.to_flax(w, H, dh, p.part) for w in raw]
      out = (jnp.stack(parts) if p.per_layer else parts[0]).astype(target)
      if all(_cast_keeps_finite(w.dtype, target) for w in raw):
        # Checking the stored tensors reads half the bytes of the converted ones (fp16 to
        # fp32), in the same pass as the cast: a fifth of the load time on CPU.
        flag = jnp.stack([jnp.isfinite(w).all() for w in raw])
        flags[p.path] = flag if p.per_layer else flag[0]
      else:
        flag = jnp.isfinite(out)
        flags[p.path] = flag.reshape(L, -1).all(axis=1) if p.per_layer else flag.all()
      return out

    if paths is not None:
      return {p.path: leaf(p) for p in PARAMS if p.path in paths}, None
    return param_tree(leaf), flags

  return layout


# Host conversion (see `convert_state_dict`). A job converts one block of rows of one
# tensor, at most _HOST_JOB_ELEMENTS, so the threads share the few large tables evenly;
# each block is converted in pieces of _CACHE_ELEMENTS, small enough to stay in cache
# between the passes over them.
_HOST_JOB_ELEMENTS = 1 << 22
_CACHE_ELEMENTS = 1 << 16
# float16 and bfloat16 store infinities and NaNs with every exponent bit set.
_HALF_EXPONENT = {np.dtype(np.float16): 0x7C00, np.dtype(ml_dtypes.bfloat16): 0x7F80}
# float16 -> float32 by bits: sign-extend the 16 bits to 32, shift exponent and mantissa
# into place (<< 13), clear the sign's copies from bits 28-30, and rescale the exponent
# bias (15 -> 127) by multiplying by 2**112, which also gets subnormals right. Exact for
# every finite float16 (tests check all of them); infinities and NaNs come out as values
# beyond float16's range, which the finiteness check below refuses.
_F16_SIGN_COPIES_MASK = np.int32(-0x70000001)  # 0x8FFFFFFF
_F16_BIAS_SCALE = np.float32(2.0**112)
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on a 64-byte boundary, the
  alignment XLA:CPU needs to adopt a host buffer without copying it (jax.device_put)."""
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + 64, np.uint8)
  start = -raw.ctypes.data % 64
  return raw[start : start + nbytes].view(dtype).reshape(shape)


def _cast_into(source: np.ndarray, dest: np.ndarray) -> bool:
  """dest[...] = source cast to dest's dtype, both C-contiguous and the same shape; returns
  whether every value of source is finite and stays finite in dest.

  numpy casts float16 one element at a time; the bit-level conversion above and
  bfloat16's 16-bit shift are whole-array integer passes, about 4x faster on one thread.
  """
  src, out = source.reshape(-1), dest.reshape(-1)
  half_to_single = out.dtype == np.float32 and src.dtype in (np.float16, ml_dtypes.bfloat16)
  limit = _FLOAT16_MAX if src.dtype == np.float16 else float(ml_dtypes.finfo(out.dtype).max)
  finite = True
  for start in range(0, src.size, _CACHE_ELEMENTS):
    piece = slice(start, start + _CACHE_ELEMENTS)
    o = out[piece]
    if half_to_single and src.dtype == np.float16:
      bits = o.view(np.int32)
      np.copyto(bits, src[piece].view(np.int16))
      np.left_shift(bits, 13, out=bits)
      np.bitwise_and(bits, _F16_SIGN_COPIES_MASK, out=bits)
      np.multiply(o, _F16_BIAS_SCALE, out=o)
    elif half_to_single:
      bits = o.view(np.uint32)
      np.copyto(bits, src[piece].view(np.uint16))
      np.left_shift(bits, 16, out=bits)
    else:
      np.copyto(o, src[piece], casting="unsafe")
    # NaN fails both comparisons; so do infinities and (for float16) their bit images.
    finite = finite and bool(-limit <= o.min()) and bool(o.max() <= limit)
  return finite


def _stored_finite(stored: np.ndarray) -> bool:
  """Whether a stored tensor holds only finite values; half-precision ones are checked on
  their exponent bits, without decoding a float."""
  exponent = _HALF_EXPONENT.get(stored.dtype)
  if exponent is None:
    return bool(np.isfinite(stored).all())
  return not np.any(np.bitwise_and(stored.view(np.uint16), exponent) == exponent)


def _host_convert(
  tensors: Mapping[str, np.ndarray], config: GPTNeoXConfig, target: np.dtype, sharding: Any
):
  """`_layout` for CPU devices: (params, {Flax path: finite flag(s)}), in two halves that
  run at the same time.

  - XLA stacks, transposes and casts the per-layer leaves (one fused pass each; numpy's
    strided copies are slower), dispatched first so that it runs in the background.
  - numpy threads cast the tables that keep their layout (embeddings, final norm: most of
    a small model's bytes) into 64-byte-aligned buffers (`_cast_into`, checking
    finiteness in the same pass; about 4x XLA's float16 convert per thread), which the
    device adopts without a copy, and check the per-layer tensors' finiteness on their
    stored bits.
  """
  import concurrent.futures

  import jax

  L = config.n_layers
  tables = [p for p in PARAMS if not p.per_layer and p.transform is COPY]
  laid = tuple(p.path for p in PARAMS if p not in tables)
  laid_names = [n for p in PARAMS if p.path in laid for n in p.hf_names(L)]
  laid_out, _ = _jit_cached(config, dtype_name(target), None, laid)(
    {n: tensors[n] for n in laid_names}
  )
  cast = {p.hf_name: _aligned_empty(tensors[p.hf_name].shape, target) for p in tables}
  jobs = []  # (name, rows): a block of a table to cast, or (name, None): a tensor to check
  for name, arr in cast.items():
    rows = max(1, _HOST_JOB_ELEMENTS // max(1, math.prod(arr.shape[1:])))
    jobs += [(name, slice(r, r + rows)) for r in range(0, max(1, len(arr)), rows)]
  jobs += [(name, None) for name in laid_names]

  def run(job) -> bool:
    name, rows = job
    if rows is None:
      return _stored_finite(tensors[name])
    if tensors[name].ndim == 0:
      return _cast_into(tensors[name], cast[name])
    return _cast_into(np.ascontiguousarray(tensors[name][rows]), cast[name][rows])

  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="convert") as pool:
    finite: dict[str, bool] = {}
    for (name, _), ok in zip(jobs, pool.map(run, jobs)):
      finite[name] = finite.get(name, True) and ok
  flags = {
    p.path: np.array([finite[n] for n in p.hf_names(L)]) if p.per_layer else finite[p.hf_name]
    for p in PARAMS
  }
  params = param_tree(lambda p: laid_out[p.path] if p.path in laid else cast[p.hf_name])
  return jax.device_put(params, sharding), flags


def _converts_on_host(target: np.dtype, sharding: Any) -> bool:
  """Whether `convert_state_dict` takes `_host_convert`: for float32 params (the cast
  `_cast_into` does fast) on CPU devices only, where host memory is device memory."""
  import jax

  if target != np.dtype(np.float32):
    return False
  if sharding is None:
    return jax.devices()[0].platform == "cpu"
  shardings = jax.tree.leaves(sharding, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  return all(d.platform == "cpu" for s in shardings for d in s.device_set)


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray],
  config: GPTNeoXConfig,
  dtype: Any = "float32",
  sharding: Any = None,
) -> dict[str, Any]:
  """HF GPT-NeoX tensors -> the Flax parameter tree (jax arrays of `dtype`), per PARAMS.

  Names are accepted with or without the `gpt_neox.` prefix (and `lm_head.weight` for
  `embed_out.weight`); the mask and rotary buffers of old .bin files are ignored. Any
  other unexpected tensor, a missing one, a shape that disagrees with `config` or a
  non-finite value (also one made by the cast) is a CheckpointError naming the tensor and
  its file when known.

  On an accelerator the conversion is done by XLA: the stored tensors go to the device as
  they are (fp16: half the bytes of fp32) and one jitted function casts, transposes,
  stacks and checks finiteness there. For float32 params on CPU devices, numpy threads do
  most of it on the host (`_host_convert`, faster there) and the device adopts the result.
  The params come out on `sharding` (one Sharding for all leaves or a matching pytree;
  None: the default device).
  """
  import jax

  target = resolve_dtype(dtype)
  tensors, where = _validated(state_dict, config)
  src = {canon: arr for canon, (_, arr) in tensors.items()}
  if _converts_on_host(target, sharding):
    params, flags = _host_convert(src, config, target, sharding)
  else:
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
      fn = _jit_cached(config, dtype_name(target), sharding)
    else:
      fn = jax.jit(_layout(config, target), out_shardings=(sharding, None))
    params, flags = fn(src)
    flags = jax.device_get(flags)
  for p in PARAMS:
    ok = np.atleast_1d(flags[p.path])
    if not ok.all():
      bad = p.hf_names(config.n_layers)[int(np.argmin(ok))]
      arr = np.asarray(tensors[bad][1], np.float32)
      kind = "NaN" if np.isnan(arr).any() else "infinite"
      # A finite source that is not finite after the cast overflowed the target dtype.
      cast = "" if not np.isfinite(arr).all() else f" (in {dtype_name(target)})"
      raise CheckpointError(f"{where(tensors[bad][0])}: holds {kind} values{cast}")
  return params


_JIT_CACHE: dict[Any, Any] = {}


def _jit_cached(
  config: GPTNeoXConfig, dtype: str, sharding: Any, paths: tuple[str, ...] | None = None
):
  """One compiled layout per (config, dtype, sharding, paths): a sweep compiles once."""
  import jax

  key = (config, dtype, sharding, paths)
  if key not in _JIT_CACHE:
    layout = _layout(config, DTYPES[dtype], paths)
    _JIT_CACHE[key] = jax.jit(layout, out_shardings=(sharding, None) if sharding else None)
  return _JIT_CACHE[key]


def params_to_state_dict(params: Mapping[str, Any], config: GPTNeoXConfig) -> dict[str, np.ndarray]:
  """The inverse of `convert_state_dict`, per PARAMS: HF names (as save_pretrained writes
  them) and torch layout, C-contiguous numpy arrays in the dtype of `params`."""
  L, H, dh = config.n_layers, config.n_heads, config.d_head
  expected = param_shapes(config)

  def leaf(p):
    node, exp = params, expected
    try:
      for key in p.keys:
        node, exp = node[key], exp[key]
    except (KeyError, TypeError):
      raise CheckpointError(f"params: no leaf {p.path}") from None
    arr = np.asarray(node)
    if arr.shape != exp:
      raise CheckpointError(
        f"params: leaf {p.path} has shape {list(arr.shape)}, the config gives {list(exp)}"
      )
    return arr

  # The Flax leaves each HF tensor feeds, in part order (q, k, v for the fused one).
  sources: dict[str, list[Param]] = {}
  for p in PARAMS:
    sources.setdefault(p.hf_name, []).append(p)
  out = {}
  for hf_name, ps in sources.items():
    ps = sorted(ps, key=lambda p: p.part)
    leaves = [leaf(p) for p in ps]
    transform = ps[0].transform
    if not ps[0].per_layer:
      out[hf_name] = np.ascontiguousarray(transform.to_hf(leaves, H, dh))
      continue
    for l in range(L):
      out[hf_name.format(l=l)] = np.ascontiguousarray(
        transform.to_hf([x[l] for x in leaves], H, dh)
      )
  return out


# --------------------------------------------------------------------------- saving


def replace_directory(tmp: str, directory: str) -> None:
  """Moves the finished `tmp` onto `directory` so readers never see a partial one.

  rename(2) is atomic but cannot replace a non-empty directory: an old one is first
  renamed aside, then removed once the new one is in place.
  """
  old = None
  if os.path.lexists(directory):
    old = tempfile.mkdtemp(
      dir=os.path.dirname(directory), prefix=f".{os.path.basename(directory)}.old-"
    )
    os.replace(directory, os.path.join(old, "x"))
  os.replace(tmp, directory)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def save_hf_checkpoint(
  directory: str | os.PathLike,
  params: Mapping[str, Any],
  config: GPTNeoXConfig,
  dtype: Any = "float32",
  shard_bytes: int | None = None,
) -> str:
  """Writes `params` as a Hugging Face GPT-NeoX checkpoint (`from_pretrained` loads it).

  `config.json` (transformers-5 layout plus the 4.x rotary keys, dtype set) and
  `model.safetensors`, or shards of at most `shard_bytes` each (a tensor larger than
  that gets a shard of its own) with `model.safetensors.index.json`. Everything is
  written in a temporary sibling directory that replaces `directory` at the end.
  """
  directory = os.path.abspath(os.fspath(directory))
  name = dtype_name(dtype)
  target = DTYPES[name]
  state = {k: v.astype(target, copy=False) for k, v in params_to_state_dict(params, config).items()}
  for k, v in state.items():
    if not np.isfinite(v).all():
      raise CheckpointError(f"params: {k} is not finite in {name} (NaN, or overflow on cast)")
  hf = config.to_hf_dict()
  hf["dtype"] = name
  hf["torch_dtype"] = name  # what transformers 4.x readers look for
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = files.make_temp_dir(parent, prefix=f".{os.path.basename(directory)}.tmp-")
  try:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(hf, f, indent=2, sort_keys=True)
      f.write("\n")
    if shard_bytes is None:
      write_safetensors(os.path.join(tmp, SAFETENSORS_SINGLE), state)
    else:
      if shard_bytes <= 0:
        raise CheckpointError(f"shard_bytes={shard_bytes}: must be positive")
      shards: list[dict[str, np.ndarray]] = [{}]
      used = 0
      for k in sorted(state):
        if shards[-1] and used + state[k].nbytes > shard_bytes:
          shards.append({})
          used = 0
        shards[-1][k] = state[k]
        used += state[k].nbytes
      weight_map = {}
      for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(tmp, fname), shard)
        weight_map.update(dict.fromkeys(shard, fname))
      with open(os.path.join(tmp, SAFETENSORS_INDEX), "w") as f:
        json.dump(
          {
            "metadata": {"total_size": sum(v.nbytes for v in state.values())},
            "weight_map": weight_map,
          },
          f,
          indent=2,
          sort_keys=True,
        )
    replace_directory(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory
