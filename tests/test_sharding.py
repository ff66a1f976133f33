"""Device meshes and sharded sweeps (jax_pythia.sharding).

A sharded sweep must give the single-device table. Several devices on the CPU need
XLA_FLAGS before JAX starts, so those sweeps run as subprocesses (`run_sweep`) and this
test session keeps its one device. The helpers here are shared with test_multihost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest
from jax.sharding import PartitionSpec as P

from jax_pythia import data, model, sharding, weights
from jax_pythia.config import GPTNeoXConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = ["model", "step", "layer", "component", "head", "metric"]
SEQ = 16
SEQUENCES_PER_STEP = 8
# 8 heads and vocab 64: every mesh of 8 devices divides them (d_head 8: rotary dim 2).
CONFIG = GPTNeoXConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=8, d_mlp=256, max_seq_len=64)
STEPS = (0, 1, 2)


def make_suite(out: str, steps=STEPS, config: GPTNeoXConfig = CONFIG, name: str = "mini-h8") -> str:
  """A suite directory: random checkpoints step<N>/ of one model, a token stream and
  suite.json (`resolve_models` and `open_data` read it as they read the toy suite)."""
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, config.vocab_size, SEQ + 1) for _ in range(SEQUENCES_PER_STEP * 12)]
  data.write_mmap_indexed_dataset(os.path.join(out, "data", "train"), seqs)
  for s in steps:
    params = model.init_params(config, jax.random.PRNGKey(s))
    weights.save_hf_checkpoint(os.path.join(out, name, f"step{s}"), params, config)
  with open(os.path.join(out, "suite.json"), "w") as f:
    json.dump(
      {
        "models": [{"name": name}],
        "data_prefix": "data/train",
        "sequences_per_step": SEQUENCES_PER_STEP,
      },
      f,
    )
  return out


#: Options of the CPU sweeps (small, gradients included).
SWEEP_ARGS = (
  "--n_sequences=8",
  "--loss_sequences=8",
  "--nofigures",
  "--gradient_window=1",
  "--gradient_sequences=8",
)


def sweep_cmd(suite: str, out: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "tools.sweep", f"--models={suite}", f"--out={out}", *extra]


def env_with_devices(n: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(
    JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}"
  )
  return env


def run_sweep(
  suite: str, out: str, *extra: str, devices: int = 1, timeout: float = 240
) -> subprocess.CompletedProcess:
  proc = subprocess.run(
    sweep_cmd(suite, out, *extra),
    env=env_with_devices(devices),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def assert_same_table(expected_dir: str, actual_dir: str) -> None:
  """Same rows (no duplicates, no gaps) and values to 1e-5 relative.

  condition_number gets 1e-3: it divides by the smallest singular value, which float32
  rounding moves by ~1e-4 relative when reductions run in another order on other shards.
  grad_condition_number is not compared: a gradient of T tokens has rank <= T, so its
  smallest kept singular value is rounding noise (the metric is ~1e7 and meaningless).
  """
  a = pd.read_parquet(os.path.join(expected_dir, "metrics.parquet"))
  b = pd.read_parquet(os.path.join(actual_dir, "metrics.parquet"))
  assert not b.duplicated(KEY).any()
  assert len(a) == len(b)
  merged = a.merge(b, on=KEY, how="outer", indicator=True)
  assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"].head()
  merged = merged[merged.metric != "grad_condition_number"]
  loose = merged.metric == "condition_number"
  np.testing.assert_allclose(merged.value_y[~loose], merged.value_x[~loose], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(merged.value_y[loose], merged.value_x[loose], rtol=1e-3)
  pa = pd.read_parquet(os.path.join(expected_dir, "pairwise_cka.parquet"))
  pb = pd.read_parquet(os.path.join(actual_dir, "pairwise_cka.parquet"))
  keys = KEY + ["other_step"]
  pm = pa.merge(pb, on=keys)
  assert len(pm) == len(pa) == len(pb)
  np.testing.assert_allclose(pm.value_y, pm.value_x, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ in-process units


def test_parse_mesh():
  assert sharding.parse_mesh("data:4,model:2") == {"data": 4, "model": 2}
  assert sharding.parse_mesh("model:-1") == {"model": -1}
  assert sharding.parse_mesh(None) is None and sharding.parse_mesh(" ") is None
  for bad in ("data=4", "data:4,data:2", "pipe:2", "data:-1,model:-1", "data:0"):
    with pytest.raises(sharding.ShardingError):
      sharding.parse_mesh(bad)


def test_make_mesh_on_one_device():
  mesh = sharding.make_mesh("data:1")
  assert dict(mesh.shape) == {"data": 1, "model": 1}
  assert dict(sharding.make_mesh("model:-1").shape) == {"model": 1, "data": 1}
  with pytest.raises(sharding.ShardingError, match="needs 2 devices"):
    sharding.make_mesh("data:2")


def test_param_specs_follow_the_layout():
  specs = sharding.param_specs(CONFIG, 8)
  shapes = weights.param_shapes(CONFIG)
  is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
  assert jax.tree.structure(shapes, is_leaf=is_shape) == jax.tree.structure(
    specs, is_leaf=lambda x: isinstance(x, P)
  )
  layers = specs["layers"]
  assert layers["attn"]["query"]["kernel"] == P(None, None, "model", None)  # H axis
  assert layers["attn"]["out"]["kernel"] == P(None, "model", None, None)  # H axis
  assert layers["mlp"]["fc_in"]["kernel"] == P(None, None, "model")  # f
  assert layers["mlp"]["fc_out"]["kernel"] == P(None, "model", None)  # f
  assert specs["embed_in"]["embedding"] == P("model", None)  # vocab 64 divides
  odd = GPTNeoXConfig(vocab_size=50, d_model=64, n_layers=1, n_heads=8, d_mlp=256)
  assert sharding.param_specs(odd, 8)["embed_out"]["embedding"] == P(None, None)
  with pytest.raises(sharding.ShardingError, match="n_heads"):
    sharding.param_specs(CONFIG, 16)
  # Without a model axis nothing is split.
  assert all(
    all(a is None for a in s)
    for s in jax.tree.leaves(sharding.param_specs(CONFIG, 1), is_leaf=lambda x: isinstance(x, P))
  )


def test_param_specs_from_the_table_equal_the_layout_written_out():
  """weights.PARAMS' model_dim column gives, leaf by leaf, the specs written here by hand."""
  m = "model"
  heads_in = {"kernel": P(None, None, m, None), "bias": P(None, m, None)}
  rep = P(None, None)
  want = {
    "embed_in": {"embedding": P(m, None)},
    "layers": {
      "ln_1": {"scale": rep, "bias": rep},
      "attn": {
        "query": heads_in,
        "key": heads_in,
        "value": heads_in,
        "out": {"kernel": P(None, m, None, None), "bias": rep},
      },
      "ln_2": {"scale": rep, "bias": rep},
      "mlp": {
        "fc_in": {"kernel": P(None, None, m), "bias": P(None, m)},
        "fc_out": {"kernel": P(None, m, None), "bias": rep},
      },
    },
    "ln_f": {"scale": P(None), "bias": P(None)},
    "embed_out": {"embedding": P(m, None)},
  }
  assert sharding.param_specs(CONFIG, 2) == want


def test_placement_single_process():
  place = sharding.Placement.create(None)
  assert place.mesh is None and place.is_writer and place.process_count == 1
  queue = [("m", 3), ("m", 1)]
  assert list(place.schedule(queue)) == [queue]
  x = np.arange(6).reshape(3, 2)
  assert place.batch(x) is x
  meshed = sharding.Placement.create("data:1")
  params = jax.tree.map(np.asarray, model.init_params(CONFIG, jax.random.PRNGKey(0)))
  placed = meshed.params(params, CONFIG)
  np.testing.assert_array_equal(
    meshed.host(placed["layers"]["attn"]["out"]["kernel"]),
    params["layers"]["attn"]["out"]["kernel"],
  )
  with pytest.raises(sharding.ShardingError, match="split"):
    sharding.Placement.create(None, "pipeline")


def test_initialize_distributed_needs_all_three():
  assert sharding.initialize_distributed() is False
  with pytest.raises(sharding.ShardingError, match="go together"):
    sharding.initialize_distributed("127.0.0.1:1234", 2, None)


# ------------------------------------------------------------- sharded sweeps (8 CPUs)


@pytest.fixture(scope="module")
def suite_and_baseline(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharding")
  suite = make_suite(str(root / "suite"))
  baseline = str(root / "single")
  run_sweep(suite, baseline, *SWEEP_ARGS)
  return suite, baseline, root


@pytest.mark.parametrize("mesh", ["data:8", "model:8", "data:4,model:2"])
def test_sharded_sweep_matches_single_device(suite_and_baseline, mesh):
  # Gradients are off here: on XLA:CPU's forced host devices the gradient program
  # (collectives inside the layer scan's while loops next to LAPACK SVDs) can deadlock;
  # it is the same compiled code on one device per process (test_multihost).
  suite, baseline, root = suite_and_baseline
  out = str(root / mesh.replace(":", "").replace(",", "_"))
  proc = run_sweep(suite, out, *SWEEP_ARGS, f"--mesh={mesh}", devices=8)
  assert "(8 devices)" in proc.stdout
  assert_same_table(baseline, out)


def test_converted_cache_restores_onto_the_mesh(suite_and_baseline, tmp_path):
  """A suite of orbax caches (checkpoints.save_converted) sweeps to the same table."""
  from jax_pythia import checkpoints

  suite, baseline, _ = suite_and_baseline
  cached = tmp_path / "cached"
  os.makedirs(cached)
  for name in ("data", "suite.json"):
    os.symlink(os.path.join(suite, name), cached / name)
  for s in STEPS:
    config, params = checkpoints.load_checkpoint(os.path.join(suite, "mini-h8", f"step{s}"))
    checkpoints.save_converted(str(cached / "mini-h8" / f"step{s}"), config, params)
  out = str(tmp_path / "out")
  run_sweep(str(cached), out, *SWEEP_ARGS, "--mesh=data:2,model:4", devices=8)
  assert_same_table(baseline, out)


def test_bad_mesh_is_one_line(suite_and_baseline, tmp_path):
  suite, _, _ = suite_and_baseline
  proc = subprocess.run(
    sweep_cmd(suite, str(tmp_path / "o"), *SWEEP_ARGS, "--mesh=model:16"),
    env=env_with_devices(8),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0
  assert "mesh" in proc.stderr and "Traceback" not in proc.stderr
