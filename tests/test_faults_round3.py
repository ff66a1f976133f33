"""The defects of the third fault-injection run (issue 18), one test per numbered item
(item 1, remote --data through the tools, is tests/test_remote_data.py): nothing is
computed from the wrong bytes, and every fault is one line naming the culprit."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jax_pythia import data
from jax_pythia.checkpoints import hub, sources
from jax_pythia.data import staged, streams, transports
from jax_pythia.errors import CheckpointError, JaxPythiaError
from jax_pythia.models import weights
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.sweep import results
from jax_pythia.sweep import run as sweep
from tests import hf_fixtures as hf
from tests import suite_fixtures as sf
from tests import test_streams
from tests.test_faults import one_line_error
from tests.test_streams import shard_like_pythia
from tests.tool_runs import run_tool

pile, server = test_streams.pile, test_streams.server  # their fixtures, used here too


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
  models = {"small-2l": sf.SUITE_MODELS["small-2l"]}
  return sf.write_suite(tmp_path_factory.mktemp("suite"), models=models, steps=(0, 4, 8))


def prepared(suite_dir, out, data=None, steps="8", model="small-2l", **options):
  """A sweep checked and --out claimed (sweep.json written), nothing computed."""
  models = sources.resolve_models([str(suite_dir / model)])
  source = sources.open_data(str(data or suite_dir / "data" / "train"), models, None, 8)
  defaults = {"n_sequences": 6, "gradient_window": 1, "gradient_sequences": 4}
  options = sweep.SweepOptions(**{**defaults, **options})
  runner = sweep.Sweep(models, steps, source, str(out), options)
  runner.prepare()
  return runner


# ------------------------------------------------------------------ 3. a record that lost a key


def damage_record(out: Path, how: str) -> None:
  path = out / "sweep.json"
  record = json.loads(path.read_text())
  if how == "no data":
    del record["data"]
  elif how == "no seed":
    del record["options"]["seed"]
  elif how == "mistyped":
    record["options"]["n_sequences"] = "6"
  elif how == "batches":
    record["data"]["batches"] = ["deadbeef"]
  elif how == "empty":
    record = {}
  path.write_text(json.dumps(record))


@pytest.mark.parametrize(
  "how, key",
  [
    ("no data", "key 'data' is missing"),
    ("no seed", "key 'options.seed' is missing"),
    ("mistyped", "key 'options.n_sequences' holds '6'"),
    ("batches", "key 'data.batches'"),
    ("empty", "key 'options' is missing"),
    ("deleted", "holds results"),
  ],
)
def test_a_record_that_lost_or_mistyped_a_key_is_refused(suite_dir, tmp_path, how, key):
  out = tmp_path / "out"
  prepared(suite_dir, out)
  result = out / "checkpoints" / "small-2l" / "step8.parquet"  # a result beside the record
  result.parent.mkdir(parents=True)
  result.write_bytes(b"PAR1")
  if how == "deleted":
    (out / "sweep.json").unlink()
  else:
    damage_record(out, how)
  other = tmp_path / "other" / "train"  # other data and one more step: must not mix in
  sf.write_token_stream(other, np.random.default_rng(7).integers(0, sf.VOCAB, (88, 17)))
  with pytest.raises(JaxPythiaError) as caught:
    prepared(suite_dir, out, data=other, steps="4,8")
  message = str(caught.value)
  assert "\n" not in message and key in message, message
  assert "sweep.json" in message, message


def test_a_rewritten_local_stream_is_refused_by_its_batches_content(suite_dir, tmp_path):
  """Item 7, first case: a shard folder rewritten in place (same names and sizes)."""
  shards = tmp_path / "shards"
  names = shard_like_pythia(suite_dir / "data" / "train", shards, 500)
  out = tmp_path / "out"
  prepared(suite_dir, out, data=shards)
  prepared(suite_dir, out, data=shards)  # unchanged: welcome
  shard = shards / names[3]
  flipped = bytearray(shard.read_bytes())
  flipped[450] ^= 1  # byte 1950: item 57, in the batch of step 7 (the fixed inputs)
  shard.write_bytes(bytes(flipped))
  with pytest.raises(JaxPythiaError, match=r"--data \(the content of the batches read\): "):
    prepared(suite_dir, out, data=shards)


# ------------------------------------------------------------------ 4. capture of an empty file


def test_capture_of_an_empty_token_file_is_one_line(tmp_path):
  ckpt = hf.make_checkpoint(tmp_path / "model", seed=1)
  result = run_tool(
    "capture",
    f"--checkpoint={ckpt.path}",
    "--tokens=/dev/null",
    "--sites=blocks.0.hook_resid_post",
    f"--out={tmp_path / 'acts.npz'}",
  )
  one_line_error(result, "capture", "/dev/null", "not a readable .npy file")


# ------------------------------------------------------------------ 5. plan names the given stream


def test_plan_prints_the_size_of_the_suites_stream(suite_dir):
  result = run_tool(
    "plan", f"--models={suite_dir / 'small-2l'}", "--steps=0", "--flops_per_device=1e12",
    "--devices=1", "--device_memory=1GB",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  line = [x for x in result.stdout.splitlines() if x.startswith("training data:")][0]
  size = (suite_dir / "data" / "train.bin").stat().st_size  # 88 items of 17 uint16 tokens
  assert size == 88 * 17 * 2
  assert f"not the whole {size / 1e3:.3g} kB of {suite_dir / 'data' / 'train'}" in line, line
  assert "600" not in line


# ------------------------------------------------------------------ 6. --data_timeout


class StallingServer:
  """Answers HEAD with the file's size; every GET sends its headers and 3 bytes, then
  stalls (or, `trickle`, sends the rest of its answer one byte every 0.2 s)."""

  def __init__(self, root: Path, trickle: bool = False):
    self.release = threading.Event()
    release = self.release

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str((root / self.path.lstrip("/")).stat().st_size))
        self.end_headers()

      def do_GET(self):
        first, last = self.headers["Range"].removeprefix("bytes=").split("-")
        self.send_response(206)
        self.send_header("Content-Length", str(int(last) - int(first) + 1))
        self.end_headers()
        content = (root / self.path.lstrip("/")).read_bytes()[int(first) : int(last) + 1]
        self.wfile.write(content[:3])
        self.wfile.flush()
        for i in range(3, len(content) if trickle else 3):
          if release.wait(0.2):
            return
          self.wfile.write(content[i : i + 1])
          self.wfile.flush()
        release.wait(60)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

  def close(self):
    self.release.set()
    self.httpd.shutdown()
    self.httpd.server_close()


def test_data_timeout_bounds_a_stalled_server(suite_dir, tmp_path):
  help_text = " ".join(run_tool("fetch_data", "--help").stdout.split())
  assert "--data_timeout" in help_text and "4 times" in help_text
  names = shard_like_pythia(suite_dir / "data" / "train", tmp_path / "shards", 500)
  stalling = StallingServer(tmp_path / "shards")
  try:
    start = time.monotonic()
    result = run_tool(
      "fetch_data", f"--models={suite_dir / 'small-2l'}", "--steps=0",
      f"--data={stalling.url}/{names[0]}", f"--out={tmp_path / 'staged'}",
      "--sequences_per_step=8", "--n_sequences=6", "--gradient_sequences=4",
      "--data_timeout=0.5s", f"--cache_dir={tmp_path / 'cache'}",
      timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - start
  finally:
    stalling.close()
  one_line_error(result, "fetch_data", f"{stalling.url}/document.idx", "timed out", "4 attempts")
  assert elapsed < 40  # 4 x 0.5 s and 1 + 2 + 4 s of backoff, not 4 x 60 s


# ------------------------------------------------------------------ 2. staged batches and cache


def staged_folder(suite_dir, tmp_path) -> Path:
  """The batches of steps 5, 6 and 7 staged from the suite's stream."""
  stream = data.MMapIndexedDataset(suite_dir / "data" / "train")
  folder = tmp_path / "staged"
  staged.stage(stream, {5: 4, 6: 4, 7: 6}, str(folder), sf.SEQUENCES_PER_STEP)
  return folder


def edit_manifest(folder: Path, edit) -> None:
  manifest = json.loads((folder / "manifest.json").read_text())
  edit(manifest, manifest["batches"])
  (folder / "manifest.json").write_text(json.dumps(manifest))


def swap_items(manifest, batches):  # step 5 now claims step 6's sequences, and back
  batches[0]["items"], batches[1]["items"] = batches[1]["items"], batches[0]["items"]


def point_elsewhere(manifest, batches):  # step 5 read from where step 6 was staged
  batches[0]["staged_first"] = batches[1]["staged_first"]


def flip_a_token(folder: Path) -> None:
  path = folder / "batches.bin"
  content = bytearray(path.read_bytes())
  content[40] ^= 1  # a token of step 5's batch
  path.write_bytes(bytes(content))


@pytest.mark.parametrize(
  "damage, expected",
  [
    (lambda f: edit_manifest(f, swap_items), "step 6 .items 40..43. does not match its"),
    (lambda f: edit_manifest(f, point_elsewhere), "step 5 .* does not match its content hash"),
    (
      lambda f: edit_manifest(f, lambda m, b: m.update(item_size=9)),
      "step 5 .* does not match its content hash",
    ),
    (flip_a_token, "step 5 .* does not match its content hash"),
    (lambda f: edit_manifest(f, lambda m, b: b[2].pop("hash")), r"batches\[2\]\.hash is missing"),
  ],
  ids=["items swapped", "staged_first", "item_size", "flipped byte", "no hash"],
)
def test_a_staged_folder_that_changed_is_refused(suite_dir, tmp_path, damage, expected):
  folder = staged_folder(suite_dir, tmp_path)
  reference = data.MMapTokenSource(suite_dir / "data" / "train", sf.SEQUENCES_PER_STEP)
  source = data.open_token_source(str(folder), sequences_per_step=sf.SEQUENCES_PER_STEP)
  for step, n in ((5, 4), (6, 4), (7, 6)):  # whole, it is read as staged
    np.testing.assert_array_equal(source.batch(step, n), reference.batch(step, n))
  damage(folder)
  with pytest.raises(data.DataError, match=expected) as caught:
    source = data.open_token_source(str(folder), sequences_per_step=sf.SEQUENCES_PER_STEP)
    for step in (5, 6):
      source.batch(step, 4)
  assert str(folder / "manifest.json") in str(caught.value)


def cached_http_source(server, cache):
  from tests.test_streams import http_source

  return http_source(server, cache, attempts=1)


def test_the_range_cache_is_checked_before_use(pile, server, tmp_path):
  from tests.test_streams import N_ITEMS, SEQUENCES_PER_STEP, assert_same_batches, make_items

  reference, shards, _ = pile
  cache = tmp_path / "cache"
  assert_same_batches(cached_http_source(server, cache), reference)
  folder = next(cache.iterdir())
  # A rewritten piece (a valid .npy of the same shape, other tokens): fetched again.
  piece = sorted(folder.glob("items-*.npy"))[0]
  np.save(piece, np.load(piece)[::-1].copy())
  server.requests = 0
  assert_same_batches(cached_http_source(server, cache), reference)
  assert server.requests == 8 + 3  # the layout, and that piece's batch again (one shard)
  # An edited layout (shard size): its checksum fails, it is read again.
  layout = json.loads((folder / "stream.json").read_text())
  (folder / "stream.json").write_text(json.dumps({**layout, "shard_size": 90}))
  assert_same_batches(cached_http_source(server, cache), reference)
  # Another stream at the same URL (same sizes, other tokens): the cache is not its.
  rng = np.random.default_rng(1)
  other = [rng.integers(0, 65536, len(x)).astype(np.uint16) for x in make_items()]
  data.write_mmap_indexed_dataset(tmp_path / "other" / "document", other)
  shard_like_pythia(tmp_path / "other" / "document", shards)
  other_reference = data.MMapTokenSource(tmp_path / "other" / "document", SEQUENCES_PER_STEP)
  assert_same_batches(cached_http_source(server, cache), other_reference)
  assert N_ITEMS == len(other)


def test_a_range_answered_with_other_bytes_is_refused(pile, server, tmp_path):
  server.shift_ranges = 2
  source = streams.ShardedStream(
    f"{server.url}/document-00000-of-00007.bin", cache_dir=None, attempts=1
  )
  with pytest.raises(streams.StreamError, match=r"document\.idx bytes 0-33: .*Content-Range"):
    len(source)


# ------------------------------------------------------------------ 7. report on damaged files


@pytest.fixture(scope="module")
def finished_sweep(suite_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("finished") / "out"
  result = run_tool(
    "sweep", f"--models={suite_dir / 'small-2l'}", f"--out={out}", "--steps=4,8",
    "--nogradients", "--nofigures", "--n_sequences=6", "--sequences_per_step=8",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  return out


@pytest.mark.parametrize("damage", ["activations", "status", "truncated"])
def test_report_refuses_damaged_checkpoint_files_and_keeps_the_tables(
  finished_sweep, tmp_path, damage
):
  out = tmp_path / "out"
  shutil.copytree(finished_sweep, out)
  tables = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
  assert set(tables) == {"metrics.parquet", "checkpoints.parquet", "pairwise_cka.parquet"}
  culprit = {
    "activations": out / "activations" / "small-2l" / "step4.npz",
    "status": out / "status" / "small-2l" / "step4.json",
    "truncated": out / "checkpoints" / "small-2l" / "step4.parquet",
  }[damage]
  if damage == "truncated":  # a whole parquet file that lost rows
    pd.read_parquet(culprit).iloc[:10].to_parquet(culprit)
  else:
    culprit.unlink()
  if damage == "truncated":  # through the tool once
    result = run_tool("report", f"--out={out}")
    one_line_error(result, "report", str(culprit), "rerun the sweep")
  else:
    with pytest.raises(JaxPythiaError, match=f"{culprit}.*rerun the sweep"):
      results.finalize(str(out))
  assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == tables


# ------------------------------------------------------------------ 7. weights read and run


def write_raw_safetensors(path: Path, header: dict, payload: bytes) -> None:
  """The format by hand (8-byte little-endian header length, JSON header, data)."""
  text = json.dumps(header).encode()
  path.write_bytes(len(text).to_bytes(8, "little") + text + payload)


@pytest.mark.parametrize(
  "header, expected",
  [
    (
      {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      },
      "tensors 'a' and 'b' overlap",
    ),
    (
      {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
      },
      "tensors 'a' and 'b' overlap",
    ),
    ({"a": {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]}}, "malformed header"),
    ({"a": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, "malformed header"),
  ],
)
def test_safetensors_with_overlapping_or_non_integer_entries_are_refused(
  tmp_path, header, expected
):
  path = tmp_path / "model.safetensors"
  write_raw_safetensors(path, header, np.arange(4, dtype="<f4").tobytes())
  with pytest.raises(CheckpointError, match=f"{path}: .*{expected}"):
    weights.read_safetensors(path)


def test_deeply_nested_safetensors_header_is_named(tmp_path):
  """Item 9: a RecursionError, not a traceback."""
  path = tmp_path / "model.safetensors"
  text = b"[" * 100_000 + b"]" * 100_000
  path.write_bytes(len(text).to_bytes(8, "little") + text)
  with pytest.raises(CheckpointError, match=f"{path}: safetensors header is not valid JSON"):
    weights.read_safetensors(path)


def test_weights_that_overflow_the_forward_are_flagged(suite_dir, tmp_path):
  import torch

  root = tmp_path / "suite"
  shutil.copytree(suite_dir, root)
  model = hf.tiny_model(seed=3, vocab_size=sf.VOCAB, max_position_embeddings=64,
                        **sf.SUITE_MODELS["small-2l"])  # fmt: skip
  with torch.no_grad():
    for p in model.parameters():
      p.mul_(1e18)  # finite in float32 (max 3.4e38); products of two overflow
  assert all(torch.isfinite(p).all() for p in model.parameters())
  shutil.rmtree(root / "small-2l" / "step4")
  hf.write_safetensors(model, root / "small-2l" / "step4")
  models = sources.resolve_models([str(root / "small-2l")])
  source = sources.open_data(None, models, None, None)
  options = sweep.SweepOptions(n_sequences=6, gradients=False)
  out = tmp_path / "out"
  sweep.Sweep(models, "4,8", source, str(out), options, on_error="skip").run()
  status = json.loads((out / "status" / "small-2l" / "step4.json").read_text())
  assert status["status"] == "failed" and "not finite" in status["message"], status
  assert not (out / "checkpoints" / "small-2l" / "step4.parquet").exists()
  assert json.loads((out / "status" / "small-2l" / "step8.json").read_text())["status"] == "ok"


# ------------------------------------------------------------------ 8. hangs


def test_a_trickling_server_fails_fetch_data_in_bounded_time(suite_dir, tmp_path):
  names = shard_like_pythia(suite_dir / "data" / "train", tmp_path / "shards", 500)
  trickling = StallingServer(tmp_path / "shards", trickle=True)
  try:
    start = time.monotonic()
    result = run_tool(
      "fetch_data", f"--models={suite_dir / 'small-2l'}", "--steps=0",
      f"--data={trickling.url}/{names[0]}", f"--out={tmp_path / 'staged'}",
      "--sequences_per_step=8", "--n_sequences=6", "--gradient_sequences=4",
      "--data_timeout=1s", f"--cache_dir={tmp_path / 'cache'}", timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - start
  finally:
    trickling.close()
  one_line_error(result, "fetch_data", f"{trickling.url}/document.idx", "took over 1 s")
  assert elapsed < 40  # 4 x 1 s and 1 + 2 + 4 s of backoff


def test_the_sweeps_watchdog_names_the_data_read(suite_dir, tmp_path):
  names = shard_like_pythia(suite_dir / "data" / "train", tmp_path / "shards", 500)
  stalling = StallingServer(tmp_path / "shards")
  try:
    result = run_tool(
      "sweep", f"--models={suite_dir / 'small-2l'}", f"--out={tmp_path / 'out'}",
      f"--data={stalling.url}/{names[0]}", "--sequences_per_step=8", "--stall_timeout=3s",
      env={"JAX_PYTHIA_DATA_CACHE": str(tmp_path / "cache")}, timeout=120,
    )  # fmt: skip
  finally:
    stalling.close()
  assert result.returncode == 3, result.stderr[-2000:]
  assert "phase opening the token data (--data)" in result.stderr, result.stderr[-2000:]


# ------------------------------------------------------------------ 9. tracebacks


def test_a_seed_beyond_64_bits_is_refused_before_out_is_claimed(suite_dir, tmp_path):
  out = tmp_path / "out"
  result = run_tool(
    "sweep", f"--models={suite_dir / 'small-2l'}", f"--out={out}", f"--seed={2**64}",
    "--nogradients", "--n_sequences=6", "--sequences_per_step=8",
  )  # fmt: skip
  one_line_error(result, "sweep", f"--seed={2**64}")
  assert not (out / "sweep.json").exists()


NESTED = "[" * 100_000 + "]" * 100_000


def nested_config(tmp_path):
  (tmp_path / "config.json").write_text(NESTED)
  return lambda: GPTNeoXConfig.from_json_file(tmp_path / "config.json"), "config.json"


def nested_index(tmp_path):
  ckpt = hf.make_checkpoint(tmp_path / "ckpt", form="sharded", seed=2)
  (ckpt.path / "model.safetensors.index.json").write_text(NESTED)
  return lambda: hub.load_checkpoint(ckpt.path), "model.safetensors.index.json"


def nested_suite(tmp_path):
  (tmp_path / "suite.json").write_text(NESTED)
  return lambda: sources.read_manifest(tmp_path), "suite.json"


def nested_manifest(tmp_path):
  (tmp_path / "manifest.json").write_text(NESTED)
  return lambda: staged.StagedStream(str(tmp_path)), "manifest.json"


@pytest.mark.parametrize("case", [nested_config, nested_index, nested_suite, nested_manifest])
def test_deeply_nested_json_is_named(tmp_path, case):
  call, name = case(tmp_path)
  with pytest.raises(JaxPythiaError, match=f"{name}.*RecursionError") as caught:
    call()
  assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
  "edit, field",
  [
    (lambda m, b: b[0].update(step="5"), r"batches\[0\]\.step"),
    (lambda m, b: b[1].update(items=[48]), r"batches\[1\]\.items"),
    (lambda m, b: m.update(sequences_per_step=None), "'sequences_per_step'"),
    (lambda m, b: m.update(batches={}), "'batches'"),
  ],
)
def test_a_mistyped_staged_manifest_is_named(suite_dir, tmp_path, edit, field):
  folder = staged_folder(suite_dir, tmp_path)
  edit_manifest(folder, edit)
  with pytest.raises(data.DataError, match=f"manifest.json: (field )?{field} is missing or of"):
    staged.StagedStream(str(folder))


def test_an_edited_cache_layout_is_named_offline(pile, server, tmp_path, monkeypatch):
  from tests.test_streams import assert_same_batches

  cache = tmp_path / "cache"
  assert_same_batches(cached_http_source(server, cache), pile[0])
  layout = next(cache.iterdir()) / "stream.json"
  fields = json.loads(layout.read_text())
  layout.write_text(json.dumps({**fields, "count": "40"}))
  monkeypatch.setattr(transports.HttpTransport, "offline_reason", lambda self: "offline here")
  with pytest.raises(data.DataError, match=f"{layout}: damaged or edited"):
    cached_http_source(server, cache)


# ------------------------------------------------------------------ 10. check order, flag names


@pytest.mark.parametrize(
  "options, expected",
  [
    (dict(positions="3,99"), "--positions out of range"),
    (dict(gradient_sequences=9), "--gradient_sequences=9: a training batch of"),
    (dict(loss_sequences=9), "--loss_sequences=9: a training batch of"),
    (dict(data_step=1000), "--data_step=1000: "),
  ],
)
def test_sweep_checks_name_their_flag_before_claiming_out(suite_dir, tmp_path, options, expected):
  out = tmp_path / "out"
  with pytest.raises(JaxPythiaError) as caught:
    prepared(suite_dir, out, **options)
  assert str(caught.value).startswith(expected), str(caught.value)
  assert not (out / "sweep.json").exists()


def test_fetch_data_names_sequences_per_step(suite_dir, tmp_path):
  result = run_tool(
    "fetch_data", f"--models={suite_dir / 'small-2l'}", f"--out={tmp_path / 'staged'}",
    f"--data={suite_dir / 'data' / 'train'}", "--sequences_per_step=4", "--n_sequences=6",
  )  # fmt: skip
  one_line_error(result, "fetch_data", "--n_sequences=6: a training batch of", "holds 4")


@pytest.mark.parametrize(
  "flag, expected",
  [
    ("--seq_len=-5", "--seq_len=-5: must be a finite number > 0"),
    ("--loss_sequences=-1", "--loss_sequences=-1: must be >= 0"),
    ("--gradient_microbatch=5", "--gradient_microbatch=5 must divide"),
    ("--flops_per_device=inf", "--flops_per_device=inf: must be a finite number > 0"),
  ],
)
def test_plan_refuses_what_the_sweep_refuses(flag, expected):
  result = run_tool("plan", "--devices=8", "--flops_per_device=1e12", "--device_memory=16GB", flag)
  one_line_error(result, "plan", expected)
