"""The plan a user reads before spending a pod: bytes, FLOPs, memory, time per model.

  python -m tools.plan --models=pythia-6.9b-deduped,pythia-12b-deduped --steps=all \
      --devices=64 --mesh=data:8,model:8 --flops_per_device=197e12 --utilisation=0.4
  python -m tools.plan --models=runs/toy_suite --measure   # this machine's devices

Memory per device is the peak under the microbatches (and rematerialisation) the sweep
would choose for --device_memory (default: what this machine's first device reports);
the microbatch column shows the gradient microbatch. One checkpoint per call streams its
gradient batches (the gradient call holds one batch's gradients, the spectra call two);
stacked checkpoints (C > 1) hold all of theirs at once. Throughput is either measured
(--measure: a small forward on this machine's devices) or given (--flops_per_device in
FLOP/s, times --utilisation). See jax_pythia/scale/plan.py for the formulas.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from tools import _cli

FLAGS = flags.FLAGS
_cli.define_work_flags()
flags.adopt_module_key_flags(_cli)  # --help lists the shared flags with this tool's own
flags.DEFINE_list(
  "models",
  ["pythia-70m-deduped"],
  "Pythia names, or local suite/model directories (their config.json gives the shapes).",
)
flags.DEFINE_integer("devices", None, "Devices the sweep will run on (default: this machine's).")
flags.DEFINE_integer("hosts", 1, "Hosts fetching checkpoints in parallel (--split=checkpoints).")
flags.DEFINE_string(
  "mesh",
  None,
  "Mesh for the memory estimate, e.g. data:8,model:8 (default: per model the smallest model "
  "axis that fits --device_memory, shown as model:M in the microbatch column; pass it as --mesh).",
)
flags.DEFINE_bool(
  "measure",
  False,
  "Measure FLOP/s of one local device (a small forward) and assume every device reaches it.",
)
flags.DEFINE_float(
  "flops_per_device",
  None,
  "Peak FLOP/s of one device (e.g. 197e12 for a TPU v5e in bf16), used with --utilisation.",
)
flags.DEFINE_float("utilisation", 0.4, "Fraction of --flops_per_device the sweep reaches.")
flags.DEFINE_float("bandwidth", 200e6, "Download bytes/s of one host from the Hub.")
flags.DEFINE_string(
  "data",
  None,
  "The token data the sweep will read, as tools.sweep's --data (default: the Hub stream the "
  "models trained on, or their suite's data); only its size is read.",
)
flags.DEFINE_enum(
  "platform",
  None,
  ["cpu", "gpu", "tpu"],
  "The devices the sweep will run on (default: this machine's; a CPU with --device_memory "
  "plans for a GPU). On tpu no float64 refinement of condition numbers runs, so its memory "
  "is not counted.",
)
flags.DEFINE_integer(
  "seq_len", None, "Tokens per sequence (default: 2048 for Pythia, max_seq_len of a local config)."
)


def device_memory_and_source() -> tuple[float, str]:
  """Bytes of one device (--device_memory, else this machine's) and where they come from."""
  from jax_pythia.scale import plan

  if FLAGS.device_memory:
    return plan.parse_bytes(
      FLAGS.device_memory
    ), f"--device_memory={FLAGS.device_memory} per device"
  device_bytes, where = plan.device_memory()
  return device_bytes, f"{plan.format_bytes(device_bytes)} per device ({where} of this machine)"


def flops_per_device() -> tuple[float | None, str]:
  """(usable FLOP/s of one device, where the figure comes from); None with --measure,
  which measures later at the checkpoints per call chosen."""
  from jax_pythia.scale import plan

  if FLAGS.measure:
    return None, ""
  if FLAGS.flops_per_device:
    return (
      FLAGS.flops_per_device * FLAGS.utilisation,
      f"{FLAGS.flops_per_device:.3g} FLOP/s x {FLAGS.utilisation} utilisation",
    )
  raise plan.PlanError("give --measure or --flops_per_device (FLOP/s of one device)")


def sweep_options():
  """The work flags as the sweep's options: what the sweep would refuse is refused here
  too (one check, SweepOptions)."""
  from jax_pythia import sweep

  return sweep.SweepOptions(
    n_sequences=FLAGS.n_sequences,
    positions=FLAGS.positions,
    gradients=FLAGS.gradients,
    gradient_window=FLAGS.gradient_window,
    gradient_sequences=FLAGS.gradient_sequences,
    gradient_microbatch=FLAGS.gradient_microbatch,
    loss_sequences=FLAGS.loss_sequences,
    dtype=FLAGS.dtype,
    matmul_precision=FLAGS.matmul_precision,
    selection=_cli.selection(),  # only the selected work is counted
  )


def data_read(options, item_tokens: int) -> tuple[dict[int, int], int, tuple[str, int | None]]:
  """The training batches the sweep reads (fixed inputs, gradient windows, loss batch),
  their bytes, and the stream they come from with its size (None where unknown here)."""
  from jax_pythia import sweep
  from jax_pythia.checkpoints import sources
  from jax_pythia.data import streams
  from jax_pythia.errors import JaxPythiaError
  from jax_pythia.scale import plan

  models = sources.resolve_models(FLAGS.models, FLAGS.revisions)
  needs = sweep.batches_needed(models, FLAGS.steps, options)
  try:
    location, _ = sources.data_location(FLAGS.data, models)
  except JaxPythiaError:  # models of several suites: the sweep will need --data
    location = "the token data the sweep is given (--data)"
  pile = location in (streams.PILE_DEDUPED, streams.PILE_STANDARD)
  size = plan.PILE_BYTES if pile else streams.local_bytes(location)
  return needs, streams.batch_bytes(needs, item_tokens), (location, size)


def main(argv):
  _cli.reject_extra_args(argv)
  from jax_pythia.scale import plan

  check_flags()
  options = sweep_options()
  devices = FLAGS.devices
  if devices is None or FLAGS.measure:
    import jax

    devices = devices or jax.device_count()
  per_device, source = flops_per_device()
  device_bytes, memory_source = device_memory_and_source()
  shapes = plan.resolve(FLAGS.models, FLAGS.seq_len)
  works, meshes = works_and_meshes(shapes, devices, device_bytes, options)
  if FLAGS.measure:
    c = max(w.checkpoints_per_call for w in works)
    per_device = plan.measure_flops_per_device(checkpoints_per_call=c)
    source = f"measured {per_device / 1e9:.3g} GFLOP/s on one local device at {c} ckpt(s)/call"
  plans = [
    plan.make_plan(s, FLAGS.steps, w, m, per_device * devices, FLAGS.bandwidth, device_bytes)
    for s, w, m in zip(shapes, works, meshes)
  ]
  needs, data_bytes, stream = data_read(options, max(s.seq_len for s in shapes) + 1)
  print(
    plan.format_plan(
      plans,
      devices,
      FLAGS.hosts,
      per_device * devices,
      source,
      data_bytes,
      len(needs),
      memory_source,
      stream,
    )
  )


def check_flags() -> None:
  """Refuse, naming the flag, what the sweep would refuse."""
  _cli.require_items("models", FLAGS.models)
  _cli.require_precision()
  for flag in ("devices", "hosts", "flops_per_device", "bandwidth", "n_sequences", "seq_len"):
    _cli.require_positive(flag, getattr(FLAGS, flag))
  _cli.require_positive("utilisation", FLAGS.utilisation, at_most=1)


def works_and_meshes(shapes, devices: int, device_bytes: int | None, options):
  """Each model's work (kept positions, checkpoints per call) and mesh, as the sweep
  would choose them on such a device."""
  import jax

  from jax_pythia.scale import plan, sharding

  requested = _cli.checkpoints_per_call()
  mesh = plan.mesh_of(sharding.parse_mesh(FLAGS.mesh), devices, FLAGS.mesh)
  platform = FLAGS.platform or jax.local_devices()[0].platform
  if platform == "cpu" and FLAGS.device_memory:  # another device's memory: plan for a GPU
    platform = "gpu"
  work = plan.Work(
    FLAGS.n_sequences,
    options.computes_gradients,  # no gradient pass without a selected gradient metric
    FLAGS.gradient_window,
    FLAGS.gradient_sequences,
    FLAGS.gradient_microbatch,
    FLAGS.loss_sequences,
    FLAGS.dtype,
    **plan.selected_work(options.chosen, platform),  # only the selected work is counted
  )
  works = [
    dataclasses.replace(work, kept_positions=plan.kept_positions(FLAGS.positions, s.seq_len))
    for s in shapes
  ]
  meshes = [
    mesh if FLAGS.mesh else plan.choose_mesh(s, w, devices, device_bytes)
    for s, w in zip(shapes, works)
  ]
  works = [
    dataclasses.replace(
      w,
      checkpoints_per_call=plan.checkpoints_per_call(s, w, m, device_bytes, requested, platform),
    )
    for s, w, m in zip(shapes, works, meshes)
  ]
  return works, meshes


if __name__ == "__main__":
  _cli.run(main)
