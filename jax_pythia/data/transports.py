"""How a byte-range stream's files are read: one `Transport` per protocol (the Hub through
HfFileSystem, any fsspec filesystem, plain HTTP with `Range`), and `Retrying`, which retries
transient failures with exponential backoff and turns the rest into one `StreamError` line
naming the URL, byte range and cause. `streams.ShardedStream` and `olmo` read through them.

HTTP answers are checked: a 200 (the whole file) for a range, a `Content-Range` that is not
the range asked for, and an answer that does not arrive whole within `timeout_s` (a server
trickling a byte at a time) are refused. Each transport records, where its protocol says,
what names each file's content (ETag, Last-Modified, a Hub blob id): `versions`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from jax_pythia import remote
from jax_pythia.data.indexed import DataError, DataFileNotFoundError

DEFAULT_ATTEMPTS = 4
DEFAULT_BACKOFF_S = 1.0
DEFAULT_TIMEOUT_S = 60.0


class StreamError(DataError):
  """A remote or sharded stream that cannot be read: names the URL, byte range and cause."""


class StreamOfflineError(StreamError):
  """An `hf://` stream needed the network while HF_HUB_OFFLINE is set."""


# ------------------------------------------------------------------------- transports


class Transport:
  """Reads byte ranges of named files at one location. Raises FileNotFoundError for a file
  that is not there; anything else it raises is classified by `_is_transient`."""

  #: The stream's identity in the cache (repository@revision for the Hub, else the URL).
  key: str
  #: What names each sized file's content where the protocol says (ETag, Last-Modified,
  #: a Hub blob id): filled by `size`, recorded in the layout and the sweep's record.
  versions: dict[str, str]

  def url(self, name: str) -> str:
    raise NotImplementedError

  def size(self, name: str) -> int:
    raise NotImplementedError

  def read(self, name: str, start: int, stop: int) -> bytes:
    raise NotImplementedError

  def list(self) -> list[str] | None:
    """File names at the location, or None where the protocol cannot list (plain HTTP)."""
    return None

  def offline_reason(self) -> str | None:
    """Why the network may not be used now, or None."""
    return None


class FsspecTransport(Transport):
  """Any fsspec filesystem (file://, memory://, gs://, hf:// through HfFileSystem, ...)."""

  def __init__(self, fs: Any, root: str, display: str, key: str | None = None):
    self.fs, self.root, self.display = fs, root.rstrip("/"), display.rstrip("/")
    self.key = key or self.display
    self.versions = {}

  def _path(self, name: str) -> str:
    return f"{self.root}/{name}" if self.root else name

  def url(self, name: str) -> str:
    return f"{self.display}/{name}"

  def size(self, name: str) -> int:
    if not hasattr(self.fs, "info"):
      return int(self.fs.size(self._path(name)))
    info = self.fs.info(self._path(name))
    lfs = info.get("lfs") if isinstance(info.get("lfs"), dict) else {}
    # Content names where the filesystem gives one (object stores, the Hub); not a local
    # mtime, which changes when identical bytes are rewritten.
    for version in (lfs.get("sha256"), info.get("blob_id"), info.get("ETag"), info.get("etag")):
      if version:
        self.versions[name] = str(version)
        break
    return int(info["size"])

  def read(self, name: str, start: int, stop: int) -> bytes:
    return self.fs.cat_file(self._path(name), start=start, end=stop)

  def list(self) -> list[str] | None:
    try:
      entries = self.fs.ls(self.root or "/", detail=False)
    except FileNotFoundError:
      return []
    return sorted(os.path.basename(str(e).rstrip("/")) for e in entries)


class HubTransport(FsspecTransport):
  """`hf://datasets/<org>/<name>[@revision][/folder]` through huggingface_hub's HfFileSystem."""

  def __init__(self, url: str):
    rest = url[len("hf://") :]
    m = re.match(r"^(datasets/)?([\w.-]+/[\w.-]+)(?:@([^/]+))?(/.*)?$", rest)
    if not m:
      raise StreamError(f"--data={url}: expected hf://datasets/<org>/<name>[@revision][/folder]")
    kind = m.group(1) or ""
    self.repo_id, self.revision = m.group(2), m.group(3) or "main"
    folder = (m.group(4) or "").strip("/")
    root = f"{kind}{self.repo_id}@{self.revision}" + (f"/{folder}" if folder else "")
    self._fs = None
    super().__init__(None, root, f"hf://{root}", key=root)

  @property
  def fs(self):  # created on first use: an offline run served by the cache never needs it
    if self._fs is None:
      from huggingface_hub import HfFileSystem

      self._fs = HfFileSystem()
    return self._fs

  @fs.setter
  def fs(self, value):
    self._fs = value

  def read(self, name: str, start: int, stop: int) -> bytes:
    # No read-ahead: fsspec's default buffered file would fetch a 5 MB block past every
    # range (doubling a batch, and 5 MB for each 4 KB read of index entries).
    return self.fs.cat_file(self._path(name), start=start, end=stop, cache_type="none")

  def offline_reason(self) -> str | None:
    return "HF_HUB_OFFLINE is set" if remote.hub_offline() else None


class HttpTransport(Transport):
  """Plain HTTP(S) with `Range` requests, standard library only. HTTP cannot list a folder,
  so the URL names shard 0 (`.../document-00000-of-00020.bin`) or a joined `.bin`."""

  def __init__(self, base_url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
    self.base, self.timeout_s = base_url.rstrip("/"), timeout_s
    self.key = self.base
    self.versions = {}

  def url(self, name: str) -> str:
    return f"{self.base}/{urllib.parse.quote(name)}"

  def _open(self, request: urllib.request.Request):
    try:
      return urllib.request.urlopen(request, timeout=self.timeout_s)
    except urllib.error.HTTPError as e:
      if e.code in (404, 410):
        raise FileNotFoundError(f"HTTP {e.code}") from None
      raise

  def size(self, name: str) -> int:
    with self._open(urllib.request.Request(self.url(name), method="HEAD")) as response:
      length = response.headers.get("Content-Length")
      version = response.headers.get("ETag") or response.headers.get("Last-Modified")
    if version:
      self.versions[name] = version
    if length is None:
      raise StreamError(f"{self.url(name)}: the server gives no Content-Length")
    return int(length)

  def read(self, name: str, start: int, stop: int) -> bytes:
    request = urllib.request.Request(self.url(name), headers={"Range": f"bytes={start}-{stop - 1}"})
    with self._open(request) as response:
      if response.status != 206:
        # A 200 would be the whole file: a 30 GB shard for a 4 MB batch.
        raise StreamError(
          f"{self.url(name)} bytes {start}-{stop - 1}: the server ignored the Range header "
          f"(HTTP {response.status}); it must serve byte ranges"
        )
      answered = response.headers.get("Content-Range")
      if answered is not None and _content_range(answered) != (start, stop - 1):
        # Another range's bytes would be taken for these: refuse them.
        raise StreamError(
          f"{self.url(name)} bytes {start}-{stop - 1}: the server answered with "
          f"Content-Range {answered!r}, not the range asked for"
        )
      return self._read_body(response)

  def _read_body(self, response) -> bytes:
    """The whole answer within `timeout_s`: the socket's timeout bounds each wait only, so
    a server that trickles a byte at a time would otherwise hold the read for ever."""
    deadline = time.monotonic() + self.timeout_s
    chunks = []
    while chunk := response.read1(1 << 20):
      chunks.append(chunk)
      if time.monotonic() > deadline:
        raise TimeoutError(
          f"the answer took over {self.timeout_s:g} s ({sum(map(len, chunks))} bytes so far; "
          f"the server trickles)"
        )
    return b"".join(chunks)


def _content_range(header: str) -> tuple[int, int] | None:
  """(first, last) of a `Content-Range: bytes first-last/total` header; None if malformed."""
  m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header)
  return (int(m.group(1)), int(m.group(2))) if m else None


def open_transport(location: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Transport, str]:
  """(transport of the folder, name of a file in it or '') for a `--data` location."""
  if location.startswith("hf://"):
    return HubTransport(location), ""
  if location.startswith(("http://", "https://")):
    base, _, name = location.rstrip("/").rpartition("/")
    if not name.endswith(".bin"):
      raise StreamError(
        f"--data={location}: plain HTTP cannot list a folder; give the URL of shard 0 "
        f"(.../document-00000-of-00020.bin) or of a joined .bin"
      )
    return HttpTransport(base, timeout_s), name
  import fsspec

  if "://" in location:
    protocol, path = location.split("://", 1)
    try:
      fs = fsspec.filesystem(protocol)
    except (ImportError, ValueError) as e:
      raise StreamError(f"--data={location}: no filesystem for {protocol}:// ({e})") from None
    display_root = f"{protocol}://"
  else:
    fs, path, display_root = fsspec.filesystem("file"), os.path.abspath(location), ""
  if path.endswith((".bin", ".idx")):
    folder, _, name = path.rpartition("/")
    return FsspecTransport(fs, folder, display_root + folder), name
  return FsspecTransport(fs, path, display_root + path.rstrip("/")), ""


# --------------------------------------------------------------------------- retries


def _is_transient(error: BaseException) -> bool:
  """Trouble worth retrying: timeouts, dropped connections, 5xx/429. Not: a missing file,
  a refused Range, a short read (a truncated file stays truncated)."""
  if isinstance(error, (FileNotFoundError, PermissionError, DataError)):
    return False
  if isinstance(error, urllib.error.HTTPError):
    return error.code == 429 or error.code >= 500
  status = getattr(getattr(error, "response", None), "status_code", None)
  if status is not None:
    return status == 429 or status >= 500
  if isinstance(error, (TimeoutError, socket.timeout, ConnectionError, urllib.error.URLError)):
    return True
  return remote.is_transport_error(error)


def _cause(error: BaseException) -> str:
  if isinstance(error, FileNotFoundError):
    return f"not found ({error})" if str(error) else "not found"
  if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
    error = error.reason if isinstance(error.reason, BaseException) else error
  text = str(error) or type(error).__name__
  return text if type(error).__name__ in text else f"{type(error).__name__}: {text}"


@dataclasses.dataclass
class Retrying:
  """A transport's reads with retries, whole-range checks and one-line errors."""

  transport: Transport
  attempts: int = DEFAULT_ATTEMPTS
  backoff_s: float = DEFAULT_BACKOFF_S
  sleep: Callable[[float], None] = time.sleep

  def _call(self, what: str, call: Callable[[], Any]) -> Any:
    for attempt in range(self.attempts):
      try:
        return call()
      except Exception as e:  # noqa: BLE001 - classified just below
        if isinstance(e, StreamError):
          raise
        if not _is_transient(e) or attempt == self.attempts - 1:
          tries = f" (after {attempt + 1} attempts)" if attempt else ""
          error = DataFileNotFoundError if isinstance(e, FileNotFoundError) else StreamError
          raise error(f"{what}: {_cause(e)}{tries}") from None
        self.sleep(self.backoff_s * 2**attempt)
    raise AssertionError("unreachable")

  def size(self, name: str) -> int:
    return self._call(f"{self.transport.url(name)} (size)", lambda: self.transport.size(name))

  def read(self, name: str, start: int, stop: int) -> bytes:
    what = f"{self.transport.url(name)} bytes {start}-{stop - 1}"
    raw = self._call(what, lambda: self.transport.read(name, start, stop))
    if len(raw) != stop - start:
      raise StreamError(
        f"{what}: got {len(raw)} bytes of {stop - start}; the file is shorter than the index says"
      )
    return raw
