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
