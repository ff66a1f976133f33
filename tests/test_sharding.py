"""Device meshes and sharded sweeps (jax_pythia.scale.sharding, jax_pythia.scale.xla_cpu).

A sharded sweep must give the single-device table. Several devices on the CPU need
XLA_FLAGS before JAX starts, so those sweeps run as subprocesses (`run_sweep`) and this
test session keeps its one device. Every subprocess has a timeout: a CPU mesh that
deadlocks fails its test within minutes. The helpers here are shared with test_multihost.
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

from jax_pythia import data
from jax_pythia.checkpoints import converted
from jax_pythia.models import model as model
from jax_pythia.models import weights
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.scale import sharding, xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = ["model", "step", "layer", "component", "head", "metric"]
SEQ = 16
SEQUENCES_PER_STEP = 8
# 8 heads and vocab 64: every mesh of 8 devices divides them (d_head 8: rotary dim 2).
CONFIG = GPTNeoXConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=8, d_mlp=256, max_seq_len=64)
STEPS = (0, 1, 2)
# pythia-14m's shape (vocab 512 here) and batches of 32 sequences of 65 tokens, at which
# every CPU mesh hung before jax_pythia sized XLA:CPU's thread pool (issue 13,
# jax_pythia.scale.xla_cpu). The small CONFIG cannot show it: its QR of W_O is too small for
# jaxlib to split over the pool.
CONFIG_14M = GPTNeoXConfig(
  vocab_size=512, d_model=128, n_layers=6, n_heads=4, d_mlp=512, max_seq_len=128
)
SEQ_14M, SEQUENCES_PER_STEP_14M = 64, 32


def make_suite(
  out: str,
  steps=STEPS,
  config: GPTNeoXConfig = CONFIG,
  name: str = "mini-h8",
  seq: int = SEQ,
  sequences_per_step: int = SEQUENCES_PER_STEP,
) -> str:
  """A suite directory: random checkpoints step<N>/ of one model, a token stream of
  `seq + 1`-token items and suite.json (`resolve_models` and `open_data` read it as they
  read the toy suite)."""
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, config.vocab_size, seq + 1) for _ in range(sequences_per_step * 12)]
  data.write_mmap_indexed_dataset(os.path.join(out, "data", "train"), seqs)
  for s in steps:
    params = model.init_params(config, jax.random.PRNGKey(s))
    weights.save_hf_checkpoint(os.path.join(out, name, f"step{s}"), params, config)
  with open(os.path.join(out, "suite.json"), "w") as f:
    json.dump(
      {
        "models": [{"name": name}],
        "data_prefix": "data/train",
        "sequences_per_step": sequences_per_step,
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
  suite: str, out: str, *extra: str, devices: int = 1, timeout: float = 300
) -> subprocess.CompletedProcess:
  try:
    proc = subprocess.run(
      sweep_cmd(suite, out, *extra),
      env=env_with_devices(devices),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
    )
  except subprocess.TimeoutExpired as e:  # run() has killed it
    tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
    pytest.fail(f"sweep on {devices} device(s) hung: no result in {timeout:.0f} s\n{tail}")
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
  with pytest.raises(sharding.ShardingError, match="--mesh: a model axis of 16 .* 8 heads"):
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


def test_cpu_pool_sized_for_the_host_devices():
  flags = "--xla_force_host_platform_device_count"
  assert xla_cpu.host_device_count({}) == 1
  assert xla_cpu.host_device_count({"XLA_FLAGS": f"--foo {flags}=2 {flags}=8"}) == 8
  assert xla_cpu.host_device_count({"JAX_NUM_CPU_DEVICES": "4"}) == 4
  assert [xla_cpu.threads_needed(n) for n in (1, 2, 8)] == [1, 5, 17]
  env = {"XLA_FLAGS": f"{flags}=8"}
  xla_cpu.size_pool(env)
  assert int(env["PJRT_NPROC"]) == max(17, xla_cpu.cores())
  assert xla_cpu.mesh_problem(8, env) is None
  chosen = {"XLA_FLAGS": f"{flags}=8", "PJRT_NPROC": "4"}
  xla_cpu.size_pool(chosen)  # the user's choice stays, and a mesh is refused with it
  assert chosen["PJRT_NPROC"] == "4"
  assert "PJRT_NPROC=17" in xla_cpu.mesh_problem(8, chosen)
  one = {}
  xla_cpu.size_pool(one)  # one device: XLA's default pool
  assert "PJRT_NPROC" not in one and xla_cpu.mesh_problem(1, {"PJRT_NPROC": "1"}) is None


# What the OpenBLAS that jaxlib's LAPACK calls (scipy's) runs with, after `import jax_pythia`.
BLAS_THREADS = """
import ctypes, json, re
import jax_pythia, jax, jax.numpy as jnp
jnp.linalg.svd(jnp.ones((8, 8)))  # loads jaxlib's LAPACK (scipy's OpenBLAS)
libs = set(re.findall(r"/\\S*libscipy_openblas-\\S*\\.so", open("/proc/self/maps").read()))
print(json.dumps([ctypes.CDLL(lib).scipy_openblas_get_num_threads() for lib in sorted(libs)]))
"""


@pytest.mark.parametrize("user", [{}, {"OMP_NUM_THREADS": "2"}])
def test_lapack_runs_on_one_openblas_thread_unless_the_user_chose(user):
  env = {k: v for k, v in os.environ.items() if "NUM_THREADS" not in k} | user
  done = subprocess.run(
    [sys.executable, "-c", BLAS_THREADS], env=env, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr[-2000:]
  counts = json.loads(done.stdout.strip().splitlines()[-1])
  if not counts:
    pytest.skip("no scipy OpenBLAS loaded here (another BLAS, or not Linux)")
  assert counts == [1] if not user else counts[0] == min(2, xla_cpu.cores()), counts
  chosen = {"OPENBLAS_NUM_THREADS": "4"}
  xla_cpu.single_thread_blas(chosen)
  assert chosen == {"OPENBLAS_NUM_THREADS": "4"}


# A batched LAPACK call (QR, as the OV basis of the activations) inside a layer scan,
# replicated on every device, next to a collective over the data axis: the pattern that
# hung every CPU mesh of the sweep (issue 13). With XLA's default pool of the 2 cores it
# hangs at once; jax_pythia's import sizes the pool (jax_pythia.scale.xla_cpu).
LAPACK_AND_COLLECTIVE = """
import jax_pythia
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
w = np.random.default_rng(0).normal(size=(6, 4, 128, 32)).astype(np.float32)
w = jax.device_put(w, NamedSharding(mesh, P()))
x = jax.device_put(np.ones((32, 64, 128), np.float32), NamedSharding(mesh, P("data")))
@jax.jit
def f(w, x):
  def layer(h, wl):
    h = jnp.tanh(h @ wl[0] @ wl[0].T)
    return h, jnp.linalg.qr(wl, mode="r").sum() + h.mean()
  return jax.lax.scan(layer, x, w)[1].sum()
for i in range(10):
  float(f(w + i, x))
print("ok", jax.device_count())
"""


@pytest.mark.parametrize("devices", [2, 8])
def test_lapack_next_to_collectives_on_cpu_devices(devices):
  try:
    proc = subprocess.run(
      [sys.executable, "-c", LAPACK_AND_COLLECTIVE],
      env={k: v for k, v in env_with_devices(devices).items() if k not in ("PJRT_NPROC", "NPROC")},
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
    )
  except subprocess.TimeoutExpired:
    pytest.fail(f"LAPACK next to collectives on {devices} CPU devices hung (120 s)")
  assert proc.returncode == 0 and proc.stdout.split() == ["ok", str(devices)], proc.stderr


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


@pytest.mark.parametrize("mesh", ["data:8", "model:8"])
def test_sharded_sweep_matches_single_device(suite_and_baseline, mesh):
  suite, baseline, root = suite_and_baseline
  out = str(root / mesh.replace(":", "").replace(",", "_"))
  proc = run_sweep(suite, out, *SWEEP_ARGS, f"--mesh={mesh}", devices=8)
  assert "(8 devices)" in proc.stdout
  assert_same_table(baseline, out)


#: Activations on 32 sequences of 64 tokens; gradients on 2 batches of 8 sequences.
ARGS_14M = ("--n_sequences=32", "--nofigures", "--gradient_window=1", "--gradient_sequences=8")


@pytest.fixture(scope="module")
def suite_14m_and_baseline(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharding_14m")
  suite = make_suite(
    str(root / "suite"), (0, 1), CONFIG_14M, "mini-14m", SEQ_14M, SEQUENCES_PER_STEP_14M
  )
  baseline = str(root / "single")
  run_sweep(suite, baseline, *ARGS_14M)
  return suite, baseline, root


@pytest.mark.parametrize("mesh, devices", [("data:4,model:2", 8), ("data:2", 2)])
def test_sharded_sweep_at_realistic_sizes(suite_14m_and_baseline, mesh, devices):
  """The meshes of issue 13 that hung, gradients included, give the single-device table."""
  suite, baseline, root = suite_14m_and_baseline
  out = str(root / mesh.replace(":", "").replace(",", "_"))
  proc = run_sweep(suite, out, *ARGS_14M, f"--mesh={mesh}", devices=devices)
  assert f"mesh {mesh if ',' in mesh else mesh + ',model:1'} ({devices} devices)" in proc.stdout
  assert_same_table(baseline, out)


def test_converted_cache_restores_onto_the_mesh(suite_and_baseline, tmp_path):
  """A suite of orbax caches (converted.save_converted) sweeps to the same table."""
  from jax_pythia.checkpoints import hub as checkpoints

  suite, baseline, _ = suite_and_baseline
  cached = tmp_path / "cached"
  os.makedirs(cached)
  for name in ("data", "suite.json"):
    os.symlink(os.path.join(suite, name), cached / name)
  for s in STEPS:
    config, params = checkpoints.load_checkpoint(os.path.join(suite, "mini-h8", f"step{s}"))
    converted.save_converted(str(cached / "mini-h8" / f"step{s}"), config, params)
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


def test_cpu_mesh_with_too_small_a_pool_is_refused(suite_and_baseline, tmp_path):
  """A CPU mesh that would deadlock is refused up front, in one line, instead of hanging."""
  suite, _, _ = suite_and_baseline
  proc = subprocess.run(
    sweep_cmd(suite, str(tmp_path / "o"), *SWEEP_ARGS, "--mesh=data:8"),
    env={**env_with_devices(8), "PJRT_NPROC": "2"},
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    "sweep: error: mesh data:8,model:1: 8 CPU devices in one process need XLA:CPU's thread "
    "pool to have >= 17 threads, it has 2: their collectives and LAPACK calls would wait on "
    "each other forever; set PJRT_NPROC=17 or leave it unset (jax_pythia then sizes it at "
    "import from --xla_force_host_platform_device_count in XLA_FLAGS)"
  ]
  assert not os.path.exists(tmp_path / "o" / "checkpoints")
