"""The persistent compilation cache (jax_pythia.compile_cache): where it goes, that a second
process finds what the first wrote, and that a damaged entry never crashes a run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jax_pythia import compile_cache

REPO = Path(__file__).resolve().parents[1]

# A small study call compiled in a fresh process with the cache at argv[1]: prints its
# result, so two processes can be compared.
_PROGRAM = """
import sys
import jax, numpy as np
from jax_pythia import compile_cache
from jax_pythia.models import model
from jax_pythia.study import checkpoint as study
from jax_pythia.models.config import GPTNeoXConfig
compile_cache.enable(sys.argv[1])
config = GPTNeoXConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=8)
params = model.init_params(config, jax.random.PRNGKey(0))
tokens = np.arange(2 * 9).reshape(2, 9) % 64
loss = study.loss_fn(config)(params, tokens)
print(repr(float(loss)))
"""


def _run(cache: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-c", _PROGRAM, cache],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_where_the_cache_goes(tmp_path):
  home = {"HOME": "/home/u"}
  assert compile_cache.resolve(None, home) == "/home/u/.cache/jax_pythia/xla"
  xdg = {**home, "XDG_CACHE_HOME": "/x"}
  assert compile_cache.resolve(None, xdg) == "/x/jax_pythia/xla"
  env = {**xdg, compile_cache.ENV: str(tmp_path / "e")}
  assert compile_cache.resolve(None, env) == str(tmp_path / "e")
  assert compile_cache.resolve(str(tmp_path / "f"), env) == str(tmp_path / "f")  # flag wins
  for off in ("none", "off", "NONE", ""):
    assert compile_cache.resolve(off, env) is None
  assert compile_cache.resolve(None, {**home, compile_cache.ENV: "none"}) is None


def test_a_second_process_reads_what_the_first_wrote(tmp_path):
  cache = str(tmp_path / "xla")
  first = _run(cache)
  assert first.returncode == 0, first.stderr[-2000:]
  written = compile_cache.entries(cache)
  assert any(name.startswith("jit_fn-") for name in written), written  # the loss call
  stamps = {name: os.stat(os.path.join(cache, name)).st_mtime_ns for name in written}
  second = _run(cache)
  assert second.returncode == 0, second.stderr[-2000:]
  assert second.stdout == first.stdout
  # Every call was found: nothing new written, nothing rewritten.
  assert compile_cache.entries(cache) == written
  assert {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in written} == stamps


@pytest.mark.parametrize("damage", ["garbage", "empty"])
def test_a_damaged_entry_is_named_and_compiled_again(tmp_path, damage):
  cache = str(tmp_path / "xla")
  first = _run(cache)
  assert first.returncode == 0, first.stderr[-2000:]
  for name in compile_cache.entries(cache):
    with open(os.path.join(cache, name), "wb") as f:
      f.write(os.urandom(64) if damage == "garbage" else b"")
  again = _run(cache)
  assert again.returncode == 0, again.stderr[-2000:]
  assert again.stdout == first.stdout
  assert "compilation cache: " in again.stderr and "-cache could not be used" in again.stderr


def test_an_unusable_directory_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(compile_cache.CompileCacheError, match="--compilation_cache=.*file/xla"):
    compile_cache.enable(str(blocker / "xla"))


def test_tests_never_write_the_users_cache():
  # conftest points the tools' cache at a temporary directory for the session.
  assert compile_cache.resolve() != compile_cache.default_dir()
