"""Pythia's training stream read by byte range: from the Hub, any fsspec URL, a plain HTTP
server, or a local folder of unjoined shards. Never a whole shard.

The Hub ships the pre-tokenized Pile (`EleutherAI/pile-deduped-pythia-preshuffled`, and
`...-standard-...` for the standard models) as shards named like Pythia's
`utils/shard_memmap.py` writes them, `<base>-<i:05>-of-<last:05>.bin`, plus one
`<base>.idx` indexing the joined stream (docs/pythia.md, "The training data"). Joined,
item i (one 2,049-token training sequence) lies at bytes
[pointers[i], pointers[i] + sizes[i] * 2) of the concatenation, so it lives in shard
`offset // shard_size`; sequences and batches straddle shard ends. As in Pythia's
`utils/unshard_memmap.py`, the shard size is shard 0's file size (never assumed).

`ShardedStream` is an `data.IndexedStream`: `data.MMapTokenSource` and `data.batch_of_step`
read it exactly as they read a local `document.bin/.idx` (one formula for the batch of a
step, one parser of the index header). What it checks, by range reads only:
- the index header, and that the .idx is as long as the header says;
- that the index's last item ends exactly where the joined shards end (a disagreeing index
  or a missing or truncated last shard shows here, before any batch is read);
- for each read: the `sizes` and `pointers` entries of the items read (back to back, as
  Megatron writes them), each touched shard's size, and that every range came back whole.

Fetched items go to a local cache (`cache_dir`, default `$JAX_PYTHIA_DATA_CACHE` or
`~/.cache/jax_pythia/data`) keyed by the stream (repository and revision for the Hub, the
URL otherwise) and the item range, each piece checked by its content hash before use
(`range_cache`): a rerun or a second process reads them without a request. Online, the
layout is read again and a cache of another layout emptied. Files are read through
`transports`: transient failures (timeouts, refused connections, 5xx) are retried with
exponential backoff; then one `StreamError` line names the URL, byte range and cause.
With HF_HUB_OFFLINE=1 an `hf://` stream serves what its cache holds and names what is not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any

import numpy as np

from jax_pythia.data import indexed as data
from jax_pythia.data import range_cache, staged
from jax_pythia.data.indexed import DataError, DataFileNotFoundError
from jax_pythia.data.sources import MMapTokenSource
from jax_pythia.data.transports import (
  DEFAULT_ATTEMPTS,
  DEFAULT_BACKOFF_S,
  DEFAULT_TIMEOUT_S,
  Retrying,
  StreamError,
  StreamOfflineError,
  Transport,
  open_transport,
)

#: Pythia's training streams on the Hub (the deduped models trained on the first).
PILE_DEDUPED = "hf://datasets/EleutherAI/pile-deduped-pythia-preshuffled"
PILE_STANDARD = "hf://datasets/EleutherAI/pile-standard-pythia-preshuffled"

SHARD_NAME = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<last>\d{5})\.bin$")
CACHE_ENV = "JAX_PYTHIA_DATA_CACHE"


def shard_name(base: str, index: int, last: int) -> str:
  """Pythia's `utils/shard_memmap.py` naming: `document-00003-of-00020.bin`."""
  return f"{base}-{index:05d}-of-{last:05d}.bin"


def default_cache_dir() -> str:
  return os.path.expanduser(
    os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "jax_pythia", "data")
  )


# --------------------------------------------------------------------------- the stream


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which files hold the joined stream: its shards in order and its index."""

  idx_name: str
  shard_names: tuple[str, ...]
  shard_size: int  # bytes of every shard but the last (shard 0's size)
  last_shard_size: int
  dtype: str
  count: int
  doc_count: int
  first_item_size: int
  #: {file name: what names its content} where the server says (ETag, Last-Modified, ...)
  versions: dict = dataclasses.field(default_factory=dict)

  @property
  def total_bytes(self) -> int:
    return self.shard_size * (len(self.shard_names) - 1) + self.last_shard_size


def _find_layout_names(transport: Transport, name: str) -> tuple[str, list[str]]:
  """(index name, shard names in order) from a named shard or joined .bin, or a listing."""
  if name:
    m = SHARD_NAME.match(name)
    if m:
      base, last = m.group("base"), int(m.group("last"))
      return f"{base}.idx", [shard_name(base, i, last) for i in range(last + 1)]
    stem = name[: -len(".bin")] if name.endswith((".bin", ".idx")) else name
    return f"{stem}.idx", [f"{stem}.bin"]
  names = transport.list()
  if names is None:
    raise StreamError(f"{transport.url('')}: cannot list it; name shard 0 or a joined .bin")
  shards: dict[str, dict[int, tuple[int, str]]] = {}
  for n in names:
    if m := SHARD_NAME.match(n):
      shards.setdefault(m.group("base"), {})[int(m.group("index"))] = (int(m.group("last")), n)
  indexed = [b for b in sorted(shards) if f"{b}.idx" in names]
  if not shards or not indexed:
    joined = sorted(n[:-4] for n in names if n.endswith(".idx") and n[:-4] + ".bin" in names)
    if len(joined) == 1:
      return f"{joined[0]}.idx", [f"{joined[0]}.bin"]
    found = ", ".join(names[:8]) or "nothing"
    raise DataFileNotFoundError(
      f"{transport.url('')}: no <base>-<i:05>-of-<last:05>.bin shards with a <base>.idx "
      f"(nor one joined .bin/.idx pair); found {found}"
    )
  if len(indexed) > 1:
    raise StreamError(f"{transport.url('')}: several sharded streams ({indexed}); name shard 0")
  base = indexed[0]
  last = max(last for last, _ in shards[base].values())
  for i in range(last + 1):
    if i not in shards[base]:
      raise DataFileNotFoundError(
        f"{transport.url(shard_name(base, i, last))}: shard {i} of {last + 1} is missing"
      )
  return f"{base}.idx", [shard_name(base, i, last) for i in range(last + 1)]


class ShardedStream:
  """A Megatron-indexed token stream read by byte range (see the module doc).

  Nothing is requested until a method needs it, so an offline rerun that the cache
  serves makes no request at all. `requests` counts the ranges and sizes asked for.
  """

  def __init__(
    self,
    location: str,
    *,
    cache_dir: str | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff_s: float = DEFAULT_BACKOFF_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    transport: Transport | None = None,
  ):
    self.location = location
    if transport is None:
      transport, self._named = open_transport(location, timeout_s)
    else:
      self._named = ""
    self.transport = transport
    self.remote = Retrying(transport, attempts, backoff_s)
    self.name = location
    self.cache = None
    if cache_dir is not None:
      digest = hashlib.sha256(transport.key.encode()).hexdigest()[:16]
      readable = re.sub(r"[^\w.@-]+", "_", transport.key).strip("_")[-80:]
      self.cache = os.path.join(cache_dir, f"{readable}-{digest}")
    self._cache = range_cache.RangeCache(self.cache) if self.cache else None
    self._layout: Layout | None = None
    self._checked_shards: set[int] = set()
    self._last: tuple[int, int, np.ndarray] | None = None  # the last items read

  def __repr__(self) -> str:
    return f"ShardedStream({self.location!r}, cache={self.cache!r})"

  # -- the network, or a clear word on why not

  def _online(self, missing: str) -> Retrying:
    reason = self.transport.offline_reason()
    if reason:
      where = f"the cache {self.cache}" if self.cache else "there is no cache, so it"
      raise StreamOfflineError(
        f"{self.location} is offline ({reason}) and {where} lacks {missing}; fetch it while "
        f"online (tools.fetch_data stages it for offline hosts) or unset HF_HUB_OFFLINE"
      )
    return self.remote

  # -- layout and index checks

  @property
  def layout(self) -> Layout:
    """Offline, the cached layout; online, the one read now (a few small requests), and a
    cache that holds another layout (another stream now at this URL, or an edited
    `stream.json`) is emptied first: its pieces are not this stream's."""
    if self._layout is None:
      if self.transport.offline_reason():
        self._layout = self._cached_layout()
        if self._layout is None:
          self._online("the stream's index and shard sizes")  # raises, naming the cache
      else:
        try:
          cached = self._cached_layout()
        except range_cache.CacheError:
          cached = None
          self._cache.clear()
        self._layout = self._read_layout()
        if self._cache and cached != self._layout:
          self._cache.clear()
          self._cache.write_layout(_layout_fields(self._layout))
    return self._layout

  def identity(self) -> dict[str, Any]:
    """What names this stream's content for a sweep's record: where it is (repository and
    revision for the Hub, else the URL or folder), its files and their sizes, and the
    server's name for their content where it gives one (ETag, Last-Modified, blob id). A
    rewrite with the same sizes shows in the content hashes of the batches read
    (`outdir.data_identity`), not here: a local folder's modification time is not used."""
    layout = self.layout
    identity = {
      "location": self.transport.key,
      "index": layout.idx_name,
      "shards": len(layout.shard_names),
      "shard_bytes": layout.shard_size,
      "last_shard_bytes": layout.last_shard_size,
      "items": layout.count,
    }
    if layout.versions:
      identity["versions"] = dict(sorted(layout.versions.items()))
    return identity

  def _cached_layout(self) -> Layout | None:
    """The cache's layout, None without one; raises CacheError naming a damaged one."""
    if not self._cache:
      return None
    fields = self._cache.read_layout()
    if fields is None:
      return None
    layout = _layout_from_fields(fields)
    if layout is None:
      raise range_cache.CacheError(
        f"{self._cache.layout_path}: not a stream layout (a field is missing or mistyped)"
      )
    return layout

  def _read_layout(self) -> Layout:
    remote = self._online("the stream's index and shard sizes")
    idx_name, shards = _find_layout_names(self.transport, self._named)
    idx_url = self.transport.url(idx_name)
    idx_size = remote.size(idx_name)
    header = data.parse_index_header(
      remote.read(idx_name, 0, min(data.INDEX_HEADER_SIZE, idx_size)), idx_url, idx_size
    )
    if idx_size != header.nbytes:
      raise StreamError(
        f"index {idx_url} is {idx_size} bytes, but its header announces {header.count} items "
        f"and {header.doc_count} documents, which make {header.nbytes}"
      )
    shard_size = remote.size(shards[0])
    last_size = remote.size(shards[-1]) if len(shards) > 1 else shard_size
    first_size = last_end = 0
    if header.count:
      first_size = int(self._index_entries(remote, idx_name, header, 0, 1)[0][0])
      sizes, pointers = self._index_entries(remote, idx_name, header, header.count - 1, 1)
      last_end = int(pointers[0]) + int(sizes[0]) * header.dtype.itemsize
    layout = Layout(
      idx_name,
      tuple(shards),
      shard_size,
      last_size,
      header.dtype.name,
      header.count,
      header.doc_count,
      first_size,
      dict(self.transport.versions),
    )
    if last_end != layout.total_bytes:
      raise StreamError(
        f"index {idx_url} disagrees with the shards: its last item ends at byte {last_end}, "
        f"the {len(shards)} shard(s) hold {layout.total_bytes} bytes ({shards[0]} "
        f"{shard_size} bytes, {shards[-1]} {last_size}); a shard is truncated or missing, "
        f"or the index belongs to another stream"
      )
    return layout

  @staticmethod
  def _index_entries(
    remote: Retrying, idx_name: str, header: data.IndexHeader, start: int, n: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """`sizes` and `pointers` of items start .. start+n-1, by two range reads."""
    a = header.sizes_offset + 4 * start
    sizes = np.frombuffer(remote.read(idx_name, a, a + 4 * n), "<i4")
    b = header.pointers_offset + 8 * start
    pointers = np.frombuffer(remote.read(idx_name, b, b + 8 * n), "<i8")
    return sizes, pointers

  # -- IndexedStream

  def __len__(self) -> int:
    return self.layout.count

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.layout.dtype)

  def item_sizes(self, start: int, stop: int) -> np.ndarray:
    if (start, stop) == (0, 1):
      return np.array([self.layout.first_item_size])
    # batch_of_step asks for the sizes, then the items: one read serves both.
    return np.full(stop - start, self.read_items(start, stop).shape[1], np.int64)

  def read_items(self, start: int, stop: int) -> np.ndarray:
    if self._last is not None and self._last[:2] == (start, stop):
      return self._last[2]
    items = self._from_cache(start, stop)
    if items is None:
      items = self._read(start, stop)
      self._to_cache(start, stop, items)
    self._last = (start, stop, items)
    return items

  # -- reading

  def _read(self, start: int, stop: int) -> np.ndarray:
    layout = self.layout
    if not 0 <= start < stop <= layout.count:
      raise DataError(f"{self.location} holds {layout.count} items; asked for {start}..{stop - 1}")
    remote = self._online(f"items {start}..{stop - 1}")
    header = data.IndexHeader(np.dtype(layout.dtype), layout.count, layout.doc_count)
    idx_url = self.transport.url(layout.idx_name)
    sizes, pointers = self._index_entries(remote, layout.idx_name, header, start, stop - start)
    itemsize = header.dtype.itemsize
    if sizes.min() != sizes.max():
      raise DataError(
        f"index {idx_url}: items {start}..{stop - 1} have unequal lengths "
        f"({sizes.min()}..{sizes.max()} tokens); training sequences all have seq_len + 1"
      )
    length = int(sizes[0])
    expected = int(pointers[0]) + np.arange(stop - start, dtype=np.int64) * length * itemsize
    if (pointers != expected).any():
      i = int(np.flatnonzero(pointers != expected)[0])
      raise StreamError(
        f"index {idx_url} is corrupt: item {start + i} starts at byte {int(pointers[i])}, but "
        f"items are {length * itemsize} bytes back to back, so it should start at "
        f"{int(expected[i])}"
      )
    begin, end = int(pointers[0]), int(pointers[0]) + (stop - start) * length * itemsize
    raw = self._read_joined(remote, begin, end)
    return np.frombuffer(raw, header.dtype).reshape(stop - start, length)

  def _read_joined(self, remote: Retrying, begin: int, end: int) -> bytes:
    """Bytes [begin, end) of the joined stream, from the one or two shards they lie in."""
    layout = self.layout
    if end > layout.total_bytes:
      raise StreamError(
        f"{self.location}: the index points at bytes {begin}..{end - 1}, past the end of the "
        f"shards ({layout.total_bytes} bytes)"
      )
    parts = []
    offset = begin
    while offset < end:
      shard = min(offset // layout.shard_size, len(layout.shard_names) - 1)
      shard_begin = shard * layout.shard_size
      is_last = shard == len(layout.shard_names) - 1
      stop = end if is_last else min(end, shard_begin + layout.shard_size)
      name = layout.shard_names[shard]
      self._check_shard(remote, shard)
      parts.append(remote.read(name, offset - shard_begin, stop - shard_begin))
      offset = stop
    return b"".join(parts)

  def _check_shard(self, remote: Retrying, shard: int) -> None:
    """A middle shard's size (once): a truncated shard would shift every item after it."""
    checked = self._checked_shards
    layout = self.layout
    if shard in checked or shard in (0, len(layout.shard_names) - 1):
      return
    name = layout.shard_names[shard]
    size = remote.size(name)
    if size != layout.shard_size:
      raise StreamError(
        f"{self.transport.url(name)} is {size} bytes; every shard but the last must be as "
        f"long as shard 0 ({layout.shard_size} bytes): it is truncated"
      )
    checked.add(shard)

  # -- cache

  def _from_cache(self, start: int, stop: int) -> np.ndarray | None:
    if not self._cache:
      return None
    self.layout  # noqa: B018 - online, a cache of another layout is emptied first
    return self._cache.get(start, stop)

  def _to_cache(self, start: int, stop: int, items: np.ndarray) -> None:
    if self._cache:
      self._cache.put(start, stop, items)


def _layout_fields(layout: Layout) -> dict[str, Any]:
  fields = dataclasses.asdict(layout)
  fields["shard_names"] = list(layout.shard_names)
  return fields


def _layout_from_fields(fields: dict[str, Any]) -> Layout | None:
  """A Layout from its JSON fields, or None when one is missing or of the wrong type."""
  names = fields.get("shard_names")
  versions = fields.get("versions", {})
  ints = ("shard_size", "last_shard_size", "count", "doc_count", "first_item_size")
  if not (
    isinstance(names, list)
    and names
    and all(isinstance(n, str) for n in names)
    and isinstance(fields.get("idx_name"), str)
    and isinstance(fields.get("dtype"), str)
    and all(type(fields.get(k)) is int and fields[k] >= 0 for k in ints)
    and isinstance(versions, dict)
    and fields.get("dtype") in {d.name for d in data.DTYPE_CODES.values()}
    and set(fields) <= {f.name for f in dataclasses.fields(Layout)}
  ):
    return None
  return Layout(**{**fields, "shard_names": tuple(names)})


def is_stream_location(path: str) -> bool:
  """True for what `open_stream` reads: URLs and local folders of shards (not a local
  `<prefix>.bin/.idx`, which `data.MMapIndexedDataset` maps directly)."""
  return "://" in path or os.path.isdir(path)


def open_stream(location: str, cache_dir: str | None = "default", **options: Any) -> ShardedStream:
  """A `ShardedStream` of `location`; remote streams cache in `default_cache_dir()` unless
  `cache_dir` names another folder (None: no cache). Local folders are not cached."""
  if cache_dir == "default":
    local = "://" not in location or location.startswith("file://")
    cache_dir = None if local else default_cache_dir()
  return ShardedStream(location, cache_dir=cache_dir, **options)


def open_stream_source(
  location: str,
  sequences_per_step: int = data.SEQUENCES_PER_STEP,
  seq_len: int | None = None,
  fixed_step: int | None = None,
  **options: Any,
) -> MMapTokenSource:
  """The training stream at `location` (a URL, a folder of shards, or a staged folder) as a
  token source: the same `MMapTokenSource` that reads a local `.bin/.idx`."""
  if "://" not in location and staged.is_staged(location):
    stream: data.IndexedStream = staged.StagedStream(location)
    if stream.sequences_per_step != sequences_per_step:
      raise DataError(
        f"--data={location} was staged with {stream.sequences_per_step} sequences a step; "
        f"the sweep asks for {sequences_per_step}"
      )
  else:
    stream = open_stream(location, **options)
  return MMapTokenSource(stream, sequences_per_step, seq_len, fixed_step)


def pile_for_models(names: list[str]) -> str:
  """The Hub stream Pythia models trained on: the deduplicated Pile for `-deduped` models,
  the standard Pile for the others. Models of both kinds need two runs, one per stream."""
  deduped = {"deduped" in name for name in names}
  if len(deduped) != 1:
    raise DataError(
      f"--models {names} trained on two streams (deduped and standard Pile); stage or sweep "
      f"each kind separately, or name the stream with --data"
    )
  return PILE_DEDUPED if deduped.pop() else PILE_STANDARD


def local_bytes(location: str) -> int | None:
  """Bytes of the token data at a local `location` (a .bin/.idx prefix's .bin, a folder's
  shards or staged batches, a .npy or .txt file); None for a URL or what is not there."""
  if "://" in location:
    return None
  if os.path.isdir(location):
    names = [n for n in os.listdir(location) if n.endswith(".bin")]
    return sum(os.path.getsize(os.path.join(location, n)) for n in names) or None
  stem = location[:-4] if location.endswith((".bin", ".idx")) else location
  for path in (f"{stem}.bin", location):
    if os.path.isfile(path):
      return os.path.getsize(path)
  return None


def batch_bytes(needs: dict[int, int], item_tokens: int, token_bytes: int = 2) -> int:
  """Bytes of the batches `needs` ({step: sequences}) at `item_tokens` tokens an item."""
  return sum(needs.values()) * item_tokens * token_bytes
