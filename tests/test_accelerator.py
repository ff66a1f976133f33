"""benchmarks.accelerator --smoke: the prepared GPU run, on tiny shapes on CPU, so that it
does not rot between the rare runs on an accelerator. Figures are not checked (CPU,
shared machine); that every part ran, or was skipped for the budget with its reason, is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_writes_every_part(tmp_path):
  out = tmp_path / "run.json"
  results_md = tmp_path / "RESULTS.md"
  results_md.write_text("# Results\n")
  env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
  env.pop("OUT", None)
  command = [sys.executable, "-m", "benchmarks.accelerator", "--smoke", "--out", str(out)]
  # One shape keeps the test short; the skip-by-budget path needs a second one.
  command += ["--results_md", str(results_md), "--shapes", "160m"]
  try:
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  except subprocess.TimeoutExpired:
    pytest.fail("benchmarks.accelerator --smoke hung")
  assert done.returncode == 0, done.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["errors"] == {}, data["errors"]
  parts, skipped = data["parts"], data["skipped"]
  for name in ("device", "reference", "study/160m/float32", "study/160m/bfloat16", "deviation"):
    assert name in parts, (name, skipped)
  assert "spectra" in parts or "spectra" in skipped
  assert not any("410m" in k for k in list(parts) + list(skipped))
  assert set(parts["device"]["peak_flops"]) == {"bfloat16", "float32", "float32_highest"}
  for dtype in ("float32", "bfloat16"):
    figures = parts[f"study/160m/{dtype}"]
    assert figures["seconds_per_checkpoint"] > 0
    assert 0 < figures["fwd_bwd_mfu"] and 0 < figures["fwd_bwd_executed_fraction_of_peak"]
    assert parts["ratio"][dtype] > 0
  assert {"loss", "weights per"} <= set(parts["deviation"])
  assert any(k.startswith("cka") for k in parts["deviation"])
  section = results_md.read_text()
  assert section.startswith("# Results\n") and "## Accelerator run" in section
  assert "| 160m | float32 |" in section
  assert (tmp_path / "run.md").exists()

  # --record: the section of a run's JSON (what comes back from a lent machine), appended.
  from benchmarks import accelerator

  recorded = tmp_path / "recorded.md"
  accelerator.main(["--record", str(out), "--results_md", str(recorded)])
  assert "| 160m | bfloat16 |" in recorded.read_text()
