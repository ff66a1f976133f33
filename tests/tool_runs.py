"""Running the absl tools as a user does: a subprocess from the repository root, offline,
on CPU, under a timeout (a hang fails the test instead of stalling the suite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tool(tool, *args, env=None, timeout=300, prelude=None):
  """`python -m tools.<tool> *args`; `env` adds to (or, with None values, removes from)
  the environment. `prelude`: Python run in the tool's process before it starts (to fill
  an in-process filesystem, or stand a stub in for the network)."""
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", **(env or {})}
  env = {k: v for k, v in env.items() if v is not None}
  command = [sys.executable, "-m", f"tools.{tool}"]
  if prelude:
    start = f"sys.argv[0] = {tool!r}\nrunpy.run_module('tools.{tool}', run_name='__main__')"
    command = [sys.executable, "-c", f"import runpy, sys\n{prelude}\n{start}"]
  return subprocess.run(
    [*command, *map(str, args)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def finish_all(procs, timeout: float, what: str) -> list[tuple[str, str]]:
  """[(stdout, stderr)] of processes run side by side, each exited 0; killed and the test
  failed, naming `what`, when any has not finished in `timeout` seconds (a hang)."""
  import pytest

  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  except subprocess.TimeoutExpired:
    pytest.fail(f"{what} hung: no result in {timeout:.0f} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
  return outputs
