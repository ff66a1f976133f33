"""What a sweep's --out holds besides results: the record of what computed them, and the
cheap check that each finished checkpoint's files are whole.

`sweep.json` records everything that changes a number: the options, what identifies the
token data (its files' resolved paths, sizes and modification times; sequences per step;
sequence length; the tokenizer) and where each model's checkpoints were read from. A
rerun into the same --out must match it; a mismatch is refused naming the flag and both
values, so results of different inputs are never mixed. A rerun may add models.

Claiming --out (reading, comparing and writing the record) holds an exclusive lock on
`<out>/.sweep.lock`: two sweeps started together cannot both pass the check with
different options. The kernel releases the lock when its process dies, so a killed
sweep never blocks the next one. Two identical sweeps may run at once: every result
file is written atomically, so they write the same bytes.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jax_pythia.errors import SweepError
from jax_pythia.sweep.results import read_json, write_json

RECORD_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"

#: The flag that sets each recorded data fact, for messages.
_DATA_FLAGS = {
  "kind": "--data",
  "files": "--data",
  "sequences_per_step": "--sequences_per_step",
  "seq_len": "--data (sequence length)",
  "tokenizer": "--tokenizer",
}


class OutDirError(SweepError):
  """An --out that cannot take these results (a file, other inputs, an unreadable record)."""


# ------------------------------------------------------------------------------ identity


def _file_identity(path: str | os.PathLike) -> dict[str, Any]:
  real = os.path.realpath(os.fspath(path))
  info = os.stat(real)
  return {"path": real, "bytes": info.st_size, "mtime_ns": info.st_mtime_ns}


def data_identity(source: Any) -> dict[str, Any]:
  """What identifies a token source's content: its files (resolved path, size, mtime),
  sequences per step and sequence length; a text source's tokenizer by its hash."""
  dataset = getattr(source, "dataset", None)
  if dataset is not None and hasattr(dataset, "bin_path"):
    paths = [dataset.idx_path, dataset.bin_path]
  else:
    paths = [source.name]
  identity: dict[str, Any] = {
    "kind": type(source).__name__,
    "files": [_file_identity(p) for p in paths],
    "seq_len": int(source.seq_len),
  }
  if getattr(source, "sequences_per_step", None) is not None:
    identity["sequences_per_step"] = int(source.sequences_per_step)
  tokenizer = getattr(source, "tokenizer", None)
  if tokenizer is not None and hasattr(tokenizer, "to_str"):
    identity["tokenizer"] = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
  return identity


def _show(value: Any) -> str:
  """A recorded value as a user reads it (data files: path, size, modification time)."""
  if isinstance(value, list) and value and isinstance(value[0], dict) and "path" in value[0]:
    return " + ".join(
      f"{f['path']} ({f['bytes']:,} bytes, modified "
      f"{datetime.datetime.fromtimestamp(f['mtime_ns'] / 1e9):%Y-%m-%d %H:%M:%S})"
      for f in value
    )
  return json.dumps(value) if isinstance(value, (str, type(None), bool)) else str(value)


def _differences(previous: Mapping[str, Any], record: Mapping[str, Any]) -> list[str]:
  """`<flag>: old X, new Y` for each recorded fact that changed."""
  found = []
  for key, value in record.get("options", {}).items():
    old = previous.get("options", {}).get(key, value)
    if old != value:
      found.append(f"--{key}: old {_show(old)}, new {_show(value)}")
  old_data = previous.get("data")
  if old_data is not None:
    for key in sorted(set(old_data) | set(record["data"])):
      old, new = old_data.get(key), record["data"].get(key)
      if old != new:
        found.append(f"{_DATA_FLAGS.get(key, '--data')}: old {_show(old)}, new {_show(new)}")
  for name, location in record.get("models", {}).items():
    old = previous.get("models", {}).get(name, location)
    if old != location:
      found.append(f"--models ({name}'s checkpoints): old {old}, new {location}")
  return found


# ------------------------------------------------------------------------------ claiming


def check_is_directory(out_dir: str) -> None:
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise OutDirError(f"--out={out_dir} is a file; give a directory (new or a sweep's)")


@contextlib.contextmanager
def locked(out_dir: str) -> Iterator[None]:
  """An exclusive lock on `out_dir` (waits for another holder; released at exit or death)."""
  check_is_directory(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  fd = os.open(os.path.join(out_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def claim(
  out_dir: str,
  options: Mapping[str, Any],
  data: Mapping[str, Any],
  models: Mapping[str, str],
) -> None:
  """Records these inputs in `<out_dir>/sweep.json`, or checks them against the record.

  `models`: each model's name and the resolved location of its checkpoints. Raises
  OutDirError naming every flag whose value differs from the record, with both values.
  Models new to `out_dir` are added to the record.
  """
  path = os.path.join(out_dir, RECORD_FILE)
  record = {"options": dict(options), "data": dict(data), "models": dict(models)}
  record = json.loads(json.dumps(record))  # tuples -> lists, as they read back
  with locked(out_dir):
    if not os.path.exists(path):
      write_json(path, record)
      return
    previous = read_json(path, "the record of the options its results were computed with")
    if not isinstance(previous, dict):
      raise OutDirError(f"{path}: not a sweep record (expected a JSON object); remove it and rerun")
    differences = _differences(previous, record)
    if differences:
      raise OutDirError(
        f"--out={out_dir} holds results computed with other options: "
        f"{'; '.join(differences)}. Use another --out, or remove it"
      )
    # Records from before data and model locations were recorded gain them now.
    merged = {
      "options": record["options"],
      "data": previous.get("data") or record["data"],
      "models": {**record["models"], **previous.get("models", {})},
    }
    if merged != previous:
      write_json(path, merged)


# ------------------------------------------------------------------------------ checking


def check_finished(metrics_path: str, acts_path: str, status: Mapping[str, Any] | None) -> str:
  """'' when a finished checkpoint's files are whole (they open; the rows are as many as
  its status says), else why not. Reads only the parquet footer and the .npz directory."""
  import pyarrow.parquet as pq

  try:
    rows = pq.read_metadata(metrics_path).num_rows
  except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
    return f"{metrics_path} does not open ({type(e).__name__}: {e})"
  expected = (status or {}).get("rows")
  if not rows or (expected is not None and rows != expected):
    return f"{metrics_path} holds {rows} rows, expected {expected or 'some'}"
  try:
    with np.load(acts_path) as f:
      if not f.files:
        return f"{acts_path} holds no activations"
  except FileNotFoundError:
    return f"{acts_path} is missing"
  except Exception as e:  # noqa: BLE001 - zipfile/numpy raise several kinds
    return f"{acts_path} does not open ({type(e).__name__}: {e})"
  return ""


def verify_finished(
  paths: Mapping[tuple[str, int], tuple[str, str, str]],
  notify: Callable[[str], None],
) -> list[tuple[str, int]]:
  """Checks every finished checkpoint (`paths`: (model, step) -> (metrics .parquet,
  activations .npz, status .json)); returns those that must be computed again.

  A damaged one has its files removed and is named in one line through `notify`. One whose
  status record was lost (the run died between its rows and its status) gets it back.
  """
  redo = []
  for (model, step), (metrics_path, acts_path, status_path) in paths.items():
    if not os.path.exists(metrics_path):
      continue
    try:
      status = read_json(status_path, "a status record") if os.path.exists(status_path) else None
    except SweepError:
      status = None
    if status is not None and (not isinstance(status, dict) or status.get("status") != "ok"):
      status = None
    why = check_finished(metrics_path, acts_path, status)
    if why:
      notify(f"{model} step {step}: {why}; computing it again")
      for path in (metrics_path, acts_path, status_path):
        with contextlib.suppress(FileNotFoundError):
          os.unlink(path)
      redo.append((model, step))
    elif status is None:
      import pyarrow.parquet as pq

      write_json(
        status_path,
        {
          "model": model,
          "step": step,
          "status": "ok",
          "message": "status restored by a rerun: the run that computed it stopped first",
          "load_s": None,
          "compute_s": None,
          "rows": pq.read_metadata(metrics_path).num_rows,
        },
      )
  return redo
