"""Stage the training batches a sweep needs into a small local folder, once, for a pod.

  python -m tools.fetch_data --models=pythia-70m-deduped,pythia-160m-deduped --steps=paper \
      --out=/shared/pile-staged
  python -m tools.sweep --models=... --steps=paper --data=/shared/pile-staged

Exactly the batches the sweep will read (the fixed inputs, each checkpoint's gradient
window, the held-out loss batch: jax_pythia.sweep.run.batches_needed) are read by byte range
from --data (default: the Hub stream the models trained on) into DIR/batches.bin/.idx,
with DIR/manifest.json mapping each step to its sequences. Use the same sweep options
here as in the sweep; a step that was not staged is a clear error there, not a wrong batch.
"""

from __future__ import annotations

from absl import flags

from tools import _cli

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "Models, as in tools.sweep (they set the final step).")
flags.DEFINE_string("out", None, "Folder to stage into (shared by the pod).")
flags.DEFINE_string(
  "data",
  None,
  "The stream to read: hf://datasets/EleutherAI/pile-deduped-pythia-preshuffled (the "
  "default for -deduped models; pile-standard-... for the others), any fsspec URL, a "
  "folder of shards, a joined .bin/.idx prefix, or OLMo's training order "
  "(olmo:CONFIG.yaml[,GLOBAL_INDICES], docs/suites.md; its batch size is the config's).",
)
flags.DEFINE_string(
  "cache_dir",
  None,
  "Range-read cache (default: $JAX_PYTHIA_DATA_CACHE or ~/.cache/jax_pythia/data).",
)
flags.DEFINE_integer(
  "sequences_per_step",
  1024,
  "Sequences per training batch (Pythia: 1024; an olmo: --data's config gives its own).",
)
_cli.define_data_timeout()
_cli.define_work_flags()  # the sweep's own flags: what it computes is what is staged
flags.adopt_module_key_flags(_cli)  # --help lists them with this tool's own
flags.DEFINE_string(
  "stall_timeout",
  "30m",
  "Exit (status 3, one line naming the batch being read) when staging makes no progress "
  "for this long: seconds or a duration (90s, 30m, 2h); 0: never. Each read is also "
  "bounded by --data_timeout.",
)
flags.DEFINE_integer(
  "data_step",
  None,
  "As in tools.sweep: the step whose batch gives the fixed inputs (default: the step "
  "before the final checkpoint).",
)


def open_stream(location: str, timeout_s: float):
  """(the stream of items at --data, its sequences per step): OLMo's training order with
  its config's batch size (a different --sequences_per_step is refused), else
  --sequences_per_step."""
  from jax_pythia import data
  from jax_pythia.data import olmo, streams

  if olmo.is_olmo_location(location):
    source = olmo.open_olmo(location)
    given = FLAGS["sequences_per_step"]
    if given.present and given.value != source.batch_size:
      raise ValueError(
        f"--sequences_per_step={given.value}: {location} trains on batches of "
        f"{source.batch_size} (global_train_batch_size); leave the flag out"
      )
    return source, source.batch_size
  if streams.is_stream_location(location):
    cache_dir = FLAGS.cache_dir or "default"
    return streams.open_stream(location, cache_dir=cache_dir, timeout_s=timeout_s), (
      FLAGS.sequences_per_step
    )
  return data.MMapIndexedDataset(location), FLAGS.sequences_per_step


def main(argv):
  _cli.reject_extra_args(argv)
  from tqdm import tqdm

  from jax_pythia import sweep
  from jax_pythia.checkpoints import sources
  from jax_pythia.data import staged, streams
  from jax_pythia.sweep import watchdog

  if not FLAGS.models or not FLAGS.out:
    raise ValueError("give --models and --out (see --help)")
  timeout_s = _cli.data_timeout()  # bad values fail before any work
  heartbeat = watchdog.Heartbeat()
  stall_timeout = watchdog.parse_duration(FLAGS.stall_timeout)
  watchdog.Watchdog(heartbeat, stall_timeout).start()  # a daemon: gone when main returns
  options = sweep.SweepOptions(
    n_sequences=FLAGS.n_sequences,
    data_step=FLAGS.data_step,
    gradients=FLAGS.gradients,
    gradient_window=FLAGS.gradient_window,
    gradient_sequences=FLAGS.gradient_sequences,
    loss_sequences=FLAGS.loss_sequences,
  )
  heartbeat.beat(phase="resolving --models")
  models = sources.resolve_models(FLAGS.models, FLAGS.revisions)
  location = FLAGS.data or streams.pile_for_models([m.name for m in models])
  heartbeat.beat(phase=f"reading the index of {location} (--data)")
  stream, sequences_per_step = open_stream(location, timeout_s)
  options.check_batch_counts(sequences_per_step, "--data")
  needs = sweep.batches_needed(models, FLAGS.steps, options)
  print(
    f"staging {len(needs)} batches ({sum(needs.values())} sequences) of {location} into {FLAGS.out}"
  )
  heartbeat.beat(phase=f"reading the batch of step {min(needs)} (--data)")

  def staged_one(step):
    bar.update(1)
    following = [s for s in needs if s > step]
    what = f"the batch of step {following[0]}" if following else "the staged index"
    heartbeat.beat(phase=f"reading {what} (--data)")

  with tqdm(total=len(needs), unit="batch", dynamic_ncols=True, delay=0.5) as bar:
    manifest = staged.stage(stream, needs, FLAGS.out, sequences_per_step, progress=staged_one)
  size = streams.batch_bytes(needs, manifest["item_size"], stream.dtype.itemsize)
  print(f"wrote {FLAGS.out}: {size / 1e6:.3g} MB; sweep with --data={FLAGS.out}")


if __name__ == "__main__":
  _cli.run(main)
