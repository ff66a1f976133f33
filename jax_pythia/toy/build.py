"""An offline mini-Pythia suite: GPT-NeoX and Llama models of several sizes, trained here.

The one source of truth for the toy suite's layout and its build. The parts:

- `jax_pythia.toy.corpus`: the corpus (the Python standard library's source), the
  byte-level tokenizer and the pre-shuffled token stream.
- `jax_pythia.toy.train`: sizes, Pythia's learning-rate law, `ToySuiteOptions`, the
  schedule, optimizer and the resumable training loop of one model.
- here: the build, which writes the data, trains every size and writes the manifest.

Checkpoints are `<out>/<model>/step<N>/{config.json,model.safetensors}` in float32, which
`checkpoints.resolve_checkpoint(<out>/<model>, step=N)` and
`transformers.GPTNeoXForCausalLM.from_pretrained` (`LlamaForCausalLM` for the Llama
models) read.

Defaults (`DEFAULT_OPTIONS`, see README for the time on 2 CPU cores), smallest first:
`toy-llama-2l-32d` (Llama: 2 heads, 1 key/value head, SwiGLU 88 wide, tied embeddings),
`toy-2l-32d`, `toy-3l-48d`, `toy-llama-4l-64d` (Llama: 4 heads, 2 key/value heads, SwiGLU
176 wide, untied), `toy-4l-64d`, `toy-4l-96d` (GPT-NeoX as Pythia), d_head 16; peak lr
4.26e-3, 4.19e-3, 3.01e-3, 2.42e-3, 2.38e-3, 1.91e-3; 200 steps of 128 sequences x 64
tokens (128 because the study takes the first 128 sequences of a step's batch),
checkpoints 0, 1, 2, 4, ..., 128 and every 20 steps (19 per model). Every model reads the
same batches. `TINY_OPTIONS` builds two GPT-NeoX models in seconds, for tests.

Layout of a suite directory `<out>`::

  suite.json                      the manifest, written last (only a complete suite has it)
  suite.partial.json              the options of a build in progress (removed when complete)
  tokenizer.json
  data/stdlib_text_document.{bin,idx}   the token stream
  data/corpus_files.txt           the stdlib files in stream order, one relative path a line
  <model>/step<N>/{config.json,model.safetensors}
  <model>/train_loss.csv          step,loss,lr: loss of the batch of step s at checkpoint s,
                                  lr of update s
  <model>/train_state.npz         params + optimizer state at the latest checkpoint (resume)

Every file is written under a temporary name and renamed into place, and a model's resume
state is written only after its checkpoint, so a build killed at any moment resumes (rerun
the same command) from its last saved state and ends with the same bits as an
uninterrupted build: the compiled float32 step is deterministic on XLA CPU. (Bits are
equal for one machine type and one jax/XLA version; another CPU may compile to other
instructions and round differently.)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jax_pythia.checkpoints import sources
from jax_pythia.errors import ToySuiteError
from jax_pythia.toy.corpus import (
  EOD_ID,
  VOCAB_SIZE,
  build_token_stream,
  byte_level_tokenizer,
  corpus_description,
)
from jax_pythia.toy.options import (
  DEFAULT_OPTIONS,
  DEFAULT_SIZES,
  TINY_OPTIONS,
  ToySize,
  ToySuiteOptions,
  pythia_lr_law,
)
from jax_pythia.toy.train import (
  TRAIN_LOSS_FILE,
  ProgressFn,
  RunBudget,
  TqdmProgress,
  atomic_write_bytes,
  train_model,
)

#: The build's API; the options, sizes and progress types are defined in toy.options and toy.train.
__all__ = [
  "DEFAULT_OPTIONS",
  "DEFAULT_SIZES",
  "MANIFEST_FILE",
  "PARTIAL_MANIFEST_FILE",
  "TINY_OPTIONS",
  "BuildResult",
  "ToySize",
  "ToySuiteError",
  "ToySuiteOptions",
  "TqdmProgress",
  "build_toy_suite",
  "ensure_toy_suite",
  "load_manifest",
]

MANIFEST_FILE = sources.MANIFEST_FILE  # read by the one reader, sources.read_manifest
PARTIAL_MANIFEST_FILE = "suite.partial.json"
TOKENIZER_FILE = "tokenizer.json"
DATA_PREFIX = "data/stdlib_text_document"
CORPUS_LIST_FILE = "data/corpus_files.txt"
MANIFEST_FORMAT = "jax-pythia-toy-suite/1"


def _json_bytes(obj: Any) -> bytes:
  return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _sha256_file(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _options_record(options: ToySuiteOptions) -> dict[str, Any]:
  """What a build must agree on to continue another build's files."""
  return {
    "format": MANIFEST_FORMAT,
    "options": options.to_dict(),
    "python_version": platform.python_version(),
    "python_implementation": platform.python_implementation(),
  }


def _prepare_data(out: str, options: ToySuiteOptions, partial: dict[str, Any]) -> dict[str, Any]:
  """Writes tokenizer and token stream unless the partial build recorded them intact."""
  from jax_pythia import data

  prefix = os.path.join(out, DATA_PREFIX)
  files = {
    "tokenizer": os.path.join(out, TOKENIZER_FILE),
    "bin": f"{prefix}.bin",
    "idx": f"{prefix}.idx",
    "corpus_files": os.path.join(out, CORPUS_LIST_FILE),
  }
  recorded = partial.get("data_sha256")
  if (
    recorded
    and all(os.path.isfile(p) for p in files.values())
    and all(_sha256_file(files[k]) == recorded.get(k) for k in files)
  ):
    return partial
  tokenizer = byte_level_tokenizer()
  atomic_write_bytes(files["tokenizer"], tokenizer.to_str(pretty=True).encode())
  items, used = build_token_stream(options, tokenizer)
  data.write_mmap_indexed_dataset(prefix, items, dtype=np.uint16)
  atomic_write_bytes(files["corpus_files"], ("\n".join(used) + "\n").encode())
  partial = {
    **partial,
    "data_sha256": {k: _sha256_file(p) for k, p in files.items()},
    "corpus": {**corpus_description(), "n_files_used": len(used), "n_tokens": int(items.size)},
  }
  atomic_write_bytes(os.path.join(out, PARTIAL_MANIFEST_FILE), _json_bytes(partial))
  return partial


def _model_record(size: ToySize, options: ToySuiteOptions, final_loss: float) -> dict[str, Any]:
  config = size.config(options.seq_len)
  return {
    "name": size.name,
    "path": size.name,
    "family": size.family,
    "n_layers": size.n_layers,
    "d_model": size.d_model,
    "n_heads": size.n_heads,
    "n_kv_heads": size.n_kv_heads or size.n_heads,
    "tie_embeddings": size.tied,
    "d_head": size.d_head,
    "d_mlp": config.d_mlp,
    "n_params": sum(math.prod(s) for s in _leaf_shapes(config)),
    "non_embedding_params": size.non_embedding_params,
    "learning_rate": options.learning_rate(size),
    "train_loss": f"{size.name}/{TRAIN_LOSS_FILE}",
    "final_train_loss_mean_last_10": final_loss,
  }


def _recipe(options: ToySuiteOptions) -> dict[str, Any]:
  b, a = pythia_lr_law()
  return {
    "optimizer": "adamw",
    "adam_betas": [options.adam_b1, options.adam_b2],
    "adam_eps": options.adam_eps,
    "weight_decay": options.weight_decay,
    "weight_decay_on": "kernels and embeddings (not biases, not norm scales)",
    "grad_clip_norm": options.grad_clip_norm,
    "warmup_steps": options.warmup_steps,
    "lr_decay": "cosine",
    "min_lr_fraction": options.min_lr_fraction,
    "lr_law": {
      "form": "lr = lr_scale * exp(a) * N^b, N = the layers' matrix weights (12 L d^2 "
      "for GPT-NeoX), least squares on Pythia's table, 3 significant digits",
      "a": a,
      "b": b,
      "lr_scale": options.lr_scale,
    },
  }


def _manifest(
  options: ToySuiteOptions, partial: dict[str, Any], final_losses: dict[str, float]
) -> dict[str, Any]:
  models = [_model_record(size, options, final_losses[size.name]) for size in options.sizes]
  return {
    "format": MANIFEST_FORMAT,
    "models": models,
    "steps": list(options.checkpoint_steps()),
    "n_steps": options.n_steps,
    "sequences_per_step": options.sequences_per_step,
    "seq_len": options.seq_len,
    "vocab_size": VOCAB_SIZE,
    "eod_token_id": EOD_ID,
    "seed": options.seed,
    "dtype": "float32",
    "checkpoint_layout": "<model>/step<N>/{config.json,model.safetensors}",
    "tokenizer": TOKENIZER_FILE,
    "tokenizer_kind": "byte-level: id b is byte b, <|endoftext|> = 256, vocab padded to 264",
    "data_prefix": DATA_PREFIX,
    "data_format": "Megatron MMapIndexedDataset, uint16; batch of step s = items s*B..s*B+B-1",
    "corpus_files": CORPUS_LIST_FILE,
    "corpus": partial["corpus"],
    "data_sha256": partial["data_sha256"],
    "recipe": _recipe(options),
    "options": options.to_dict(),
  }


def _leaf_shapes(config: Any) -> list[tuple[int, ...]]:
  from jax_pythia.models import weights

  def leaves(tree):
    for value in tree.values():
      if isinstance(value, dict):
        yield from leaves(value)
      else:
        yield value

  return list(leaves(weights.param_shapes(config)))


@dataclasses.dataclass
class BuildResult:
  """What `build_toy_suite` did: the manifest (None if stopped early) and its timings."""

  manifest: dict[str, Any] | None
  complete: bool
  seconds: dict[str, float]  # "data" and each model name trained in this run


def load_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
  """The suite's manifest, plus `root` (the absolute suite directory; not in the file).

  Paths in the manifest (`tokenizer`, `data_prefix`, model `path`s) are relative to root.
  """
  out = os.path.abspath(os.fspath(out_dir))
  path = os.path.join(out, MANIFEST_FILE)
  manifest = sources.read_manifest(out)
  if manifest is None:
    raise ToySuiteError(
      f"{path}: no toy-suite manifest (the suite is not complete; build "
      "it with python -m tools.make_toy_suite)"
    )
  if manifest.get("format") != MANIFEST_FORMAT:
    raise ToySuiteError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
  return {**manifest, "root": out}


def _matches(record: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
  return all(record.get(k) == v for k, v in expected.items())


def _resume_partial(out: str, partial_path: str, expected: dict[str, Any]) -> dict[str, Any]:
  """The partial manifest of an interrupted build of the same options (refusing another
  build's), or a new one."""
  if not os.path.isfile(partial_path):
    atomic_write_bytes(partial_path, _json_bytes(expected))
    return dict(expected)
  with open(partial_path) as f:
    try:
      found = json.load(f)
    except json.JSONDecodeError:
      found = {}
  if found and not _matches(found, expected):
    raise ToySuiteError(
      f"{out} holds a partial toy suite of other options or another Python "
      f"({_difference(found, expected)}); remove it, or build into another folder"
    )
  return {**found, **expected}


def build_toy_suite(
  out_dir: str | os.PathLike,
  options: ToySuiteOptions = DEFAULT_OPTIONS,
  *,
  max_steps_this_run: int | None = None,
  progress: ProgressFn | None = None,
  log: Callable[[str], None] | None = None,
) -> BuildResult:
  """Builds the suite in `out_dir`, or continues a partial build of the same options.

  `max_steps_this_run` stops after that many training steps over all models (an
  interruption, for tests); rerunning continues where the last saved state left off.
  """
  log = log or (lambda message: None)
  out = os.path.abspath(os.fspath(out_dir))
  expected = _options_record(options)
  manifest_path = os.path.join(out, MANIFEST_FILE)
  if os.path.isfile(manifest_path):
    manifest = load_manifest(out)
    if not _matches({**manifest, **_options_record_of(manifest)}, expected):
      raise ToySuiteError(
        f"{out} holds a toy suite built with other options or another Python "
        f"({_difference(manifest, expected)}); remove it, or build into another folder"
      )
    return BuildResult(manifest, True, {})
  os.makedirs(out, exist_ok=True)
  partial_path = os.path.join(out, PARTIAL_MANIFEST_FILE)
  partial = _resume_partial(out, partial_path, expected)

  seconds: dict[str, float] = {}
  start = time.perf_counter()
  partial = _prepare_data(out, options, partial)
  seconds["data"] = time.perf_counter() - start

  from jax_pythia import data

  dataset = data.MMapIndexedDataset(os.path.join(out, DATA_PREFIX))
  budget = RunBudget(max_steps_this_run)
  final_losses = {}
  for size in options.sizes:
    start = time.perf_counter()
    done = train_model(out, size, options, dataset, budget=budget, progress=progress, log=log)
    seconds[size.name] = time.perf_counter() - start
    if not done:
      log(f"stopped after max_steps_this_run={max_steps_this_run} steps; rerun to resume")
      return BuildResult(None, False, seconds)
    final_losses[size.name] = _final_loss(os.path.join(out, size.name, TRAIN_LOSS_FILE))
  manifest = _manifest(options, partial, final_losses)
  atomic_write_bytes(manifest_path, _json_bytes(manifest))
  os.unlink(partial_path)
  return BuildResult(load_manifest(out), True, seconds)


def _options_record_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
  corpus = manifest.get("corpus", {})
  return {
    "python_version": corpus.get("python_version"),
    "python_implementation": corpus.get("python_implementation"),
  }


def _difference(found: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
  found = {**found, **(_options_record_of(found) if "corpus" in found else {})}
  diffs = []
  for key, value in expected.items():
    if key == "options":
      theirs = found.get("options") or {}
      diffs += [
        f"{k}: {theirs.get(k)!r} here, {v!r} asked" for k, v in value.items() if theirs.get(k) != v
      ]
    elif found.get(key) != value:
      diffs.append(f"{key}: {found.get(key)!r} here, {value!r} asked")
  return "; ".join(diffs) or "unreadable record"


def _final_loss(path: str, last: int = 10) -> float:
  with open(path) as f:
    losses = [float(row["loss"]) for row in csv.DictReader(f)]
  return float(np.mean(losses[-last:]))


def ensure_toy_suite(
  out_dir: str | os.PathLike,
  *,
  progress: ProgressFn | str | None = "bars",
  log: Callable[[str], None] | None = None,
  **options,
) -> dict[str, Any]:
  """The manifest of the toy suite in `out_dir`, building or resuming it first if needed.

  `options` override fields of `ToySuiteOptions` (e.g. `n_steps=200`, `sizes="2x32,4x64"`).
  Returns at once (reading suite.json) when the suite is complete. A build shows tqdm bars
  unless `progress` is None or another ProgressFn.
  """
  if progress == "bars":
    progress = TqdmProgress()
  result = build_toy_suite(
    out_dir, ToySuiteOptions.from_overrides(**options), progress=progress, log=log
  )
  return result.manifest
