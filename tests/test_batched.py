"""Checkpoints batched per compiled call (--checkpoints_per_call): the same tables as one
checkpoint per call, resume per checkpoint, the plan's memory and bad input."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from jax_pythia import sweep
from jax_pythia.checkpoints import sources
from jax_pythia.errors import SweepError
from jax_pythia.scale import plan, sharding
from jax_pythia.sweep import results
from tests import suite_fixtures as sf

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(
  n_sequences=6, positions="random:2", gradient_window=1, gradient_sequences=4, loss_sequences=4
)


def run_sweep(suite_dir, out, per_call, steps="all"):
  models = sources.resolve_models([str(suite_dir)])
  source = sources.open_data(None, models, None, None)
  runner = sweep.Sweep(
    models, steps, source, str(out), sweep.SweepOptions(**OPTIONS), checkpoints_per_call=per_call
  )
  runner.run()
  return runner


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
  # One model keeps it fast; steps 0, 1, 2, 4, 8.
  small = {"small-2l": sf.SUITE_MODELS["small-2l"]}
  return sf.write_suite(tmp_path_factory.mktemp("suite"), models=small)


@pytest.fixture(scope="module")
def one_and_three(suite_dir, tmp_path_factory):
  one, three = tmp_path_factory.mktemp("c1"), tmp_path_factory.mktemp("c3")
  run_sweep(suite_dir, one, 1)
  runner = run_sweep(suite_dir, three, 3)
  return one, three, runner


def assert_same_values(batched: pd.DataFrame, single: pd.DataFrame) -> None:
  """Within 1e-5 relative (1e-6 absolute for float32 rounding noise around 0: a CKA of
  unrelated heads, a cosine). Stacking changes the summation order of the gradients'
  matmuls (float32 rounding, about 3e-7 relative); a condition number amplifies a
  relative change of the matrix by up to itself (it divides by the smallest singular
  value), so a gradient's condition number is held to 1e-6 x its size: beyond ~1e5 it
  sits at float32's resolution with one checkpoint per call as well."""
  cond = (single.metric == "grad_condition_number").to_numpy()
  np.testing.assert_allclose(batched.value[~cond], single.value[~cond], rtol=1e-5, atol=1e-6)
  a, b = single.value[cond].to_numpy(), batched.value[cond].to_numpy()
  # NaN: a condition number float32 cannot resolve (analysis.spectra), in both runs alike.
  np.testing.assert_array_equal(np.isnan(b), np.isnan(a))
  a, b = a[~np.isnan(a)], b[~np.isnan(a)]
  assert np.all(np.abs(a - b) <= np.maximum(1e-5, 1e-6 * a) * a)


def test_batched_tables_equal_one_checkpoint_per_call(one_and_three):
  one, three, runner = one_and_three
  # Steps 0, 1, 2, 4, 8: the final 8 alone, then [0, 1, 2] stacked, then [4] alone.
  assert [
    [step for _, step in chunk]
    for chunk in runner._chunks([(runner.models[0], s) for s in (8, 0, 1, 2, 4)])
  ] == [[8], [0, 1, 2], [4]]
  for out in (one, three):
    results.finalize(str(out))
  keys = ["model", "step", "component", "metric", "layer", "head"]
  for table in ("metrics", "pairwise_cka"):
    a = pd.read_parquet(one / f"{table}.parquet")
    b = pd.read_parquet(three / f"{table}.parquet")
    sort = keys + (["other_step"] if table == "pairwise_cka" else [])
    a, b = a.sort_values(sort, ignore_index=True), b.sort_values(sort, ignore_index=True)
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    assert len(a) > 500 and set(a.step) == set(sf.SUITE_STEPS)
    assert_same_values(b, a)
  status = pd.read_parquet(three / "checkpoints.parquet")
  assert (status.status == "ok").all() and len(status) == len(sf.SUITE_STEPS)


def test_batched_run_resumes_per_checkpoint(one_and_three, suite_dir):
  _, three, _ = one_and_three
  metrics_path, _, _ = results.checkpoint_paths(str(three), "small-2l", 1)
  before = pd.read_parquet(metrics_path)
  others = {
    s: os.path.getmtime(results.checkpoint_paths(str(three), "small-2l", s)[0])
    for s in (0, 2, 4, 8)
  }
  os.remove(metrics_path)
  runner = run_sweep(suite_dir, three, 3)
  assert runner.pending() == {"small-2l": []}
  after = pd.read_parquet(metrics_path)  # computed alone this time
  pd.testing.assert_frame_equal(after.drop(columns="value"), before.drop(columns="value"))
  assert_same_values(before, after)
  for s, mtime in others.items():
    assert os.path.getmtime(results.checkpoint_paths(str(three), "small-2l", s)[0]) == mtime


def test_plan_memory_and_automatic_choice():
  shape, mesh = plan.from_suite("pythia-160m"), {"data": 1}
  work = plan.Work(gradient_microbatch=16)
  one = plan.memory_per_device(shape, work, mesh)
  two = plan.memory_per_device(shape, dataclasses.replace(work, checkpoints_per_call=2), mesh)
  four = plan.memory_per_device(shape, dataclasses.replace(work, checkpoints_per_call=4), mesh)
  assert four["total"] == pytest.approx(2 * two["total"])
  # One checkpoint streams its gradient batches; stacked ones hold all G at once.
  assert one["total"] < two["total"] / 2
  # One checkpoint's layout on a device large enough for the fullest one; each stacked
  # checkpoint's share of the stacked calls' peak under it.
  layout = plan.choose_layout(shape, work, mesh, 1e13)
  peak = max(plan.stacked_peaks(shape, work, mesh, layout, 2).values()) / 2
  assert layout.peak < peak
  room = 5.5 * peak / plan.HEADROOM  # a device where 5 stacked fit under the headroom
  assert dataclasses.replace(plan.choose_layout(shape, work, mesh, room), limit=0) == (
    dataclasses.replace(layout, limit=0)
  )
  assert plan.checkpoints_per_call(shape, work, mesh, room, 0, "gpu") == 5
  assert plan.checkpoints_per_call(shape, work, mesh, 1e6 * room, 0, "gpu") == 16
  assert plan.checkpoints_per_call(shape, work, mesh, 1e6 * room, 0, "cpu") == 1
  assert plan.checkpoints_per_call(shape, work, mesh, None, 0, "gpu") == 1
  assert plan.checkpoints_per_call(shape, work, mesh, room, 5, "cpu") == 5
  with pytest.raises(plan.PlanError, match=r"^--checkpoints_per_call=6: 6 checkpoints of pythia"):
    plan.checkpoints_per_call(shape, work, mesh, room, 6, "gpu")
  with pytest.raises(plan.PlanError, match=r"^--checkpoints_per_call=-1: "):
    plan.checkpoints_per_call(shape, work, mesh, room, -1, "gpu")


def test_bad_checkpoints_per_call(suite_dir, tmp_path):
  models = sources.resolve_models([str(suite_dir)])
  source = sources.open_data(None, models, None, None)
  options = sweep.SweepOptions(**OPTIONS)
  with pytest.raises(SweepError, match=r"^--checkpoints_per_call=-1: "):
    sweep.Sweep(models, "all", source, str(tmp_path / "a"), options, checkpoints_per_call=-1)
  # More than this machine's memory holds, by the plan's estimate: refused before work.
  runner = sweep.Sweep(
    models, "all", source, str(tmp_path / "b"), options, checkpoints_per_call=10**9
  )
  with pytest.raises(SweepError, match=r"^--checkpoints_per_call=1000000000: .* over the limit"):
    runner.run()
  assert not os.path.exists(results.checkpoint_paths(str(tmp_path / "b"), "small-2l", 8)[0])
  proc = subprocess.run(
    [sys.executable, "-m", "tools.sweep", f"--models={suite_dir}", "--checkpoints_per_call=x"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    "sweep: error: --checkpoints_per_call=x: a number of checkpoints >= 1, or auto (0)"
  ]


def test_stacked_checkpoints_never_run_on_a_mesh(suite_dir, tmp_path):
  """The stacked path's spectra run where its checkpoints are, one device: on a mesh it
  would hold every layer of C checkpoints on one device where the one-checkpoint path
  splits them by layer (docs/tpu.md), so a mesh refuses C > 1 and chooses C = 1."""
  models = sources.resolve_models([str(suite_dir)])
  source = sources.open_data(None, models, None, None)
  options = sweep.SweepOptions(**OPTIONS)
  mesh = sharding.Placement(sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  with pytest.raises(SweepError, match=r"^--checkpoints_per_call=2 with --mesh: stacked"):
    sweep.Sweep(
      models, "all", source, str(tmp_path / "a"), options, placement=mesh, checkpoints_per_call=2
    )
  runner = sweep.Sweep(
    models, "all", source, str(tmp_path / "b"), options, placement=mesh, device_memory=1e12
  )
  runner.prepare()
  assert runner.per_call == {"small-2l": 1}
  alone = sweep.Sweep(
    models, "all", source, str(tmp_path / "c"), options, device_memory=1e12, checkpoints_per_call=3
  )
  alone.prepare()
  assert alone.per_call == {"small-2l": 3}
