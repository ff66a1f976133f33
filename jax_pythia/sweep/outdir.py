"""What a sweep's --out holds besides results: the record of what computed them, and the
cheap check that each finished checkpoint's files are whole.

`sweep.json` records everything that changes a number: the options, what identifies the
token data (a local file's resolved path, size and modification time; a stream's
location, files, sizes and the server's content names (`streams.ShardedStream.identity`);
a content hash of every training batch read; sequences per step; sequence length; the
tokenizer) and where each model's checkpoints were read from. A rerun into the same --out
must match it; a mismatch is refused naming the flag and both values, so results of
different inputs are never mixed. A rerun may add models and steps (their batches' hashes
join the record). A record with a key missing or of the wrong type, or results without a
record, are refused: nothing says what computed them.

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
from jax_pythia.sweep import results
from jax_pythia.sweep.results import read_json, write_json

RECORD_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"

#: The flag that sets each recorded data fact, for messages.
_DATA_FLAGS = {
  "kind": "--data",
  "files": "--data",
  "stream": "--data",
  "batches": "--data (the content of the batches read)",
  "sequences_per_step": "--sequences_per_step",
  "seq_len": "--data (sequence length)",
  "tokenizer": "--tokenizer",
}


#: Options a record may lack, and what their absence means (SweepOptions.fingerprint).
#: A record from before --metrics computed another protocol than today's default (float32
#: condition numbers, NaN where unresolved; no nuclear norm): a rerun into it is refused,
#: naming --metrics and what the old run computed, rather than mixing the two in one table.
_ABSENT_OPTIONS = {
  "matmul_precision": "default",
  "metrics": "the protocol before --metrics (float32 condition numbers, no nuclear norm)",
}
#: What every record holds: without one of these it no longer says what computed its results.
_RECORD_SECTIONS = ("options", "data", "models")
_REQUIRED_DATA = {"kind": str, "seq_len": int}
#: Where a sweep's per-checkpoint results live under --out (results.checkpoint_paths).
_RESULT_FOLDERS = ("checkpoints", "activations", "status")


class OutDirError(SweepError):
  """An --out that cannot take these results (a file, other inputs, an unreadable record)."""


# ------------------------------------------------------------------------------ identity


def _file_identity(path: str | os.PathLike) -> dict[str, Any]:
  real = os.path.realpath(os.fspath(path))
  info = os.stat(real)
  return {"path": real, "bytes": info.st_size, "mtime_ns": info.st_mtime_ns}


def content_hash(array: np.ndarray) -> str:
  """A short hash of an array's bytes: names a batch of tokens by its content."""
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def data_identity(source: Any, batches: Mapping[str, str] | None = None) -> dict[str, Any]:
  """What identifies a token source's content: a stream's own identity (location, files,
  sizes, content names; `identity()`) or a local file's (resolved path, size, mtime);
  sequences per step and sequence length; a text source's tokenizer by its hash; and
  `batches`, {"<step>x<sequences>": content_hash} of the training batches read."""
  dataset = getattr(source, "dataset", None)
  identity: dict[str, Any] = {"kind": type(source).__name__}
  own = getattr(source, "identity", None) or getattr(dataset, "identity", None)
  if own is not None:  # a remote or staged stream names itself (never by a local stat)
    identity["stream"] = own()
  elif hasattr(dataset, "bin_path"):
    identity["files"] = [_file_identity(p) for p in (dataset.idx_path, dataset.bin_path)]
  elif os.path.isfile(source.name):
    identity["files"] = [_file_identity(source.name)]
  else:  # named by no local file: its batches' hashes name its content
    identity["stream"] = {"location": source.name}
  identity["seq_len"] = int(source.seq_len)
  if batches:
    identity["batches"] = dict(batches)
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
  old_options, new_options = previous["options"], record["options"]
  for key in sorted(set(old_options) | set(new_options)):
    old = old_options.get(key, _ABSENT_OPTIONS.get(key))
    value = new_options.get(key, _ABSENT_OPTIONS.get(key))
    if old != value:
      found.append(f"--{key}: old {_show(old)}, new {_show(value)}")
  old_data = previous["data"]
  for key in sorted(set(old_data) | set(record["data"])):
    old, new = old_data.get(key), record["data"].get(key)
    if key == "batches":  # a rerun may read more batches; those both read must agree
      old, new = old or {}, new or {}
      changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
      if changed:
        k = changed[0]
        found.append(
          f"{_DATA_FLAGS[key]}: the batch {k} (step x sequences) had content hash {old[k]}, "
          f"now {new[k]}"
        )
    elif old != new:
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
      held = holds_results(out_dir)
      if held:
        raise OutDirError(
          f"--out={out_dir} holds results ({held}) but no {RECORD_FILE} saying what computed "
          f"them; use another --out, or remove them"
        )
      write_json(path, record)
      return
    previous = read_json(path, "the record of the options its results were computed with")
    _check_record(path, previous, record)
    differences = _differences(previous, record)
    if differences:
      raise OutDirError(
        f"--out={out_dir} holds results computed with other options: "
        f"{'; '.join(differences)}. Use another --out, or remove it"
      )
    # New models and the batches new steps read join the record.
    batches = {**record["data"].get("batches", {}), **previous["data"].get("batches", {})}
    merged = {
      "options": record["options"],
      "data": {**record["data"], **({"batches": batches} if batches else {})},
      "models": {**record["models"], **previous["models"]},
    }
    if merged != previous:
      write_json(path, merged)


def holds_results(out_dir: str) -> str:
  """A result file under `out_dir` (a per-checkpoint file or a gathered table), or ''."""
  for folder in _RESULT_FOLDERS:
    for dirpath, _, names in os.walk(os.path.join(out_dir, folder)):
      for name in sorted(names):
        if not name.startswith(".tmp-"):
          return os.path.join(dirpath, name)
  table = os.path.join(out_dir, "metrics.parquet")
  return table if os.path.exists(table) else ""


def _check_record(path: str, previous: Any, record: Mapping[str, Any]) -> None:
  """Refuses a record that lost a key or holds one of the wrong type, naming file and key:
  compared as it is, it would take other inputs for its own and mix their results."""

  def refuse(key: str, why: str) -> OutDirError:
    return OutDirError(
      f"{path}: {key} {why}, so it no longer says what computed the results beside it; "
      f"use another --out, or remove the folder's results"
    )

  if not isinstance(previous, dict):
    raise refuse("the record", "is not a JSON object")
  for section in _RECORD_SECTIONS:
    if not isinstance(previous.get(section), dict):
      why = "is missing" if section not in previous else "is not an object"
      raise refuse(f"key {section!r}", why)
  old = previous["options"]
  for key, value in record["options"].items():
    if key not in old and key not in _ABSENT_OPTIONS:
      raise refuse(f"key 'options.{key}'", "is missing")
    if key in old and not _same_type(old[key], value):
      raise refuse(f"key 'options.{key}'", f"holds {old[key]!r}, of the wrong type")
  for key, kind in _REQUIRED_DATA.items():
    if not isinstance(previous["data"].get(key), kind):
      raise refuse(f"key 'data.{key}'", "is missing or of the wrong type")
  batches = previous["data"].get("batches", {})
  if not isinstance(batches, dict) or not all(isinstance(v, str) for v in batches.values()):
    raise refuse("key 'data.batches'", "is not an object of content hashes")
  if not all(isinstance(v, str) for v in previous["models"].values()):
    raise refuse("key 'models'", "holds a location that is not a string")


def _same_type(old: Any, new: Any) -> bool:
  return old is None or new is None or type(old) is type(new)


# ------------------------------------------------------------------------------ checking


def verify_finished(
  paths: Mapping[tuple[str, int], tuple[str, str, str]],
  notify: Callable[[str], None],
  changed: Callable[..., None] = lambda *paths: None,
) -> list[tuple[str, int]]:
  """Checks every finished checkpoint (`paths`: (model, step) -> (metrics .parquet,
  activations .npz, status .json)); returns those that must be computed again.

  A damaged one has its files removed and is named in one line through `notify`. One whose
  status record was lost (the run died between its rows and its status) gets it back.
  `changed(*paths)` is told of each file removed or restored (`store.OutStore.sync`).
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
    why = results.check_finished(metrics_path, acts_path, status)
    if why:
      notify(f"{model} step {step}: {why}; computing it again")
      for path in (metrics_path, acts_path, status_path):
        with contextlib.suppress(FileNotFoundError):
          os.unlink(path)
      changed(metrics_path, acts_path, status_path)
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
      changed(status_path)
  return redo
