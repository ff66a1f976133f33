"""Atomic file writes: a crash or a kill never leaves a half-written result behind."""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
from collections.abc import Callable, Mapping

import numpy as np

from jax_pythia.errors import JaxPythiaError


class WriteError(JaxPythiaError, OSError):
  """A result that could not be written (full disk, no permission, a file in the way):
  the message names the path being written; nothing half-written is left behind."""

  @classmethod
  def of(cls, path: str | os.PathLike, error: OSError) -> WriteError:
    if isinstance(error, WriteError):
      return error
    why = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
      why += " (finished results are kept: free space and rerun to resume)"
    elif error.errno in (errno.EEXIST, errno.ENOTDIR) and error.filename:
      why = f"{error.filename} is in the way: a file where a directory belongs"
    elif error.filename and os.fspath(error.filename) != os.fspath(path):
      why += f": {error.filename}"
    return cls(error.errno, f"{os.fspath(path)}: cannot write it: {why}")

  def __str__(self) -> str:
    return self.strerror or super().__str__()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
  """Calls write(tmp_path) beside `path`, then renames the result onto `path`.

  Temporary files are named `.tmp-*` in the target directory (same file system, so the
  rename is atomic); a failed write removes its temporary file. The data and the rename
  are fsynced, so a power loss cannot leave a complete-looking but empty file.
  """
  directory = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    tmp = _create_temp_file(directory, suffix)
    write(tmp)
    _fsync(tmp, os.O_RDONLY)
    os.replace(tmp, path)
  except OSError as e:
    raise WriteError.of(path, e) from None
  finally:
    if tmp is not None and os.path.exists(tmp):
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
