"""The toy suite against independent ground truth: transformers' GPT-NeoX on the saved
checkpoints, the raw bytes of the stdlib files (the tokenizer is byte level), the data
format read back by the project's reader, and bit-for-bit rebuilds (fresh, resumed after
interruptions, and from another process through the CLI)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jax_pythia import data
from jax_pythia.checkpoints import hub as checkpoints
from jax_pythia.models import model as model
from jax_pythia.toy import build as toy_suite
from jax_pythia.toy import options as toy_options
from jax_pythia.toy import train as toy_train
from jax_pythia.toy.build import TINY_OPTIONS

REPO = Path(__file__).resolve().parents[1]
OPTIONS = TINY_OPTIONS
MODEL_NAMES = [s.name for s in OPTIONS.sizes]


def _file_digests(root: Path) -> dict[str, str]:
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


def _read_loss_csv(path: Path) -> list[dict[str, float]]:
  with open(path) as f:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _saved_state(root: Path, name: str):
  """(step, params) of a model's resume state, restored onto a freshly built tree."""
  size = next(s for s in OPTIONS.sizes if s.name == name)
  init_params, init_opt, _, _ = toy_train.compiled_programs(size, OPTIONS)
  params = init_params(jax.random.PRNGKey(OPTIONS.seed))
  step, params, _, _ = toy_train._load_train_state(
    str(root / name / toy_train.TRAIN_STATE_FILE), params, init_opt(params)
  )
  return step, params


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """One uninterrupted build of the tiny suite."""
  root = tmp_path_factory.mktemp("suite")
  result = toy_suite.build_toy_suite(root, OPTIONS)
  assert result.complete
  return root, result.manifest


def test_layout_manifest_and_schedule(built):
  root, manifest = built
  steps = [0, 1, 2, 4, 8, 10, 20, 30, 40]
  assert list(OPTIONS.checkpoint_steps()) == steps
  assert manifest["steps"] == steps
  assert not (root / toy_suite.PARTIAL_MANIFEST_FILE).exists()
  assert json.loads((root / "suite.json").read_text())["models"] == manifest["models"]
  assert [m["name"] for m in manifest["models"]] == MODEL_NAMES == ["toy-1l-16d", "toy-2l-32d"]
  for key, value in (
    ("n_steps", 40),
    ("sequences_per_step", 4),
    ("seq_len", 32),
    ("vocab_size", 264),
    ("seed", 0),
    ("tokenizer", "tokenizer.json"),
    ("data_prefix", "data/stdlib_text_document"),
  ):
    assert manifest[key] == value, key
  for m in manifest["models"]:
    model_dir = root / m["name"]
    step_dirs = sorted(int(p.name[4:]) for p in model_dir.iterdir() if p.name.startswith("step"))
    assert step_dirs == steps
    for s in steps:
      assert sorted(os.listdir(model_dir / f"step{s}")) == ["config.json", "model.safetensors"]
    # The sweep's normal loading path finds them by model directory and step.
    assert checkpoints.resolve_checkpoint(str(model_dir), step=40) == str(model_dir / "step40")
    rows = _read_loss_csv(model_dir / "train_loss.csv")
    assert [r["step"] for r in rows] == list(range(40))
    lrs = np.array([r["lr"] for r in rows])
    peak = m["learning_rate"]
    # 1% warmup of 40 steps is one step: update 0 runs at the peak; cosine to 10% at the end.
    assert lrs[0] == pytest.approx(peak, rel=1e-6)
    assert lrs[-1] == pytest.approx(0.1 * peak, rel=1e-5)
    assert np.all(np.diff(lrs) <= 0)
    mid = 0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * 20 / 39))
    assert lrs[20] == pytest.approx(mid, rel=1e-5)
  small, large = manifest["models"]
  assert small["learning_rate"] > large["learning_rate"]  # Pythia: smaller models, larger lr


def test_learning_rates_follow_pythias_table():
  from jax_pythia import suite

  # The fitted law reproduces the real table within a factor of 1.6 at every size...
  for s in suite.SIZES.values():
    b, a = toy_options.pythia_lr_law()
    fitted = math.exp(a) * (12 * s.n_layers * s.d_model**2) ** b
    assert 1 / 1.6 < fitted / s.learning_rate < 1.6, s.name
  # ... and the default toy sizes get rates that fall as they grow.
  rates = [toy_suite.DEFAULT_OPTIONS.learning_rate(s) for s in toy_suite.DEFAULT_SIZES]
  assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates) >= 4


def test_token_stream_is_the_tokenized_corpus_in_megatron_format(built):
  import tokenizers

  root, manifest = built
  stdlib = Path(manifest["corpus"]["stdlib"])
  used = (root / manifest["corpus_files"]).read_text().splitlines()
  assert used and len(used) == manifest["corpus"]["n_files_used"]
  assert all(
    p.endswith(".py") and "site-packages" not in p and "/test/" not in f"/{p}" for p in used
  )
  # Byte level: the ids of a file are its UTF-8 bytes, then <|endoftext|> = 256.
  stream = np.concatenate(
    [np.append(np.frombuffer((stdlib / p).read_bytes(), np.uint8), 256) for p in used]
  )
  row = OPTIONS.seq_len + 1
  n_items = OPTIONS.n_steps * OPTIONS.sequences_per_step
  chunks = stream[: n_items * row].reshape(n_items, row)
  expected = chunks[np.random.default_rng([OPTIONS.seed, 2]).permutation(n_items)]

  dataset = data.MMapIndexedDataset(root / manifest["data_prefix"])
  assert dataset.dtype == np.uint16 and len(dataset) == n_items
  np.testing.assert_array_equal(np.stack([dataset[i] for i in range(n_items)]), expected)
  B = OPTIONS.sequences_per_step
  for step in (0, 17, OPTIONS.n_steps - 1):
    np.testing.assert_array_equal(
      data.batch_of_step(dataset, step, B, B), expected[step * B : (step + 1) * B]
    )
  source = data.open_token_source(root / manifest["data_prefix"], sequences_per_step=B)
  assert source.seq_len == OPTIONS.seq_len and source.fixed_step == OPTIONS.n_steps - 1

  tokenizer = tokenizers.Tokenizer.from_file(str(root / manifest["tokenizer"]))
  for p in used[:3]:
    text = (stdlib / p).read_text(encoding="utf-8")
    assert tokenizer.encode(text).ids == list(text.encode("utf-8"))
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
  assert tokenizer.token_to_id("<|endoftext|>") == 256


def test_loss_falls(built):
  root, manifest = built
  for m in manifest["models"]:
    losses = [r["loss"] for r in _read_loss_csv(root / m["name"] / "train_loss.csv")]
    assert losses[0] == pytest.approx(math.log(264), abs=0.3)  # near uniform at init
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first - 1.0, (m["name"], first, last)
    assert m["final_train_loss_mean_last_10"] == pytest.approx(last, rel=1e-6)


def test_checkpoints_load_in_transformers_with_the_trained_logits(built):
  import torch
  import transformers

  root, manifest = built
  tokens = data.batch_of_step(data.MMapIndexedDataset(root / manifest["data_prefix"]), 39, 4, 4)[
    :, :-1
  ]
  for m in manifest["models"]:
    step, trained = _saved_state(root, m["name"])
    assert step == 40
    forward = None
    for s in (0, 40):
      directory = root / m["name"] / f"step{s}"
      hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(directory).eval()
      with torch.no_grad():
        expected = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
      config, params = checkpoints.load_checkpoint(str(directory))
      if s == 40:  # the checkpoint holds exactly the params training ended with
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained)):
          np.testing.assert_array_equal(np.asarray(a), b)
      forward = forward or model.make_forward(config)
      logits, _ = forward(params, tokens)
      scale = np.abs(expected).max()
      np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5 * scale)


def test_interrupted_builds_resume_to_the_same_bits(built, tmp_path):
  root, _ = built
  out = tmp_path / "resumed"
  first = toy_suite.build_toy_suite(out, OPTIONS, max_steps_this_run=25)
  assert not first.complete and first.manifest is None
  assert not (out / "suite.json").exists() and (out / "suite.partial.json").exists()
  small = out / "toy-1l-16d"
  assert (small / "step20").is_dir() and not (small / "step30").exists()
  assert not (small / "train_loss.csv").exists()
  # Stopped at step 25; the resume state is the last checkpoint's.
  assert toy_train._saved_step(str(small / toy_train.TRAIN_STATE_FILE)) == 20
  with pytest.raises(toy_suite.ToySuiteError, match="n_steps"):
    toy_suite.build_toy_suite(
      out, toy_suite.ToySuiteOptions(**{**OPTIONS.to_dict(), "n_steps": 50})
    )
  second = toy_suite.build_toy_suite(out, OPTIONS, max_steps_this_run=30)  # into model two
  assert not second.complete and (small / "train_loss.csv").exists()
  assert (out / "toy-2l-32d" / "step10").is_dir()
  third = toy_suite.build_toy_suite(out, OPTIONS)
  assert third.complete
  assert _file_digests(out) == _file_digests(root)


def test_rebuild_is_bit_identical_and_complete_suite_returns_at_once(built, tmp_path):
  root, manifest = built
  again = toy_suite.build_toy_suite(tmp_path / "again", OPTIONS)
  assert _file_digests(tmp_path / "again") == _file_digests(root)
  start = time.perf_counter()
  assert toy_suite.ensure_toy_suite(root, **OPTIONS.to_dict()) == manifest
  assert {**again.manifest, "root": manifest["root"]} == manifest
  assert time.perf_counter() - start < 1.0
  with pytest.raises(toy_suite.ToySuiteError, match="seed"):
    toy_suite.ensure_toy_suite(root, **{**OPTIONS.to_dict(), "seed": 1})


def test_checkpoint_without_weights_is_not_trusted(built, tmp_path):
  """A state that points past a checkpoint that is not complete restarts the model, and
  the temporaries of a killed build are cleaned up."""
  import shutil

  root, _ = built
  out = tmp_path / "damaged"
  shutil.copytree(root, out)
  (out / "suite.json").unlink()
  (out / toy_suite.PARTIAL_MANIFEST_FILE).write_text(json.dumps(toy_suite._options_record(OPTIONS)))
  (out / "toy-2l-32d" / "step30" / "model.safetensors").unlink()
  (out / "toy-2l-32d" / "train_loss.csv").unlink()
  # What a kill during save_hf_checkpoint leaves behind: a hidden, half-written directory.
  (out / "toy-2l-32d" / ".step40.tmp-killed").mkdir()
  (out / "toy-2l-32d" / ".step40.tmp-killed" / "config.json").write_text("{")
  assert toy_suite.build_toy_suite(out, OPTIONS).complete
  assert _file_digests(out) == _file_digests(root)


def test_cli_builds_the_same_model_in_another_process(built, tmp_path):
  """A model's files depend on its size and the options, not on the other sizes: one size
  built by the CLI in a fresh process must equal the fixture's bit for bit."""
  root, _ = built
  out = tmp_path / "cli"
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "tools.make_toy_suite",
      f"--out={out}",
      "--preset=tiny",
      "--sizes=1x16x2",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert "toy-1l-16d" in run.stdout and "final train loss" in run.stdout
  theirs, ours = _file_digests(out), _file_digests(root)
  shared = [k for k in ours if not k.startswith(("toy-2l-32d", "suite.json"))]
  assert sorted(shared) == sorted(k for k in theirs if k != "suite.json")
  assert all(theirs[k] == ours[k] for k in shared)
  bad = subprocess.run(
    [sys.executable, "-m", "tools.make_toy_suite", f"--out={out}", "--preset=tiny", "--sizes=2x30"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 2 and "error:" in bad.stderr and "2x30x1" in bad.stderr
