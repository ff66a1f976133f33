"""Where a steady checkpoint's time goes in bench_sweep's sweep (issue 21, item 5).

  python -m benchmarks.bench_account [--size 70m --checkpoints 3 --seq 128 \
      --n_sequences 128 --gradient_sequences 16]

The same suite and options as `benchmarks.bench_sweep` (random Pythia-shaped fp16
checkpoints, 70m by default). First the sweep as it runs, its phases timed from its
heartbeat, its process CPU time per checkpoint and its compiles counted
(`jax.monitoring`); then the same steady checkpoints again, each loaded first (no
prefetch beside it), their compute (`ChunkWork.one`) timed alone, their load (read, hash,
convert) alone and the writes of their files alone. Process CPU time is reported beside
wall time: on a shared machine it is the steadier of the two.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import threading
import time

import jax
import numpy as np
import torch
from transformers import GPTNeoXConfig as HFConfig
from transformers import GPTNeoXForCausalLM

from benchmarks import bench_sweep, shapes
from jax_pythia import data, sweep
from jax_pythia.checkpoints import sources
from jax_pythia.files import save_npz
from jax_pythia.sweep import loading, results, watchdog


class PhaseClock(watchdog.Heartbeat):
  """A heartbeat that also records each (step, phase)'s wall time and each step's CPU."""

  def __init__(self):
    super().__init__()
    self.spans: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    self.cpu: collections.Counter = collections.Counter()  # process CPU seconds per step
    self._last: tuple | None = None

  def beat(self, model=None, step=None, phase=""):
    now, cpu = time.perf_counter(), time.process_time()
    if self._last is not None and self._last[0] is not None:
      step0, phase0, t0, cpu0 = self._last
      self.spans[step0][phase0.split(",")[0].split(" (")[0]] += now - t0
      self.cpu[step0] += cpu - cpu0
    self._last = (step, phase, now, cpu)
    super().beat(model, step, phase)


def compile_counter() -> collections.Counter:
  """Counts compiles and traces as JAX reports them."""
  counts: collections.Counter = collections.Counter()

  def listen(event, duration, **kwargs):
    if "backend_compile" in event or "jaxpr_trace" in event:
      counts[event.rsplit("/", 1)[-1]] += 1

  jax.monitoring.register_event_duration_secs_listener(listen)
  return counts


def write_suite(root, size, n_checkpoints, seq, sequences_per_step):
  """bench_sweep's suite (random fp16 checkpoints, a token stream) at any Pythia size."""
  steps = [bench_sweep.STEP_EVERY * i for i in range(n_checkpoints)]
  rng = np.random.default_rng(0)
  kwargs = shapes.hf_kwargs(size)
  n_items = (steps[-1] + 1) * sequences_per_step
  data.write_mmap_indexed_dataset(
    os.path.join(root, "data", "train"),
    (rng.integers(0, kwargs["vocab_size"], seq + 1) for _ in range(n_items)),
  )
  for step in steps:
    torch.manual_seed(step)
    model = GPTNeoXForCausalLM(HFConfig(**kwargs)).to(torch.float16)
    model.save_pretrained(os.path.join(root, "shaped", f"step{step}"))
  return steps


def in_sweep(runner, clock, counts, steps):
  """Runs the sweep; prints each checkpoint's phases; the status table by step."""
  per_step = {}
  runner.progress = lambda name, step: per_step.setdefault(step, dict(counts))
  start = time.perf_counter()
  runner.run()
  wall = time.perf_counter() - start
  _, status = results.collect(runner.out_dir)
  status = status.set_index("step")
  final = steps[-1]
  steady = (wall - status.loc[final, "compute_s"]) / (len(steps) - 1)
  print(f"sweep: {wall:.1f} s, {len(steps)} checkpoints; after the first {steady:.2f} s each")
  for step in [final] + steps[:-1]:
    spans = ", ".join(f"{k} {v:.2f}" for k, v in clock.spans[step].items())
    print(
      f"  step {step}: compute_s {status.loc[step, 'compute_s']:.2f}, load_s "
      f"{status.loc[step, 'load_s']:.2f}; phases: {spans}; process CPU "
      f"{clock.cpu[step]:.2f} s; compiles/traces so far {per_step.get(step)}",
      flush=True,
    )
  return status, steady


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--size", default="70m", help="a Pythia size (bench_sweep: 70m)")
  parser.add_argument("--checkpoints", type=int, default=3)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--n_sequences", type=int, default=128)
  parser.add_argument("--gradient_sequences", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=2, help="repeats of the runs alone")
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="bench_account_")
  steps = write_suite(root, args.size, args.checkpoints, args.seq, args.n_sequences)
  source = data.open_token_source(
    os.path.join(root, "data", "train"), sequences_per_step=args.n_sequences
  )
  models = sources.resolve_models([os.path.join(root, "shaped")])
  options = sweep.SweepOptions(
    n_sequences=args.n_sequences, gradient_sequences=args.gradient_sequences
  )
  counts, clock = compile_counter(), PhaseClock()
  runner = sweep.Sweep(models, "all", source, os.path.join(root, "out"), options, heartbeat=clock)
  status, steady = in_sweep(runner, clock, counts, steps)
  sweep_cpu = dict(clock.cpu)  # the runs alone beat the same clock
  m, others = models[0], steps[:-1]
  timed = collections.defaultdict(list)  # what -> [(wall, CPU)]
  writes = []
  with jax.default_matmul_precision(options.matmul_precision):  # as the sweep runs them
    for _ in range(args.rounds):
      for step in others:
        loaded = measure(timed["load alone"], loading.load, m, step, options.dtype)
        rows, acts = measure(timed["compute alone"], runner.work.one, m, loaded)
        # As in the sweep: the next checkpoint (here the final) loads in a thread beside.
        beside = threading.Thread(target=loading.load, args=(m, steps[-1], options.dtype))
        beside.start()
        measure(timed["compute, a load beside"], runner.work.one, m, loaded)
        beside.join()
        t = time.perf_counter()
        scratch = os.path.join(root, "scratch")
        save_npz(os.path.join(scratch, "a.npz"), acts)
        results.write_parquet(rows, os.path.join(scratch, "m.parquet"))
        results.write_json(os.path.join(scratch, "s.json"), {"step": step})
        writes.append(time.perf_counter() - t)
  print(f"compiles/traces after the sweep's, in the runs alone: {dict(counts)}")
  compute = np.mean([status.loc[s, "compute_s"] for s in others])
  in_cpu = np.mean([sweep_cpu[s] for s in others])
  print(
    f"per steady checkpoint: in the sweep {compute:.2f} s compute (process CPU {in_cpu:.2f} s), "
    f"{steady:.2f} s wall as bench_sweep counts it; below, means of {len(others) * args.rounds}"
  )
  for what, pairs in timed.items():
    wall, cpu = np.mean(pairs, axis=0)
    ratio = compute / wall
    print(f"  {what}: {wall:.2f} s (process CPU {cpu:.2f} s); in the sweep / this {ratio:.3f}")
  print(f"  writing one checkpoint's files: {np.mean(writes):.3f} s")


def measure(into, fn, *args):
  """fn(*args), its (wall, process CPU) seconds appended to `into`."""
  t, c = time.perf_counter(), time.process_time()
  out = fn(*args)
  into.append((time.perf_counter() - t, time.process_time() - c))
  wall, cpu = into[-1]
  print(f"    {getattr(fn, '__name__', fn)}: {wall:.2f} s (CPU {cpu:.2f} s)", flush=True)
  return out


if __name__ == "__main__":
  main()
