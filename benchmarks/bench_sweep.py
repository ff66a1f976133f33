"""End to end: the reference's method against the sweep, same checkpoints, same tokens.

  python -m benchmarks.bench_sweep [--checkpoints 3 --seq 128 --gradient_sequences 16]

Writes a local suite of random pythia-70m-shaped checkpoints (fp16 safetensors, as on the
Hub) and a token stream, then times per checkpoint:

- the reference's way (docs/method.md, written out here): `from_pretrained`, PyTorch forward
  hooks on the fused qkv and dense_4h_to_h, numpy CKA per layer and per head, and Python
  loops over layers and heads building every d x d OV matrix (weights and, by the chain
  rule, the gradients of the 11 batches around the step) for `np.linalg.svd`;
- `jax_pythia.sweep.run.Sweep` with the same options (per-head values, CKA to the final
  checkpoint, weight and gradient spectra), the next checkpoint loading in the background.

Prints seconds per checkpoint for both (the sweep's with and without its one-off
compilation), the ratio, and the sweep's load time next to its compute time: loading is
hidden when the wall time per checkpoint is about the compute time alone.

First of all it measures the matmul peak of this CPU (`benchmarks.throughput`), and after the
sweep it times the gradient pass of one checkpoint alone (11 batches, forward + backward):
its executed FLOP/s as a fraction of that peak, its MFU (6 N convention), and the ceiling
on the ratio that this pass alone sets (the reference's time over the pass's: what the
sweep would reach if everything else were free). The peak is measured again at the end: on
a shared machine the two readings show the noise.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from transformers import GPTNeoXConfig as HFConfig
from transformers import GPTNeoXForCausalLM

from benchmarks import shapes, throughput
from jax_pythia import data, sweep
from jax_pythia.checkpoints import sources
from jax_pythia.checkpoints.hub import load_checkpoint
from jax_pythia.study import checkpoint as study
from jax_pythia.sweep import results

STEP_EVERY = 10


def write_suite(root, n_checkpoints, seq, sequences_per_step):
  steps = [STEP_EVERY * i for i in range(n_checkpoints)]
  n_items = (steps[-1] + 1) * sequences_per_step
  rng = np.random.default_rng(0)
  data.write_mmap_indexed_dataset(
    os.path.join(root, "data", "train"), (rng.integers(0, 50277, seq + 1) for _ in range(n_items))
  )
  for step in steps:
    torch.manual_seed(step)
    model = GPTNeoXForCausalLM(HFConfig(**shapes.hf_kwargs("70m"))).to(torch.float16)
    model.save_pretrained(os.path.join(root, "pythia-70m-shaped", f"step{step}"))
  return steps


# ---- the reference's method ------------------------------------------------------------


def np_cka(x, y):
  x = x - x.mean(0)
  y = y - y.mean(0)
  return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def np_per(s, k):
  s = s[:k]
  p = s / s.sum()
  return float(np.exp(-(p * np.log(p)).sum()) / k)


def reference_checkpoint(
  directory, inputs, gradient_batches, final_acts, device="cpu", microbatch=0, marks=None
):
  """The reference's metrics of one checkpoint. On `device` (torch), each gradient batch in
  microbatches of `microbatch` sequences (0: whole), their gradients accumulated. `marks`,
  a list, gets time.perf_counter() before the first gradient batch and after each."""
  model = GPTNeoXForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).eval()
  cfg = model.config
  d, heads = cfg.hidden_size, cfg.num_attention_heads
  dh = d // heads
  layers = model.gpt_neox.layers
  store = {}
  hooks = []
  for l, layer in enumerate(layers):
    hooks.append(
      layer.attention.query_key_value.register_forward_hook(
        lambda m, a, o, l=l: store.setdefault(("qkv", l), []).append(
          o[:, -1].detach().cpu().numpy()
        )
      )
    )
    hooks.append(
      layer.mlp.dense_4h_to_h.register_forward_hook(
        lambda m, a, o, l=l: store.setdefault(("mlp", l), []).append(
          o[:, -1].detach().cpu().numpy()
        )
      )
    )
  with torch.no_grad():
    for chunk in np.array_split(inputs, max(1, len(inputs) // (microbatch or len(inputs)))):
      model(torch.tensor(chunk, device=device))
  for h in hooks:
    h.remove()
  store = {key: np.concatenate(chunks) for key, chunks in store.items()}
  results, acts = {}, {}
  weights = {}
  for l, layer in enumerate(layers):
    w_qkv = layer.attention.query_key_value.weight.detach().cpu().numpy().reshape(heads, 3, dh, d)
    w_v = w_qkv[:, 2].reshape(d, d)  # rows of head h: its value projection
    w_o = layer.attention.dense.weight.detach().cpu().numpy()
    w_mlp = layer.mlp.dense_4h_to_h.weight.detach().cpu().numpy()
    weights[l] = (w_v, w_o)
    v = store[("qkv", l)].reshape(len(inputs), heads, 3, dh)[:, :, 2].reshape(len(inputs), d)
    acts[("ov", l)] = v @ w_o.T
    acts[("mlp", l)] = store[("mlp", l)]
    for h in range(heads):
      acts[("ov_head", l, h)] = v[:, h * dh : (h + 1) * dh] @ w_o[:, h * dh : (h + 1) * dh].T
      ov_h = w_o[:, h * dh : (h + 1) * dh] @ w_v[h * dh : (h + 1) * dh]
      results[("per", "ov_head", l, h)] = np_per(np.linalg.svd(ov_h, compute_uv=False), dh)
    results[("per", "ov", l)] = np_per(np.linalg.svd(w_o @ w_v, compute_uv=False), d)
    results[("per", "mlp", l)] = np_per(np.linalg.svd(w_mlp, compute_uv=False), d)
  reference = final_acts if final_acts is not None else acts
  for key, x in acts.items():
    results[("cka",) + key] = np_cka(x, reference[key])
  grad_s = {}
  previous = {}
  cosines = {}
  if marks is not None:
    marks.append(time.perf_counter())
  for batch in gradient_batches:
    model.zero_grad()
    parts = np.array_split(batch, max(1, len(batch) // (microbatch or len(batch))))
    for part in parts:
      tokens = torch.tensor(part.astype(np.int64), device=device)
      logits = model(tokens[:, :-1]).logits
      loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
      )
      (loss / len(parts)).backward()
      del logits, loss
    for l, layer in enumerate(layers):
      w_v, w_o = weights[l]
      g_qkv = layer.attention.query_key_value.weight.grad.cpu().numpy().reshape(heads, 3, dh, d)
      g_v = g_qkv[:, 2].reshape(d, d)
      g_o = layer.attention.dense.weight.grad.cpu().numpy()
      g_mlp = layer.mlp.dense_4h_to_h.weight.grad.cpu().numpy()
      mats = {("mlp", l): g_mlp, ("ov", l): g_o @ w_v + w_o @ g_v}
      for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        mats[("ov_head", l, h)] = g_o[:, sl] @ w_v[sl] + w_o[:, sl] @ g_v[sl]
      for key, g in mats.items():
        grad_s.setdefault(key, []).append(np.linalg.svd(g, compute_uv=False))
        if key in previous:
          cosines.setdefault(key, []).append(
            np.sum(g * previous[key]) / np.linalg.norm(g) / np.linalg.norm(previous[key])
          )
        previous[key] = g
    if marks is not None:
      marks.append(time.perf_counter())
  for key, s in grad_s.items():
    k = 2 * dh if key[0] == "ov_head" else d
    results[("grad_per",) + key] = np_per(np.mean(s, axis=0), k)
    results[("grad_cosine",) + key] = float(np.mean(cosines.get(key, [np.nan])))
  return results, acts


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoints", type=int, default=3)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--n_sequences", type=int, default=128)
  parser.add_argument("--gradient_sequences", type=int, default=16)
  parser.add_argument("--peak_n", type=int, default=2048, help="matmul size of the peak")
  args = parser.parse_args()
  peak = throughput.matmul_peak(args.peak_n, "float32")
  print(
    f"matmul peak of this CPU: {peak / 1e9:.1f} GFLOP/s (float32, {args.peak_n}^3, best run; "
    "the machine is shared, so every figure below is noisy)"
  )
  root = tempfile.mkdtemp(prefix="bench_sweep_")
  steps = write_suite(root, args.checkpoints, args.seq, args.n_sequences)
  final = steps[-1]
  source = data.open_token_source(
    os.path.join(root, "data", "train"), sequences_per_step=args.n_sequences
  )
  inputs = source.batch(final - 1, args.n_sequences)[:, :-1]
  model_dir = os.path.join(root, "pythia-70m-shaped")
  print(
    f"{args.checkpoints} pythia-70m-shaped checkpoints (fp16 safetensors), "
    f"{args.n_sequences} x {args.seq} tokens (last token), gradients on 11 batches of "
    f"{args.gradient_sequences} sequences; torch threads {torch.get_num_threads()}"
  )

  start = time.perf_counter()
  final_acts = None
  reference_rows = {}
  for step in [final] + [s for s in steps if s != final]:
    batches = [
      source.batch(s, args.gradient_sequences) for s in sweep.gradient_steps(step, 5, final - 1)
    ]
    rows, acts = reference_checkpoint(
      os.path.join(model_dir, f"step{step}"), inputs, batches, final_acts
    )
    final_acts = final_acts or acts
    reference_rows[step] = rows
  t_reference = (time.perf_counter() - start) / len(steps)

  out = os.path.join(root, "out")
  models = sources.resolve_models([model_dir])
  options = sweep.SweepOptions(
    n_sequences=args.n_sequences, gradient_sequences=args.gradient_sequences
  )
  runner = sweep.Sweep(models, "all", source, out, options)
  start = time.perf_counter()
  runner.run()
  t_sweep_total = time.perf_counter() - start
  _, status = results.collect(out)
  compute = status.compute_s.to_numpy()
  load = status.load_s.to_numpy()
  t_first = float(status.set_index("step").loc[final, "compute_s"])
  t_steady = (t_sweep_total - t_first) / max(len(steps) - 1, 1)

  metrics, _ = results.collect(out)
  worst = 0.0
  for step, rows in reference_rows.items():
    got = metrics[metrics.step == step].set_index(["metric", "component", "layer", "head"])
    for key, want in rows.items():
      metric, component, layer = key[:3]
      head = key[3] if len(key) > 3 else -1
      if metric == "cka" and step == final:
        continue
      value = got.loc[(metric, component, layer, head), "value"]
      worst = max(worst, abs(value - want) / max(abs(want), 1e-6))
  print(f"  reference (torch hooks + numpy loops): {t_reference:8.2f} s/checkpoint")
  print(
    f"  jax_pythia sweep, all checkpoints    : {t_sweep_total / len(steps):8.2f} "
    f"s/checkpoint (incl. compiling once: {t_first:.1f} s for the first)"
  )
  print(f"  jax_pythia sweep, after the first    : {t_steady:8.2f} s/checkpoint")
  print(
    f"  ratio reference / sweep: {t_reference / (t_sweep_total / len(steps)):.1f}x overall, "
    f"{t_reference / t_steady:.1f}x steady state"
  )
  print(
    f"  sweep load (background thread) {np.mean(load[1:]):.2f} s vs compute "
    f"{np.mean(compute[1:]):.2f} s per checkpoint after the first: the wall time per "
    f"checkpoint ({t_steady:.2f} s) is the compute alone when loading is hidden"
  )
  print(
    f"  max relative difference of the {sum(map(len, reference_rows.values()))} "
    f"reference values: {worst:.2e}"
  )
  fwd_bwd(model_dir, final, source, args, peak, t_steady, t_reference)


def fwd_bwd(model_dir, final, source, args, peak, t_steady, t_reference):
  """Times the gradient pass of one checkpoint alone (compiled ahead, run once)."""
  config, params = load_checkpoint(os.path.join(model_dir, f"step{final}"), dtype="float32")
  value_slice = sweep.SweepOptions().value_slice
  steps = sweep.gradient_steps(final, 5, final - 1)
  batches = np.stack([source.batch(s, args.gradient_sequences) for s in steps])[:, None]
  fn = study.gradient_fn(config, value_slice).lower(params, batches).compile()
  seconds = throughput.timed(fn, params, batches)
  flops = throughput.fwd_bwd_flops(
    config,
    batches.shape[0] * args.gradient_sequences,
    args.seq,
    study.gradient_weights(value_slice),
  )
  executed, mfu = flops["executed"] / seconds, flops["model"] / seconds
  print(
    f"  forward+backward, {batches.shape[0]} batches of {args.gradient_sequences} x {args.seq}: "
    f"{seconds:.2f} s ({100 * seconds / t_steady:.0f}% of the steady checkpoint), "
    f"{executed / 1e9:.1f} GFLOP/s executed = {100 * executed / peak:.0f}% of the matmul peak; "
    f"MFU {100 * mfu / peak:.0f}% (6N convention: it counts every weight's gradient, "
    "the pass forms only the study's, so it can pass 100%)"
  )
  print(
    f"  ceiling: reference / this gradient pass alone = {t_reference / seconds:.2f}x (the ratio "
    "the sweep would reach if activations, spectra and loading cost nothing; the pass computes "
    "the same losses and gradients as the reference's torch backward)"
  )
  again = throughput.matmul_peak(args.peak_n, "float32")
  print(f"  matmul peak measured again at the end: {again / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
  main()
