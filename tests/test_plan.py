"""The pre-flight plan (jax_pythia.scale.plan, tools.plan): shapes, FLOPs, memory, output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jax_pythia import suite
from jax_pythia.scale import plan
from tests.test_sharding import CONFIG, ROOT, STEPS, make_suite


def test_pythia_parameter_counts():
  # Published totals (6.9b and 12b pad the vocab to 50,432 and 50,688).
  counts = {
    "70m": 70_426_624,
    "160m": 162_322_944,
    "410m": 405_334_016,
    "1.4b": 1_414_647_808,
    "6.9b": 6_857_302_016,
    "12b": 11_846_072_320,
  }
  for size, expected in counts.items():
    assert plan.from_suite(f"pythia-{size}").params == expected


def test_flops_follow_the_formulas():
  shape = plan.from_suite("pythia-410m-deduped")
  work = plan.Work(n_sequences=128, gradient_window=5, gradient_sequences=128)
  f = plan.flops_per_checkpoint(shape, work)
  s, L, d = 2048, 24, 1024
  attn = 4 * L * s * s * d
  assert f["capture"] == pytest.approx(2 * shape.layer_params * 128 * s + 128 * attn)
  grad_tokens = 11 * 128 * s
  assert f["gradients"] == pytest.approx(
    6 * (shape.layer_params + d * suite.VOCAB_SIZE) * grad_tokens + 3 * 11 * 128 * attn
  )
  assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
  no_grad = plan.flops_per_checkpoint(shape, plan.Work(gradients=False))
  assert no_grad["gradients"] == 0 and no_grad["total"] < f["total"] / 10


def test_memory_shrinks_under_the_mesh():
  shape = plan.from_suite("pythia-12b")
  work = plan.Work(gradient_microbatch=8)
  one = plan.memory_per_device(shape, work, {"data": 1, "model": 1})
  split = plan.memory_per_device(shape, work, {"data": 2, "model": 8})
  assert one["params"] == pytest.approx(4 * shape.params, rel=1e-6)  # float32
  assert split["params"] < one["params"] / 7
  assert split["activations"] < one["activations"] / 2
  # The call's gradients split over the model axis; the carried previous batch's and the
  # spectra's copy of the weights split by layer over all 16 devices: 36 layers in 4
  # groups of 9 (gcd(36, 16) = 4), in float32 here.
  parts = plan.gradient_call_bytes(shape, work, {"data": 2, "model": 8})
  d, f, L = shape.d_model, shape.d_mlp, shape.n_layers
  nine_layers = 4 * 9 * (2 * d * d + f * d)
  assert parts["carry"] == parts["spectra_weights"] == nine_layers
  whole = plan.gradient_call_bytes(shape, work, {})
  assert whole["carry"] == 4 * L * (2 * d * d + f * d) and whole["spectra_weights"] == 0
  beside = 2 * nine_layers
  assert split["grads"] - beside == pytest.approx((one["grads"] - whole["carry"]) / 8)
  # Without a carry on the devices (--gradient_window=0, or kept in host memory): none.
  assert plan.gradient_call_bytes(shape, work, {}, carry="host")["carry"] == 0


def test_plan_steps_and_time():
  shape = plan.from_suite("pythia-70m")
  p = plan.make_plan(shape, "paper", plan.Work(), {"data": 4}, 1e15, 1e8)
  assert len(p.steps) == 27 and p.fetch_bytes == 27 * 2 * shape.params
  assert p.compute_s == pytest.approx(p.flops["total"] / 1e15)
  assert p.total_s(hosts=1) == pytest.approx(27 * max(p.compute_s, p.fetch_s))
  with pytest.raises(plan.PlanError):
    plan.make_plan(shape, "7", plan.Work(), {"data": 1}, 1e15, 1e8)


def test_memory_columns_add_up_to_the_peak_without_gradients():
  """With --nogradients the capture call is the peak: params + activations of the
  microbatch the layout chose (not of every sequence at once) make the memory column."""
  shape = plan.from_suite("pythia-1b")
  work = plan.Work(gradients=False)
  p = plan.make_plan(shape, "final", work, {}, 1e14, 1e8, device_bytes=16e9)
  assert p.layout.capture_microbatch < work.n_sequences and p.layout.fits
  m = p.memory
  assert m["grads"] == 0
  assert m["params"] + m["activations"] == pytest.approx(m["total"]) == p.layout.peaks["capture"]


def test_local_suite_and_cli(tmp_path):
  suite_dir = make_suite(str(tmp_path / "suite"))
  [shape] = plan.from_directory(suite_dir, seq_len=16)
  assert (shape.d_model, shape.n_heads, shape.vocab, shape.steps) == (
    CONFIG.d_model,
    CONFIG.n_heads,
    CONFIG.vocab_size,
    STEPS,
  )
  assert shape.checkpoint_bytes > 2 * shape.params  # config.json and fp16 weights
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "tools.plan",
      f"--models={suite_dir},pythia-6.9b-deduped",
      "--devices=8",
      "--mesh=data:2,model:4",
      "--flops_per_device=1e12",
    ],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  assert "mini-h8" in proc.stdout and "pythia-6.9b-deduped" in proc.stdout
  assert "8 device(s)" in proc.stdout
  # 27 + 1 checkpoints of 6.9b: 253 batches of 128 x 2,049 uint16 tokens (counted in
  # test_fetch_data); the local suite's own final step adds its window.
  # A local suite and a Hub model read no one stream: no stream's size is claimed.
  assert "training data: " in proc.stdout and "600 GB" not in proc.stdout
  assert "from the token data the sweep is given (--data)" in proc.stdout
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "tools.plan",
      "--models=pythia-7m",
      "--flops_per_device=1e12",
      "--devices=1",
    ],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert bad.returncode != 0 and "Traceback" not in bad.stderr


BARS = ("--steps=paper", "--dtype=bfloat16", "--flops_per_device=1e14", "--device_memory=16GB")


@pytest.mark.parametrize(
  "devices, platform, fit, misfit",
  [
    # A TPU v5e-8: every size from 2.8b fits (no float64 refinement on TPU).
    (8, "tpu", ("2.8b", "6.9b", "12b"), ()),
    # Eight 16 GB GPUs: the refinement's float64 workspace takes 12b's spectra call over.
    (8, "gpu", ("2.8b", "6.9b"), ("12b",)),
    # One 16 GB device (a GPU, refinement counted).
    (1, "gpu", ("1.4b", "2.8b"), ()),
  ],
)
def test_pythia_sizes_on_16gb_devices(devices, platform, fit, misfit):
  """Issue 21's bars: tools.plan's paper protocol in bfloat16 on 16 GB devices."""
  from tests.tool_runs import run_tool

  names = [f"pythia-{size}-deduped" for size in fit + misfit]
  result = run_tool(
    "plan", f"--models={','.join(names)}", f"--devices={devices}", f"--platform={platform}", *BARS
  )
  assert result.returncode == 0, result.stderr[-3000:]
  misfits = [line for line in result.stdout.splitlines() if "does not fit" in line]
  assert [line.split()[1] for line in misfits] == [f"pythia-{size}-deduped" for size in misfit]
  for line in misfits:
    assert "spectra call" in line and "leave grad_condition_number out of --metrics" in line
