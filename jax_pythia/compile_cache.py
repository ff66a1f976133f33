"""JAX's persistent compilation cache, on by default for the tools.

Every new process would otherwise compile every call again: a rerun, a resumed sweep, a
second model of the same shapes, each host of a pod. With the cache on, XLA executables
are written to a directory keyed by the program, the backend and the flags, and a later
process with the same shapes loads them instead of compiling.

Where (first that is set): the tool's `--compilation_cache` flag, the environment
variable `JAX_PYTHIA_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/jax_pythia/xla` (default
`~/.cache/jax_pythia/xla`). `none` (or `off`, or an empty value) turns it off. A damaged
entry (a write cut short, a full disk) is not fatal: it is named in one line, removed and
compiled again, and this run's compile writes it anew (JAX itself only warns, and never
replaces an entry that exists, so every later run would compile that call again).
"""

from __future__ import annotations

import os
import shutil
import sys

from jax_pythia.errors import JaxPythiaError

ENV = "JAX_PYTHIA_COMPILATION_CACHE"
OFF = ("none", "off", "")


class CompileCacheError(JaxPythiaError, ValueError):
  """A compilation cache directory that cannot be used."""


def default_dir(environ=os.environ) -> str:
  """$XDG_CACHE_HOME/jax_pythia/xla, or ~/.cache/jax_pythia/xla."""
  home = environ.get("HOME") or os.path.expanduser("~")
  base = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
  return os.path.join(base, "jax_pythia", "xla")


def resolve(flag: str | None = None, environ=os.environ) -> str | None:
  """The cache directory to use (module doc), or None when turned off."""
  value = flag if flag is not None else environ.get(ENV)
  if value is None:
    return default_dir(environ)
  if value.strip().lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(value))


def enable(flag: str | None = None, what: str = "--compilation_cache") -> str | None:
  """Points JAX's persistent cache at `resolve(flag)` and caches every compiled call
  (not only those over JAX's default 1 s: a sweep's small calls add up too). Must run
  before the first compile. Returns the directory, or None when off. Errors name `what`
  when the directory came from `flag`, else the environment variable."""
  value = flag if flag is not None else os.environ.get(ENV)
  if flag is None and value is not None:
    what = ENV
  if value and os.path.expanduser(value.strip()).startswith("~"):  # else a ./~name folder
    raise CompileCacheError(
      f"{what}={value!r}: {value.strip().split(os.sep)[0]} names no home directory here"
    )
  path = resolve(flag)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise CompileCacheError(
      f"{what}={path!r}: cannot create the directory ({e.strerror}); pass none to turn it off"
    ) from None
  if not os.access(path, os.W_OK):
    raise CompileCacheError(f"{what}={path!r}: not writable; pass none to turn it off")
  import jax

  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _replace_damaged_entries()
  return path


def _replace_damaged_entries() -> None:
  """Wraps JAX's read of a cache entry: an entry it cannot use is named in one line and
  removed, so the compile that follows writes it anew (module doc). Left as JAX has it
  where JAX lacks the function (another version), or asks for cache errors to raise."""
  try:
    import jax
    from jax._src import compilation_cache as jax_cache
  except ImportError:
    return
  read = getattr(jax_cache, "get_executable_and_time", None)
  if read is None or getattr(read, "replaces_damaged_entries", False):
    return

  def checked(cache_key, *args, **kwargs):
    try:
      return read(cache_key, *args, **kwargs)
    except Exception as e:
      verification = getattr(jax_cache, "CacheVerificationError", ())
      if jax.config.jax_raise_persistent_cache_errors or isinstance(e, verification):
        raise
      entry = os.path.join(jax.config.jax_compilation_cache_dir or "", f"{cache_key}-cache")
      if not os.path.lexists(entry):
        raise  # not an entry of this directory: JAX warns as it would
      if os.path.isdir(entry) and not os.path.islink(entry):
        shutil.rmtree(entry, ignore_errors=True)
      else:
        os.unlink(entry)
      why = (str(e).strip().splitlines() or [""])[0][:200]
      print(
        f"compilation cache: {entry} could not be used ({type(e).__name__}: {why}); "
        "removed, compiled again",
        file=sys.stderr,
      )
      return None, None

  checked.replaces_damaged_entries = True
  jax_cache.get_executable_and_time = checked


def entries(path: str) -> list[str]:
  """The cache's entry files (name-hash-cache), sorted."""
  if not os.path.isdir(path):
    return []
  return sorted(f for f in os.listdir(path) if f.endswith("-cache"))
