"""Converts a Hugging Face-format checkpoint (any supported family) into an orbax cache.

  python -m tools.convert --checkpoint=EleutherAI/pythia-410m@step143000 --out=cache/410m

Later runs restore the cache with `jax_pythia.checkpoints.converted.restore_converted`,
straight onto a device sharding, skipping the read and conversion of the original weights.
"""

from __future__ import annotations

from absl import flags

from tools import _cli

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "checkpoint",
  None,
  "Local Hugging Face-format directory, or "
  "<repo>@<revision> (e.g. EleutherAI/pythia-160m-deduped@step3000).",
)
flags.DEFINE_string(
  "out",
  None,
  "Directory of the orbax cache to write: a new directory, or one an earlier convert wrote "
  "(it is replaced). Anything else is refused, never deleted.",
)
flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16", "float16"],
  "Dtype the converted parameters are stored in.",
)
flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
  _cli.reject_extra_args(argv)
  from jax_pythia.checkpoints import converted
  from jax_pythia.checkpoints import hub as checkpoints

  converted.check_converted_target(FLAGS.out)  # before the slow part: refuse at once
  config, params = checkpoints.load_checkpoint(FLAGS.checkpoint, dtype=FLAGS.dtype)
  converted.save_converted(FLAGS.out, config, params)
  print(f"wrote {FLAGS.out}: {config.n_layers} layers, d_model {config.d_model}, {FLAGS.dtype}")


if __name__ == "__main__":
  _cli.run(main)
