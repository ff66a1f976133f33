"""Atomic file writes: a crash or a kill never leaves a half-written result behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
  """Calls write(tmp_path) beside `path`, then renames the result onto `path`.

  Temporary files are named `.tmp-*` in the target directory (same file system, so the
  rename is atomic); a failed write removes its temporary file. The data and the rename
  are fsynced, so a power loss cannot leave a complete-looking but empty file.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
  os.close(fd)
  try:
    write(tmp)
    _fsync(tmp, os.O_RDONLY)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  _fsync(directory, os.O_RDONLY)


def _fsync(path: str, flags: int) -> None:
  try:
    fd = os.open(path, flags)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # some file systems cannot fsync a directory
  finally:
    os.close(fd)


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """np.savez, atomically."""

  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)

  atomic_write(path, write, ".npz")
