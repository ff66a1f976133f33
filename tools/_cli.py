"""What every entry point shares: one-line errors, atomic output files, progress."""

from __future__ import annotations

import os
import sys
import tempfile
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


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
  """Calls write(tmp_path) and renames it onto path, so a crash never leaves half a file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
