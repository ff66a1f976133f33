"""The orbax cache of converted parameters: `tools.convert` writes one (`save_converted`), a
sweep or notebook restores it (`restore_converted`) straight onto the mesh's shardings,
skipping the Hugging Face read and conversion."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import numpy as np

from jax_pythia import files
from jax_pythia.errors import CheckpointError, JaxPythiaError
from jax_pythia.models import family, weights
from jax_pythia.models.config import GPTNeoXConfig

DEFAULT_REVISION = "main"
#: Attempts (with exponential backoff) at each Hub operation before giving up. Kept low:
#: huggingface_hub already retries single HTTP requests; these retry a whole listing or
#: download that failed midway (a dropped connection during a multi-GB shard).
HUB_ATTEMPTS = 2
HUB_BACKOFF_S = 2.0

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def few_names(names: list[str]) -> str:
  return (
    ", ".join(names)
    if len(names) <= 6
    else (", ".join(names[:3]) + ", ..., " + ", ".join(names[-2:]))
  )


def default_sharding():
  import jax

  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def shardings_like(tree: Any, sharding: Any) -> Any:
  """One sharding per leaf of `tree`: a single Sharding broadcast, or a matching pytree."""
  import jax

  if sharding is None:
    sharding = default_sharding()
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda _: sharding, tree)
  try:
    return jax.tree.map(lambda _, s: s, tree, sharding)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"sharding: a pytree that does not match the params ({e})") from None


# --------------------------------------------------------------------------- orbax cache

_META_FILE = "jax_pythia.json"
_PARAMS_DIR = "params"
_FORMAT_VERSION = 1


def check_converted_target(directory: str | os.PathLike) -> str:
  """The absolute `directory`, if `save_converted` may write it; else CheckpointError.

  Writing replaces the whole directory, so it may name only something that does not
  exist yet or a cache `save_converted` wrote itself (its marker file and params/,
  nothing else): never a checkpoint, a suite, a parent of either, or a file.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.lexists(directory):
    return directory
  if os.path.islink(directory) or not os.path.isdir(directory):
    kind = "a symbolic link" if os.path.islink(directory) else "a file"
    raise CheckpointError(f"{directory}: is {kind}, not a converted cache; refusing to replace it")
  entries = set(os.listdir(directory))
  if not entries:
    return directory
  if not (is_converted(directory) and entries == {_META_FILE, _PARAMS_DIR}):
    held = few_names(sorted(entries))
    raise CheckpointError(
      f"{directory}: exists and is not a converted cache written by convert (it holds "
      f"{held}); refusing to replace it: give a new directory"
    )
  return directory


def _remove_stale_temporaries(directory: str) -> None:
  """Drops what a killed save left beside `directory` (`.<name>.tmp-*`, `.<name>.old-*`)."""
  parent, name = os.path.split(directory)
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    if entry.startswith((f".{name}.tmp-", f".{name}.old-")):
      path = os.path.join(parent, entry)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.unlink(path)


def save_converted(directory: str | os.PathLike, config: GPTNeoXConfig, params: Any) -> str:
  """Saves converted params (orbax) and their config (JSON) for `restore_converted`.

  Everything is written in a temporary sibling that is renamed onto `directory` last,
  so a crash leaves no directory that looks complete; what an earlier, killed save left
  beside it is removed first. `directory` must be new, empty or an earlier output of this
  function (`check_converted_target`): nothing else is ever replaced.
  """
  import jax
  import orbax.checkpoint as ocp

  directory = check_converted_target(directory)
  _remove_stale_temporaries(directory)
  leaves = jax.tree.leaves(params)
  dtypes = {np.dtype(leaf.dtype) for leaf in leaves}
  if len(dtypes) != 1:
    raise CheckpointError(
      f"params: expected one dtype for every leaf, found {sorted(map(str, dtypes))}"
    )
  found = jax.tree.map(lambda x: tuple(x.shape), params)
  if found != weights.param_shapes(config):
    raise CheckpointError("params: tree or shapes do not match the config")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = files.make_temp_dir(parent, prefix=f".{os.path.basename(directory)}.tmp-")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, _PARAMS_DIR), params)
      ckptr.wait_until_finished()
    meta = {
      "format_version": _FORMAT_VERSION,
      "dtype": weights.dtype_name(dtypes.pop()),
      "config": config.to_hf_dict(),
    }
    with open(os.path.join(tmp, _META_FILE), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    weights.replace_directory(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def is_converted(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds a complete `save_converted` output."""
  directory = os.fspath(directory)
  return os.path.isfile(os.path.join(directory, _META_FILE)) and os.path.isdir(
    os.path.join(directory, _PARAMS_DIR)
  )


@dataclasses.dataclass(frozen=True)
class Converted:
  """A `save_converted` directory, restored only when placed (`sharding.Placement.params`),
  straight onto the mesh's shardings."""

  directory: str


def converted_config(directory: str) -> GPTNeoXConfig:
  """The config stored in a converted checkpoint, read without restoring the params."""
  return _read_meta(directory)[1]


def _read_meta(directory: str) -> tuple[np.dtype, Any]:
  """(dtype, config) of a converted checkpoint's metadata; a damaged file is named."""
  meta_path = os.path.join(directory, _META_FILE)
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
      raise TypeError("expected an object with a 'config' object")
    if meta.get("format_version") != _FORMAT_VERSION:
      raise CheckpointError(
        f"{meta_path}: format_version {meta.get('format_version')!r}, this code reads "
        f"{_FORMAT_VERSION}; convert again"
      )
    dtype = weights.resolve_dtype(meta["dtype"])
    config = family.config_from_hf(meta["config"], source=meta_path)
  except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
    if isinstance(e, JaxPythiaError):  # already one line naming the file
      raise
    raise CheckpointError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from None
  return dtype, config


def restore_converted(
  directory: str | os.PathLike, sharding: Any = None
) -> tuple[GPTNeoXConfig, Any]:
  """(config, params) saved by `save_converted`, restored straight onto `sharding`.

  `sharding`: one `jax.sharding.Sharding` for every leaf, a pytree of them matching the
  params, or None (the first device).
  """
  import jax
  import orbax.checkpoint as ocp

  directory = os.path.abspath(os.fspath(directory))
  if not is_converted(directory):
    raise CheckpointError(
      f"{directory}: not a converted checkpoint (expected {_META_FILE} and {_PARAMS_DIR}/)"
    )
  dtype, config = _read_meta(directory)
  shapes = weights.param_shapes(config)
  is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
  shardings = shardings_like(jax.tree.map(lambda s: 0, shapes, is_leaf=is_shape), sharding)
  abstract = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s, dtype, sharding=sh), shapes, shardings, is_leaf=is_shape
  )
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(directory, _PARAMS_DIR), abstract)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{directory}: cannot restore the params ({e})") from None
  return config, params
