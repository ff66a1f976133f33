"""Checkpoints checked before they are trusted: content hashes, duplicates, dtypes.

The Hub's Pythia checkpoints have known defects that would corrupt the study without a
word: step0 and step1 hold identical weights on every model, many pythia-2.8b step
branches serve late-training weights, two 12b step branches serve the final checkpoint's
first shard. So every checkpoint's weights are hashed as they are read (`content_hash`:
SHA-256 over the tensors in name order, each with its dtype and shape, independent of
file format and sharding), the hash goes into checkpoints.parquet, and `flag_duplicates`
marks a checkpoint whose weights equal an earlier step's ("same weights as step N") or,
for a non-final step, the final's. Dtypes are trusted from each file's own header, never
from config.json, but one checkpoint must agree with itself (`check_tensors`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd

from jax_pythia.errors import CheckpointError
from jax_pythia.models import formats, gpt_neox, weights

#: checkpoints.parquet columns this module adds.
HASH_COLUMN = "weights_hash"
SHARDS_COLUMN = "shard_hashes"  # per weight file, comma-separated, file-name order
SAME_AS_COLUMN = "same_as_step"  # -1: unique
FLAG_COLUMN = "flag"
HASH_THREADS = 8  # "" or "same weights as step N" / "... as the final step N"


def _is_buffer(name: str) -> bool:
  return bool(formats.IGNORED_BUFFER_RE.search(name))


@dataclasses.dataclass(frozen=True)
class WeightsHash:
  """`digest` of all weights; `shards` one digest per weight file (in file-name order), so
  a sharded checkpoint that mixes in another step's shard shows which."""

  digest: str
  shards: tuple[str, ...]


def content_hash(state_dict: Mapping[str, np.ndarray]) -> WeightsHash:
  """SHA-256 of the weights, read once: each tensor's name, dtype, shape and raw bytes
  (from the mmap: this is the read that faults the file in, so the conversion after it
  reads from the page cache) give a tensor digest; the whole is the SHA-256 of those in
  canonical-name order (the same for safetensors and .bin, one file or shards), each file
  the SHA-256 of its own. Mask and rotary buffers of old .bin files are not weights."""
  sources = getattr(state_dict, "sources", {})
  names = [name for name in state_dict if not _is_buffer(name)]

  def tensor_digest(name: str) -> str:
    arr = np.ascontiguousarray(state_dict[name])
    digest = hashlib.sha256(
      f"{gpt_neox.canonical_name(name)}|{arr.dtype.str}|{arr.shape}\n".encode()
    )
    if arr.size:
      digest.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return digest.hexdigest()

  # hashlib releases the GIL on large buffers: tensors hash in parallel on many-core hosts.
  workers = max(1, min(HASH_THREADS, os.cpu_count() or 1, len(names)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    digests = dict(zip(names, pool.map(tensor_digest, names)))
  per_tensor = {
    gpt_neox.canonical_name(name): (digests[name], sources.get(name, "")) for name in names
  }
  whole = hashlib.sha256()
  files: dict[str, hashlib._Hash] = {}
  for canon in sorted(per_tensor):
    digest, source = per_tensor[canon]
    whole.update(digest.encode())
    files.setdefault(os.path.basename(source), hashlib.sha256()).update(digest.encode())
  shards = tuple(files[f].hexdigest()[:16] for f in sorted(files))
  return WeightsHash(whole.hexdigest(), shards)


def check_tensors(state_dict: weights.StateDict, directory: str) -> None:
  """One line naming file and tensor when a tensor's dtype differs from the checkpoint's
  other weights. Each file's own header says its dtype (fp16 and fp32 checkpoints are
  both fine; config.json's torch_dtype is not trusted), but a mix within one checkpoint
  means a shard from elsewhere. Shapes against the config, and tensors against the shard
  index, are checked by `weights.convert_state_dict` and `weights.read_state_dict`."""
  sources = getattr(state_dict, "sources", {})
  kinds: dict[np.dtype, list[str]] = {}
  for name, arr in state_dict.items():
    if not _is_buffer(name):
      kinds.setdefault(np.dtype(arr.dtype), []).append(name)
  if len(kinds) > 1:
    majority = max(kinds, key=lambda d: len(kinds[d]))
    odd = next(n for d, names in kinds.items() if d != majority for n in names)
    raise CheckpointError(
      f"{sources.get(odd, directory)}: tensor {odd!r} is {state_dict[odd].dtype}, but the "
      f"checkpoint's other {len(kinds[majority])} weights are {majority}"
    )


def checked_hash(state_dict: weights.StateDict, directory: str) -> WeightsHash:
  """`check_tensors`, then `content_hash`: what the sweep does with each checkpoint read."""
  check_tensors(state_dict, directory)
  return content_hash(state_dict)


def flag_duplicates(status: pd.DataFrame) -> pd.DataFrame:
  """`status` (one row per checkpoint: model, step, weights_hash) with `same_as_step`
  and `flag`: a non-final step equal to its model's final is "same weights as the final
  step N"; else a step equal to an earlier one is "same weights as step M" (the earliest).
  The final itself is never flagged: it is the reference the others are compared with.
  Rows without a hash (failed, or restored from a converted cache) are never flagged."""
  out = status.copy()
  if HASH_COLUMN not in out:
    out[HASH_COLUMN] = None
  same = np.full(len(out), -1, np.int64)
  flags = [""] * len(out)
  for _, rows in out.groupby("model", sort=False):
    final_step = int(rows.step.max())
    hashed = rows[rows[HASH_COLUMN].notna() & (rows[HASH_COLUMN] != "")]
    final_hash = hashed.loc[hashed.step == final_step, HASH_COLUMN]
    final_hash = final_hash.iloc[0] if len(final_hash) else None
    final_shards = []
    if SHARDS_COLUMN in hashed:
      final_row = hashed.loc[hashed.step == final_step, SHARDS_COLUMN]
      final_shards = str(final_row.iloc[0] or "").split(",") if len(final_row) else []
    final_shards = final_shards if len(final_shards) > 1 else []
    first_of = hashed.sort_values("step").groupby(HASH_COLUMN)["step"].first()
    for i, row in hashed.iterrows():
      pos = out.index.get_loc(i)
      step, digest = int(row.step), row[HASH_COLUMN]
      if step != final_step and digest == final_hash:
        same[pos], flags[pos] = final_step, f"same weights as the final step {final_step}"
      elif step != final_step and int(first_of[digest]) != step:
        same[pos] = int(first_of[digest])
        flags[pos] = f"same weights as step {same[pos]}"
      elif step != final_step and final_shards and SHARDS_COLUMN in row:
        shards = str(row[SHARDS_COLUMN] or "").split(",")
        shared = [k for k, (a, b) in enumerate(zip(shards, final_shards)) if a and a == b]
        if shared and len(shards) == len(final_shards):
          flags[pos] = (
            f"weight file(s) {', '.join(str(k + 1) for k in shared)} of {len(shards)} "
            f"hold the final step {final_step}'s weights"
          )
  out[SAME_AS_COLUMN] = same
  out[FLAG_COLUMN] = flags
  return out
