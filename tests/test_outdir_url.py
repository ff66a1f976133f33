"""--out on an fsspec URL (jax_pythia.sweep.store), for hosts that share no disk (a TPU VM
slice): the same tables as a local --out, resumed from what the URL holds, and two
processes with no common folder but the URL (a pod rehearsed on CPU, docs/tpu.md)."""

from __future__ import annotations

import os
import subprocess
import uuid

import fsspec
import pandas as pd
import pytest

from jax_pythia import sweep
from jax_pythia.checkpoints import sources
from jax_pythia.errors import SweepError
from jax_pythia.sweep import store
from tests import suite_fixtures as sf
from tests.test_multihost import GRADIENT_ARGS, free_port
from tests.test_sharding import assert_same_table, env_with_devices, make_suite, run_sweep
from tests.tool_runs import finish_all

OPTIONS = dict(
  n_sequences=6, positions="random:2", gradient_window=1, gradient_sequences=4, loss_sequences=4
)
STEPS = "0,2,8"


def sweep_into(suite_dir, out: str) -> sweep.Sweep:
  models = sources.resolve_models([str(suite_dir)])
  source = sources.open_data(None, models, None, None)
  runner = sweep.Sweep(models, STEPS, source, out, sweep.SweepOptions(**OPTIONS))
  runner.prepare()
  return runner


def read_table(url: str) -> pd.DataFrame:
  with fsspec.open(url, "rb") as f:
    return pd.read_parquet(f)


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
  small = {"small-2l": sf.SUITE_MODELS["small-2l"]}
  return sf.write_suite(tmp_path_factory.mktemp("suite"), models=small)


def test_url_out_equals_a_local_one_and_resumes_from_it(suite_dir, tmp_path):
  local = sweep_into(suite_dir, str(tmp_path / "local"))
  local.run()
  expected = pd.read_parquet(local.finish()[0])
  url = f"memory://run-{uuid.uuid4().hex}"
  runner = sweep_into(suite_dir, url)
  staging = runner.out_dir
  assert staging != url and os.path.isdir(staging)
  runner.run()
  written = runner.finish()
  runner.store.close()
  assert not os.path.exists(staging)
  assert written[0] == f"{url}/metrics.parquet"
  pd.testing.assert_frame_equal(read_table(written[0]), expected)
  fs = fsspec.filesystem("memory")
  names = fs.find(url.split("://")[1])
  assert not [n for n in names if ".tmp-" in n]
  assert sum(n.endswith(".parquet") and "/checkpoints/" in n for n in names) == 3

  # Resume: the URL lost one checkpoint's rows; a fresh process (a new staging folder)
  # computes that one only, and the tables come out the same.
  lost = f"{url}/checkpoints/small-2l/step2.parquet"
  fs.rm_file(lost.split("://")[1])
  again = sweep_into(suite_dir, url)
  assert again.pending() == {"small-2l": [2]}
  again.run()
  again.finish()
  again.store.close()
  pd.testing.assert_frame_equal(read_table(f"{url}/metrics.parquet"), expected)
  status = read_table(f"{url}/checkpoints.parquet")
  assert sorted(status.step) == [0, 2, 8] and set(status.status) == {"ok"}


def test_url_out_of_an_unknown_protocol_is_one_line(tmp_path):
  with pytest.raises(SweepError, match=r"^--out=nosuch://x/run: cannot open it \("):
    store.OutStore("nosuch://x/run")


def test_two_processes_share_only_the_url(tmp_path):
  """A TPU VM slice rehearsed: each process has its own working folder, HOME and TMPDIR
  (so its own compile cache and staging folder); the only folder they share is the
  `file://` URL's, as the hosts of a pod share only a bucket."""
  suite = make_suite(str(tmp_path / "suite"), steps=(0, 1, 2, 4))
  single = str(tmp_path / "single")
  run_sweep(suite, single, *GRADIENT_ARGS)
  bucket = tmp_path / "bucket"
  url = f"file://{bucket}/run"
  port, procs = free_port(), []
  for i in range(2):
    host = tmp_path / f"host{i}"
    (host / "tmp").mkdir(parents=True)
    env = {**env_with_devices(1), "HOME": str(host), "TMPDIR": str(host / "tmp")}
    env.pop("XDG_CACHE_HOME", None)
    command = [
      *run_sweep_cmd(suite, url),
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    ]
    procs.append(
      subprocess.Popen(
        command, env=env, cwd=host, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
    )
  outputs = finish_all(procs, 420, "two-process sweep into a URL")
  assert "process 1 of 2" in outputs[1][0]
  # Each process wrote its own checkpoints' files to the URL, none into its own folder
  # (its staging folder is gone), and process 0 gathered them all there.
  for i in range(2):
    assert os.listdir(tmp_path / f"host{i}" / "tmp") == []
    assert not (tmp_path / f"host{i}" / "file:").exists()
  assert_same_table(single, str(bucket / "run"))


def run_sweep_cmd(suite: str, out: str) -> list[str]:
  from tests.test_sharding import sweep_cmd

  return sweep_cmd(suite, out, *GRADIENT_ARGS, "--split=checkpoints")
