"""One prepared accelerator run: what the study costs on a GPU (or TPU), in one command.

  PYTHONPATH=. python3 -m benchmarks.accelerator [--budget_s 420] [--out run.json]
  python -m benchmarks.accelerator --smoke --out /tmp/smoke.json   # tiny shapes, CPU, seconds

Made for the accelerator machine's own python3 (jax with CUDA, flax, torch, transformers,
pandas): it installs and fetches nothing, so checkpoints are random and tokens are random.
Parts, in this order, each guarded by the time left in --budget_s and by its own
try/except (a failure is printed and recorded, and the run goes on):

  device     the device and its measured matmul peaks: bfloat16, float32 at the default
             precision (TF32 on recent NVIDIA GPUs) and float32 at HIGHEST
  reference  the reference's method (`bench_sweep.reference_checkpoint`: Hugging Face torch
             with forward hooks, numpy/scipy metrics) on a 160m-shaped checkpoint on the
             same device; its gradient batches are timed one by one and the per-checkpoint
             time is projected to 11 batches. It runs first, while JAX holds little memory.
  study      random 160m-, 410m- and 1.4b-shaped checkpoints, bfloat16 and float32, under
             the study's protocol: activations of 128 sequences x 2048 tokens (last token),
             CKA to a reference, weight spectra, gradients of 11 batches of 128 x 2048
             tokens in microbatches, their spectra. Every function is compiled ahead
             (compile seconds recorded apart) and run once; the gradient pass is timed on
             one batch and counted 11 times. Reported: seconds per checkpoint and the
             forward+backward MFU (6N convention, `benchmarks.throughput`) against the
             measured peak of the dtype. A shape is skipped, with the reason, when the
             smaller one's rates say it cannot finish in the time left.
  deviation  CKA, PER (weights and gradients) and loss of the 160m checkpoint in bfloat16
             against float32: max absolute and relative differences
  spectra    seconds per route of analysis.spectra (svd, qr_svd, guarded gram_eigh, auto)
             on the 160m matrices: weights and one batch of real gradients, with how many
             of them the Gram route's guard accepts

Order: device, reference, 160m float32 and bfloat16, deviation, spectra, then the larger
shapes in bfloat16, then in float32. Seconds per checkpoint leave loading out (the sweep
loads the next checkpoint in a background thread); the reference's include from_pretrained.

Results go, after every part, to JSON ($OUT/accelerator.json when $OUT is set, else --out)
and a Markdown section beside it; at the end that section, dated, is appended to
--results_md (benchmarks/RESULTS.md). Only $OUT comes back from a lent machine: record its
JSON in this repository's RESULTS.md with `--record accelerator.json`. `--smoke` runs every
part on tiny shapes on CPU (tests/test_accelerator.py) and appends nothing unless
--results_md is given.
"""

from __future__ import annotations

import os

# Before jax is imported: JAX must not take 75% of the GPU up front, since the torch
# reference shares the device, and each part's arrays are freed before the next.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import throughput  # noqa: E402
from jax_pythia import files  # noqa: E402
from jax_pythia.models import model as model_lib  # noqa: E402
from jax_pythia.models.config import GPTNeoXConfig  # noqa: E402
from jax_pythia.scale import plan
from jax_pythia.study import checkpoint as study
from jax_pythia.study import streamed as streaming

VALUE_SLICE = "per_head"
GRADIENT_BATCHES = 11  # 2 x window 5 + 1


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The study's per-checkpoint work and the shapes to run it on."""

  shapes: dict[str, GPTNeoXConfig]
  seq_len: int = 2048
  n_sequences: int = 128
  gradient_sequences: int = 128
  peak_n: int = 8192
  reference_shape: str = "160m"
  reference_batches: int = 1  # timed one by one, projected to GRADIENT_BATCHES
  reference_microbatch: int = 4


def pythia_config(name: str) -> GPTNeoXConfig:
  from jax_pythia import suite

  s = suite.SIZES[name]
  return GPTNeoXConfig(
    vocab_size=s.vocab_size,
    d_model=s.d_model,
    n_layers=s.n_layers,
    n_heads=s.n_heads,
    d_mlp=s.d_mlp,
  )


def full_protocol() -> Protocol:
  return Protocol({name: pythia_config(name) for name in ("160m", "410m", "1.4b")})


def smoke_protocol() -> Protocol:
  tiny = dict(vocab_size=512, n_layers=2, max_seq_len=64)
  return Protocol(
    {
      "160m": GPTNeoXConfig(d_model=64, n_heads=4, d_mlp=256, **tiny),
      "410m": GPTNeoXConfig(d_model=96, n_heads=4, d_mlp=384, **tiny),
    },
    seq_len=32,
    n_sequences=8,
    gradient_sequences=8,
    peak_n=256,
    reference_batches=2,
    reference_microbatch=4,
  )


# ------------------------------------------------------------------------------ run state


class Budget:
  def __init__(self, seconds: float):
    self.start, self.seconds = time.perf_counter(), seconds

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.start)


class Report:
  """Results as they come: printed, and rewritten (atomically) after every part."""

  def __init__(self, json_path: str):
    self.json_path = json_path
    self.md_path = os.path.splitext(json_path)[0] + ".md"
    self.data: dict = {
      "started_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
      "host": platform.node(),
      "jax": jax.__version__,
      "parts": {},
      "errors": {},
      "skipped": {},
    }

  def part(self, name: str, value) -> None:
    self.data["parts"][name] = value
    print(f"[{name}] {json.dumps(value, default=_plain)}", flush=True)
    self.save()

  def error(self, name: str, exc: BaseException) -> None:
    line = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    self.data["errors"][name] = line
    print(f"[{name}] FAILED {line}", flush=True)
    traceback.print_exc()
    self.save()

  def skip(self, name: str, why: str) -> None:
    self.data["skipped"][name] = why
    print(f"[{name}] skipped: {why}", flush=True)
    self.save()

  def save(self) -> None:
    text = json.dumps(self.data, indent=1, default=_plain)
    files.atomic_write(self.json_path, lambda p: open(p, "w").write(text), suffix=".json")
    md = markdown(self.data)
    files.atomic_write(self.md_path, lambda p: open(p, "w").write(md), suffix=".md")


def _plain(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  return str(x)


def guarded(report: Report, name: str, fn, *args):
  try:
    return fn(*args)
  except (KeyboardInterrupt, SystemExit):
    raise
  except BaseException as exc:  # noqa: BLE001 - every failure is recorded and the run goes on
    report.error(name, exc)
    return None


# ---------------------------------------------------------------------------------- parts


def device_part(protocol: Protocol) -> dict:
  device = jax.devices()[0]
  n = protocol.peak_n
  return {
    "platform": device.platform,
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
    "peak_flops": {
      "bfloat16": throughput.matmul_peak(n, "bfloat16"),
      "float32": throughput.matmul_peak(n, "float32"),
      "float32_highest": throughput.matmul_peak(n, "float32", "highest"),
    },
  }


def random_params(config: GPTNeoXConfig, seed: int, dtype) -> dict:
  init = jax.jit(model_lib.init_params, static_argnums=(0, 2))
  return init(config, jax.random.PRNGKey(seed), jnp.dtype(dtype))


def device_bytes() -> float | None:
  try:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("bytes_limit")) or None
  except Exception:  # noqa: BLE001 - CPU devices have no memory stats
    return None


def gradient_microbatch(config, protocol: Protocol, dtype: str) -> int:
  """The largest microbatch dividing gradient_sequences that `plan` says fits in half of
  the device memory (all of it on a device that reports none)."""
  limit = device_bytes()
  shape = throughput.shape_of(config, protocol.seq_len)
  candidates = [m for m in range(protocol.gradient_sequences, 0, -1)]
  candidates = [m for m in candidates if protocol.gradient_sequences % m == 0]
  if limit is None:
    return candidates[0]
  for mb in candidates:
    work = plan.Work(
      n_sequences=protocol.n_sequences,
      gradient_sequences=protocol.gradient_sequences,
      gradient_microbatch=mb,
      dtype=dtype,
    )
    if plan.memory_per_device(shape, work, {})["total"] < 0.5 * limit:
      return mb
  return 1


def activation_chunk(config, protocol: Protocol) -> int:
  """Sequences per activation call: the full s x s scores of every head (a few float32
  copies) stay under a quarter of the device memory."""
  limit = device_bytes()
  if limit is None:
    return protocol.n_sequences
  per_sequence = 4 * 4 * config.n_heads * protocol.seq_len**2
  chunk = max(1, min(protocol.n_sequences, int(0.25 * limit // per_sequence)))
  while protocol.n_sequences % chunk:
    chunk -= 1
  return chunk


def compiled(fn, *args, **static):
  """(executable, compile seconds) of a jitted fn for these arguments."""
  start = time.perf_counter()
  exe = fn.lower(*args, **static).compile()
  return exe, time.perf_counter() - start


def run_activations(config, params, tokens, idx, chunk, exe=None):
  """(acts, seconds, compile seconds, executable): {component: array} of all sequences,
  `chunk` sequences per call."""
  compile_s = 0.0
  if exe is None:
    exe, compile_s = compiled(
      study.activation_fn(config, VALUE_SLICE), params, tokens[:chunk], idx[:chunk]
    )
  start = time.perf_counter()
  parts = [
    exe(params, tokens[i : i + chunk], idx[i : i + chunk]) for i in range(0, len(tokens), chunk)
  ]
  # The sequence axis is the one before the features in every component.
  acts = {k: jnp.concatenate([p[k] for p in parts], axis=-2) for k in parts[0]}
  jax.block_until_ready(acts)
  return acts, time.perf_counter() - start, compile_s, exe


def study_checkpoint(config, protocol: Protocol, dtype: str, seed: int, keep: bool = False):
  """Times the protocol on one random checkpoint; (figures, metrics or None)."""
  rng = np.random.default_rng(seed)
  s, n = protocol.seq_len, protocol.n_sequences
  params = random_params(config, seed, dtype)
  tokens = rng.integers(0, config.vocab_size, (n, s), dtype=np.int32)
  idx = np.full((n, 1), s - 1, np.int32)
  chunk = activation_chunk(config, protocol)
  seconds, compile_s = {}, {}
  acts, seconds["activations"], compile_s["activations"], act_exe = run_activations(
    config, params, tokens, idx, chunk
  )

  cka_exe, compile_s["cka"] = compiled(study.cka_against, acts, acts)
  seconds["cka"] = throughput.timed(cka_exe, acts, acts)

  layers = params["layers"]
  exe, compile_s["weight_spectra"] = compiled(study.weight_metrics, layers, value_slice=VALUE_SLICE)
  seconds["weight_spectra"] = throughput.timed(exe, layers)
  weight_metrics = exe(layers)

  mb = gradient_microbatch(config, protocol, dtype)
  m = protocol.gradient_sequences // mb
  batch = rng.integers(0, config.vocab_size, (1, m, mb, s + 1), dtype=np.int32)
  exe, compile_s["gradients"] = compiled(study.gradient_fn(config, VALUE_SLICE), params, batch)
  start = time.perf_counter()
  losses, grads = jax.block_until_ready(exe(params, batch))
  one_batch = time.perf_counter() - start
  seconds["gradients"] = GRADIENT_BATCHES * one_batch

  # The sweep's own calls for one checkpoint, per batch: one batch's gradients in the
  # weights' dtype (study.batch_gradient_fn, streamed) and their reduction layer by layer
  # (streaming.gradient_terms); a checkpoint runs each 11 times.
  streamed = {}
  stream_exe, compile_s["batch_gradients"] = compiled(
    study.batch_gradient_fn(config, VALUE_SLICE), params, batch[0]
  )
  start = time.perf_counter()
  _, batch_grads = jax.block_until_ready(stream_exe(params, batch[0]))
  streamed["batch_gradients"] = time.perf_counter() - start
  carry = streaming.first_gradient_carry(batch_grads, VALUE_SLICE)
  terms_exe, compile_s["gradient_terms"] = compiled(
    streaming.gradient_terms, batch_grads, carry, layers, value_slice=VALUE_SLICE
  )
  start = time.perf_counter()
  jax.block_until_ready(terms_exe(batch_grads, carry, layers))  # donates batch_grads
  streamed["gradient_terms"] = time.perf_counter() - start

  # The spectra cost does not depend on the values: the one gradient stands for all 11.
  stacked = jax.tree.map(lambda g: jnp.concatenate([g] * GRADIENT_BATCHES), grads)
  spectra_exe, compile_s["gradient_spectra"] = compiled(
    study.gradient_metrics_jit,
    stacked,
    layers,
    value_slice=VALUE_SLICE,
    refine=True,
    registered=study.registered_names(),
  )
  start = time.perf_counter()
  gradient_metrics = jax.block_until_ready(spectra_exe(stacked, layers))
  seconds["gradient_spectra"] = time.perf_counter() - start

  flops = throughput.fwd_bwd_flops(
    config, protocol.gradient_sequences, s, study.gradient_weights(VALUE_SLICE)
  )
  figures = {
    "dtype": dtype,
    "seconds_per_checkpoint": sum(seconds.values()),
    "seconds": seconds,
    "compile_seconds": compile_s,
    "streamed_seconds_per_batch": streamed,
    "gradient_microbatch": mb,
    "activation_chunk": chunk,
    "fwd_bwd_one_batch_s": one_batch,
    "fwd_bwd_model_flops_per_s": flops["model"] / one_batch,
    "fwd_bwd_executed_flops_per_s": flops["executed"] / one_batch,
  }
  metrics = None
  if keep:
    ref_params = jax.tree.map(
      lambda a, b: (0.8 * a.astype(jnp.float32) + 0.6 * b.astype(jnp.float32)).astype(a.dtype),
      params,
      random_params(config, seed + 1, dtype),
    )
    ref_acts, _, _, _ = run_activations(config, ref_params, tokens, idx, chunk, act_exe)
    metrics = {
      "cka": cka_exe(acts, ref_acts),
      "weights": weight_metrics,
      "gradients": gradient_metrics,
      "loss": losses,
    }
    metrics = jax.tree.map(lambda x: np.asarray(x, np.float64), metrics)
  return figures, metrics


def add_mfu(figures: dict, peaks: dict | None) -> None:
  peak = (peaks or {}).get(figures["dtype"])
  if peak:
    figures["fwd_bwd_mfu"] = figures["fwd_bwd_model_flops_per_s"] / peak
    figures["fwd_bwd_executed_fraction_of_peak"] = figures["fwd_bwd_executed_flops_per_s"] / peak


def deviation(low: dict, high: dict) -> dict:
  """{metric family: {max_abs, max_rel, n}} of bfloat16 metrics against float32 ones."""
  out = {}

  def add(family, a, b):
    a, b = np.ravel(a), np.ravel(b)
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
      return
    diff = np.abs(a[ok] - b[ok])
    rel = diff / np.maximum(np.abs(b[ok]), 1e-12)
    entry = out.setdefault(family, {"max_abs": 0.0, "max_rel": 0.0, "n": 0})
    entry["max_abs"] = max(entry["max_abs"], float(diff.max()))
    entry["max_rel"] = max(entry["max_rel"], float(rel.max()))
    entry["n"] += int(ok.sum())

  for key in high["cka"]:
    add(f"cka ({key[1]})", low["cka"][key], high["cka"][key])
  for source in ("weights", "gradients"):
    for component, metrics in high[source].items():
      for metric, value in metrics.items():
        if "per" in metric.split("_"):
          add(f"{source} {metric}", low[source][component][metric], value)
  add("loss", low["loss"], high["loss"])
  return out


def spectra_part(config: GPTNeoXConfig) -> dict:
  """Seconds per route of `analysis.spectra` (svd, qr_svd, the guarded gram_eigh, and auto,
  the rule's pick on this backend) on the study's matrix sets of one checkpoint: weights,
  and one batch of real gradients (random init, random tokens: their LayerNorm null
  directions are what the Gram route's guard refuses). Per-head OV products go through
  their QR core. For gram_eigh, how many matrices its guard accepted (the rest fell back).
  """
  from analysis import spectra

  params = random_params(config, 0, "float32")
  layers = params["layers"]
  value = layers["attn"]["value"]["kernel"]  # [L, d, H, dh]
  out_kernel = layers["attn"]["out"]["kernel"]  # [L, H, dh, d]
  d, L = config.d_model, config.n_layers
  seq = min(512, config.max_seq_len)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, seq + 1), 0, config.vocab_size)
  wrt = study.gradient_weights(VALUE_SLICE)
  grads = jax.jit(lambda p, t: model_lib.loss_and_grads(p, t, config, wrt)[1])(params, tokens)
  sets = {
    # per-head OV circuits W_V[h] W_O[h]: [L, H, d, dh] @ [L, H, dh, d], by their QR core
    "ov_head": ("core", jnp.moveaxis(value, 2, 1), out_kernel),
    # whole-layer OV: [L, d, d] @ [L, d, d]
    "ov": ("direct", value.reshape(L, d, d), out_kernel.reshape(L, d, d)),
    # the MLP output matrix [L, f, d], and its gradient on one batch
    "mlp": ("direct", layers["mlp"]["fc_out"]["kernel"], None),
    "mlp_gradient": ("direct", grads["mlp"]["fc_out"]["kernel"], None),
  }
  result = {}
  for route in spectra.ROUTES:
    for name, (method, left, right) in sets.items():
      if right is None:
        fn = jax.jit(lambda m, route=route: spectra.singular_values(m, route))
        args = (left,)
      else:
        fn = jax.jit(
          lambda a, b, method=method, route=route: spectra.product_singular_values(
            a, b, method, route
          )
        )
        args = (left, right)
      exe, compile_s = compiled(fn, *args)
      entry = {
        "seconds": throughput.timed(exe, *args, repeats=2),
        "compile_seconds": compile_s,
        "shape": [list(x.shape) for x in args],
      }
      if route == "auto":
        core = (left.shape[-1],) * 2 if method == "core" else (left.shape[-2], args[-1].shape[-1])
        entry["picks"] = spectra.choose_route(core)
      if route == "gram_eigh" and right is None:
        flat = left.reshape(-1, *left.shape[-2:])
        accepted = np.asarray(spectra._gram_values(flat)[1])
        entry["guard_accepts"] = f"{int(accepted.sum())}/{accepted.size}"
      result[f"{route}/{name}"] = entry
  return result


def reference_part(config: GPTNeoXConfig, protocol: Protocol) -> dict:
  """The reference's method on one checkpoint of `config` on the same device."""
  import torch
  import transformers

  from benchmarks import bench_sweep

  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf = transformers.GPTNeoXConfig(
    vocab_size=config.vocab_size,
    hidden_size=config.d_model,
    num_hidden_layers=config.n_layers,
    num_attention_heads=config.n_heads,
    intermediate_size=config.d_mlp,
    max_position_embeddings=config.max_seq_len,
    rotary_pct=config.rotary_pct,
    use_parallel_residual=True,
    tie_word_embeddings=False,
  )
  rng = np.random.default_rng(0)
  s = protocol.seq_len
  inputs = rng.integers(0, config.vocab_size, (protocol.n_sequences, s))
  batches = [
    rng.integers(0, config.vocab_size, (protocol.gradient_sequences, s + 1))
    for _ in range(protocol.reference_batches)
  ]
  with tempfile.TemporaryDirectory() as directory:
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(hf).to(torch.float16).save_pretrained(directory)
    marks = []
    start = time.perf_counter()
    bench_sweep.reference_checkpoint(
      directory,
      inputs,
      batches,
      None,
      device=device,
      microbatch=protocol.reference_microbatch,
      marks=marks,
    )
    total = time.perf_counter() - start
    if device == "cuda":
      torch.cuda.empty_cache()
  # Everything but the gradient batches once, then each batch as timed (the last one, once
  # the first has warmed the device up, when there are several).
  batch_s = [float(x) for x in np.diff(marks)]
  fixed = total - sum(batch_s)
  per_batch = batch_s[-1]
  return {
    "device": device,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "run_s": total,
    "gradient_batches_timed": len(batch_s),
    "gradient_batch_s": batch_s,
    "per_gradient_batch_s": per_batch,
    "seconds_per_checkpoint": fixed + GRADIENT_BATCHES * per_batch,
    "microbatch": protocol.reference_microbatch,
  }


# -------------------------------------------------------------------------------- report

TARGETS = {
  "bf16_mfu_410m_and_above": 0.40,
  "reference_ratio_min": 3.0,
}


def markdown(data: dict) -> str:
  parts = data["parts"]
  lines = [f"## Accelerator run {data['started_utc']}", ""]
  dev = parts.get("device")
  if dev:
    peaks = dev["peak_flops"]
    lines.append(
      f"Device: {dev['device_kind']} ({dev['platform']}, {dev['device_count']} device(s)), "
      f"jax {data['jax']}. Measured matmul peak: "
      + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in peaks.items())
      + "."
    )
    lines.append("")
  rows = [(k, v) for k, v in parts.items() if k.startswith("study/")]
  if rows:
    lines += [
      "| shape | dtype | s/checkpoint | fwd+bwd MFU (6N) | executed / peak | "
      "activations s | gradients s (11 batches) | spectra s (weights + gradients) | microbatch |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, f in rows:
      sec = f["seconds"]
      lines.append(
        f"| {key.split('/')[1]} | {f['dtype']} | {f['seconds_per_checkpoint']:.2f} | "
        f"{100 * f.get('fwd_bwd_mfu', math.nan):.1f}% | "
        f"{100 * f.get('fwd_bwd_executed_fraction_of_peak', math.nan):.1f}% | "
        f"{sec['activations']:.2f} | {sec['gradients']:.2f} | "
        f"{sec['weight_spectra'] + sec['gradient_spectra']:.2f} | {f['gradient_microbatch']} |"
      )
    lines += [
      "",
      f"Target: bf16 fwd+bwd MFU >= {TARGETS['bf16_mfu_410m_and_above']:.0%} at 410m and above.",
      "",
    ]
  ref = parts.get("reference")
  if ref:
    lines.append(
      f"Reference's method (HF torch hooks + numpy, {ref['device']}): "
      f"{ref['seconds_per_checkpoint']:.1f} s/checkpoint (projected to {GRADIENT_BATCHES} "
      f"gradient batches from {ref['gradient_batches_timed']} timed, "
      f"{ref['per_gradient_batch_s']:.1f} s each; microbatch {ref['microbatch']})."
    )
    ratio = parts.get("ratio")
    if ratio:
      lines.append(
        "Ratio reference / jax_pythia: "
        + ", ".join(f"{k} {v:.1f}x" for k, v in ratio.items())
        + f" (target >= {TARGETS['reference_ratio_min']:.0f}x)."
      )
    lines.append("")
  dev_part = parts.get("deviation")
  if dev_part:
    lines += [
      "bfloat16 against float32 (same checkpoint):",
      "",
      "| metric | max abs | max rel | n |",
    ]
    lines.append("|---|---|---|---|")
    for name, e in dev_part.items():
      lines.append(f"| {name} | {e['max_abs']:.2e} | {e['max_rel']:.2e} | {e['n']} |")
    lines.append("")
  spectra = parts.get("spectra")
  if spectra:
    lines += ["| spectra route / matrices | shapes | seconds | note |", "|---|---|---|---|"]
    for name, e in spectra.items():
      note = e.get("guard_accepts", "") and f"guard accepts {e['guard_accepts']}"
      note = note or (e.get("picks", "") and f"picks {e['picks']}")
      lines.append(f"| {name} | {e['shape']} | {e['seconds']:.4f} | {note} |")
    lines.append("")
  for title, entries in (("Failed", data["errors"]), ("Skipped", data["skipped"])):
    if entries:
      lines.append(f"{title}: " + "; ".join(f"{k}: {v}" for k, v in entries.items()))
      lines.append("")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main


def run(protocol: Protocol, report: Report, budget: Budget) -> None:
  peaks = None
  dev = guarded(report, "device", device_part, protocol)
  if dev:
    report.part("device", dev)
    peaks = dev["peak_flops"]

  ref_config = protocol.shapes[protocol.reference_shape]
  ref = guarded(report, "reference", reference_part, ref_config, protocol)
  if ref:
    report.part("reference", ref)

  order = [(protocol.reference_shape, "float32"), (protocol.reference_shape, "bfloat16")]
  others = [s for s in protocol.shapes if s != protocol.reference_shape]
  metrics = {}
  spent: dict[tuple[str, str], tuple[float, float]] = {}
  plan_order = order + [("spectra", None)] + [(s, "bfloat16") for s in others]
  plan_order += [(s, "float32") for s in others]
  for name, dtype in plan_order:
    if name == "spectra":
      if budget.left() < min(30, budget.seconds / 10):
        report.skip("spectra", f"{budget.left():.0f} s left")
        continue
      result = guarded(report, "spectra", spectra_part, ref_config)
      if result:
        report.part("spectra", result)
      continue
    key = f"study/{name}/{dtype}"
    config = protocol.shapes[name]
    need = estimate(spent, protocol, config, dtype)
    if need is not None and need > budget.left():
      report.skip(key, f"needs about {need:.0f} s, {budget.left():.0f} s left")
      continue
    start = time.perf_counter()
    keep = name == protocol.reference_shape
    out = guarded(report, key, study_checkpoint, config, protocol, dtype, 0, keep)
    if out is None:
      continue
    figures, kept = out
    spent[(name, dtype)] = (time.perf_counter() - start, sum(figures["compile_seconds"].values()))
    add_mfu(figures, peaks)
    report.part(key, figures)
    if kept is not None:
      metrics[dtype] = kept
    if name == protocol.reference_shape and len(metrics) == 2:
      dev_out = guarded(report, "deviation", deviation, metrics["bfloat16"], metrics["float32"])
      if dev_out:
        report.part("deviation", dev_out)
    if name == protocol.reference_shape and ref:
      ratio = report.data["parts"].setdefault("ratio", {})
      ratio[dtype] = ref["seconds_per_checkpoint"] / figures["seconds_per_checkpoint"]
      report.part("ratio", ratio)


def estimate(spent: dict, protocol: Protocol, config: GPTNeoXConfig, dtype: str) -> float | None:
  """Seconds a shape will take, from the largest shape already run in the same dtype: its
  compile seconds times 1.5, the rest of its wall time scaled by forward+backward FLOPs."""
  done = [(n, d) for (n, d) in spent if d == dtype]
  if not done:
    return None
  name = max(done, key=lambda k: protocol.shapes[k[0]].d_model * protocol.shapes[k[0]].n_layers)[0]
  base = protocol.shapes[name]
  wrt = study.gradient_weights(VALUE_SLICE)
  scale = (
    throughput.fwd_bwd_flops(config, 1, protocol.seq_len, wrt)["model"]
    / throughput.fwd_bwd_flops(base, 1, protocol.seq_len, wrt)["model"]
  )
  wall, compile_s = spent[(name, dtype)]
  return 1.5 * compile_s + (wall - compile_s) * scale


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device, seconds")
  parser.add_argument(
    "--shapes", default=None, help="comma-separated subset of 160m,410m,1.4b (default: all)"
  )
  parser.add_argument("--budget_s", type=float, default=None, help="default 420 (smoke: 600)")
  parser.add_argument("--out", default=None, help="JSON path when $OUT is not set")
  parser.add_argument(
    "--record",
    default=None,
    metavar="JSON",
    help="only append the section of a finished run's JSON to --results_md (the lent "
    "machine sends back $OUT, not the repository: record its accelerator.json here)",
  )
  parser.add_argument(
    "--results_md",
    default=None,
    help="Markdown file the dated section is appended to (default benchmarks/RESULTS.md; "
    "with --smoke: none)",
  )
  args = parser.parse_args(argv)
  default_md = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
  if args.record:
    with open(args.record) as f:
      section = markdown(json.load(f))
    with open(args.results_md or default_md, "a") as f:
      f.write("\n" + section)
    print(section)
    return
  protocol = smoke_protocol() if args.smoke else full_protocol()
  if args.shapes:
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in protocol.shapes]
    if unknown or protocol.reference_shape not in names:
      parser.error(
        f"--shapes={args.shapes}: choose from {','.join(protocol.shapes)}, "
        f"{protocol.reference_shape} included (the reference and the deviation run on it)"
      )
    protocol = dataclasses.replace(protocol, shapes={n: protocol.shapes[n] for n in names})
  budget = Budget(args.budget_s or (600 if args.smoke else 420))
  if os.environ.get("OUT"):
    json_path = os.path.join(os.environ["OUT"], "accelerator.json")
  elif args.out:
    json_path = args.out
  else:
    parser.error("--out is required when $OUT is not set")
  results_md = args.results_md
  if results_md is None and not args.smoke:
    results_md = default_md
  report = Report(json_path)
  report.data["protocol"] = {
    k: v for k, v in dataclasses.asdict(protocol).items() if k != "shapes"
  } | {"shapes": {k: dataclasses.asdict(v) for k, v in protocol.shapes.items()}}
  report.data["budget_s"] = budget.seconds

  def on_term(signum, frame):
    raise SystemExit(f"signal {signum}")

  signal.signal(signal.SIGTERM, on_term)
  try:
    run(protocol, report, budget)
  finally:
    report.data["elapsed_s"] = time.perf_counter() - budget.start
    report.save()
    if results_md:
      with open(results_md, "a") as f:
        f.write("\n" + markdown(report.data))
    print(
      f"wrote {report.json_path} and {report.md_path}"
      + (f"; appended to {results_md}" if results_md else "")
    )


if __name__ == "__main__":
  main()
