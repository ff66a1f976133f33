"""Batched JAX spectra vs the reference's per-matrix loops, on random Pythia-shaped weights.

Run: python -m benchmarks.bench_spectra [--sizes 70m,410m] [--grad-batches 11]
     [--grad-layers-410m 2]
     python -m benchmarks.bench_spectra --refine
       the cost of resolving condition numbers in float64, as a ratio (`bench_refinement`)
     python -m benchmarks.bench_spectra --routes [--repeats 3]
       per-route timings (analysis.spectra: svd, qr_svd, gram_eigh; one call over a batch
       vs a compiled loop) on the study's shapes, then the 70m gradient spectra (11 batches)
       side by side: route='svd' (the route before the rule) vs route='auto', same inputs,
       same process, and the ratio. Timings are best-of-N wall AND process-CPU seconds:
       the host may be shared, and process time is the steadier of the two there.

"Reference way" = what pretraining-playground's checkpoint_metric_computation.py does:
loop over layers and heads, build each d x d OV matrix (and the chain-rule gradient),
scipy.linalg.svdvals it, PER in Python. "Batched" = analysis.weight_spectra /
analysis.gradient_spectra under jit (per-head spectra from QR cores). Same random inputs;
the max relative difference is over every PER value both produce. Compile time is
reported separately; batched timings are the best of 3 warm runs, reference timings one
run (minutes); the machine may be shared, so the load average is printed per size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

if __package__ in (None, ""):  # allow `python benchmarks/bench_spectra.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import analysis  # noqa: E402
from analysis import spectra  # noqa: E402
from benchmarks import shapes  # noqa: E402

SHAPES = {name: shapes.spectra_shape(name) for name in ("70m", "410m")}


def random_checkpoint(shape, grad_batches, grad_layers, seed=0):
  """Flax-layout layers params and G gradient batches (value, out, fc_out kernels) for the
  first `grad_layers` layers (410m gradients of all 24 layers x 11 batches would be ~7 GB)."""
  rng = np.random.default_rng(seed)
  num_layers, d, heads, head_dim = (shape[k] for k in ("layers", "d", "heads", "head_dim"))
  f = 4 * d

  def w(scale, *dims):
    return (scale * rng.standard_normal(dims)).astype(np.float32)

  layers = {
    "attn": {
      "value": {"kernel": w(0.02, num_layers, d, heads, head_dim)},
      "out": {"kernel": w(0.02, num_layers, heads, head_dim, d)},
    },
    "mlp": {"fc_out": {"kernel": w(0.02, num_layers, f, d)}},
  }
  grads = {
    "attn": {
      "value": {"kernel": w(1e-3, grad_batches, grad_layers, d, heads, head_dim)},
      "out": {"kernel": w(1e-3, grad_batches, grad_layers, heads, head_dim, d)},
    },
    "mlp": {"fc_out": {"kernel": w(1e-3, grad_batches, grad_layers, f, d)}},
  }
  return layers, grads


# ----- the reference's way -----------------------------------------------------------------


def python_per(s, k):
  s = sorted((float(v) for v in s), reverse=True)[:k]
  total = sum(s)
  entropy = -sum(v / total * np.log(v / total) for v in s if v > 0)
  return float(np.exp(entropy)) / k


def torch_factors(layers, layer):
  """W_O [d, D] and W_V [D, d] of one layer in torch (out, in) layout."""
  value = layers["attn"]["value"]["kernel"][layer]  # [d, H, dh]
  out = layers["attn"]["out"]["kernel"][layer]  # [H, dh, d]
  d = value.shape[0]
  return out.reshape(-1, d).T, value.reshape(d, -1).T


def reference_weights(layers, shape):
  heads, head_dim, d = shape["heads"], shape["head_dim"], shape["d"]
  timings = {"ov_head": 0.0, "ov": 0.0, "mlp": 0.0}
  per = {"ov_head": [], "ov": [], "mlp": []}
  for layer in range(shape["layers"]):
    w_o, w_v = torch_factors(layers, layer)
    start = time.perf_counter()
    row = []
    for h in range(heads):
      cols = slice(h * head_dim, (h + 1) * head_dim)
      row.append(python_per(scipy.linalg.svdvals(w_o[:, cols] @ w_v[cols, :]), head_dim))
    per["ov_head"].append(row)
    timings["ov_head"] += time.perf_counter() - start
    start = time.perf_counter()
    per["ov"].append(python_per(scipy.linalg.svdvals(w_o @ w_v), d))
    timings["ov"] += time.perf_counter() - start
    start = time.perf_counter()
    dense_4h_to_h = layers["mlp"]["fc_out"]["kernel"][layer].T
    per["mlp"].append(python_per(scipy.linalg.svdvals(dense_4h_to_h), d))
    timings["mlp"] += time.perf_counter() - start
  return {k: np.array(v) for k, v in per.items()}, timings


def reference_gradients(layers, grads, shape, num_layers):
  heads, head_dim, d = shape["heads"], shape["head_dim"], shape["d"]
  num_batches = grads["mlp"]["fc_out"]["kernel"].shape[0]
  timings = {"ov_head": 0.0, "ov": 0.0, "mlp": 0.0}
  per = {"ov_head": [], "ov": [], "mlp": []}
  for layer in range(num_layers):
    w_o, w_v = torch_factors(layers, layer)
    grad_factors = [
      torch_factors(jax.tree.map(lambda g, t=t: g[t], grads), layer) for t in range(num_batches)
    ]
    start = time.perf_counter()
    row = []
    for h in range(heads):
      cols = slice(h * head_dim, (h + 1) * head_dim)
      spectra = [
        scipy.linalg.svdvals(dw_o[:, cols] @ w_v[cols, :] + w_o[:, cols] @ dw_v[cols, :])
        for dw_o, dw_v in grad_factors
      ]
      row.append(python_per(np.mean(spectra, axis=0), 2 * head_dim))
    per["ov_head"].append(row)
    timings["ov_head"] += time.perf_counter() - start
    start = time.perf_counter()
    spectra = [scipy.linalg.svdvals(dw_o @ w_v + w_o @ dw_v) for dw_o, dw_v in grad_factors]
    per["ov"].append(python_per(np.mean(spectra, axis=0), d))
    timings["ov"] += time.perf_counter() - start
    start = time.perf_counter()
    spectra = [
      scipy.linalg.svdvals(grads["mlp"]["fc_out"]["kernel"][t, layer].T) for t in range(num_batches)
    ]
    per["mlp"].append(python_per(np.mean(spectra, axis=0), d))
    timings["mlp"] += time.perf_counter() - start
  return {k: np.array(v) for k, v in per.items()}, timings


# ----- batched ----------------------------------------------------------------------------


REPEATS = 3


def timed_jit(fn, *args):
  """(compile seconds, best warm run seconds of REPEATS, output) for jax.jit(fn)(*args)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up run
  best = float("inf")
  for _ in range(REPEATS):  # best of a few: the machine may be shared
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - start)
  return compile_s, best, out


def batched_component_fns(shape):
  """Per-component jitted pieces, to report the split (the sweep calls weight_spectra)."""
  d, head_dim = shape["d"], shape["head_dim"]
  return {
    "ov_head": lambda layers: analysis.proportional_effective_rank(
      analysis.ov_head_singular_values(layers["attn"]), head_dim
    ),
    "ov": lambda layers: analysis.proportional_effective_rank(
      analysis.ov_singular_values(layers["attn"]), d
    ),
    "mlp": lambda layers: analysis.proportional_effective_rank(
      analysis.mlp_singular_values(layers["mlp"]), d
    ),
  }


def max_relative_difference(ours, reference):
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.abs(ours - reference) / np.abs(reference)))


def report(label, ref_s, ours_s, compile_s, rel):
  ratio = ref_s / ours_s if ours_s > 0 else float("inf")
  print(
    f"  {label:<22} reference {ref_s:9.3f} s   batched {ours_s:8.3f} s   "
    f"ratio {ratio:8.1f}x   compile {compile_s:6.2f} s   max rel diff {rel:.2e}"
  )
  return rel


def bench_size(name, grad_batches, grad_layers):
  shape = SHAPES[name]
  print(
    f"\n== pythia-{name}: L={shape['layers']} d={shape['d']} H={shape['heads']} "
    f"dh={shape['head_dim']}  (load average {os.getloadavg()[0]:.1f}, "
    f"{os.cpu_count()} cores)"
  )
  num_layers = grad_layers or shape["layers"]
  layers_np, grads_np = random_checkpoint(shape, grad_batches, num_layers)
  layers = jax.tree.map(jnp.asarray, layers_np)
  worst = 0.0

  ref_per, ref_times = reference_weights(layers_np, shape)
  print(" weights (one checkpoint):")
  ours_total = 0.0
  for component, fn in batched_component_fns(shape).items():
    compile_s, run_s, per = timed_jit(fn, layers)
    ours_total += run_s
    worst = max(
      worst,
      report(
        component,
        ref_times[component],
        run_s,
        compile_s,
        max_relative_difference(per, ref_per[component]),
      ),
    )
  compile_s, run_s, spectra = timed_jit(analysis.weight_spectra, layers)
  rel = max(max_relative_difference(spectra[c]["per"], ref_per[c]) for c in ref_per)
  worst = max(worst, report("all (weight_spectra)", sum(ref_times.values()), run_s, compile_s, rel))

  layers_sub = jax.tree.map(lambda a: a[:num_layers], layers_np)
  grads_sub = grads_np
  ref_per, ref_times = reference_gradients(layers_sub, grads_sub, shape, num_layers)
  note = (
    ""
    if num_layers == shape["layers"]
    else f", measured on {num_layers} of {shape['layers']} layers (both ways)"
  )
  print(f" gradients ({grad_batches} gradient batches{note}):")
  compile_s, run_s, spectra = timed_jit(
    analysis.gradient_spectra,
    jax.tree.map(jnp.asarray, grads_sub),
    jax.tree.map(jnp.asarray, layers_sub),
  )
  rel = max(max_relative_difference(spectra[c]["grad_per"], ref_per[c]) for c in ref_per)
  worst = max(
    worst, report("all (gradient_spectra)", sum(ref_times.values()), run_s, compile_s, rel)
  )
  print("   reference split: " + ", ".join(f"{c} {t:.2f} s" for c, t in ref_times.items()))
  return worst


def best_of(fn, *args, repeats=None):
  """(best wall s, best process-CPU s) of warm runs of a compiled fn."""
  jax.block_until_ready(fn(*args))
  wall = cpu = float("inf")
  for _ in range(repeats or REPEATS):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall = min(wall, time.perf_counter() - start)
    cpu = min(cpu, time.process_time() - start_cpu)
  return wall, cpu


ROUTE_SHAPES = (  # (count, m, n): 70m MLP gradient, 70m OV, a head's 2dh core
  (6, 2048, 512),
  (6, 512, 512),
  (48, 128, 128),
)


def bench_route_errors():
  """The error constants of analysis.spectra: Gram eigenvalue error in eps * s_max^2 and SVD
  error in sqrt(k) * eps * s_max, on U diag(s) V^T with log-spaced s (float64 truth)."""
  import scipy.stats

  from analysis import spectra

  rng = np.random.default_rng(1)
  eps = np.finfo(np.float32).eps
  gram_worst = svd_worst = 0.0
  cases = (((2048, 512), 1e3), ((512, 512), 1e6), ((512, 128), 1e1), ((1024, 64), 1e6))
  for (m, n), kappa in cases:
    s = np.logspace(0, -np.log10(kappa), n)
    u = scipy.stats.ortho_group.rvs(m, random_state=rng)[:, :n]
    v = scipy.stats.ortho_group.rvs(n, random_state=rng)
    a = jnp.asarray((u * s) @ v.T, jnp.float32)
    truth = scipy.linalg.svdvals(np.asarray(a, np.float64))
    gram = jnp.matmul(a.T, a, precision=jax.lax.Precision.HIGHEST)
    eigenvalues = np.sort(np.asarray(jnp.linalg.eigvalsh(gram), np.float64))[::-1]
    gram_worst = max(gram_worst, np.max(np.abs(eigenvalues - truth**2)) / (eps * truth[0] ** 2))
    svd = np.asarray(spectra.singular_values(a, "svd"), np.float64)
    svd_worst = max(svd_worst, np.max(np.abs(svd - truth)) / (np.sqrt(n) * eps * truth[0]))
  print(
    f"errors: Gram eigenvalues <= {gram_worst:.2f} eps s_max^2 (GRAM_EIGENVALUE_ERROR = "
    f"{spectra.GRAM_EIGENVALUE_ERROR}); SVD <= {svd_worst:.2f} sqrt(k) eps s_max "
    f"(SVD_ERROR_PER_SQRT_DIM = {spectra.SVD_ERROR_PER_SQRT_DIM})"
  )


def bench_routes():
  """Per-route seconds per matrix; the constants of analysis.spectra.choose_route."""
  from analysis import spectra

  rng = np.random.default_rng(0)
  print(f"per-route seconds per matrix ({jax.default_backend()}; wall / process CPU):")
  for count, m, n in ROUTE_SHAPES:
    batch = jnp.asarray(rng.standard_normal((count, m, n)), jnp.float32)
    cells = []
    for route in ("svd", "qr_svd", "gram_eigh"):
      variants = [
        ("loop", lambda a, r=route: jax.lax.map(lambda x: spectra.singular_values(x, r), a))
      ]
      if min(m, n) < 256:  # one batched LAPACK call over large matrices is ~10x slower
        variants.append(("batched", lambda a, r=route: spectra.singular_values(a, r)))
      for how, fn in variants:
        wall, cpu = best_of(jax.jit(fn), batch)
        cells.append(f"{route}/{how} {wall / count:.4f}/{cpu / count:.4f}")
    print(f"  {m}x{n} (x{count}): " + "  ".join(cells), flush=True)
  picks = (f"{m}x{n} -> {spectra.choose_route((m, n))}" for _, m, n in ROUTE_SHAPES)
  print("  rule picks: " + ", ".join(picks))


def model_gradients(grad_batches, sequences=4, seq_len=128, seed=0):
  """Real gradients: G backward passes of a random-init 70m-shaped model
  (jax_pythia.models.gpt_neox) on random tokens. Unlike Gaussian noise they have the
  structure of the study's gradients (e.g. LayerNorm leaves the MLP and W_O gradients an
  exact null direction, and the spectra spread over orders of magnitude), which decides
  whether the guarded Gram route is taken.
  Returns (grads with leaves [G, L, ...], params['layers'])."""
  from jax_pythia.models import model as model_lib
  from jax_pythia.models.config import GPTNeoXConfig

  shape = SHAPES["70m"]
  config = GPTNeoXConfig(
    vocab_size=50304,
    d_model=shape["d"],
    n_layers=shape["layers"],
    n_heads=shape["heads"],
    d_mlp=4 * shape["d"],
  )
  params = model_lib.init_params(config, jax.random.PRNGKey(seed))
  wrt = ("attn.value.kernel", "attn.out.kernel", "mlp.fc_out.kernel")
  grad_fn = jax.jit(lambda p, t: model_lib.loss_and_grads(p, t, config, wrt)[1])
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), grad_batches)
  grads = [grad_fn(params, jax.random.randint(k, (sequences, seq_len + 1), 0, 50277)) for k in keys]
  return jax.tree.map(lambda *g: jnp.stack(g), *grads), params["layers"]


def bench_gradient_routes(grad_batches):
  """70m gradient spectra, route='svd' (before) vs route='auto', same inputs and process."""
  from analysis import spectra

  grads, layers = model_gradients(grad_batches)
  mlp = grads["mlp"]["fc_out"]["kernel"]
  accepted = np.asarray(spectra._gram_values(mlp.reshape(-1, *mlp.shape[-2:]))[1])
  print(
    f"guarded Gram route on the real MLP gradients: accepted {accepted.sum()} of "
    f"{accepted.size} (others fall back to QR+SVD)"
  )
  results = {}
  for route in ("svd", "auto"):
    fn = jax.jit(lambda g, p, r=route: analysis.gradient_spectra(g, p, route=r))
    results[route] = (best_of(fn, grads, layers), fn(grads, layers))
  (old_wall, old_cpu), old = results["svd"]
  (new_wall, new_cpu), new = results["auto"]
  rel = max(
    max_relative_difference(new[c][m], old[c][m])
    for c in analysis.COMPONENTS
    for m in ("grad_per", "grad_effective_rank")
  )
  print(
    f"70m gradient spectra ({grad_batches} real gradient batches, best of {REPEATS}): "
    f"route='svd' {old_wall:.2f} s wall / {old_cpu:.2f} s CPU, route='auto' {new_wall:.2f} s "
    f"wall / {new_cpu:.2f} s CPU; ratio {old_wall / new_wall:.2f}x wall, "
    f"{old_cpu / new_cpu:.2f}x CPU; max rel diff of PER/ER {rel:.1e} "
    f"(load average {os.getloadavg()[0]:.1f})"
  )


def bench_refinement(repeats=None):
  """The cost of resolving condition numbers in float64 (analysis.spectra.refine_
  singular_values) on 70m-shaped weights: every spectral metric of the three components
  with the condition number (refined where float32 cannot resolve it) against the same
  without it (no refinement), as a ratio. Twice: random weights (float32 resolves them:
  only the check runs) and weights whose spectra span 1e6 (every matrix recomputed)."""
  from analysis import protocol

  shape = SHAPES["70m"]
  layers, _ = random_checkpoint(shape, 1, 0)
  dh, d = shape["head_dim"], shape["d"]
  wide = {
    "attn": {
      "value": {"kernel": layers["attn"]["value"]["kernel"] * np.logspace(0, -6, dh)},
      "out": layers["attn"]["out"],
    },
    "mlp": {"fc_out": {"kernel": layers["mlp"]["fc_out"]["kernel"] * np.logspace(0, -6, d)}},
  }
  wide = jax.tree.map(lambda x: np.asarray(x, np.float32), wide)
  spectral = tuple(analysis.metrics_in_family("spectral"))
  plain = tuple(n for n in spectral if n != "condition_number")
  plan = lambda names: tuple((c, names) for c in ("mlp", "ov", "ov_head"))  # noqa: E731
  print(f"float64 refinement of condition numbers, 70m weights, {jax.devices()[0].platform}")
  for label, params in (("random, as drawn", layers), ("spectra over 1e6", wide)):
    times = {}
    for key, names in (("without", plain), ("with", spectral)):
      fn = jax.jit(lambda p, names=names: protocol.weight_values(p, "per_head", plan(names)))
      times[key] = best_of(fn, params, repeats=repeats)
    out = jax.jit(lambda p: protocol.weight_values(p, "per_head", plan(("condition_number",))))(
      params
    )
    nan = sum(int(np.isnan(np.asarray(v["condition_number"])).sum()) for v in out.values())
    total = sum(np.asarray(v["condition_number"]).size for v in out.values())
    unresolved = _float32_unresolved(params, shape)
    ratio = times["with"][0] / times["without"][0]
    cpu = times["with"][1] / times["without"][1]
    print(
      f"  {label:26s} without {times['without'][0]:.3f} s, with {times['with'][0]:.3f} s: "
      f"{ratio:.2f}x wall, {cpu:.2f}x process CPU; unresolved in float32: {unresolved} "
      f"of {total}, NaN after: {nan}"
    )


def _float32_unresolved(params, shape):
  """How many of the weights' condition numbers float32 alone leaves NaN."""
  attn = params["attn"]
  s_k = (
    (analysis.ov_head_singular_values(attn), shape["head_dim"]),
    (analysis.ov_singular_values(attn), shape["d"]),
    (analysis.mlp_singular_values(params["mlp"]), shape["d"]),
  )
  return sum(int(np.isnan(np.asarray(spectra.condition_number(s, k))).sum()) for s, k in s_k)


def main(argv=None):
  global REPEATS
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="70m,410m")
  parser.add_argument("--grad-batches", type=int, default=11)
  parser.add_argument("--repeats", type=int, default=REPEATS)
  parser.add_argument(
    "--grad-layers-410m",
    type=int,
    default=2,
    help="layers of 410m used for the gradient comparison (0 = all 24)",
  )
  parser.add_argument("--routes", action="store_true", help="per-route and old-vs-new timings")
  parser.add_argument(
    "--refine", action="store_true", help="the cost of the float64 condition-number refinement"
  )
  parser.add_argument(
    "--no-route-table", action="store_true", help="with --routes: only the old-vs-new timing"
  )
  args = parser.parse_args(argv)
  REPEATS = args.repeats
  if args.refine:
    bench_refinement()
    return 0
  if args.routes:
    print(f"jax {jax.__version__}; float32; {os.cpu_count()} cores")
    if not args.no_route_table:
      bench_route_errors()
      bench_routes()
    bench_gradient_routes(args.grad_batches)
    return 0
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float32")
  worst = 0.0
  for name in args.sizes.split(","):
    grad_layers = args.grad_layers_410m if name == "410m" else 0
    worst = max(worst, bench_size(name, args.grad_batches, grad_layers))
  print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
  print(
    f"\nmax relative difference of PER over everything: {worst:.2e} "
    f"({'ok' if worst <= 1e-4 else 'ABOVE 1e-4'})"
  )
  return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
  sys.exit(main())
