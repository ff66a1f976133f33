"""What a sweep will cost before it runs: bytes, FLOPs, memory per device, time.

Shapes come from `jax_pythia.suite` (Pythia names) or from a local directory's
config.json (the toy suite, test suites). FLOP counts use the standard estimates:
2 * params * tokens for a forward pass and 6 * params * tokens for forward + backward,
with params the matmul weights a token passes through, plus the attention matmuls
(QK^T and AV: 2 * 2 * s * d per token and layer forward; the model computes the full
masked s x s square), plus the SVDs of the spectra (about 4 m n^2 each). Memory per
device is params + the chosen weights' gradients + activations kept for the backward
pass, under the mesh's model and data split (jax_pythia.sharding). These are estimates,
meant to size a pod, not to replace a measured run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import numpy as np

from jax_pythia import suite
from jax_pythia.config import GPTNeoXConfig
from jax_pythia.errors import JaxPythiaError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Pythia's joined training stream: 146,432,000 sequences of 2,049 uint16 tokens.
PILE_BYTES = 146_432_000 * 2_049 * 2


class PlanError(JaxPythiaError, ValueError):
  """A plan that cannot be made (unknown model, bad mesh)."""


@dataclasses.dataclass(frozen=True)
class Shape:
  """What the plan needs of one model."""

  name: str
  n_layers: int
  d_model: int
  n_heads: int
  d_mlp: int
  vocab: int
  seq_len: int
  steps: tuple[int, ...]
  checkpoint_bytes: int | None = None  # on disk, when known (local suites)
  stored_bytes_per_param: int = 2  # fp16/bf16 on the Hub

  @property
  def layer_params(self) -> int:
    """Matmul weights of the layers (what every token passes through)."""
    return self.n_layers * (4 * self.d_model**2 + 2 * self.d_model * self.d_mlp)

  @property
  def params(self) -> int:
    d, f, L = self.d_model, self.d_mlp, self.n_layers
    per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    return 2 * self.vocab * d + L * per_layer + 2 * d

  @property
  def bytes_per_checkpoint(self) -> int:
    return self.checkpoint_bytes or self.stored_bytes_per_param * self.params


def from_suite(name: str, seq_len: int | None = None) -> Shape:
  m = suite.parse_model(name)
  s = m.size
  return Shape(
    m.name,
    s.n_layers,
    s.d_model,
    s.n_heads,
    s.d_mlp,
    s.vocab_size,
    seq_len or suite.SEQUENCE_LENGTH,
    suite.ALL_STEPS,
  )


def from_directory(path: str, seq_len: int | None = None) -> list[Shape]:
  """Every model of a local suite (or one model's directory of step<N>/)."""
  from jax_pythia import checkpoints, sources, weights

  shapes = []
  for m in sources.resolve_models([path]):
    step_dir = os.path.join(m.location, suite.revision(m.final_step))
    config_path = os.path.join(step_dir, weights.CONFIG_FILE)
    if os.path.isfile(config_path):
      config = GPTNeoXConfig.from_json_file(config_path)
    else:
      config = checkpoints.converted_config(step_dir)
    size = sum(
      os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(step_dir) for f in files
    )
    shapes.append(
      Shape(
        m.name,
        config.n_layers,
        config.d_model,
        config.n_heads,
        config.d_mlp,
        config.vocab_size,
        seq_len or config.max_seq_len,
        m.steps,
        checkpoint_bytes=size,
      )
    )
  return shapes


def resolve(names: Sequence[str], seq_len: int | None = None) -> list[Shape]:
  shapes = []
  for name in names:
    if os.path.isdir(os.path.expanduser(name)):
      shapes += from_directory(os.path.expanduser(name), seq_len)
      continue
    try:
      shapes.append(from_suite(name, seq_len))
    except ValueError as e:
      raise PlanError(f"--models: {e}") from None
  return shapes


@dataclasses.dataclass(frozen=True)
class Work:
  """The per-checkpoint work of a sweep (SweepOptions' numbers that cost)."""

  n_sequences: int = 128
  gradients: bool = True
  gradient_window: int = 5
  gradient_sequences: int = 128
  gradient_microbatch: int = 0
  loss_sequences: int = 0
  dtype: str = "float32"

  @property
  def gradient_batches(self) -> int:
    return 2 * self.gradient_window + 1 if self.gradients else 0


def attention_flops(shape: Shape, sequences: int) -> float:
  """Forward QK^T and AV of `sequences` full sequences."""
  return 2 * 2 * shape.n_layers * shape.seq_len**2 * shape.d_model * sequences


def svd_flops(m: int, n: int) -> float:
  m, n = max(m, n), min(m, n)
  return 4.0 * m * n * n


def flops_per_checkpoint(shape: Shape, work: Work) -> dict[str, float]:
  """{part: FLOPs} of one checkpoint: capture, gradients, loss, spectra, total."""
  s, d, f, L, H = shape.seq_len, shape.d_model, shape.d_mlp, shape.n_layers, shape.n_heads
  dh = d // H
  with_unembed = shape.layer_params + d * shape.vocab
  # The capture pass stops before the unembedding (no logits).
  capture = 2 * shape.layer_params * work.n_sequences * s + attention_flops(shape, work.n_sequences)
  g_seqs = work.gradient_batches * work.gradient_sequences
  gradients = 6 * with_unembed * g_seqs * s + 3 * attention_flops(shape, g_seqs)
  loss = 2 * with_unembed * work.loss_sequences * s + attention_flops(shape, work.loss_sequences)
  # Weights once, gradients once per batch: MLP (f x d), whole OV (d x d), heads' cores.
  per_set = L * (svd_flops(f, d) + svd_flops(d, d) + H * (2 * svd_flops(d, dh) + svd_flops(dh, dh)))
  spectra = per_set * (1 + work.gradient_batches)
  parts = {"capture": capture, "gradients": gradients, "loss": loss, "spectra": spectra}
  parts["total"] = sum(parts.values())
  return parts


def memory_per_device(shape: Shape, work: Work, mesh: dict[str, int]) -> dict[str, float]:
  """{part: bytes} on one device under `mesh` ({'data': D, 'model': M})."""
  D, M = mesh.get("data", 1), mesh.get("model", 1)
  b = DTYPE_BYTES[work.dtype]
  d, f, L, V, H, s = (
    shape.d_model,
    shape.d_mlp,
    shape.n_layers,
    shape.vocab,
    shape.n_heads,
    shape.seq_len,
  )
  vocab_split = M if V % M == 0 else 1
  embeddings = 2 * V * d / vocab_split
  layers = (shape.layer_params + L * (3 * d + f)) / M  # kernels and split biases
  small = L * (6 * d) + 2 * d  # LayerNorms, out/fc_out biases: replicated
  params = b * (embeddings + layers + small)
  # Gradients of the value, out and fc_out kernels: the scan's float32 accumulator and
  # the step's own gradient.
  grads = 2 * 4 * L * (2 * d * d + f * d) / M if work.gradients else 0.0
  mb = work.gradient_microbatch or work.gradient_sequences
  per_token_layer = b * (10 * d + 2 * f / M) + 4 * 2 * (H / M) * s  # saved + scores
  if work.gradients:
    tokens = mb / D * s
    acts = tokens * (L * per_token_layer + 3 * 4 * V / vocab_split)
  else:
    tokens = max(work.n_sequences, work.loss_sequences) / D * s
    acts = tokens * (per_token_layer + (3 * 4 * V / vocab_split if work.loss_sequences else 0))
  out = {"params": params, "grads": grads, "activations": acts}
  out["total"] = sum(out.values())
  return out


def measure_flops_per_device(seconds: float = 2.0) -> float:
  """FLOP/s one local device reaches on a small model's forward (all its overheads in)."""
  import jax

  from jax_pythia import model

  config = GPTNeoXConfig(
    vocab_size=4096, d_model=512, n_layers=4, n_heads=8, d_mlp=2048, max_seq_len=256
  )
  params = model.init_params(config, jax.random.PRNGKey(0))
  tokens = np.zeros((8, 256), np.int32)
  fn = model.make_forward(config, return_logits=True)
  jax.block_until_ready(fn(params, tokens))
  shape = Shape("measure", 4, 512, 8, 2048, 4096, 256, (0,))
  flops = 2 * (shape.layer_params + 512 * 4096) * 8 * 256 + attention_flops(shape, 8)
  runs, start = 0, time.perf_counter()
  while runs < 3 or time.perf_counter() - start < seconds:
    jax.block_until_ready(fn(params, tokens))
    runs += 1
  return flops * runs / (time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class ModelPlan:
  shape: Shape
  steps: tuple[int, ...]
  flops: dict[str, float]
  memory: dict[str, float]
  compute_s: float  # per checkpoint, on all devices
  fetch_s: float  # per checkpoint, one host

  @property
  def fetch_bytes(self) -> int:
    return self.shape.bytes_per_checkpoint * len(self.steps)

  def total_s(self, hosts: int = 1) -> float:
    # Fetching overlaps computing (the sweep prefetches), so the slower one sets the pace;
    # with split=checkpoints each host fetches its own share.
    per = max(self.compute_s, self.fetch_s / hosts)
    return per * len(self.steps)


def make_plan(
  shape: Shape,
  steps: str,
  work: Work,
  mesh: dict[str, int],
  flops_per_second: float,
  bandwidth: float,
) -> ModelPlan:
  """`flops_per_second`: what all devices together sustain (peak x utilisation)."""
  try:
    chosen = suite.parse_steps(steps, shape.steps)
  except ValueError as e:
    raise PlanError(f"--steps for {shape.name}: {e}") from None
  if shape.steps[-1] not in chosen:
    chosen = chosen + (shape.steps[-1],)  # the sweep always adds the final checkpoint
  flops = flops_per_checkpoint(shape, work)
  memory = memory_per_device(shape, work, mesh)
  return ModelPlan(
    shape,
    chosen,
    flops,
    memory,
    flops["total"] / flops_per_second,
    shape.bytes_per_checkpoint / bandwidth,
  )


def _si(x: float, unit: str) -> str:
  for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


def _duration(s: float) -> str:
  if s < 120:
    return f"{s:.3g} s"
  if s < 7200:
    return f"{s / 60:.3g} min"
  return f"{s / 3600:.3g} h"


def format_plan(
  plans: Sequence[ModelPlan],
  devices: int,
  hosts: int,
  flops_per_second: float,
  source: str,
  data_bytes: int | None = None,
  data_batches: int = 0,
) -> str:
  """The plan as text; `data_bytes` of training data in `data_batches` batches (what
  tools.fetch_data stages, from jax_pythia.sweep.batches_needed) go beside the checkpoints."""
  lines = [
    f"plan for {devices} device(s) on {hosts} host(s); throughput "
    f"{_si(flops_per_second, 'FLOP/s')} in all ({source})",
    "",
  ]
  header = (
    "model",
    "ckpts",
    "params",
    "fetch",
    "FLOPs/ckpt",
    "(capture/grad)",
    "mem/device",
    "(params/grads/acts)",
    "s/ckpt",
    "total",
  )
  rows = [header]
  for p in plans:
    f, m = p.flops, p.memory
    rows.append(
      (
        p.shape.name,
        str(len(p.steps)),
        _si(p.shape.params, ""),
        _si(p.fetch_bytes, "B"),
        _si(f["total"], ""),
        f"{_si(f['capture'], '')}/{_si(f['gradients'], '')}",
        _si(m["total"], "B"),
        f"{_si(m['params'], 'B')}/{_si(m['grads'], 'B')}/{_si(m['activations'], 'B')}",
        f"{max(p.compute_s, p.fetch_s / hosts):.3g}",
        _duration(p.total_s(hosts)),
      )
    )
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  total = sum(p.total_s(hosts) for p in plans)
  lines += [
    "",
    f"all models: {_si(sum(p.fetch_bytes for p in plans), 'B')} of checkpoints to fetch, "
    f"about {_duration(total)}",
  ]
  if data_bytes is not None:
    lines.append(
      f"training data: {_si(data_bytes, 'B')} to fetch ({data_batches} batches read by byte "
      f"range; tools.fetch_data stages them), not the whole {_si(PILE_BYTES, 'B')} stream"
    )
  return "\n".join(lines)
