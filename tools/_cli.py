"""What every entry point shares: one-line errors for bad input."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags

from jax_pythia.errors import JaxPythiaError

flags.DEFINE_bool("traceback", False, "On error, print the full traceback instead of one line.")

# Errors caused by input (files, flags, configs). Anything else is a bug and keeps its
# traceback.
_USER_ERRORS = (JaxPythiaError, ValueError, OSError)


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run, reporting input errors as `<tool>: error: <message>` and exit 2."""

  def guarded(argv):
    try:
      main(argv)
    except _USER_ERRORS as e:
      if flags.FLAGS.traceback:
        traceback.print_exc()
      tool = os.path.basename(sys.argv[0]).removesuffix(".py")
      print(f"{tool}: error: {e}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)

  app.run(guarded)


def reject_extra_args(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}: every option is a --flag (see --help)")


def define_work_flags() -> None:
  """The flags that set what a sweep computes per checkpoint, defined once: tools.sweep
  runs that work, tools.plan prices it, with the same names, defaults and help."""
  flags.DEFINE_string(
    "steps",
    "all",
    "Checkpoints: all, paper (the study's 27), a comma "
    "list (0,512,143000) or START:STOP[:EVERY]. The final one is always "
    "included: it is every CKA's reference.",
  )
  flags.DEFINE_integer(
    "n_sequences", 128, "Sequences of the fixed batch activations are taken on (the paper: 128)."
  )
  flags.DEFINE_string(
    "positions",
    "last",
    "Token positions per sequence: last (the paper), all, random:K or a comma list of indices.",
  )
  flags.DEFINE_bool("gradients", True, "Compute gradient metrics (needs a .bin/.idx stream).")
  flags.DEFINE_integer("gradient_window", 5, "Gradients on the batches of steps s-W..s+W.")
  flags.DEFINE_integer("gradient_sequences", 128, "Sequences of each gradient batch.")
  flags.DEFINE_integer(
    "gradient_microbatch",
    0,
    "Split gradient batches into microbatches of this many sequences to bound memory "
    "(0: the largest that fits --device_memory, with rematerialisation if that is what "
    "makes a larger one fit). An explicit value that cannot fit is refused up front.",
  )
  flags.DEFINE_integer(
    "loss_sequences",
    0,
    "Also record the loss on this many sequences of "
    "the final step's batch, which no checkpoint trained on (0: off).",
  )
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype.")
  flags.DEFINE_string(
    "device_memory",
    None,
    "Memory of one device, e.g. 16GB or 80GiB (default: what the first local device "
    "reports: memory_stats() on GPU/TPU, available RAM on CPU). Microbatches and "
    "rematerialisation are chosen so each compiled call's planned peak stays under 90% of it.",
  )
