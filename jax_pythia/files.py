"""Atomic file writes: a crash or a kill never leaves a half-written result behind."""

from __future__ import annotations

import os
import secrets
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
  tmp = _create_temp_file(directory, suffix)
  try:
    write(tmp)
    _fsync(tmp, os.O_RDONLY)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  _fsync(directory, os.O_RDONLY)


def _create_temp_file(directory: str, suffix: str) -> str:
  """A new empty `.tmp-*` file whose mode follows the umask, as open() gives ordinary files.

  (tempfile.mkstemp makes 0600 files, which other users of a shared --out cannot read.)
  """
  for _ in range(100):
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(6)}{suffix}")
    try:
      os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
      continue
    return tmp
  raise FileExistsError(f"{directory}: no free temporary file name after 100 tries")


def make_temp_dir(parent: str, prefix: str) -> str:
  """tempfile.mkdtemp, but with the mode a plain mkdir gives (mkdtemp makes it 0700)."""
  tmp = tempfile.mkdtemp(dir=parent, prefix=prefix)
  os.chmod(tmp, 0o777 & ~_umask())
  return tmp


def _umask() -> int:
  """This process's umask, read without changing it (os.umask sets it, racing threads)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


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
