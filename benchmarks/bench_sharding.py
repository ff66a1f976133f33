"""Sharded sweep on a pythia-410m-shaped random suite: 1 vs 8 host devices.

  python -m benchmarks.bench_sharding [--steps=3] [--seq_len=128] [--work=/tmp/bench410]

Builds (once) 3 random checkpoints of the 410m shape (vocab 50304, d 1024, 24 layers, 16
heads; ~0.8 GB each in fp16), runs `tools.sweep` as a child process on 1 device and on 8
forced host devices (mesh model:8, then data:8), and prints the child's peak RSS
(os.wait4's ru_maxrss), seconds per checkpoint from the status files, and the plan's
prediction from a measured single-device throughput. Gradients are off: on XLA:CPU's
forced host devices the gradient program can deadlock (see tests/test_sharding.py).
The 8 "devices" share this machine's cores, so the plan's fair prediction for them uses
the one-device throughput, not 8x it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(work: str, n_steps: int, seq_len: int) -> str:
  import jax
  import numpy as np

  from jax_pythia import data
  from jax_pythia.models import model as model
  from jax_pythia.models import weights
  from jax_pythia.models.config import GPTNeoXConfig

  suite = os.path.join(work, "suite")
  if os.path.exists(os.path.join(suite, "suite.json")):
    return suite
  config = GPTNeoXConfig(
    vocab_size=50304, d_model=1024, n_layers=24, n_heads=16, d_mlp=4096, max_seq_len=2048
  )
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, 50277, seq_len + 1) for _ in range(8 * (n_steps + 2))]
  data.write_mmap_indexed_dataset(os.path.join(suite, "data", "train"), seqs)
  for s in range(n_steps):
    params = model.init_params(config, jax.random.PRNGKey(s), dtype=jax.numpy.float16)
    weights.save_hf_checkpoint(
      os.path.join(suite, "pythia-410m-random", f"step{s}"), params, config
    )
    del params
  with open(os.path.join(suite, "suite.json"), "w") as f:
    json.dump(
      {
        "models": [{"name": "pythia-410m-random"}],
        "data_prefix": "data/train",
        "sequences_per_step": 8,
      },
      f,
    )
  return suite


def run(suite: str, out: str, devices: int, mesh: str | None) -> dict:
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )
  cmd = [
    sys.executable,
    "-m",
    "tools.sweep",
    f"--models={suite}",
    f"--out={out}",
    "--n_sequences=8",
    "--loss_sequences=8",
    "--nogradients",
    "--nofigures",
  ]
  if mesh:
    cmd.append(f"--mesh={mesh}")
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  output = proc.stdout.read().decode()
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  if status:
    raise SystemExit(f"sweep failed ({status}):\n{output[-3000:]}")
  records = [json.load(open(p)) for p in glob.glob(os.path.join(out, "status", "*", "*.json"))]
  return {
    "devices": devices,
    "mesh": mesh or "-",
    "peak_rss_gb": usage.ru_maxrss / 2**20,
    "wall_s": wall,
    "checkpoints": len(records),
    "compute_s": sum(r["compute_s"] for r in records) / len(records),
    "load_s": sum(r["load_s"] for r in records) / len(records),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--work", default="/tmp/bench_sharding")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--seq_len", type=int, default=128)
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  suite = build(args.work, args.steps, args.seq_len)

  from jax_pythia.scale import plan

  rate = plan.measure_flops_per_device()
  shape = plan.from_directory(suite, seq_len=args.seq_len)[0]
  work = plan.Work(n_sequences=8, gradients=False, loss_sequences=8)
  flops = plan.flops_per_checkpoint(shape, work)["total"]
  print(
    f"410m-shaped: {shape.params / 1e6:.0f} M params, {flops / 1e12:.2f} TFLOP per "
    f"checkpoint (seq {args.seq_len}); measured {rate / 1e9:.1f} GFLOP/s on one device"
  )
  rows = []
  for devices, mesh in ((1, None), (8, "model:8"), (8, "data:8")):
    out = os.path.join(args.work, f"out-{devices}-{mesh or 'single'}".replace(":", ""))
    subprocess.run(["rm", "-rf", out], check=True)
    r = run(suite, out, devices, mesh)
    r["plan_s"] = flops / rate  # the devices share this machine's cores
    r["plan_naive_s"] = flops / (rate * devices)
    rows.append(r)
    print(json.dumps(r), flush=True)
  print(
    f"\n{'devices':>7} {'mesh':>8} {'peak RSS':>9} {'compute s/ckpt':>15} "
    f"{'load s/ckpt':>12} {'plan s/ckpt':>12} {'plan x devices':>15}"
  )
  for r in rows:
    print(
      f"{r['devices']:>7} {r['mesh']:>8} {r['peak_rss_gb']:>7.2f}GB {r['compute_s']:>15.2f} "
      f"{r['load_s']:>12.2f} {r['plan_s']:>12.2f} {r['plan_naive_s']:>15.2f}"
    )


if __name__ == "__main__":
  main()
