"""Folders staged by `tools.fetch_data`: the few training batches a sweep needs, copied
once from the stream (the Hub, HTTP, a shard folder) into a small local
`batches.bin/.idx` with `manifest.json` mapping each staged step to its items.

Each staged batch carries a content hash of its step's item range and tokens
(`range_cache.piece_hash`), checked the first time the batch is read: a manifest edited to
point a step at other sequences, a flipped byte in `batches.bin`, or other per-batch
fields (`staged_first`, `item_size`) that no longer match are refused naming the folder,
never read as the step's batch. A manifest field that is missing or of the wrong type is
refused in one line naming the file and field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from jax_pythia.data import indexed as data
from jax_pythia.data.indexed import DataError, DataFileNotFoundError
from jax_pythia.data.range_cache import piece_hash
from jax_pythia.files import atomic_write

STAGED_MANIFEST = "manifest.json"
STAGED_PREFIX = "batches"
STAGED_FORMAT = "jax_pythia staged training batches"
#: The manifest's fields and their types (per batch: step, items [start, stop), where the
#: items start in batches.bin, and their content hash).
_FIELDS = {
  "source": str,
  "source_items": int,
  "sequences_per_step": int,
  "item_size": int,
  "batches": list,
}
_BATCH_FIELDS = {"step": int, "items": list, "staged_first": int, "hash": str}


def _is(value: Any, kind: type) -> bool:
  return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _checked_manifest(path: str, manifest: Any) -> list[tuple[int, int, int, int, str]]:
  """(step, first item, stop, first staged item, hash) of each staged batch, sorted;
  DataError naming the file and field that is missing or mistyped."""

  def refuse(field: str) -> DataError:
    return DataError(
      f"{path}: {field} is missing or of the wrong type; stage the folder again with "
      f"python -m tools.fetch_data"
    )

  if not isinstance(manifest, dict) or manifest.get("format") != STAGED_FORMAT:
    raise DataError(f"{path}: not a manifest of staged batches (format {STAGED_FORMAT!r})")
  for field, kind in _FIELDS.items():
    if not _is(manifest.get(field), kind):
      raise refuse(f"field {field!r}")
  if manifest["sequences_per_step"] < 1 or manifest["item_size"] < 1:
    raise refuse("'sequences_per_step' or 'item_size'")
  ranges = []
  for i, batch in enumerate(manifest["batches"]):
    where = f"batches[{i}]"
    if not isinstance(batch, dict):
      raise refuse(where)
    for field, kind in _BATCH_FIELDS.items():
      if not _is(batch.get(field), kind):
        raise refuse(f"{where}.{field}")
    items = batch["items"]
    if len(items) != 2 or not all(_is(x, int) for x in items) or not 0 <= items[0] < items[1]:
      raise refuse(f"{where}.items")
    ranges.append((batch["step"], items[0], items[1], batch["staged_first"], batch["hash"]))
  return sorted(ranges, key=lambda r: r[1])


class StagedStream:
  """A folder written by `stage`, standing in for the whole stream. Items keep their
  numbers in the original stream, so `data.batch_of_step` finds the batch of a step
  exactly as in the original; an item that was not staged is an error naming the step
  range and how to stage it, a batch whose hash fails one naming the folder."""

  def __init__(self, directory: str):
    self.directory = directory
    self.name = directory
    self.path = path = os.path.join(directory, STAGED_MANIFEST)
    try:
      with open(path, encoding="utf-8") as f:
        self.manifest = json.load(f)
    except FileNotFoundError:
      raise DataFileNotFoundError(
        f"{path} not found: not a folder staged by tools.fetch_data"
      ) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
      raise DataError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    self.ranges = _checked_manifest(path, self.manifest)
    self.staged = data.MMapIndexedDataset(os.path.join(directory, STAGED_PREFIX))
    if sum(b - a for _, a, b, _, _ in self.ranges) != len(self.staged):
      raise DataError(
        f"{path} lists {sum(b - a for _, a, b, _, _ in self.ranges)} staged items, but "
        f"{self.staged.bin_path} holds {len(self.staged)}: the folder is incomplete"
      )
    self._verified: set[int] = set()  # batches (by first item) whose hash held

  @property
  def sequences_per_step(self) -> int:
    return self.manifest["sequences_per_step"]

  def identity(self) -> dict[str, Any]:
    """The staged folder and the stream it was staged from; the batches' own content is
    named by their hashes (`outdir.data_identity`)."""
    return {
      "staged": os.path.realpath(self.directory),
      "source": self.manifest["source"],
      "source_items": len(self),
    }

  def __len__(self) -> int:
    return self.manifest["source_items"]

  def _staged_range(self, start: int, stop: int) -> tuple[int, int]:
    for step, a, b, first, expected in self.ranges:
      if a <= start and stop <= b:
        if a not in self._verified:
          self._verify(step, a, b, first, expected)
        return first + start - a, first + stop - a
    sps = self.sequences_per_step
    raise DataError(
      f"--data={self.directory}: items {start}..{stop - 1} (step {start // sps}) were not "
      f"staged from {self.manifest['source']}; stage them with python -m tools.fetch_data "
      f"(same --models/--steps and sweep options as the sweep) or read the stream directly"
    )

  def _verify(self, step: int, a: int, b: int, first: int, expected: str) -> None:
    """The staged batch of `step` is what was staged (its items' range and tokens)."""
    size = self.manifest["item_size"]
    fits = 0 <= first and first + b - a <= len(self.staged)
    items = self.staged.read_items(first, first + b - a) if fits else None
    if items is None or items.shape[1] != size or piece_hash(a, b, items) != expected:
      raise DataError(
        f"--data={self.directory}: the staged batch of step {step} (items {a}..{b - 1}) "
        f"does not match its content hash in {self.path}: batches.bin or the manifest "
        f"changed since staging; stage the folder again with python -m tools.fetch_data"
      )
    self._verified.add(a)

  def item_sizes(self, start: int, stop: int) -> np.ndarray:
    # Every staged item has the one length the staging checked; item 0 need not be staged.
    return np.full(stop - start, self.manifest["item_size"], np.int64)

  def read_items(self, start: int, stop: int) -> np.ndarray:
    return self.staged.read_items(*self._staged_range(start, stop))


def is_staged(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, STAGED_MANIFEST))


def stage(
  stream: data.IndexedStream,
  needs: dict[int, int],
  out_dir: str,
  sequences_per_step: int = data.SEQUENCES_PER_STEP,
  progress: Callable[[int], Any] | None = None,
) -> dict:
  """Copies the batches `needs` ({step: sequences}) of `stream` into `out_dir` (see
  `StagedStream`); returns the manifest. Written `.bin` first, `.idx`, then the manifest,
  each atomically, so a crash leaves no folder that looks complete."""
  ranges = {}
  for step, n in sorted(needs.items()):
    ranges[step] = data.step_items(step, n, sequences_per_step)
    if ranges[step][1] > len(stream):
      raise DataError(
        f"{stream.name} holds {len(stream)} items; step {step} needs items "
        f"{ranges[step][0]}..{ranges[step][1] - 1}"
      )
  batches, item_size, first = [], None, 0

  def items():
    nonlocal item_size, first
    for step, (a, b) in ranges.items():
      tokens = stream.read_items(a, b)
      if item_size is None:
        item_size = tokens.shape[1]
      if tokens.shape[1] != item_size:
        raise DataError(
          f"{stream.name}: step {step} has items of {tokens.shape[1]} tokens, earlier steps "
          f"{item_size}; training sequences all have one length"
        )
      hash_ = piece_hash(a, b, tokens)
      batches.append({"step": step, "items": [a, b], "staged_first": first, "hash": hash_})
      first += b - a
      yield from tokens
      if progress:
        progress(step)

  dtype = getattr(stream, "dtype", np.dtype(np.uint16))
  os.makedirs(out_dir, exist_ok=True)
  data.write_mmap_indexed_dataset(os.path.join(out_dir, STAGED_PREFIX), items(), dtype)
  manifest = {
    "format": STAGED_FORMAT,
    "source": stream.name,
    "source_items": len(stream),
    "sequences_per_step": sequences_per_step,
    "item_size": item_size,
    "batches": batches,
  }

  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)

  atomic_write(os.path.join(out_dir, STAGED_MANIFEST), write, ".json")
  return manifest
