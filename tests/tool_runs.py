"""Running the absl tools as a user does: a subprocess from the repository root, offline,
on CPU, under a timeout (a hang fails the test instead of stalling the suite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tool(tool, *args, env=None, timeout=300):
  """`python -m tools.<tool> *args`; `env` adds to (or, with None values, removes from)
  the environment."""
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", **(env or {})}
  env = {k: v for k, v in env.items() if v is not None}
  return subprocess.run(
    [sys.executable, "-m", f"tools.{tool}", *map(str, args)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
