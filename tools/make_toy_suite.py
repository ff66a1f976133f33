"""Builds the offline mini-Pythia suite (or resumes an interrupted build).

  python -m tools.make_toy_suite --out=runs/toy_suite            # the default suite
  python -m tools.make_toy_suite --out=/tmp/tiny --preset=tiny   # seconds, for tests

Several GPT-NeoX and Llama sizes trained on the Python standard library's source,
byte-level tokenized, with Pythia's recipe scaled down; see jax_pythia/toy/build.py (layout, build),
jax_pythia/toy/corpus.py (corpus, tokenizer) and jax_pythia/toy/train.py (schedule,
training). Rerunning the same command continues an interrupted build to the same bits; on
a complete suite it returns at once.
"""

from __future__ import annotations

from absl import flags, logging

from tools import _cli

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Suite directory (created; suite.json is written last).")
flags.DEFINE_enum(
  "preset",
  "default",
  ["default", "tiny"],
  "Starting options; the flags below override them when given.",
)
flags.DEFINE_string(
  "sizes",
  None,
  "Comma list of LAYERSxD_MODEL[xHEADS] (GPT-NeoX; heads default to d_model/16) and "
  "llama:LAYERSxD_MODEL[xHEADS[xKV_HEADS]][:tied] (Llama: GQA with KV_HEADS key/value heads, "
  "SwiGLU, tied embeddings), e.g. llama:2x32x2x1:tied,2x32,3x48,llama:4x64x4x2,4x64,4x96.",
)
flags.DEFINE_integer("seq_len", None, "Tokens (bytes) per training sequence.")
flags.DEFINE_integer("sequences_per_step", None, "Sequences per training batch (B).")
flags.DEFINE_integer("n_steps", None, "Training steps of every model.")
flags.DEFINE_integer(
  "checkpoint_every", None, "Checkpoint every N steps (after the log-spaced ones)."
)
flags.DEFINE_integer(
  "log_checkpoints_until", None, "Log-spaced checkpoints 1, 2, 4, ... up to this step."
)
flags.DEFINE_integer("seed", None, "Seed of the initialisation and the data order.")
flags.DEFINE_float("lr_scale", None, "Multiplies every size's Pythia-law learning rate.")
flags.DEFINE_integer(
  "max_steps_this_run",
  None,
  "Stop after this many training steps in all (simulates an interruption; rerun to resume).",
)
flags.mark_flag_as_required("out")

_OPTION_FLAGS = (
  "sizes",
  "seq_len",
  "sequences_per_step",
  "n_steps",
  "checkpoint_every",
  "log_checkpoints_until",
  "seed",
  "lr_scale",
)


def main(argv):
  _cli.reject_extra_args(argv)
  from jax_pythia.toy import build as toy_suite

  preset = toy_suite.TINY_OPTIONS if FLAGS.preset == "tiny" else toy_suite.DEFAULT_OPTIONS
  overrides = {name: FLAGS[name].value for name in _OPTION_FLAGS if FLAGS[name].value is not None}
  options = toy_suite.ToySuiteOptions.from_overrides(**{**preset.to_dict(), **overrides})
  result = toy_suite.build_toy_suite(
    FLAGS.out,
    options,
    max_steps_this_run=FLAGS.max_steps_this_run,
    progress=toy_suite.TqdmProgress(),
    log=logging.info,
  )
  if not result.complete:
    print(
      f"stopped early (--max_steps_this_run={FLAGS.max_steps_this_run}); rerun the same "
      f"command to resume {FLAGS.out}"
    )
    return
  manifest = result.manifest
  for model in manifest["models"]:
    took = result.seconds.get(model["name"])
    timing = f", {took:.1f}s this run" if took is not None else ""
    print(
      f"{model['name']}: {model['n_params']:,} params, lr {model['learning_rate']:g}, "
      f"final train loss {model['final_train_loss_mean_last_10']:.3f}{timing}"
    )
  print(
    f"{len(manifest['steps'])} checkpoints per model (steps {manifest['steps'][0]}.."
    f"{manifest['steps'][-1]}); manifest {manifest['root']}/{toy_suite.MANIFEST_FILE}"
  )


if __name__ == "__main__":
  _cli.run(main)
