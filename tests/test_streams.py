"""Sharded and remote training streams (jax_pythia.data.streams), all offline.

The stream is written joined by `data.write_mmap_indexed_dataset`, then cut into shards the
way Pythia's `utils/shard_memmap.py` does (fixed-size byte chunks of the joined .bin named
`<base>-<i:05>-of-<last:05>.bin`, one `<base>.idx` for the whole). Every batch read through
a shard folder, file://, memory://, a local HTTP server honouring Range, or the Hub (a
stubbed filesystem) must equal what the existing reader gives on the joined file.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from jax_pythia import data
from jax_pythia.data import DataError, DataFileNotFoundError, indexed, staged, streams, transports

SEQUENCES_PER_STEP = 4
ITEM_TOKENS = 9  # 18 bytes an item: items straddle the 100-byte shards' ends
N_ITEMS = 40
SHARD_BYTES = 100


def make_items() -> list[np.ndarray]:
  rng = np.random.default_rng(0)
  return [rng.integers(0, 65536, ITEM_TOKENS).astype(np.uint16) for _ in range(N_ITEMS)]


def shard_like_pythia(prefix: Path, out_dir: Path, shard_bytes: int = SHARD_BYTES) -> list[str]:
  """Pythia's shard_memmap.py: the joined .bin cut into `shard_bytes` chunks, index copied."""
  out_dir.mkdir(parents=True, exist_ok=True)
  joined = Path(f"{prefix}.bin").read_bytes()
  chunks = [joined[i : i + shard_bytes] for i in range(0, len(joined), shard_bytes)]
  names = [f"document-{i:05d}-of-{len(chunks) - 1:05d}.bin" for i in range(len(chunks))]
  for name, chunk in zip(names, chunks):
    (out_dir / name).write_bytes(chunk)
  (out_dir / "document.idx").write_bytes(Path(f"{prefix}.idx").read_bytes())
  return names


@pytest.fixture
def pile(tmp_path):
  """(joined reader's source, folder of shards, shard names)."""
  joined = tmp_path / "joined" / "document"
  data.write_mmap_indexed_dataset(joined, make_items())
  names = shard_like_pythia(joined, tmp_path / "shards")
  reference = data.MMapTokenSource(joined, SEQUENCES_PER_STEP)
  return reference, tmp_path / "shards", names


def straddling_steps() -> list[int]:
  """Steps whose 4-item batch crosses a shard end (computed here from the item sizes)."""
  item_bytes = 2 * ITEM_TOKENS
  batch_bytes = SEQUENCES_PER_STEP * item_bytes
  return [
    s
    for s in range(N_ITEMS // SEQUENCES_PER_STEP)
    if (s * batch_bytes) // SHARD_BYTES != (s * batch_bytes + batch_bytes - 1) // SHARD_BYTES
  ]


def assert_same_batches(source, reference, n=SEQUENCES_PER_STEP):
  for step in range(N_ITEMS // SEQUENCES_PER_STEP):
    np.testing.assert_array_equal(source.batch(step, n), reference.batch(step, n))
  np.testing.assert_array_equal(source.fixed_inputs(3), reference.fixed_inputs(3))


def test_shard_layout_has_straddling_batches(pile):
  _, _, names = pile
  assert len(names) == 8 and names[0] == "document-00000-of-00007.bin"
  assert len(straddling_steps()) >= 5


def test_local_folder_and_file_url_match_the_joined_file(pile):
  reference, shards, _ = pile
  for location in (str(shards), f"file://{shards}", f"file://{shards}/document-00000-of-00007.bin"):
    source = data.open_token_source(location, sequences_per_step=SEQUENCES_PER_STEP)
    assert isinstance(source.dataset, streams.ShardedStream)
    assert len(source.dataset) == N_ITEMS
    assert source.dataset.layout.shard_size == SHARD_BYTES  # from shard 0, not assumed
    assert_same_batches(source, reference)


def test_memory_filesystem(pile):
  reference, shards, _ = pile
  fs = fsspec.filesystem("memory")
  root = f"/pile-{uuid.uuid4().hex}"
  try:
    for path in shards.iterdir():
      fs.pipe(f"{root}/{path.name}", path.read_bytes())
    source = data.open_token_source(f"memory://{root}", sequences_per_step=SEQUENCES_PER_STEP)
    assert_same_batches(source, reference)
  finally:
    fs.rm(root, recursive=True)


# ------------------------------------------------------------------------ HTTP


class RangeServer:
  """http.server on 127.0.0.1 serving a folder with Range support; counts requests, can
  fail the next N with 503 or hang (never answer in time)."""

  def __init__(self, root: Path):
    self.root, self.requests, self.fail_next, self.hang = root, 0, 0, False
    self.whole_file_reads = 0
    self.shift_ranges = 0  # answer with bytes this far past the range asked for
    self.release = threading.Event()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def _serve(self, body: bool):
        server.requests += 1
        if server.hang:
          server.release.wait(10)
          return
        if server.fail_next:
          server.fail_next -= 1
          self.send_error(503)
          return
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
          self.send_error(404)
          return
        content = path.read_bytes()
        header = self.headers.get("Range")
        if header:
          first, last = header.removeprefix("bytes=").split("-")
          first, last = int(first) + server.shift_ranges, int(last) + server.shift_ranges
          last = min(last, len(content) - 1)
          part = content[first : last + 1]
          self.send_response(206)
          self.send_header("Content-Range", f"bytes {first}-{last}/{len(content)}")
        else:
          part = content
          server.whole_file_reads += body
          self.send_response(200)
        self.send_header("Content-Length", str(len(part) if header else len(content)))
        self.send_header("ETag", f'"{hashlib.md5(content).hexdigest()}"')
        self.end_headers()
        if body:
          self.wfile.write(part)

      def do_GET(self):
        self._serve(True)

      def do_HEAD(self):
        self._serve(False)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

  def close(self):
    self.release.set()
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(pile):
  s = RangeServer(pile[1])
  yield s
  s.close()


def http_source(server, cache, **options):
  stream = streams.ShardedStream(
    f"{server.url}/document-00000-of-00007.bin",
    cache_dir=str(cache),
    backoff_s=options.pop("backoff_s", 0.01),
    **options,
  )
  return data.MMapTokenSource(stream, SEQUENCES_PER_STEP)


def test_http_range_reads_match_and_the_cache_is_reused(pile, server, tmp_path):
  reference = pile[0]
  source = http_source(server, tmp_path / "cache")
  assert_same_batches(source, reference)
  assert server.requests > 0 and server.whole_file_reads == 0  # byte ranges only
  server.requests = 0
  again = http_source(server, tmp_path / "cache")
  # Online, the layout is read again (sizes, index header and ends: is the cache still
  # this stream's?); every batch then comes from the cache.
  layout_requests = server.requests
  assert layout_requests == 8
  assert_same_batches(again, reference)
  assert server.requests == layout_requests
  # A smaller batch of a cached step is served from the cached range too.
  np.testing.assert_array_equal(again.batch(3, 2), reference.batch(3, 2))
  assert server.requests == layout_requests


def test_http_server_failing_twice_then_answering(pile, server, tmp_path):
  server.fail_next = 2
  source = http_source(server, tmp_path / "cache", attempts=3)
  step = straddling_steps()[0]
  np.testing.assert_array_equal(source.batch(step, 4), pile[0].batch(step, 4))
  assert server.fail_next == 0


def test_http_server_failing_beyond_the_retries_names_url_and_cause(server, tmp_path):
  server.fail_next = 5
  source = streams.ShardedStream(
    f"{server.url}/document-00000-of-00007.bin", cache_dir=None, attempts=3, backoff_s=0.01
  )
  with pytest.raises(streams.StreamError) as info:
    len(source)
  message = str(info.value)
  assert "\n" not in message
  assert f"{server.url}/document.idx" in message and "503" in message and "3 attempts" in message


def test_http_server_that_never_answers_fails_in_bounded_time(server, tmp_path):
  server.hang = True
  source = streams.ShardedStream(
    f"{server.url}/document-00000-of-00007.bin",
    cache_dir=None,
    attempts=2,
    backoff_s=0.01,
    timeout_s=0.3,
  )
  start = time.monotonic()
  with pytest.raises(streams.StreamError, match=r"document\.idx.*timed out.*2 attempts"):
    len(source)
  assert time.monotonic() - start < 5


def test_http_missing_middle_shard_names_its_url(pile, server, tmp_path):
  (pile[1] / "document-00003-of-00007.bin").unlink()
  source = http_source(server, tmp_path / "cache")
  np.testing.assert_array_equal(source.batch(8, 4), pile[0].batch(8, 4))  # shards 5, 6
  with pytest.raises(DataFileNotFoundError, match=r"document-00003-of-00007\.bin.*not found"):
    source.batch(4, 4)  # bytes 288..359: shards 2 and 3


# ------------------------------------------------------------------ broken streams


def test_missing_shard_in_a_folder(pile):
  _, shards, _ = pile
  (shards / "document-00002-of-00007.bin").unlink()
  with pytest.raises(DataFileNotFoundError, match=r"document-00002-of-00007\.bin: shard 2 of 8"):
    data.open_token_source(str(shards), sequences_per_step=SEQUENCES_PER_STEP)


def test_truncated_middle_shard(pile):
  _, shards, _ = pile
  path = shards / "document-00004-of-00007.bin"
  path.write_bytes(path.read_bytes()[:-2])
  source = data.open_token_source(str(shards), sequences_per_step=SEQUENCES_PER_STEP)
  np.testing.assert_array_equal(source.batch(0, 4), pile[0].batch(0, 4))
  with pytest.raises(streams.StreamError, match=r"document-00004-of-00007\.bin is 98 bytes.*trunc"):
    source.batch(6, 4)  # bytes 432..503: shard 4


def test_truncated_last_shard_disagrees_with_the_index(pile):
  _, shards, names = pile
  path = shards / names[-1]
  path.write_bytes(path.read_bytes()[:-4])
  with pytest.raises(streams.StreamError, match=r"document\.idx disagrees with the shards"):
    data.open_token_source(str(shards), sequences_per_step=SEQUENCES_PER_STEP)


def test_index_of_another_stream(pile, tmp_path):
  _, shards, _ = pile
  data.write_mmap_indexed_dataset(tmp_path / "other", make_items()[:-1])
  (shards / "document.idx").write_bytes((tmp_path / "other.idx").read_bytes())
  with pytest.raises(streams.StreamError, match=r"last item ends at byte 702.*hold 720 bytes"):
    data.open_token_source(str(shards), sequences_per_step=SEQUENCES_PER_STEP)


def test_corrupt_pointer_in_the_index(pile):
  _, shards, _ = pile
  idx = bytearray((shards / "document.idx").read_bytes())
  pointer_of_item_9 = indexed.INDEX_HEADER_SIZE + 4 * N_ITEMS + 8 * 9
  idx[pointer_of_item_9 : pointer_of_item_9 + 8] = (9 * 18 + 2).to_bytes(8, "little")
  (shards / "document.idx").write_bytes(bytes(idx))
  source = data.open_token_source(str(shards), sequences_per_step=SEQUENCES_PER_STEP)
  with pytest.raises(streams.StreamError, match=r"item 9 starts at byte 164.*should start at 162"):
    source.batch(2, 4)


# ------------------------------------------------------------------------ the Hub


class HubStub:
  """Stands in for HfFileSystem (the network) with a memory filesystem laid out as the
  Hub's paths; the stream code above it is what is tested."""

  def __init__(self, shards: Path, repo_root: str):
    self.fs = fsspec.filesystem("memory")
    self.prefix = f"/hub-{uuid.uuid4().hex}/"
    self.calls = 0
    for path in shards.iterdir():
      self.fs.pipe(f"{self.prefix}{repo_root}/{path.name}", path.read_bytes())

  def _p(self, path):
    self.calls += 1
    return self.prefix + path

  def size(self, path):
    return self.fs.size(self._p(path))

  def info(self, path):  # as HfFileSystem: the git blob id names the content
    content = self.fs.cat_file(self._p(path))
    return {"size": len(content), "blob_id": hashlib.sha1(content).hexdigest()}

  def cat_file(self, path, start=None, end=None, **kwargs):
    self.open_options = kwargs
    return self.fs.cat_file(self._p(path), start=start, end=end)

  def ls(self, path, detail=False):
    return self.fs.ls(self._p(path), detail=False)

  def close(self):
    self.fs.rm(self.prefix.rstrip("/"), recursive=True)


def test_hub_stream_then_offline_from_the_cache(pile, tmp_path, monkeypatch):
  from huggingface_hub import constants

  reference, shards, _ = pile
  url = streams.PILE_DEDUPED
  stub = HubStub(shards, "datasets/EleutherAI/pile-deduped-pythia-preshuffled@main")
  try:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(streams.CACHE_ENV, str(tmp_path / "cache"))
    stream = streams.open_stream(url)
    assert stream.cache.startswith(str(tmp_path / "cache"))
    stream.transport.fs = stub
    source = data.MMapTokenSource(stream, SEQUENCES_PER_STEP)
    for step in (0, 3, 9):
      np.testing.assert_array_equal(source.batch(step, 4), reference.batch(step, 4))
    assert stub.calls > 0 and stub.open_options == {"cache_type": "none"}  # no read-ahead
  finally:
    stub.close()
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(transports.HubTransport, "fs", None)  # any request would fail
  offline = data.open_token_source(url, sequences_per_step=SEQUENCES_PER_STEP)
  for step in (0, 3, 9):
    np.testing.assert_array_equal(offline.batch(step, 4), reference.batch(step, 4))
  with pytest.raises(streams.StreamOfflineError, match=r"offline.*lacks items 20\.\.23"):
    offline.batch(5, 4)


def test_hub_offline_without_cache_says_so(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv(streams.CACHE_ENV, str(tmp_path / "cache"))
  with pytest.raises(
    streams.StreamOfflineError,
    match=r"pile-standard-pythia-preshuffled is offline \(HF_HUB_OFFLINE is set\) and the "
    r"cache .* lacks the stream's index and shard sizes",
  ):
    data.open_token_source(streams.PILE_STANDARD)


def test_hub_url_forms():
  t = transports.HubTransport("hf://datasets/EleutherAI/pile-deduped-pythia-preshuffled@v1/sub")
  assert (t.repo_id, t.revision) == ("EleutherAI/pile-deduped-pythia-preshuffled", "v1")
  assert t.url("document.idx") == (
    "hf://datasets/EleutherAI/pile-deduped-pythia-preshuffled@v1/sub/document.idx"
  )
  with pytest.raises(streams.StreamError, match="expected hf://datasets"):
    transports.HubTransport("hf://nonsense")


# --------------------------------------------------------------------- staging


def test_staged_folder_serves_exactly_the_staged_steps(pile, tmp_path):
  reference, shards, _ = pile
  stream = streams.open_stream(str(shards))
  manifest = staged.stage(stream, {2: 4, 7: 3, 9: 4}, str(tmp_path / "staged"), SEQUENCES_PER_STEP)
  assert [b["items"] for b in manifest["batches"]] == [[8, 12], [28, 31], [36, 40]]
  assert sorted(os.listdir(tmp_path / "staged")) == ["batches.bin", "batches.idx", "manifest.json"]
  source = data.open_token_source(str(tmp_path / "staged"), sequences_per_step=SEQUENCES_PER_STEP)
  for step, n in ((2, 4), (7, 3), (9, 4), (9, 2)):
    np.testing.assert_array_equal(source.batch(step, n), reference.batch(step, n))
  np.testing.assert_array_equal(source.fixed_inputs(4), reference.fixed_inputs(4))
  with pytest.raises(DataError, match=r"items 12\.\.15 \(step 3\) were not staged"):
    source.batch(3, 4)
  with pytest.raises(DataError, match=r"items 28\.\.31 \(step 7\) were not staged"):
    source.batch(7, 4)
  with pytest.raises(DataError, match="staged with 4 sequences a step"):
    data.open_token_source(str(tmp_path / "staged"), sequences_per_step=8)


def test_http_requests_per_batch(pile, server, tmp_path):
  """A batch costs its index entries (sizes, pointers) and its bytes, one range per
  shard it touches, plus one size check the first time a middle shard is touched."""
  source = http_source(server, tmp_path / "cache")
  server.requests = 0
  source.batch(0, 4)  # bytes 0..71: shard 0
  assert server.requests == 3
  server.requests = 0
  source.batch(1, 4)  # bytes 72..143: shards 0 and 1 (a middle shard: its size checked)
  assert server.requests == 5
  server.requests = 0
  source.batch(2, 4)  # bytes 144..215: shards 1 and 2
  assert server.requests == 5
