"""A stall watchdog: ends a run that has made no progress for too long.

A wedged XLA collective or LAPACK call blocks its thread inside C++ forever, and no
Python exception or signal handler can reach it; on a pod that burns hours silently. So
the work reports where it is on a `Heartbeat` (model, step, phase) as it goes, and a
`Watchdog` daemon thread checks it: once the last beat is older than the timeout it
writes one line to stderr naming the checkpoint and phase, and ends the process with
`os._exit(STALL_EXIT_STATUS)` (a normal exit would wait on the wedged threads).

  heartbeat = Heartbeat()
  with Watchdog(heartbeat, parse_duration("30m")):
    heartbeat.beat("pythia-70m", 512, "gradients")
    ...
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from typing import TextIO

from jax_pythia.errors import JaxPythiaError

#: Exit status of a stalled run (distinct from errors, 2, and interrupts, 130).
STALL_EXIT_STATUS = 3
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*$")


class WatchdogError(JaxPythiaError, ValueError):
  """A stall timeout that is not a duration."""


def parse_duration(spec: str | float | int, what: str = "--stall_timeout") -> float:
  """Seconds from `90`, `90s`, `30m`, `1.5h` (0 means off)."""
  if isinstance(spec, (int, float)):
    seconds = float(spec)
  else:
    m = _DURATION_RE.match(spec)
    if not m:
      raise WatchdogError(f"{what}={spec!r}: expected seconds or a duration like 90s, 30m, 2h")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
  if seconds < 0:
    raise WatchdogError(f"{what}={spec!r}: must be >= 0 (0: no watchdog)")
  return seconds


def format_duration(seconds: float) -> str:
  if seconds >= 3600 and seconds % 3600 == 0:
    return f"{seconds / 3600:g}h"
  if seconds >= 60 and seconds % 60 == 0:
    return f"{seconds / 60:g}m"
  return f"{seconds:g}s"


class Heartbeat:
  """Where the work is (model, step, phase) and when it last got there. Thread-safe."""

  def __init__(self):
    self._lock = threading.Lock()
    self._where: tuple[str | None, int | None, str] = (None, None, "starting")
    self._time = time.monotonic()

  def beat(self, model: str | None = None, step: int | None = None, phase: str = "") -> None:
    """Marks progress: now in `phase` of checkpoint (model, step)."""
    with self._lock:
      self._where = (model, step, phase)
      self._time = time.monotonic()

  def where(self) -> str:
    """`pythia-70m step 512, phase gradients` (or just the phase outside a checkpoint)."""
    with self._lock:
      model, step, phase = self._where
    if model is None:
      return f"phase {phase}"
    return f"{model} step {step}, phase {phase}"

  def idle_seconds(self) -> float:
    with self._lock:
      return time.monotonic() - self._time


class Watchdog:
  """A daemon thread that ends the process when `heartbeat` stays still `timeout_s`.

  `timeout_s` 0 disables it. Use as a context manager, or `start()` / `stop()`.
  """

  def __init__(self, heartbeat: Heartbeat, timeout_s: float, *, stream: TextIO | None = None):
    self.heartbeat, self.timeout_s = heartbeat, float(timeout_s)
    self.stream = stream
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def start(self) -> Watchdog:
    if self.timeout_s > 0 and self._thread is None:
      self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def __enter__(self) -> Watchdog:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def _watch(self) -> None:
    # Checks a few times per timeout, so a stall is reported within ~1.25 timeouts.
    poll = min(max(self.timeout_s / 4, 0.05), 30.0)
    while not self._stop.wait(poll):
      if self.heartbeat.idle_seconds() >= self.timeout_s:
        stream = self.stream or sys.stderr
        stream.write(
          f"\nstalled: no progress for {format_duration(self.timeout_s)} (--stall_timeout) "
          f"in {self.heartbeat.where()}; exiting with status {STALL_EXIT_STATUS}\n"
        )
        stream.flush()
        os._exit(STALL_EXIT_STATUS)
