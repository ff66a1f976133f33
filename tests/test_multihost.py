"""Two real processes on localhost (jax.distributed, gloo CPU collectives) split a
local suite and produce the one-process table: no duplicates, no gaps."""

from __future__ import annotations

import os
import socket
import subprocess

from tests.test_sharding import (
  ROOT,
  SWEEP_ARGS,
  assert_same_table,
  env_with_devices,
  make_suite,
  run_sweep,
  sweep_cmd,
)
from tests.tool_runs import finish_all

GRADIENT_ARGS = (
  "--n_sequences=8",
  "--loss_sequences=8",
  "--nofigures",
  "--gradient_window=1",
  "--gradient_sequences=8",
)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two(suite: str, out: str, *extra: str, devices: int = 1, timeout: float = 240):
  port = free_port()
  procs = [
    subprocess.Popen(
      sweep_cmd(
        suite,
        out,
        *extra,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      env=env_with_devices(devices),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  return finish_all(procs, timeout, "two-process sweep")


def test_split_checkpoints_two_processes(tmp_path):
  # 1 final + 4 others: process 0 does the final, then each does two of the rest.
  suite = make_suite(str(tmp_path / "suite"), steps=(0, 1, 2, 4, 8))
  single = str(tmp_path / "single")
  run_sweep(suite, single, *GRADIENT_ARGS)
  split = str(tmp_path / "split")
  outputs = run_two(suite, split, *GRADIENT_ARGS, "--split=checkpoints")
  assert "process 1 of 2" in outputs[1][0]
  assert os.path.exists(os.path.join(split, "metrics.parquet"))
  assert_same_table(single, split)


def test_split_shard_two_processes(tmp_path):
  # One global mesh of 2 processes x 2 devices.
  suite = make_suite(str(tmp_path / "suite"), steps=(0, 2))
  single = str(tmp_path / "single")
  run_sweep(suite, single, *SWEEP_ARGS)
  shard = str(tmp_path / "shard")
  outputs = run_two(suite, shard, *SWEEP_ARGS, "--split=shard", "--mesh=data:2,model:2", devices=2)
  assert "mesh data:2,model:2 (4 devices)" in outputs[0][0]
  assert_same_table(single, shard)
