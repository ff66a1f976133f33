"""The local cache of a byte-range stream (`streams.ShardedStream`): its layout and the
item ranges already fetched, each checked by a content hash before it is used.

  <cache>/stream.json                  the layout (shards, sizes, index header, content
                                       names the server gave) and a hash of it
  <cache>/items-<start>-<stop>-<h>.npy items start..stop-1 as read; h hashes the range and
                                       the array, so a piece rewritten, damaged or renamed
                                       is found, removed and fetched again, never used

Everything is written atomically: a rerun or a second process reads it without a request.
The stream compares the layout it reads online with the cached one and empties the cache
when they differ (another stream at the same URL), so pieces of one stream never serve
another's items.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import numpy as np

from jax_pythia.data.indexed import DataError
from jax_pythia.files import atomic_write

LAYOUT_FILE = "stream.json"
_PIECE = re.compile(r"^items-(\d+)-(\d+)-([0-9a-f]{16})\.npy$")
_CHECKSUM = "checksum"


class CacheError(DataError):
  """A cache file that is damaged and cannot be fetched again (offline)."""


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def piece_hash(start: int, stop: int, items: np.ndarray) -> str:
  """Names items start..stop-1 by their range, dtype, shape and bytes."""
  h = hashlib.sha256(f"{start}-{stop}:{items.dtype.str}:{items.shape}:".encode())
  h.update(np.ascontiguousarray(items).tobytes())
  return h.hexdigest()[:16]


class RangeCache:
  """One stream's cache folder (see the module doc)."""

  def __init__(self, directory: str):
    self.directory = directory
    self._checked: set[str] = set()  # pieces whose hash held this run

  @property
  def layout_path(self) -> str:
    return os.path.join(self.directory, LAYOUT_FILE)

  def read_layout(self) -> dict[str, Any] | None:
    """The cached layout's fields; None when there is none. Raises CacheError for one
    that is damaged (not JSON, not an object, or edited: its checksum fails)."""
    try:
      with open(self.layout_path, encoding="utf-8") as f:
        fields = json.load(f)
    except FileNotFoundError:
      return None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
      raise CacheError(f"{self.layout_path}: damaged ({type(e).__name__})") from None
    if not isinstance(fields, dict) or fields.pop(_CHECKSUM, None) != _digest(fields):
      raise CacheError(f"{self.layout_path}: damaged or edited (its checksum does not hold)")
    return fields

  def write_layout(self, fields: dict[str, Any]) -> None:
    os.makedirs(self.directory, exist_ok=True)
    record = {**fields, _CHECKSUM: _digest(fields)}

    def write(tmp):
      with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)

    atomic_write(self.layout_path, write, ".json")

  def clear(self) -> None:
    """Removes the layout and every piece (they belong to another stream)."""
    if not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if name == LAYOUT_FILE or _PIECE.match(name):
        os.unlink(os.path.join(self.directory, name))
    self._checked.clear()

  def get(self, start: int, stop: int) -> np.ndarray | None:
    """Items start..stop-1 from a cached piece whose hash holds, else None. A piece whose
    hash fails is removed (the caller fetches the items again)."""
    if not os.path.isdir(self.directory):
      return None
    for name in sorted(os.listdir(self.directory)):
      m = _PIECE.match(name)
      if not m or not int(m.group(1)) <= start < stop <= int(m.group(2)):
        continue
      first, last = int(m.group(1)), int(m.group(2))
      path = os.path.join(self.directory, name)
      try:
        items = np.load(path, mmap_mode="r", allow_pickle=False)
        whole = name in self._checked or piece_hash(first, last, items) == m.group(3)
      except (OSError, ValueError, EOFError):
        whole = False
      if not whole or items.ndim != 2 or len(items) != last - first:
        os.unlink(path)  # damaged or not what its name says: never used
        continue
      self._checked.add(name)
      return np.asarray(items[start - first : stop - first])
    return None

  def put(self, start: int, stop: int, items: np.ndarray) -> None:
    name = f"items-{start}-{stop}-{piece_hash(start, stop, items)}.npy"

    def write(tmp):
      with open(tmp, "wb") as f:
        np.save(f, items)

    os.makedirs(self.directory, exist_ok=True)
    atomic_write(os.path.join(self.directory, name), write, ".npy")
    self._checked.add(name)
