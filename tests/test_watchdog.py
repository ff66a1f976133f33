"""The stall watchdog (jax_pythia.sweep.watchdog): a run that stops progressing exits non-zero
with one line naming the checkpoint and phase. Each stall runs in a subprocess, since the
watchdog ends its process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jax_pythia.sweep import watchdog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, timeout: float = 60, **env) -> tuple[subprocess.CompletedProcess, float]:
  start = time.monotonic()
  proc = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    env={**os.environ, "PYTHONPATH": ROOT, **env},
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return proc, time.monotonic() - start


def test_parse_duration():
  assert watchdog.parse_duration("90") == 90
  assert watchdog.parse_duration("90s") == 90
  assert watchdog.parse_duration("30m") == 1800
  assert watchdog.parse_duration("1.5h") == 5400
  assert watchdog.parse_duration("0.25s") == 0.25
  assert watchdog.parse_duration("0") == 0
  for bad in ("", "10 minutes", "-5", "m", "1d"):
    with pytest.raises(watchdog.WatchdogError, match="--stall_timeout"):
      watchdog.parse_duration(bad)
  assert watchdog.format_duration(1800) == "30m"
  assert watchdog.format_duration(0.5) == "0.5s"


def test_a_stalled_phase_exits_with_one_line():
  proc, seconds = run_python(
    """
    import time
    from jax_pythia.sweep import watchdog
    beat = watchdog.Heartbeat()
    watchdog.Watchdog(beat, 0.5).start()
    beat.beat("pythia-70m", 512, "loading")
    time.sleep(0.2)
    beat.beat("pythia-70m", 512, "spectra")
    time.sleep(120)  # a phase that never ends
    print("not reached")
    """
  )
  assert proc.returncode == watchdog.STALL_EXIT_STATUS, proc.stderr
  assert "not reached" not in proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert lines == [
    "stalled: no progress for 0.5s (--stall_timeout) in pythia-70m step 512, "
    f"phase spectra; exiting with status {watchdog.STALL_EXIT_STATUS}"
  ]
  assert seconds < 60  # interpreter start + ~0.7 s, far from the 120 s sleep


def test_progress_keeps_the_watchdog_quiet():
  proc, _ = run_python(
    """
    import time
    from jax_pythia.sweep import watchdog
    beat = watchdog.Heartbeat()
    with watchdog.Watchdog(beat, 0.5):
      for i in range(20):  # 2 s of work, a beat every 0.1 s
        beat.beat("m", i, "activations")
        time.sleep(0.1)
    time.sleep(1.0)  # stopped: idle after the block is not a stall
    print("finished")
    """
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "finished" and "stalled" not in proc.stderr


def test_sweep_stalled_on_a_silent_hub_names_the_checkpoint(tmp_path):
  """A real sweep whose checkpoint download never answers: --stall_timeout ends it."""
  tokens = np.random.default_rng(0).integers(0, 50, (4, 9))
  np.save(tmp_path / "tokens.npy", tokens)
  with socket.socket() as silent:  # accepts connections (kernel backlog), never replies
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    host, port = silent.getsockname()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "XLA_FLAGS")}
    env.update(
      PYTHONPATH=ROOT,
      JAX_PLATFORMS="cpu",
      HF_ENDPOINT=f"http://{host}:{port}",
      HF_HOME=str(tmp_path / "hf"),
    )
    start = time.monotonic()
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "tools.sweep",
        "--models=pythia-14m",
        "--steps=0",
        f"--data={tmp_path / 'tokens.npy'}",
        f"--out={tmp_path / 'out'}",
        "--nogradients",
        "--n_sequences=4",
        "--nofigures",
        "--stall_timeout=2s",
      ],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
    )
    seconds = time.monotonic() - start
  assert proc.returncode == watchdog.STALL_EXIT_STATUS, proc.stdout[-2000:] + proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  # The final checkpoint goes first (the CKA reference); its download is what hangs.
  assert last == (
    "stalled: no progress for 2s (--stall_timeout) in pythia-14m step 143000, "
    f"phase loading; exiting with status {watchdog.STALL_EXIT_STATUS}"
  ), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert seconds < 100
