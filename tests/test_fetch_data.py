"""tools.fetch_data: the batches a sweep needs, staged once, read back by the sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_pythia import data, sweep
from jax_pythia.checkpoints import sources
from jax_pythia.data import streams
from tests import suite_fixtures as sf
from tests.test_streams import shard_like_pythia

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(n_sequences=6, gradient_window=1, gradient_sequences=4, loss_sequences=4)


def test_batches_of_the_papers_protocol():
  """27 checkpoints, 11-batch windows, 128 sequences: counted by hand from the windows.

  0, 1, 2, 4 -> 0..10; 8 -> 3..13; 16 -> 11..21 (so 0..21: 22 batches); 32, 64, 128, 256,
  512 -> 11 each (55); 1000, 3000, 13000, ..., 133000 and 143000 (shifted to
  142989..142999, which holds the fixed inputs' 142999) -> 16 x 11. 22 + 55 + 176 = 253.
  """
  models = sources.resolve_models(["pythia-160m-deduped"])
  needs = sweep.batches_needed(models, "paper", sweep.SweepOptions())
  assert len(needs) == 253 and set(needs.values()) == {128}
  assert [s for s in needs if s < 30] == list(range(22)) + list(range(27, 30))
  assert max(needs) == 142_999 and 143_000 not in needs
  assert streams.batch_bytes(needs, 2049) == 253 * 128 * 2049 * 2
  with_loss = sweep.batches_needed(models, "paper", sweep.SweepOptions(loss_sequences=64))
  assert with_loss[143_000] == 64


def test_models_choose_their_stream():
  assert streams.pile_for_models(["pythia-70m-deduped"]) == streams.PILE_DEDUPED
  assert streams.pile_for_models(["pythia-70m", "pythia-1b"]) == streams.PILE_STANDARD
  with pytest.raises(data.DataError, match="two streams"):
    streams.pile_for_models(["pythia-70m", "pythia-70m-deduped"])


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
  models = {"small-2l": sf.SUITE_MODELS["small-2l"]}
  return sf.write_suite(tmp_path_factory.mktemp("suite"), models=models, steps=(0, 4, 8))


def test_fetch_data_stages_what_the_sweep_reads(suite_dir, tmp_path):
  joined = suite_dir / "data" / "train"
  shard_like_pythia(joined, tmp_path / "shards", shard_bytes=100)
  staged = tmp_path / "staged"
  args = [f"--{k}={v}" for k, v in OPTIONS.items()]
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "tools.fetch_data",
      f"--models={suite_dir / 'small-2l'}",
      "--steps=0",
      f"--data={tmp_path / 'shards'}",
      f"--out={staged}",
      f"--sequences_per_step={sf.SEQUENCES_PER_STEP}",
      *args,
    ],
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert f"--data={staged}" in proc.stdout
  models = sources.resolve_models([str(suite_dir / "small-2l")])
  options = sweep.SweepOptions(**OPTIONS)
  needs = sweep.batches_needed(models, "0", options)
  # Final step 8: window 5..7 (7 = the fixed inputs), step 0: 0..2, loss: the batch of 8.
  assert needs == {0: 4, 1: 4, 2: 4, 5: 4, 6: 4, 7: 6, 8: 4}
  source = sources.open_data(str(staged), models, None, sf.SEQUENCES_PER_STEP)
  reference = data.MMapTokenSource(joined, sf.SEQUENCES_PER_STEP)
  for step, n in needs.items():
    np.testing.assert_array_equal(source.batch(step, n), reference.batch(step, n))
  # The sweep's own checks read every batch it will need: all there.
  sweep.Sweep(models, "0", source, str(tmp_path / "out"), options).prepare()
  with pytest.raises(data.DataError, match=r"\(step 3\) were not staged"):
    sweep.Sweep(models, "4", source, str(tmp_path / "out4"), options).prepare()


def test_fetch_data_stages_olmo_batches(tmp_path, monkeypatch):
  """--data=olmo:CONFIG.yaml: OLMo's training order (batch s = global_indices[s*B:(s+1)*B],
  B from its config) staged like Pythia's stream, read back as OLMo trained on them."""
  from tests.test_olmo_data import B, _expected_instances, olmo_dir

  root, files, order = olmo_dir.__wrapped__(tmp_path, monkeypatch)
  suite_dir = sf.write_suite(tmp_path / "suite", models={"small-2l": sf.SUITE_MODELS["small-2l"]},
                             steps=(0, 2))  # fmt: skip
  staged = tmp_path / "staged"
  options = dict(n_sequences=3, gradient_window=1, gradient_sequences=2, loss_sequences=0)

  def fetch(*extra):
    return subprocess.run(
      [sys.executable, "-m", "tools.fetch_data", f"--models={suite_dir / 'small-2l'}",
       "--steps=all", f"--data=olmo:{root / 'OLMo-tiny.yaml'}", f"--out={staged}",
       *[f"--{k}={v}" for k, v in options.items()], *extra],
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
      cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

  refused = fetch("--sequences_per_step=1024")
  assert refused.returncode != 0 and "trains on batches of 3" in refused.stderr
  assert not staged.exists()
  proc = fetch()
  assert proc.returncode == 0, proc.stderr
  models = sources.resolve_models([str(suite_dir / "small-2l")])
  needs = sweep.batches_needed(models, "all", sweep.SweepOptions(**options))
  # Step 0's window 0..1; the final step 2's shifts to end at the fixed inputs' step 1 (3
  # rows), as Pythia's 143000 does to 142999.
  assert needs == {0: 2, 1: 3}
  table = _expected_instances(files)
  source = sources.open_data(str(staged), models, None, None)
  for step, n in needs.items():
    np.testing.assert_array_equal(source.batch(step, n), table[order[step * B : step * B + n]])
  with pytest.raises(data.DataError, match=r"\(step 2\) were not staged"):
    source.batch(2, 2)
