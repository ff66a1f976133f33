"""Where a sweep's --out lives: a local folder, or any fsspec URL (`gs://bucket/run`,
`file:///mnt/run`, `memory://run`) for hosts that share no filesystem (a TPU VM slice).

With a URL each process works in a local staging folder of its own, a mirror of the URL:
`pull` copies in what the URL holds and this process lacks (at the start, after each
barrier, before gathering), `sync` sends out each file the moment it is written locally
(or removes it when it was removed). Every other part of the sweep reads and writes local
files as before, so atomic writes, the record check and resuming are unchanged: a file
reaches the URL by an upload to a `.tmp-*` name and a move, so a reader (another host, a
resumed run) sees it whole or not at all. The result files are written once and never
change, except `sweep.json`, which every pull fetches again. The lock that serialises
claims (`outdir.locked`) holds for one host only: the hosts of a pod run one command with
one set of options, so their records agree.
"""

from __future__ import annotations

import errno
import os
import posixpath
import secrets
import shutil
import tempfile

from jax_pythia.files import WriteError
from jax_pythia.sweep.outdir import LOCK_FILE, RECORD_FILE, OutDirError


def is_url(out: str) -> bool:
  return "://" in out


class OutStore:
  """--out as given (`out`) and the local folder the sweep reads and writes (`local`: `out`
  itself, or a fresh staging folder when `out` is a URL; `close` removes that)."""

  def __init__(self, out: str):
    self.out, self.fs, self.root = out, None, ""
    self.local = out
    if not is_url(out):
      return
    import fsspec

    try:
      self.fs, root = fsspec.core.url_to_fs(out)
    except (ImportError, ValueError) as e:  # an unknown protocol, gcsfs not installed
      raise OutDirError(f"--out={out}: cannot open it ({type(e).__name__}: {e})") from None
    self.root = root.rstrip("/")
    self.local = tempfile.mkdtemp(prefix="jax_pythia-out-")

  @property
  def remote(self) -> bool:
    return self.fs is not None

  def _relative(self, path: str) -> str:
    rel = os.path.relpath(path, self.local)
    if rel.startswith(".."):
      raise ValueError(f"{path} is not under {self.local}")
    return "/".join(rel.split(os.sep))

  def pull(self) -> None:
    """Copies in the files under the URL this process lacks, and `sweep.json` always."""
    if not self.remote:
      return
    try:
      found = self.fs.find(self.root) if self.fs.exists(self.root) else []
    except Exception as e:  # noqa: BLE001 - each filesystem raises its own kinds
      raise OutDirError(f"--out={self.out}: cannot list it ({type(e).__name__}: {e})") from None
    for remote in sorted(found):
      rel = posixpath.relpath(remote, self.root)
      name = posixpath.basename(rel)
      if name.startswith(".tmp-") or name == LOCK_FILE:
        continue
      local = os.path.join(self.local, *rel.split("/"))
      if rel != RECORD_FILE and os.path.exists(local):
        continue
      os.makedirs(os.path.dirname(local), exist_ok=True)
      tmp = f"{local}.tmp-{secrets.token_hex(4)}"
      try:
        self.fs.get_file(remote, tmp)
        os.replace(tmp, local)
      except Exception as e:  # noqa: BLE001 - each filesystem raises its own kinds
        why = f"{type(e).__name__}: {e}"
        raise OutDirError(f"{self._url(rel)}: cannot read it ({why})") from None
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)

  def sync(self, *paths: str) -> None:
    """Makes the URL match these local files: uploads each that exists (whole, by a
    `.tmp-*` name and a move), removes each that does not."""
    if not self.remote:
      return
    for path in paths:
      rel = self._relative(path)
      remote = posixpath.join(self.root, rel)
      try:
        if not os.path.exists(path):
          if self.fs.exists(remote):
            self.fs.rm_file(remote)
          continue
        parent = posixpath.dirname(remote)
        tmp = posixpath.join(parent, f".tmp-{secrets.token_hex(6)}-{posixpath.basename(remote)}")
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.put_file(path, tmp)
        self.fs.mv(tmp, remote)
      except Exception as e:  # noqa: BLE001 - each filesystem raises its own kinds
        why = f"{type(e).__name__}: {e}"
        raise WriteError(errno.EIO, f"{self._url(rel)}: cannot write it: {why}") from None

  def named(self, path: str) -> str:
    """A local path as --out names it (its URL when --out is one)."""
    return self._url(self._relative(path)) if self.remote else path

  def _url(self, rel: str) -> str:
    return f"{self.out.rstrip('/')}/{rel}"

  def close(self) -> None:
    """Removes the staging folder (everything in it is at the URL)."""
    if self.remote and os.path.isdir(self.local):
      shutil.rmtree(self.local, ignore_errors=True)
