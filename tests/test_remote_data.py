"""Issue 18, item 1: every kind of remote `--data` through the tools end to end.

A tiny suite's joined token stream is cut into Pythia-style shards and served as a local
folder, file://, a plain HTTP server with Range on 127.0.0.1, memory:// and a stubbed Hub
(hf://). `tools.sweep` on each, and `tools.fetch_data` from each followed by a sweep on
the staged folder, must give the table the sweep gives on the joined local file.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from jax_pythia import data
from tests import suite_fixtures as sf
from tests.test_streams import RangeServer, shard_like_pythia
from tests.tool_runs import run_tool

SWEEP = [
  "--steps=0",
  "--n_sequences=6",
  "--gradient_window=1",
  "--gradient_sequences=4",
  "--loss_sequences=4",
  f"--sequences_per_step={sf.SEQUENCES_PER_STEP}",
  "--checkpoints_per_call=1",
  "--nofigures",
]
STAGE = [a for a in SWEEP if not a.startswith(("--nofigures", "--checkpoints"))]
SHARD_BYTES = 500  # 34-byte items: batches straddle shard ends
HUB_URL = "hf://datasets/EleutherAI/pile-deduped-pythia-preshuffled"
HUB_ROOT = "datasets/EleutherAI/pile-deduped-pythia-preshuffled@main"

# Run in the tool's process before it starts: memory:// and the stubbed Hub live there.
MEMORY_PRELUDE = """
import fsspec, pathlib
fs = fsspec.filesystem("memory")
for p in pathlib.Path({shards!r}).iterdir():
  fs.pipe("/pile/" + p.name, p.read_bytes())
"""
HUB_PRELUDE = """
import huggingface_hub
from tests.test_streams import HubStub
stub = HubStub(__import__("pathlib").Path({shards!r}), {root!r})
huggingface_hub.HfFileSystem = lambda: stub
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("remote")
  suite = sf.write_suite(
    root / "suite", models={"small-2l": sf.SUITE_MODELS["small-2l"]}, steps=(0, 4, 8)
  )
  shards = root / "shards"
  names = shard_like_pythia(suite / "data" / "train", shards, SHARD_BYTES)
  assert len(names) > 3
  server = RangeServer(shards)
  env = {
    "JAX_COMPILATION_CACHE_DIR": str(root / "xla"),
    "JAX_PYTHIA_DATA_CACHE": str(root / "cache"),
  }
  w = dict(root=root, suite=suite, shards=shards, names=names, server=server, env=env)
  w["reference"] = sweep_table(w, "joined", str(suite / "data" / "train"))
  yield w
  server.close()


def location(w, kind):
  """(--data, env, prelude) of the stream served as `kind`."""
  shards, shard0 = w["shards"], w["names"][0]
  env, prelude = dict(w["env"]), None
  if kind == "folder":
    url = str(shards)
  elif kind == "file":
    url = f"file://{shards}"
  elif kind == "http":
    url = f"{w['server'].url}/{shard0}"
  elif kind == "memory":
    url, prelude = "memory:///pile", MEMORY_PRELUDE.format(shards=str(shards))
  else:
    url, prelude = HUB_URL, HUB_PRELUDE.format(shards=str(shards), root=HUB_ROOT)
    env["HF_HUB_OFFLINE"] = None  # the stub stands in for the network
    env["JAX_PYTHIA_DATA_CACHE"] = str(w["root"] / "hub-cache")
  return url, env, prelude


def sweep_table(w, name, url, env=None, prelude=None):
  out = w["root"] / f"out-{name}"
  model = w["suite"] / "small-2l"
  result = run_tool(
    "sweep", f"--models={model}", f"--out={out}", f"--data={url}", *SWEEP,
    env=env or w["env"], prelude=prelude, timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  table = pd.read_parquet(out / "metrics.parquet")
  assert len(table) > 50 and table["metric"].str.startswith("grad").any()
  return table.sort_values(list(table.columns[:-1])).reset_index(drop=True)


@pytest.mark.parametrize("kind", ["folder", "file", "http", "memory", "hf"])
def test_sweep_reads_every_kind_of_stream_like_the_joined_file(world, kind):
  url, env, prelude = location(world, kind)
  table = sweep_table(world, kind, url, env, prelude)
  pd.testing.assert_frame_equal(table, world["reference"])
  record = json.loads((world["root"] / f"out-{kind}" / "sweep.json").read_text())["data"]
  assert len(record["batches"]) == 7, record  # what was read is named by its content
  stream = record["stream"]
  assert (stream["shards"], stream["items"]) == (len(world["names"]), 88), stream
  if kind in ("http", "hf"):  # and by the server's names for the files' content
    assert set(stream["versions"]) >= {"document.idx", world["names"][0]}, stream


@pytest.mark.parametrize("kind", ["file", "http", "memory", "hf"])
def test_fetch_data_stages_every_kind_of_stream(world, kind):
  url, env, prelude = location(world, kind)
  staged = world["root"] / f"staged-{kind}"
  model = world["suite"] / "small-2l"
  result = run_tool(
    "fetch_data", f"--models={model}", f"--out={staged}", f"--data={url}", *STAGE,
    env=env, prelude=prelude,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  reference = data.MMapTokenSource(world["suite"] / "data" / "train", sf.SEQUENCES_PER_STEP)
  source = data.open_token_source(str(staged), sequences_per_step=sf.SEQUENCES_PER_STEP)
  manifest = json.loads((staged / "manifest.json").read_text())
  assert len(manifest["batches"]) == 7
  for batch in manifest["batches"]:
    n = batch["items"][1] - batch["items"][0]
    np.testing.assert_array_equal(source.batch(batch["step"], n), reference.batch(batch["step"], n))
  if kind == "hf":  # and the sweep on what was staged gives the joined file's table
    table = sweep_table(world, "staged", str(staged))
    pd.testing.assert_frame_equal(table, world["reference"])
