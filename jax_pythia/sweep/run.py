"""The study over checkpoints: resumable, prefetching, writing tidy results.

For each model the final checkpoint is processed first (it is every CKA's reference),
then the other selected steps. While one checkpoint computes, the next is fetched and
converted in a background thread; a model's other steps go C at a time
(`checkpoints_per_call`, stacked in one compiled call: `jax_pythia.study`'s batched
functions), the next chunk loading while one computes. Each finished checkpoint is
written at once,
atomically (`jax_pythia.sweep.results`: its metric rows, the sampled activations pairwise CKA
needs, a status record); rerunning the same command skips what exists, so a kill loses
at most the checkpoint in flight. `results.finalize` gathers everything into
`metrics.parquet`, `pairwise_cka.parquet` and `checkpoints.parquet`.

Where models and tokens come from: `jax_pythia.checkpoints.sources`. What is computed:
`jax_pythia.study.checkpoint.checkpoint_metrics`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jax_pythia import data
from jax_pythia.checkpoints import hub as checkpoints
from jax_pythia.checkpoints import integrity
from jax_pythia.checkpoints.sources import ModelSource
from jax_pythia.errors import JaxPythiaError, SweepError
from jax_pythia.files import save_npz
from jax_pythia.models import model as model
from jax_pythia.scale import plan, sharding
from jax_pythia.sweep import checks, compute, loading, outdir, results, store, watchdog
from jax_pythia.sweep.loading import Loaded, parameter_count
from jax_pythia.sweep.options import SweepOptions, batches_needed, fixed_input_step, selected_steps


class Sweep:
  """Runs the study for some models and steps into `out_dir` (see the module doc).

  The constructor only plans (which steps of which model); `prepare` (called by `run`)
  checks the data, claims `out_dir` for these inputs (`jax_pythia.sweep.outdir`: recorded in
  `<out_dir>/sweep.json`) and checks the checkpoints it already holds.
  """

  def __init__(
    self,
    models: Sequence[ModelSource],
    steps: str,
    source: data.TokenSource,
    out_dir: str,
    options: SweepOptions | None = None,
    *,
    on_error: str = "stop",
    on_duplicate: str = "keep",
    keep_checkpoints: bool = True,
    progress: Callable[[str, int], Any] | None = None,
    placement: sharding.Placement | None = None,
    heartbeat: watchdog.Heartbeat | None = None,
    notify: Callable[[str], Any] | None = None,
    device_memory: float | None = None,
    checkpoints_per_call: int = 0,
  ):
    if on_error not in ("stop", "skip"):
      raise SweepError(f"--on_error={on_error!r}: stop or skip")
    if on_duplicate not in ("keep", "skip"):
      raise SweepError(f"--on_duplicate={on_duplicate!r}: keep or skip")
    self.on_duplicate = on_duplicate
    self._hashes: dict[str, dict[str, int]] = {}  # model -> {weights hash: first step}
    self.models, self.source = list(models), source
    self.options, self.on_error = options or SweepOptions(), on_error
    self.keep = keep_checkpoints
    self.progress = progress
    self.notify = notify or (lambda line: print(line, file=sys.stderr))
    # Mesh and process split (jax_pythia.scale.sharding); the default is one device.
    self.placement = placement or sharding.Placement()
    # Where the sweep is, for a stall watchdog (jax_pythia.sweep.watchdog) if one watches it.
    self.heartbeat = heartbeat or watchdog.Heartbeat()
    self._inputs: dict[str, np.ndarray] = {}
    self._batch_hashes: dict[str, str] = {}  # "<step>x<sequences>": content hash, read once
    self._prepared = False
    self._steps_spec = steps
    self.device_memory = device_memory  # bytes of one device; None: what it reports
    self.layouts: dict[str, plan.Layout] = {}  # per model, set by prepare()
    if checkpoints_per_call < 0:
      raise SweepError(
        f"--checkpoints_per_call={checkpoints_per_call}: a number of checkpoints >= 1, or 0 (auto)"
      )
    if checkpoints_per_call > 1 and self.placement.mesh is not None:
      raise SweepError(
        f"--checkpoints_per_call={checkpoints_per_call} with --mesh: stacked checkpoints run "
        "on one device only; use 1 (or auto)"
      )
    self.requested_per_call = checkpoints_per_call  # 0: automatic
    self.per_call: dict[str, int] = {}  # per model, set by prepare()
    self.plan = {m.name: selected_steps(m, steps) for m in self.models}
    # --out as given (a folder or an fsspec URL); the sweep reads and writes `out_dir`, a
    # local folder (the URL's staging mirror: jax_pythia.sweep.store). Last: nothing above
    # may refuse the run once a staging folder exists.
    self.store = store.OutStore(out_dir)
    self.out_dir = self.store.local

  # -- planning

  def prepare(self) -> None:
    """Checks that the data holds every batch the plan needs, chooses each model's
    microbatches and rematerialisation from the device's memory (`plan.sweep_layouts`,
    refusing a model that cannot fit), and checks that `out_dir` holds no results of
    other options (recording these options there); once, before any checkpoint loads."""
    if self._prepared:
      return
    outdir.check_is_directory(self.out_dir)
    # Inputs first: a run refused for its flags must not claim --out for them.
    self._check_data()
    checks.check_value_slice(self.models, self.options)
    self.heartbeat.beat(phase="planning memory and claiming --out")
    mesh = sharding.mesh_sizes(self.placement.mesh) if self.placement.mesh else {"data": 1}
    seq_len = self.inputs(self.models[0]).shape[1]
    self.layouts = plan.sweep_layouts(self.models, self.options, seq_len, mesh, self.device_memory)
    self.per_call = self._checkpoints_per_call(seq_len, mesh)
    checks.check_data_axis(self.options, self.models, self.layouts, mesh.get("data", 1))
    self.work = compute.ChunkWork(
      self.options,
      self.source,
      self.placement,
      self.heartbeat,
      self.layouts,
      self.inputs,
      lambda m: self.paths(m.name, m.final_step)[1],
    )
    self._check_output_dir()
    self._prepared = True

  def _check_output_dir(self):
    """Claims --out for these inputs (see jax_pythia.sweep.outdir), then checks what it holds."""
    self.store.pull()
    locations = {
      m.name: m.location if m.is_hub else os.path.realpath(m.location) for m in self.models
    }
    identity = outdir.data_identity(self.source, self._batch_hashes)
    outdir.claim(self.out_dir, self.options.fingerprint(), identity, locations)
    lead = self.placement.process_index == 0  # every process checks; one says so (and syncs)
    if lead:
      self.store.sync(os.path.join(self.out_dir, outdir.RECORD_FILE))
    finished = {(m.name, s): self.paths(m.name, s) for m in self.models for s in self.plan[m.name]}
    quiet = lambda *paths: None  # noqa: E731
    outdir.verify_finished(
      finished, self.notify if lead else quiet, self.store.sync if lead else quiet
    )

  def _check_data(self):
    o = self.options
    self.heartbeat.beat(phase="reading the fixed inputs (--data)")
    if self.source.has_training_steps:
      o.check_batch_counts(self.source.sequences_per_step, self.source.name)
    flag = (
      ("--data_step", o.data_step) if o.data_step is not None else ("--n_sequences", o.n_sequences)
    )
    with _naming_flag(*flag):
      tokens = self.inputs(self.models[0])  # raises naming the file when it lacks the batch
    checks.check_positions(o, tokens.shape[1])
    checks.check_training_data(o, self.source)
    if self.source.has_training_steps:
      # Every batch the run will read, now: one that is missing (past the stream's end, not
      # staged) fails here naming file and step, not hours in; a remote stream caches them.
      # Each batch's content hash goes into --out's record: a stream whose bytes changed
      # under the same name is refused there, not mixed with earlier results.
      for step, n in batches_needed(self.models, self._steps_spec, o).items():
        self.heartbeat.beat(phase=f"reading the training batch of step {step} (--data)")
        self._batch_hashes[f"{step}x{n}"] = outdir.content_hash(self.source.batch(step, n))

  def data_step(self, m: ModelSource) -> int:
    return fixed_input_step(self.options, m)

  def inputs(self, m: ModelSource) -> np.ndarray:
    """The fixed inputs every checkpoint of `m` is run on (read once per model)."""
    if m.name not in self._inputs:
      o = self.options
      if self.source.has_training_steps:
        tokens = self.source.batch(self.data_step(m), o.n_sequences)[:, :-1]
      else:
        tokens = self.source.fixed_inputs(o.n_sequences)
      self._inputs[m.name] = tokens
    return self._inputs[m.name]

  def paths(self, model: str, step: int) -> tuple[str, str, str]:
    return results.checkpoint_paths(self.out_dir, model, step)

  def pending(self) -> dict[str, list[int]]:
    return {
      name: [s for s in steps if not os.path.exists(self.paths(name, s)[0])]
      for name, steps in self.plan.items()
    }

  # -- running

  def run(self) -> None:
    self.prepare()
    pending = self.pending()
    everything = [(m, s) for m in self.models for s in pending[m.name]]
    self.heartbeat.beat(phase="waiting for the other processes")
    with jax.default_matmul_precision(self.options.matmul_precision):
      for queue in self.placement.schedule(everything):  # this process's share, in phases
        self.store.pull()  # what the other processes wrote before the barrier (the finals)
        self._run_queue(queue)
        self.heartbeat.beat(phase="waiting for the other processes")

  def _checkpoints_per_call(self, seq_len: int, mesh: dict[str, int]) -> dict[str, int]:
    """{model: C}: as asked (refused when it does not fit the device), or chosen from the
    device's memory and the model's size (`plan.checkpoints_per_call`); 1 on a mesh or
    for a model of unknown shape."""
    device = jax.local_devices()[0]
    device_bytes = self.device_memory or plan.device_memory(device)[0]
    work = plan.sweep_work(self.options, seq_len)
    out = {}
    for m in self.models:
      shape = plan.of_source(m, seq_len)
      if self.placement.mesh is not None or shape is None:
        out[m.name] = self.requested_per_call or 1
        continue
      try:
        out[m.name] = plan.checkpoints_per_call(
          shape, work, mesh, device_bytes, self.requested_per_call, device.platform
        )
      except plan.PlanError as e:
        raise SweepError(str(e)) from None
    return out

  def _run_queue(self, queue: list[tuple[ModelSource, int]]) -> None:
    chunks = self._chunks(queue)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      future = pool.submit(self._load_chunk, chunks[0]) if chunks else None
      for i, chunk in enumerate(chunks):
        self.heartbeat.beat(chunk[0][0].name, chunk[0][1], "loading")
        loaded = future.result()
        future = pool.submit(self._load_chunk, chunks[i + 1]) if i + 1 < len(chunks) else None
        self._process_chunk(chunk[0][0], loaded)
        if self.progress:
          for m, step in chunk:
            self.progress(m.name, step)

  def _chunks(self, queue: list[tuple[ModelSource, int]]) -> list[list[tuple[ModelSource, int]]]:
    """The queue cut into runs of up to C steps of one model; a final step stays alone (it
    is the reference the others' CKA needs)."""
    chunks: list[list[tuple[ModelSource, int]]] = []
    for m, step in queue:
      last = chunks[-1] if chunks else None
      if (
        last
        and last[0][0] is m
        and step != m.final_step
        and last[0][1] != m.final_step
        and len(last) < self.per_call.get(m.name, 1)
      ):
        last.append((m, step))
      else:
        chunks.append([(m, step)])
    return chunks

  def _load_chunk(self, chunk: list[tuple[ModelSource, int]]) -> list[Loaded]:
    return [loading.load(m, step, self.options.dtype) for m, step in chunk]

  def _seen_hashes(self, m: ModelSource) -> dict[str, int]:
    """{weights hash: first step} of `m`'s checkpoints processed so far (this run or an
    earlier one into the same --out)."""
    if m.name not in self._hashes:
      seen: dict[str, int] = {}
      folder = os.path.dirname(self.paths(m.name, m.final_step)[2])
      for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and not name.startswith(".tmp-"):
          record = results.read_json(os.path.join(folder, name), "a status record")
          if record.get(integrity.HASH_COLUMN):
            digest, step = record[integrity.HASH_COLUMN], int(record["step"])
            seen[digest] = min(step, seen.get(digest, step))
      self._hashes[m.name] = seen
    return self._hashes[m.name]

  def _process_chunk(self, m: ModelSource, chunk: list[Loaded]) -> None:
    """Computes the chunk's checkpoints in one batched call (one alone as before), then
    writes each checkpoint's files as `_process` does for one."""
    ok = self._to_compute(m, chunk)
    computed = {}
    if len(ok) > 1 and len({loaded.config for loaded in ok}) == 1:
      start = time.perf_counter()
      try:
        outputs = self.work.stacked(m, ok)
      except JaxPythiaError:  # each alone then: `_process` records which one fails
        outputs = []
      seconds = (time.perf_counter() - start) / len(ok)
      computed = {loaded.step: (*out, seconds) for loaded, out in zip(ok, outputs)}
    for loaded in chunk:
      self._process(m, loaded, computed.get(loaded.step))

  def _to_compute(self, m: ModelSource, chunk: list[Loaded]) -> list[Loaded]:
    """The chunk's checkpoints `_process` will compute: loaded, and not a duplicate it will
    skip (--on_duplicate=skip) of an earlier step, in this chunk or before it."""
    out, earlier = [], set()
    for loaded in chunk:
      if loaded.error is not None:
        continue
      digest = loaded.weights_hash.digest if loaded.weights_hash else None
      if self.on_duplicate == "skip" and digest and loaded.step != m.final_step:
        if digest in earlier or self._seen_hashes(m).get(digest, loaded.step) != loaded.step:
          continue
        earlier.add(digest)
      out.append(loaded)
    return out

  def _process(self, m: ModelSource, loaded: Loaded, computed: tuple | None = None) -> None:
    """Computes (unless `computed` gives (rows, acts, seconds)) and writes one checkpoint."""
    metrics_path, acts_path, status_path = self.paths(m.name, loaded.step)
    status = {"model": m.name, "suite": m.suite, "step": loaded.step, "load_s": loaded.seconds}
    if loaded.config is not None:
      status["parameters"] = parameter_count(loaded.config)
      status["family"] = model.family_of(loaded.config).model_type
    if loaded.weights_hash is not None:
      status[integrity.HASH_COLUMN] = loaded.weights_hash.digest
      status[integrity.SHARDS_COLUMN] = ",".join(loaded.weights_hash.shards)
      seen = self._seen_hashes(m)
      first = seen.setdefault(loaded.weights_hash.digest, loaded.step)
      if first != loaded.step and self.on_duplicate == "skip" and loaded.step != m.final_step:
        message = f"same weights as step {first}; skipped (--on_duplicate=skip)"
        if self.placement.is_writer:
          self._write_json(status_path, {**status, "status": "duplicate", "message": message})
        return
    error, start, seconds = loaded.error, time.perf_counter(), None
    if error is None:
      try:
        rows, acts, seconds = computed or (*self.work.one(m, loaded), None)
        error = _overflow(acts, self.options.dtype)
      except JaxPythiaError as e:  # a checkpoint the study cannot run: as one that fails to load
        error = str(e)
    if error is not None:
      if loaded.step == m.final_step or self.on_error == "stop":
        why = " (the final checkpoint is the CKA reference)" if loaded.step == m.final_step else ""
        raise SweepError(f"{m.name} step {loaded.step}: {error}{why}")
      if self.placement.is_writer:
        self._write_json(status_path, {**status, "status": "failed", "message": error})
      return
    if not self.placement.is_writer:
      return
    self.heartbeat.beat(m.name, loaded.step, "writing")
    save_npz(acts_path, acts)
    results.write_parquet(rows, metrics_path)  # its existence marks the step done; a rerun
    # restores the status below if the process dies first (outdir.verify_finished).
    self.store.sync(acts_path, metrics_path)  # in this order, for the same reason
    status.update(
      status="ok", message="", compute_s=seconds or time.perf_counter() - start, rows=len(rows)
    )
    if not acts:  # a selection without activation metrics captures none (analysis.selection)
      status["activations"] = False
    self._write_json(status_path, status)
    if not self.keep and m.is_hub and loaded.directory:
      checkpoints.evict_snapshot(loaded.directory)

  def _write_json(self, path: str, record: dict) -> None:
    results.write_json(path, record)
    self.store.sync(path)

  def finish(self, figures: bool = False, evals_dir: str | None = None) -> list[str]:
    """Gathers the tables (and with `figures` draws the report) from every process's
    files; process 0 calls it once all have finished. The paths written, as --out names
    them."""
    from jax_pythia.sweep import report

    self.store.pull()
    written = list(results.finalize(self.out_dir, self.options.chosen).values())
    if figures:
      self.heartbeat.beat(phase="drawing figures")
      written += report.write_report(self.out_dir, evals_dir=evals_dir)
    self.store.sync(*written)
    return [self.store.named(path) for path in written]


def _overflow(acts: dict[str, np.ndarray], dtype: str) -> str | None:
  """Why a checkpoint's activations cannot give metrics (some are inf or NaN: finite but
  huge weights overflowed the forward pass), or None. Its metrics would be mostly NaN under
  an ok status otherwise."""
  bad = [site for site, values in acts.items() if not np.isfinite(values).all()]
  if not bad:
    return None
  more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
  return (
    f"activations at {bad[0]}{more} are not finite: the forward pass overflowed "
    f"(--dtype={dtype}; the weights are finite but too large)"
  )


@contextlib.contextmanager
def _naming_flag(flag: str, value: Any):
  """Data errors raised for a flag's value start with the flag."""
  try:
    yield
  except data.DataError as e:
    raise SweepError(f"{flag}={value}: {e}") from None
