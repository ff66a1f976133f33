"""Imported by pytest before any test module: the package sets XLA's CPU flags before
JAX starts its backend (see jax_pythia/__init__.py).

The tools' persistent compilation cache (jax_pythia.compile_cache) goes to a temporary
directory for the session, never the user's ~/.cache, unless the caller chose one."""

import atexit
import os
import shutil
import tempfile

import jax_pythia  # noqa: F401
from jax_pythia import compile_cache

if compile_cache.ENV not in os.environ:
  _cache = tempfile.mkdtemp(prefix="jax_pythia_test_xla_")
  os.environ[compile_cache.ENV] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
