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
