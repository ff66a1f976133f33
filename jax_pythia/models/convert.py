"""Hugging Face tensors <-> the Flax parameter tree of any family, driven by the family's
layout table (`family.table(config)`; layout.Param rows): which HF tensor feeds which Flax
leaf, its shapes and the transform between them. Both directions and the shapes derive
from the table.

`convert_state_dict` casts, transposes, stacks the layers and checks finiteness in one
pass: on an accelerator one jitted XLA function, on CPU devices mostly numpy threads
(`_host_convert`), whose output the device adopts without a copy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from jax_pythia.errors import CheckpointError
from jax_pythia.models.family import family_of, table
from jax_pythia.models.formats import DTYPES, IGNORED_BUFFER_RE, dtype_name, few, resolve_dtype
from jax_pythia.models.layout import COPY, Param, param_tree


def param_shapes(config: Any) -> dict[str, Any]:
  """The Flax parameter tree of `config`, with shape tuples as leaves."""
  sizes = config.dims()
  return param_tree(table(config), lambda p: tuple(sizes[s] for s in p.dims))


def hf_shapes(config: Any) -> dict[str, tuple[int, ...]]:
  """Expected torch shapes, by canonical HF name, of a checkpoint of `config`."""
  sizes = config.dims()
  shapes = {}
  for p in table(config):
    for name in p.hf_names(config.n_layers):
      shapes[name] = tuple(sizes[s] for s in p.hf_shape.split())
  return shapes


def _validated(state_dict: Mapping[str, np.ndarray], config: Any):
  """({canonical name: (stored name, array)}, where(name) -> location text), after
  checking names and shapes against `config`."""
  sources = getattr(state_dict, "sources", {})
  family = family_of(config)
  canonical = family.canonical_name
  # A tied model's unembedding is its embedding; some writers still store the copy.
  tied = getattr(config, "tie_embeddings", False)
  ignored = lambda name: tied and name == "lm_head.weight"  # noqa: E731

  def where(name):
    return f"{sources[name]}: tensor {name!r}" if name in sources else f"tensor {name!r}"

  tensors: dict[str, tuple[str, np.ndarray]] = {}
  for name, arr in state_dict.items():
    if IGNORED_BUFFER_RE.search(name) or ignored(name):
      continue
    canon = canonical(name)
    if canon in tensors:
      raise CheckpointError(f"{where(name)} duplicates {where(tensors[canon][0])}")
    tensors[canon] = (name, arr)
  expected = hf_shapes(config)
  unexpected = sorted(tensors[c][0] for c in set(tensors) - set(expected))
  if unexpected:
    files = sorted({sources[n] for n in unexpected if n in sources})
    raise CheckpointError(
      f"{', '.join(files) + ': ' if files else ''}unexpected tensor(s) {few(unexpected)} "
      f"that a {family.title} of this config does not have"
    )
  missing = [c for c in expected if c not in tensors]
  if missing:
    files = sorted(set(sources.values()))
    raise CheckpointError(
      f"{', '.join(files[:3]) + ': ' if files else ''}missing tensor(s) {few(missing)}"
    )
  symbols = {n: p.hf_shape.split() for p in table(config) for n in p.hf_names(config.n_layers)}
  for canon, shape in expected.items():
    name, arr = tensors[canon]
    if tuple(arr.shape) != shape:
      dims = symbols[canon]
      raise CheckpointError(
        f"{where(name)}: expected shape {list(shape)} = [{', '.join(dims)}] from the config "
        f"({_dims_text(config, dims)}), found {list(arr.shape)}"
      )

  return tensors, where


#: The config sizes behind each dim symbol of the layout tables (what a shape error names).
_DIM_WORDS = {"L": "layers", "V": "vocabulary", "d": "hidden size", "H": "heads",
              "Hkv": "key/value heads", "dh": "head dim", "f": "MLP size"}  # fmt: skip
_PRODUCTS = {"D": ("H", "dh"), "Dkv": ("Hkv", "dh"), "3d": ("3", "d")}


def _dims_text(config: Any, dims: list[str]) -> str:
  """'Dkv = Hkv x dh = 2 key/value heads x 8 head dim, d = 32 hidden size' for `dims`."""
  sizes = {**config.dims(), "3": 3}

  def word(s):
    return f"{sizes[s]} {_DIM_WORDS[s]}" if s in _DIM_WORDS else str(sizes[s])

  parts = []
  for s in dict.fromkeys(dims):
    if s in _PRODUCTS:
      a, b = _PRODUCTS[s]
      parts.append(f"{s} = {a} x {b} = {word(a)} x {word(b)}")
    else:
      parts.append(f"{s} = {word(s)}")
  return ", ".join(parts)


def _cast_keeps_finite(source: Any, target: np.dtype) -> bool:
  """Whether every finite value of `source` stays finite in `target` (no overflow)."""
  source = np.dtype(source)
  if not np.issubdtype(source, np.floating) and source != DTYPES["bfloat16"]:
    return False
  return float(ml_dtypes.finfo(target).max) >= float(ml_dtypes.finfo(source).max)


def _layout(config: Any, target: np.dtype, paths: tuple[str, ...] | None = None):
  """A jax function {canonical HF name: array} -> (params, {Flax path: finite flag(s)}).

  A per-layer leaf has one flag per layer, so a failure names the layer's tensor. Given
  `paths`, only those leaves, as {path: leaf}, and no flags (`_host_convert` checks).
  """
  import jax.numpy as jnp

  L, sizes, params = config.n_layers, config.dims(), table(config)

  def layout(src):
    flags = {}

    def leaf(p):
      raw = [src[n] for n in p.hf_names(L)]
      parts = [p.transform.to_flax(w, p.layer_shape(sizes), p.part) for w in raw]
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
      return {p.path: leaf(p) for p in params if p.path in paths}, None
    return param_tree(params, leaf), flags

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


def _host_convert(tensors: Mapping[str, np.ndarray], config: Any, target: np.dtype, sharding: Any):
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
  params = table(config)
  tables = [p for p in params if not p.per_layer and p.transform is COPY]
  laid = tuple(p.path for p in params if p not in tables)
  laid_names = [n for p in params if p.path in laid for n in p.hf_names(L)]
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
    for p in params
  }
  tree = param_tree(params, lambda p: laid_out[p.path] if p.path in laid else cast[p.hf_name])
  return jax.device_put(tree, sharding), flags


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
  config: Any,
  dtype: Any = "float32",
  sharding: Any = None,
) -> dict[str, Any]:
  """HF tensors -> the Flax parameter tree (jax arrays of `dtype`), per the family's table.

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
  for p in table(config):
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


def _jit_cached(config: Any, dtype: str, sharding: Any, paths: tuple[str, ...] | None = None):
  """One compiled layout per (config, dtype, sharding, paths): a sweep compiles once."""
  import jax

  key = (config, dtype, sharding, paths)
  if key not in _JIT_CACHE:
    layout = _layout(config, DTYPES[dtype], paths)
    _JIT_CACHE[key] = jax.jit(layout, out_shardings=(sharding, None) if sharding else None)
  return _JIT_CACHE[key]


def params_to_state_dict(params: Mapping[str, Any], config: Any) -> dict[str, np.ndarray]:
  """The inverse of `convert_state_dict`, per the family's table: HF names (as
  save_pretrained writes them) and torch layout, C-contiguous numpy arrays in the dtype
  of `params`."""
  L, sizes, params_table = config.n_layers, config.dims(), table(config)
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
  for p in params_table:
    sources.setdefault(p.hf_name, []).append(p)
  out = {}
  for hf_name, ps in sources.items():
    ps = sorted(ps, key=lambda p: p.part)
    leaves = [leaf(p) for p in ps]
    transform = ps[0].transform
    if not ps[0].per_layer:
      out[hf_name] = np.ascontiguousarray(transform.to_hf(leaves, ps[0].layer_shape(sizes)))
      continue
    for l in range(L):
      out[hf_name.format(l=l)] = np.ascontiguousarray(
        transform.to_hf([x[l] for x in leaves], ps[0].layer_shape(sizes))
      )
  return out
