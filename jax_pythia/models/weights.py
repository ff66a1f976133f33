"""Hugging Face checkpoints <-> Flax parameters, for every model family: the public
face of `formats` (files), `convert` (the layout table's conversion) and the writer.

  state = weights.read_state_dict(directory)           # {HF name: mmapped array}
  params = weights.convert_state_dict(state, config)   # the Flax tree, per family.table
  weights.save_hf_checkpoint(directory, params, config)

The layout of each family is its one table (`family.table(config)`; GPT-NeoX's is
`gpt_neox.PARAMS`): both directions of conversion, the shapes and
`sharding.param_specs` derive from it. GPT-NeoX's fused torch `query_key_value.weight`
[3d, d] is laid out per head: its rows reshape to [H, 3, dh] (index 1: 0 query, 1 key,
2 value), so the value of head h is NOT the last third of the rows (docs/pythia.md: the
weight layout).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from jax_pythia import files
from jax_pythia.errors import CheckpointError
from jax_pythia.models.convert import (  # noqa: F401  (the public names of conversion)
  convert_state_dict,
  hf_shapes,
  param_shapes,
  params_to_state_dict,
)
from jax_pythia.models.family import table  # noqa: F401
from jax_pythia.models.formats import (  # noqa: F401  (the public names of the formats)
  BIN_INDEX,
  BIN_SINGLE,
  CONFIG_FILE,
  DTYPES,
  SAFETENSORS_INDEX,
  SAFETENSORS_SINGLE,
  StateDict,
  choose_weight_files,
  dtype_name,
  find_weight_files,
  read_safetensors,
  read_state_dict,
  read_torch_bin,
  resolve_dtype,
  write_safetensors,
)
from jax_pythia.models.gpt_neox import PARAMS  # noqa: F401  (GPT-NeoX's table)
from jax_pythia.models.layout import Param, param_tree  # noqa: F401


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
  config: Any,
  dtype: Any = "float32",
  shard_bytes: int | None = None,
) -> str:
  """Writes `params` as a Hugging Face checkpoint of `config`'s family (`from_pretrained` of
  its transformers class loads it).

  `config.json` (`config.to_hf_dict()`, dtype set) and
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
    _write_weights(tmp, state, shard_bytes)
    replace_directory(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _write_weights(tmp: str, state: dict[str, np.ndarray], shard_bytes: int | None) -> None:
  """model.safetensors, or shards of at most `shard_bytes` plus their index, in `tmp`."""
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
