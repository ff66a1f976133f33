"""The study end to end: CKA convergence and effective rank over checkpoints.

  python -m tools.sweep                      # the offline toy suite (built if missing)
  python -m tools.sweep --models=pythia-70m-deduped,pythia-160m-deduped --steps=paper \
      --data=hf://datasets/EleutherAI/pile-deduped-pythia-preshuffled --out=runs/pythia

For every model the final checkpoint goes first (the CKA reference), then the selected
steps, --checkpoints_per_call at a time in one compiled call, the next ones fetched while
the current ones compute. Results land under --out as
they finish (rerun the same command to resume): metrics.parquet (model, step, layer,
component, head, metric, value), pairwise_cka.parquet, checkpoints.parquet, figures/. A
run that makes no progress for --stall_timeout (a wedged device collective) exits with
status 3 and one line naming the checkpoint and the phase it was in.
"""

from __future__ import annotations

import os

from absl import flags

from tools import _cli

DEFAULT_TOY_SUITE = os.path.join("runs", "toy_suite")

FLAGS = flags.FLAGS
_cli.define_work_flags()
_cli.define_data_timeout()
flags.adopt_module_key_flags(_cli)  # --help lists the shared flags with this tool's own
flags.DEFINE_list(
  "models",
  [DEFAULT_TOY_SUITE],
  "Models: Pythia names (pythia-160m-deduped), Hub ids (org/name), "
  "directories of step<N>/ checkpoints, or a suite directory of such models. "
  f"The default, {DEFAULT_TOY_SUITE}, is the offline toy suite, built first "
  "if missing.",
)
flags.DEFINE_string(
  "out",
  os.path.join("runs", "sweep"),
  "Output directory, or an fsspec URL (gs://bucket/run, with gcsfs) for hosts that share no "
  "disk: each host stages its files locally and uploads each as it is written.",
)
flags.DEFINE_string(
  "data",
  None,
  "Token data: Pythia's training stream read by byte range "
  "(hf://datasets/EleutherAI/pile-deduped-pythia-preshuffled, any fsspec URL, a folder "
  "of its shards, or a folder staged by tools.fetch_data), OLMo's training order "
  "(olmo:CONFIG.yaml[,GLOBAL_INDICES], docs/suites.md), a joined .bin/.idx prefix, a "
  ".npy [batch, seq] array, or a .txt file with --tokenizer. Default: the Hub stream the "
  "models trained on (deduped or standard Pile), or the data of their local suite.",
)
flags.DEFINE_string("tokenizer", None, "tokenizer.json for a .txt --data.")
flags.DEFINE_integer(
  "sequences_per_step",
  None,
  "Sequences per training batch in --data (Pythia: 1024; a suite's manifest, a staged "
  "folder or an OLMo config says its own).",
)
flags.DEFINE_integer(
  "data_step",
  None,
  "Training step whose batch gives the fixed inputs "
  "(default: the step before the final checkpoint, 142999 for Pythia).",
)
flags.DEFINE_enum(
  "value_slice",
  "per_head",
  ["per_head", "reference"],
  "per_head: the true per-head values. reference: the reference code's "
  "last third of the fused qkv (docs/method.md: the value-slice defect), only to reproduce "
  "published numbers.",
)
flags.DEFINE_integer("seed", 0, "Seed of random positions and the CKA noise floor.")
flags.DEFINE_enum(
  "on_error",
  "stop",
  ["stop", "skip"],
  "A checkpoint that fails to load: stop the run, or skip it and record it in checkpoints.parquet.",
)
flags.DEFINE_enum(
  "on_duplicate",
  "keep",
  ["keep", "skip"],
  "A checkpoint whose weights equal an earlier step's (by content hash; step0 = step1 on "
  "every Pythia model): keep computing it (flagged in checkpoints.parquet and report.md) "
  "or skip it (recorded as duplicate).",
)
flags.DEFINE_bool(
  "keep_checkpoints",
  False,
  "Keep fetched Hub weights in the cache after "
  "processing (default: evict them; 154 checkpoints of 12b are terabytes).",
)
flags.DEFINE_string(
  "evals_dir",
  None,
  "Published Pythia evaluations (Pythia's "
  "evals/pythia-v1) to draw downstream accuracy on the same step axis.",
)
flags.DEFINE_bool("figures", True, "Draw the figures and report.md when done.")
flags.DEFINE_string(
  "stall_timeout",
  "30m",
  "Exit (status 3, one line naming the checkpoint and phase) when the sweep makes no "
  "progress for this long: seconds or a duration (90s, 30m, 2h); 0: never. A wedged "
  "device collective cannot be interrupted, so set it above the slowest phase of one "
  "checkpoint.",
)
# Scale-out (jax_pythia.scale.sharding): a device mesh and JAX's multi-process runtime.
flags.DEFINE_string(
  "mesh",
  None,
  "Device mesh, e.g. data:4,model:2 (a size -1 takes the "
  "rest): token batches split over data, layer weights over model (by "
  "heads and MLP units). Default: one device (split=shard: data over all).",
)
flags.DEFINE_enum(
  "split",
  "checkpoints",
  ["checkpoints", "shard"],
  "With several "
  "processes: checkpoints (each process sweeps its own checkpoints on its "
  "local devices; process 0 does the final ones first) or shard (all "
  "processes run every checkpoint on one global mesh; process 0 writes).",
)
flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() without arguments (TPU pods and clusters it detects).",
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0's coordinator, "
  "for jax.distributed.initialize elsewhere (with --num_processes and "
  "--process_id).",
)
flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's id, 0 .. num_processes-1.")
_cli.define_compilation_cache_flag()


def sweep_options():
  """The flags that change the numbers, as the sweep's options (checked there)."""
  from jax_pythia import sweep

  return sweep.SweepOptions(
    n_sequences=FLAGS.n_sequences,
    positions=FLAGS.positions,
    data_step=FLAGS.data_step,
    gradients=FLAGS.gradients,
    gradient_window=FLAGS.gradient_window,
    gradient_sequences=FLAGS.gradient_sequences,
    gradient_microbatch=FLAGS.gradient_microbatch,
    value_slice=FLAGS.value_slice,
    loss_sequences=FLAGS.loss_sequences,
    dtype=FLAGS.dtype,
    matmul_precision=FLAGS.matmul_precision,
    seed=FLAGS.seed,
    selection=_cli.selection(),  # --metrics, --components, --analysis, --metrics_module
  )


def announce(runner, models, placement) -> int:
  """Prints what the run will do; returns the number of checkpoints still to compute."""
  todo = sum(map(len, runner.pending().values()))
  total = sum(map(len, runner.plan.values()))
  per_call = ", ".join(f"{name} {c}" for name, c in runner.per_call.items())
  print(
    f"{len(models)} model(s), {total} checkpoints, {total - todo} already done; "
    f"results in {FLAGS.out}; {placement.describe()}; checkpoints per call: {per_call}"
  )
  for name, layout in runner.layouts.items():
    print(f"{name}: {layout.describe()}")
  return todo


def ensure_default_suite(placement) -> None:
  """Process 0 builds the toy suite the first time, resumes an interrupted build, else
  returns at once; the others read it once it is there."""
  if placement.process_index == 0:
    from jax_pythia.toy import build as toy_suite

    toy_suite.ensure_toy_suite(DEFAULT_TOY_SUITE)
  placement.barrier("toy_suite")


def finish(runner, heartbeat) -> None:
  """Process 0 gathers the tables and draws the figures."""
  heartbeat.beat(phase="gathering results")
  for path in runner.finish(FLAGS.figures, FLAGS.evals_dir):
    print(f"wrote {path}")


def open_inputs(heartbeat, data_timeout: float):
  """The models and their token data; the watchdog is told which of them is being read."""
  from jax_pythia.checkpoints import sources

  heartbeat.beat(phase="resolving --models")
  models = sources.resolve_models(FLAGS.models, FLAGS.revisions)
  heartbeat.beat(phase="opening the token data (--data)")
  source = sources.open_data(
    FLAGS.data, models, FLAGS.tokenizer, FLAGS.sequences_per_step, data_timeout
  )
  return models, source


def main(argv):
  _cli.reject_extra_args(argv)
  _cli.enable_compilation_cache()
  from jax_pythia import sweep
  from jax_pythia.scale import plan, sharding
  from jax_pythia.sweep import watchdog

  per_call = _cli.checkpoints_per_call()  # bad values fail before any work
  _cli.require_precision()
  device_memory = plan.parse_bytes(FLAGS.device_memory) if FLAGS.device_memory else None
  _cli.require_items("models", FLAGS.models)
  stall_timeout = watchdog.parse_duration(FLAGS.stall_timeout)
  data_timeout = _cli.data_timeout()
  options = sweep_options()
  # Before anything touches a device: the runtime must know every process first.
  sharding.initialize_distributed(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, auto=FLAGS.distributed
  )
  placement = sharding.Placement.create(FLAGS.mesh, FLAGS.split)
  if FLAGS.models == [DEFAULT_TOY_SUITE]:
    ensure_default_suite(placement)
  heartbeat = watchdog.Heartbeat()
  watchdog.Watchdog(heartbeat, stall_timeout).start()  # a daemon: gone when main returns
  models, source = open_inputs(heartbeat, data_timeout)
  bar = _cli.progress_bar(unit="ckpt", dynamic_ncols=True, delay=0.5)

  def progress(model, step):
    bar.set_postfix_str(f"{model} step {step}")
    bar.update(1)

  runner = sweep.Sweep(
    models,
    FLAGS.steps,
    source,
    FLAGS.out,
    options,
    on_error=FLAGS.on_error,
    on_duplicate=FLAGS.on_duplicate,
    keep_checkpoints=FLAGS.keep_checkpoints,
    progress=progress,
    placement=placement,
    heartbeat=heartbeat,
    device_memory=device_memory,
    checkpoints_per_call=per_call,
  )
  try:
    # Checks the data, fits each model to the device's memory and checks --out, before
    # any checkpoint loads.
    runner.prepare()
    bar.reset(total=announce(runner, models, placement))
    with bar:
      runner.run()
    # Every process's files are on --out before process 0 gathers them.
    heartbeat.beat(phase="waiting for the other processes")
    placement.barrier("done")
    if placement.process_index == 0:
      finish(runner, heartbeat)
  finally:
    runner.store.close()  # the staging folder of a URL --out


if __name__ == "__main__":
  _cli.run(main)
