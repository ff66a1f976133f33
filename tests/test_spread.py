"""The spectra split by layer over a CPU mesh (study.spread_*, sharding.layer_mesh) against
the same calls on one device: weight spectra and streamed gradient statistics, with the
gradients and the carried previous batch split by layer, never whole on one device.

Several CPU devices need XLA_FLAGS before JAX starts: each mesh runs in a subprocess under
a timeout (a deadlocked CPU mesh fails within minutes), as in tests/test_sharding.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_sharding import ROOT, env_with_devices

# argv: mesh spec, n_layers. Prints JSON: the largest relative differences and how the
# arrays were split.
PROGRAM = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax_pythia.models import model
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.scale import sharding
from jax_pythia.study import checkpoint as study
from jax_pythia.study import streamed

spec, n_layers = sys.argv[1], int(sys.argv[2])
config = GPTNeoXConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, d_mlp=128,
                       max_seq_len=16)
params = model.init_params(config, jax.random.PRNGKey(3))
batches = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (3, 2, 4, 17), 0, 64))
out = {}
for vs in ("per_head", "reference"):
  one = study.batch_gradient_fn(config, vs)
  # The mesh: gradients computed sharded, then split by layer for the spectra.
  place = sharding.Placement(sharding.make_mesh(spec))
  sharded = place.params(params, config)
  spread = place.layer_mesh(n_layers)
  layers = place.onto_layers(sharded["layers"], spread)
  splits, on_host = [], []
  def grads():
    for b in batches:
      g = one(sharded, place.batch(b, 1))[1]
      on_host.append(jax.tree.map(place.host, g))
      g = place.onto_layers(g, spread)
      splits.append(sorted({s.data.shape[0] for x in jax.tree.leaves(g)
                            for s in x.addressable_shards}))
      yield g
  got = streamed.streamed_gradient_metrics(grads(), layers, vs, spread, place.host)
  got_w = jax.tree.map(place.host, study.spread_weight_metrics(vs, spread)(layers))
  # The same gradients and weights reduced on one device, no mesh.
  device = jax.devices()[0]
  single = streamed.streamed_gradient_metrics(
    (jax.device_put(g, device) for g in on_host), jax.device_put(params["layers"], device), vs)
  single_w = study.weight_metrics(jax.device_put(params["layers"], device), vs)
  def rel(x, y):  # equal values (inf, NaN alike) differ by 0; NaN against a number: inf
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    with np.errstate(invalid="ignore"):
      d = np.abs(x - y) / np.maximum(np.abs(y), 1e-6)
    d[(x == y) | (np.isnan(x) & np.isnan(y))] = 0
    return float(np.nan_to_num(d, nan=np.inf).max())
  def worst(a, b):
    return max(jax.tree.leaves(jax.tree.map(rel, a, b)))
  out[vs] = {"grad": worst(got, single), "weights": worst(got_w, single_w),
             "devices": spread.devices.size, "groups": spread.shape["layers"],
             "layers_per_device": splits,
             "weight_split": sorted({s.data.shape[0] for x in jax.tree.leaves(layers)
                                     for s in x.addressable_shards})}
print(json.dumps(out))
"""


@pytest.mark.parametrize(
  "mesh, n_layers, groups",
  [("data:2,model:2", 4, 4), ("model:4", 6, 2)],  # L = 6 on 4 devices: 2 groups of 3 layers
)
def test_spread_spectra_equal_one_device(mesh, n_layers, groups):
  try:
    proc = subprocess.run(
      [sys.executable, "-c", PROGRAM, mesh, str(n_layers)],
      env=env_with_devices(4),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=420,
    )
  except subprocess.TimeoutExpired:
    pytest.fail(f"spectra split by layer on mesh {mesh} hung (420 s)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  per_device = n_layers // groups
  for value_slice, r in result.items():
    assert (r["devices"], r["groups"]) == (4, groups), (value_slice, r)
    # Every batch's gradients and the weights split by layer: no device holds them whole.
    assert r["layers_per_device"] == [[per_device]] * 3, (value_slice, r)
    assert r["weight_split"] == [per_device], (value_slice, r)
    assert r["grad"] <= 1e-5, (value_slice, r)
    assert r["weights"] <= 1e-5, (value_slice, r)
