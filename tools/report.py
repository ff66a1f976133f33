"""Redraws a sweep's figures and report.md from its stored tables, recomputing nothing.

python -m tools.report --out=runs/sweep [--evals_dir=pythia/evals/pythia-v1]
"""

from __future__ import annotations

from absl import flags

from tools import _cli

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "The sweep's output directory (holds metrics.parquet).")
flags.DEFINE_string(
  "evals_dir",
  None,
  "Published Pythia evaluations (evals/pythia-v1) to "
  "draw downstream accuracy on the same step axis.",
)
flags.DEFINE_bool(
  "gather",
  True,
  "First gather the per-checkpoint files into the tables "
  "(picks up checkpoints finished by an interrupted sweep).",
)
flags.mark_flag_as_required("out")


def main(argv):
  _cli.reject_extra_args(argv)
  from jax_pythia.sweep import report, results

  if FLAGS.gather:
    results.finalize(FLAGS.out)
  for path in report.write_report(FLAGS.out, evals_dir=FLAGS.evals_dir):
    print(f"wrote {path}")


if __name__ == "__main__":
  _cli.run(main)
