"""XLA:CPU's thread pool versus several devices in one process (no JAX import here).

XLA:CPU runs the programs of all a process's CPU devices (`--xla_force_host_platform_
device_count`) on one intra-op thread pool, whose size `PJRT_NPROC` sets when JAX
creates its CPU backend (default: the cores). Two kinds of step block a pool thread until
others finish: a collective waits for every device's program to arrive, and jaxlib
0.10's batched LAPACK kernels (in a sharded program: the QR of W_O in the activations)
split their batch into pieces on the same pool and wait for them. Once every thread
waits, nothing runs the pieces: the sweep hangs at 0% CPU (gdb: every pool thread in
ParallelBatchMap or a collective rendezvous). XLA runs the collectives of one program one
at a time (they share its communicator), so each device's program holds at most two
waiting threads, one collective and one LAPACK call; `threads_needed` always leaves one
thread free.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

POOL_ENV = "PJRT_NPROC"
_POOL_ENVS = ("PJRT_NPROC", "NPROC")  # XLA reads the first one set
_DEVICE_COUNT_RE = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def host_device_count(environ: Mapping[str, str]) -> int:
  """CPU devices JAX will create per process, as the environment asks (default 1)."""
  counts = _DEVICE_COUNT_RE.findall(environ.get("XLA_FLAGS", ""))
  if counts:
    return int(counts[-1])
  try:
    return max(int(environ.get("JAX_NUM_CPU_DEVICES", "1")), 1)
  except ValueError:
    return 1


def threads_needed(devices: int) -> int:
  """Pool threads that cannot all be waiting: two per device plus one."""
  return 2 * devices + 1 if devices > 1 else 1


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def pool_threads(environ: Mapping[str, str]) -> int:
  """The intra-op pool size XLA:CPU takes from this environment."""
  for name in _POOL_ENVS:
    try:
      return max(int(environ[name]), 1)
    except (KeyError, ValueError):
      continue
  return cores()


def size_pool(environ: MutableMapping[str, str]) -> None:
  """Sets PJRT_NPROC for the host devices asked for, unless the user chose a size."""
  devices = host_device_count(environ)
  if devices > 1 and not any(name in environ for name in _POOL_ENVS):
    environ[POOL_ENV] = str(max(cores(), threads_needed(devices)))


# OpenBLAS reads the first of these that is set, when it loads.
_BLAS_THREAD_ENVS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def single_thread_blas(environ: MutableMapping[str, str]) -> None:
  """Sets OPENBLAS_NUM_THREADS=1, unless the user chose a count.

  XLA:CPU runs LAPACK (scipy's OpenBLAS, which jaxlib calls) on its own thread pool, so
  OpenBLAS's threads add nothing there but oversubscription: they spin while they wait,
  and whatever else runs (the next checkpoint's loading, XLA's other threads) stalls. On 2
  idle cores the 70m gradient spectra took 7.07 s with OpenBLAS's default and 5.67 s with
  one thread; beside another busy process, single LAPACK calls were 10-30x slower with the
  default. Only effective before OpenBLAS loads (with scipy, or numpy for its own copy).
  """
  if not any(name in environ for name in _BLAS_THREAD_ENVS):
    environ["OPENBLAS_NUM_THREADS"] = "1"


def mesh_problem(devices: int, environ: Mapping[str, str]) -> str | None:
  """Why a mesh of `devices` CPU devices in one process would hang, or None."""
  have, need = pool_threads(environ), threads_needed(devices)
  if have >= need:
    return None
  return (
    f"{devices} CPU devices in one process need XLA:CPU's thread pool to have >= {need} "
    f"threads, it has {have}: their collectives and LAPACK calls would wait on each other "
    f"forever; set {POOL_ENV}={need} or leave it unset (jax_pythia then sizes it at import "
    "from --xla_force_host_platform_device_count in XLA_FLAGS)"
  )
