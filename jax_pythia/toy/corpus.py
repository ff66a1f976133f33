"""The toy suite's corpus, tokenizer and token stream (built by `jax_pythia.toy.build`).

Built from what every machine with a given CPython already has:

- **Corpus**: the source of the Python standard library (`sysconfig`'s stdlib), the
  `.py` files sorted by relative path, without site-packages, tests, build-specific
  modules (`_sysconfigdata_*`) or compiled extensions (see `corpus_files`).
- **Tokenizer**: byte level; id b is the byte b (0..255), `<|endoftext|>` is 256, and the
  model vocabulary is padded to `VOCAB_SIZE` as Pythia pads 50,277 to 50,304. It is stored
  as `tokenizer.json` (`tokenizers.Tokenizer.from_file` loads it).
- **Token stream** (Pythia's recipe): the files, in the order of a seeded permutation, are
  tokenized and joined with `<|endoftext|>` after each; the stream is cut into items of
  `seq_len + 1` tokens, the first `n_steps * sequences_per_step` are kept and their order
  shuffled by a second seeded permutation ("pre-shuffled"). The build writes the items in
  Megatron's MMapIndexedDataset format, so the batch of step s is items `s*B ... s*B+B-1`,
  read by `data.batch_of_step` for training exactly as the sweep reads it.
"""

from __future__ import annotations

import os
import platform
import sysconfig
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jax_pythia.errors import ToySuiteError

EOD_TOKEN = "<|endoftext|>"
EOD_ID = 256
#: 256 bytes + <|endoftext|>, padded to a multiple of 8 (Pythia pads its 50,277 to 50,304).
VOCAB_SIZE = 264

# Directories of the stdlib that are not "the standard library's source" or differ between
# builds of one CPython version: installed packages, the test suites (large, and holding
# files in deliberately odd encodings), compiled extensions and the build's config.
_EXCLUDED_DIRS = frozenset(
  {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "lib-dynload",
    "__pycache__",
  }
)
_EXCLUDED_DIR_PREFIXES = ("config-",)
# Generated at build time (paths, compiler flags of this machine's CPython).
_EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)


def stdlib_root() -> str:
  return os.path.realpath(sysconfig.get_paths()["stdlib"])


def corpus_files(root: str | os.PathLike | None = None) -> list[str]:
  """The stdlib `.py` files of the corpus: relative POSIX paths, sorted, UTF-8 only."""
  root = os.fspath(root or stdlib_root())
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [
      d for d in subdirs if d not in _EXCLUDED_DIRS and not d.startswith(_EXCLUDED_DIR_PREFIXES)
    ]
    for name in files:
      if not name.endswith(".py") or name.startswith(_EXCLUDED_FILE_PREFIXES):
        continue
      path = os.path.join(directory, name)
      if os.path.islink(path):
        continue  # a link's target is machine-specific
      found.append(Path(os.path.relpath(path, root)).as_posix())
  found.sort()
  usable = []
  for rel in found:
    try:
      (Path(root) / rel).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
      continue
    usable.append(rel)
  if not usable:
    raise ToySuiteError(f"no usable .py files under the stdlib {root}")
  return usable


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table (what ByteLevel uses)."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def byte_level_tokenizer():
  """A `tokenizers.Tokenizer` whose ids are the UTF-8 bytes, plus <|endoftext|> = 256."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from tokenizers.processors import ByteLevel as ByteLevelProcessor

  vocab = {char: b for b, char in _bytes_to_unicode().items()}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  # No regex split: with no merges every byte is a token whatever the pre-split.
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = ByteLevelProcessor(trim_offsets=False)
  tokenizer.add_special_tokens([EOD_TOKEN])
  if tokenizer.token_to_id(EOD_TOKEN) != EOD_ID:
    raise AssertionError("tokenizer: <|endoftext|> did not get id 256")
  return tokenizer


def _permutation(seed: int, stream: int, n: int) -> np.ndarray:
  """A seeded permutation; PCG64 streams are the same on every platform and numpy >= 1.17."""
  return np.random.default_rng([seed, stream]).permutation(n)


#: Stream ids of `_permutation`: which files come first, and the order of the items.
DOCUMENT_ORDER_STREAM = 1
ITEM_ORDER_STREAM = 2


class StreamShape(Protocol):
  """What the stream needs of the suite's options (toy.train.ToySuiteOptions has it)."""

  seq_len: int
  sequences_per_step: int
  n_steps: int
  seed: int

  @property
  def n_items(self) -> int: ...


def build_token_stream(
  options: StreamShape, tokenizer, root: str | None = None
) -> tuple[np.ndarray, list[str]]:
  """(items uint16 [n_steps * B, seq_len + 1] in training order, files used in stream order).

  Files are taken in the order of permutation DOCUMENT_ORDER_STREAM of `corpus_files`,
  each tokenized and followed by <|endoftext|>, until the stream fills the items; the
  items are the consecutive `seq_len + 1` chunks of the stream, reordered by permutation
  ITEM_ORDER_STREAM.
  """
  root = root or stdlib_root()
  files = corpus_files(root)
  row = options.seq_len + 1
  needed = options.n_items * row
  pieces, total, used = [], 0, []
  for index in _permutation(options.seed, DOCUMENT_ORDER_STREAM, len(files)):
    rel = files[index]
    text = (Path(root) / rel).read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces.append(np.asarray(ids + [EOD_ID], np.uint16))
    used.append(rel)
    total += len(ids) + 1
    if total >= needed:
      break
  if total < needed:
    raise ToySuiteError(
      f"the stdlib corpus under {root} holds {total} tokens; {options.n_steps} steps x "
      f"{options.sequences_per_step} sequences x {row} tokens need {needed}"
    )
  stream = np.concatenate(pieces)[:needed]
  items = stream.reshape(options.n_items, row)
  return items[_permutation(options.seed, ITEM_ORDER_STREAM, options.n_items)], used


def corpus_description(root: str | None = None) -> dict[str, Any]:
  root = root or stdlib_root()
  return {
    "kind": "python-stdlib-source",
    "python_implementation": platform.python_implementation(),
    "python_version": platform.python_version(),
    "stdlib": root,
    "n_files_available": len(corpus_files(root)),
    "selection": (
      "*.py under sysconfig stdlib, sorted by relative path; excluding "
      f"directories {sorted(_EXCLUDED_DIRS)} and config-*, files "
      "_sysconfigdata*, symlinks and non-UTF-8 files"
    ),
    "order": (
      f"files by permutation default_rng([seed, {DOCUMENT_ORDER_STREAM}]), each "
      f"followed by <|endoftext|> ({EOD_ID}); items of seq_len+1 consecutive "
      f"tokens reordered by default_rng([seed, {ITEM_ORDER_STREAM}]).permutation"
    ),
  }
