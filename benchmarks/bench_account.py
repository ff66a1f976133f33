"""Where a steady checkpoint's time goes in bench_sweep's sweep (issue 21, item 5).

  python -m benchmarks.bench_account [--checkpoints 3 --seq 128 --n_sequences 128 \
      --gradient_sequences 16]

The same suite and options as `benchmarks.bench_sweep` (random pythia-70m-shaped fp16
checkpoints). First the sweep as it runs, its phases timed from its heartbeat, compiles
counted per checkpoint (`jax.monitoring`); then the same steady checkpoints again, each
loaded first (no prefetch beside it), their compute (`ChunkWork.one`) timed alone, then
their load (read, hash, convert) alone and the writes of their files alone. Prints seconds
per steady checkpoint for each.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks import bench_sweep
from jax_pythia import data, sweep
from jax_pythia.checkpoints import sources
from jax_pythia.files import save_npz
from jax_pythia.sweep import loading, results, watchdog


class PhaseClock(watchdog.Heartbeat):
  """A heartbeat that also records how long each (step, phase) lasted."""

  def __init__(self):
    super().__init__()
    self.spans: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    self._last: tuple[int | None, str, float] | None = None

  def beat(self, model=None, step=None, phase=""):
    now = time.perf_counter()
    if self._last is not None and self._last[0] is not None:
      step0, phase0, t0 = self._last
      self.spans[step0][_phase(phase0)] += now - t0
    self._last = (step, phase, now)
    super().beat(model, step, phase)


def _phase(text: str) -> str:
  return text.split(",")[0].split(" (")[0]


def compile_counter() -> collections.Counter:
  """Counts compiles and traces as JAX reports them (every process-wide event)."""
  counts: collections.Counter = collections.Counter()

  def listen(event, duration, **kwargs):
    if "backend_compile" in event or "jaxpr_trace" in event:
      counts[event.rsplit("/", 1)[-1]] += 1

  jax.monitoring.register_event_duration_secs_listener(listen)
  return counts


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoints", type=int, default=3)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--n_sequences", type=int, default=128)
  parser.add_argument("--gradient_sequences", type=int, default=16)
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="bench_account_")
  steps = bench_sweep.write_suite(root, args.checkpoints, args.seq, args.n_sequences)
  final, others = steps[-1], steps[:-1]
  source = data.open_token_source(
    os.path.join(root, "data", "train"), sequences_per_step=args.n_sequences
  )
  models = sources.resolve_models([os.path.join(root, "pythia-70m-shaped")])
  options = sweep.SweepOptions(
    n_sequences=args.n_sequences, gradient_sequences=args.gradient_sequences
  )
  counts = compile_counter()
  clock = PhaseClock()
  out = os.path.join(root, "out")
  runner = sweep.Sweep(models, "all", source, out, options, heartbeat=clock)
  runner.prepare()
  per_step_compiles = {}
  runner.progress = lambda name, step: per_step_compiles.setdefault(step, dict(counts))
  start = time.perf_counter()
  runner.run()
  wall = time.perf_counter() - start
  _, status = results.collect(out)
  status = status.set_index("step")
  steady_wall = (wall - status.loc[final, "compute_s"]) / len(others)
  print(f"sweep: {wall:.1f} s, {len(steps)} checkpoints; after the first {steady_wall:.2f} s each")
  for step in [final] + others:
    spans = ", ".join(f"{k} {v:.2f}" for k, v in clock.spans[step].items())
    print(
      f"  step {step}: compute_s {status.loc[step, 'compute_s']:.2f}, load_s "
      f"{status.loc[step, 'load_s']:.2f}; phases: {spans}; compiles/traces so far "
      f"{per_step_compiles.get(step)}"
    )
  m = models[0]
  alone, loads, writes = [], [], []
  for step in others:
    t = time.perf_counter()
    loaded = loading.load(m, step, options.dtype)
    loads.append(time.perf_counter() - t)
    before = dict(counts)
    t = time.perf_counter()
    rows, acts = runner.work.one(m, loaded)
    alone.append(time.perf_counter() - t)
    print(
      f"  step {step} alone: compute {alone[-1]:.2f} s; new compiles/traces "
      f"{ {k: v - before.get(k, 0) for k, v in counts.items() if v != before.get(k, 0)} }"
    )
    t = time.perf_counter()
    scratch = os.path.join(root, "scratch")
    save_npz(os.path.join(scratch, "a.npz"), acts)
    results.write_parquet(rows, os.path.join(scratch, "m.parquet"))
    results.write_json(os.path.join(scratch, "s.json"), {"step": step})
    writes.append(time.perf_counter() - t)
  compute = np.mean([status.loc[s, "compute_s"] for s in others])
  print(
    f"per steady checkpoint: in the sweep {compute:.2f} s compute ({steady_wall:.2f} s wall); "
    f"alone {np.mean(alone):.2f} s; load alone {np.mean(loads):.2f} s; "
    f"writes {np.mean(writes):.3f} s; ratio in-sweep / alone {compute / np.mean(alone):.3f}"
  )


if __name__ == "__main__":
  main()
