"""What a sweep will cost before it runs: bytes, FLOPs, memory per device, time.

Shapes come from `jax_pythia.suite` (Pythia names) or from a local directory's
config.json (the toy suite, test suites). FLOP counts use the standard estimates:
2 * params * tokens for a forward pass and 6 * params * tokens for forward + backward,
with params the matmul weights a token passes through, plus the attention matmuls
(QK^T and AV: 2 * 2 * s * d per token and layer forward; the model computes the full
masked s x s square), plus the SVDs of the spectra (about 4 m n^2 each). Memory per
device is params + the chosen weights' gradients + activations kept for the backward
pass, under the mesh's model and data split (jax_pythia.scale.sharding). One checkpoint per
call streams its gradient batches (jax_pythia.sweep): the gradient call holds one batch's
gradients, beside the previous batch's kept for the spectra, and the spectra call two
batches' and one batch's SVD workspace, whatever G; C > 1 stacked checkpoints hold all G
batches at once. These are estimates, meant to size a pod, not to replace a measured run.

Memory decides how the gradients are computed: `choose_layout` picks the largest
gradient microbatch, and the cheapest rematerialisation (`model.REMAT_POLICIES`), whose
planned peak stays under `HEADROOM` of the device's memory (`--device_memory`, by default
what the device reports). The per-token coefficients of the activation model count the
residuals the backward pass keeps and were checked against XLA's own buffer assignment
(`compiled.memory_analysis()`, tests/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence

import numpy as np

from jax_pythia import suite
from jax_pythia.errors import JaxPythiaError
from jax_pythia.models.config import GPTNeoXConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Fraction of the device's memory the planned peak may use; the rest is for what the
#: plan does not count (XLA's workspace, fragmentation, the runtime).
HEADROOM = 0.9
#: Tokens per chunk of the loss's logits (model.LOSS_CHUNK_TOKENS, not imported: plan
#: runs without JAX).
LOSS_CHUNK_TOKENS = 1024
#: Rematerialisation policies from least to most recomputation (model.REMAT_POLICIES).
REMAT = ("none", "attention", "layer")
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
  # The Llama family (docs/families.md); the defaults are GPT-NeoX's.
  n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: n_heads
  gated_mlp: bool = False  # SwiGLU: three MLP matrices, not two
  tied_embeddings: bool = False  # one V x d table, not two
  param_count: int | None = None  # exact, from the family's layout table, when known

  @property
  def layer_params(self) -> int:
    """Matmul weights of the layers (what every token passes through): q and o (d x d),
    k and v (d x H_kv*dh each), and two MLP matrices (three when gated)."""
    d, kv = self.d_model, self.d_model * (self.n_kv_heads or self.n_heads) // self.n_heads
    mlp = (3 if self.gated_mlp else 2) * d * self.d_mlp
    return self.n_layers * (2 * d * d + 2 * d * kv + mlp)

  @property
  def params(self) -> int:
    if self.param_count is not None:
      return self.param_count
    d, f, L = self.d_model, self.d_mlp, self.n_layers
    per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    return 2 * self.vocab * d + L * per_layer + 2 * d

  @property
  def bytes_per_checkpoint(self) -> int:
    return self.checkpoint_bytes or self.stored_bytes_per_param * self.params


def mesh_of(mesh: dict[str, int] | None, devices: int, spec: str = "") -> dict[str, int]:
  """The mesh's axis sizes over `devices` ({"data": devices} when none is given); an axis of
  -1 takes the devices the others leave. Refuses a mesh of another device count."""
  mesh = mesh or {"data": devices}
  known = math.prod(v for v in mesh.values() if v != -1)
  mesh = {k: (devices // known if v == -1 else v) for k, v in mesh.items()}
  if math.prod(mesh.values()) != devices:
    raise PlanError(f"--mesh={spec} has {math.prod(mesh.values())} devices, --devices={devices}")
  return mesh


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
  from jax_pythia.checkpoints import sources

  return [of_source(m, seq_len) for m in sources.resolve_models([path])]


def of_source(m, seq_len: int | None = None) -> Shape | None:
  """The shape of a sources.ModelSource: a suite name's, or its final checkpoint's config
  (None for a Hub id outside the suite, whose config is not known before fetching)."""
  if m.is_hub:
    try:
      return dataclasses.replace(from_suite(m.name, seq_len), steps=m.steps)
    except ValueError:
      return None
  from jax_pythia.checkpoints import converted
  from jax_pythia.models import family, weights

  step_dir = os.path.join(m.location, suite.revision(m.final_step))
  config_path = os.path.join(step_dir, weights.CONFIG_FILE)
  if os.path.isfile(config_path):
    config = family.load_config(config_path)
  else:
    config = converted.converted_config(step_dir)
  size = sum(
    os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(step_dir) for f in files
  )
  return Shape(
    m.name,
    config.n_layers,
    config.d_model,
    config.n_heads,
    config.d_mlp,
    config.vocab_size,
    seq_len or config.max_seq_len,
    m.steps,
    checkpoint_bytes=size,
    n_kv_heads=config.n_kv_heads,
    gated_mlp=config.family != "gpt_neox",
    tied_embeddings=getattr(config, "tie_embeddings", False),
    param_count=sum(math.prod(s) for s in _leaves(weights.param_shapes(config))),
  )


def _leaves(tree) -> list[tuple[int, ...]]:
  """The shape tuples of a nested dict of them (weights.param_shapes), without JAX."""
  if isinstance(tree, dict):
    return [leaf for value in tree.values() for leaf in _leaves(value)]
  return [tree]


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
  kept_positions: int = 1  # token positions captured per sequence (--positions)
  checkpoints_per_call: int = 1  # C checkpoints stacked in one compiled call (memory x C)

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


#: Values kept per token for the backward pass, by rematerialisation policy, as
#: (per layer: d, f, H*s), (the one layer being differentiated: d, f, H*s), logits: V.
#: Counted from what each policy saves (none: the LayerNorm, q/k/v/rotary, z, MLP
#: pre/post residuals and the attention scores and pattern; attention: only the weight
#: matmuls' outputs; layer: only the layer input) and rounded to XLA's buffer assignment
#: (compiled.memory_analysis() on CPU; tests/test_memory.py holds the total within 25%).
#: The layer being differentiated holds at least one whole score matrix, as an accelerator
#: materialises it (XLA:CPU fuses part of it away). d and f values are in the compute
#: dtype, scores and logits in float32.
_ACTIVATION_VALUES = {
  "none": ((10, 4, 2), (0, 3, 2), 3),
  "attention": ((8, 0.5, 0), (0, 5, 1), 2.5),
  "layer": ((1, 0, 0), (12, 4.5, 1), 2),
}


def _dims(shape, model_axis: int) -> tuple:
  """(d, f, L, V, H, s, vocab_split): the shape's sizes, and how many ways the
  vocabulary splits over a model axis of `model_axis` devices (1 if it does not divide)."""
  V = shape.vocab
  return (
    shape.d_model,
    shape.d_mlp,
    shape.n_layers,
    V,
    shape.n_heads,
    shape.seq_len,
    model_axis if V % model_axis == 0 else 1,
  )


def gradient_call_bytes(
  shape: Shape,
  work: Work,
  mesh: dict[str, int],
  microbatch: int | None = None,
  remat: str = "none",
  checkpoints_per_call: int = 1,
  carry: str = "device",
) -> dict[str, float]:
  """{part: bytes} on one device of the compiled gradient call under `mesh`: params,
  outputs (the gradients), accumulators (the microbatch scan's running sum and one
  microbatch's gradient), activations (what the backward pass keeps for one microbatch,
  `remat` deciding how much), tokens; beside the call: carry, spectra_weights; total.

  One checkpoint per call (C = 1) is the sweep's streamed call (study.batch_gradient_fn):
  one batch's gradients, in the weights' dtype, and tokens. Beside it, split by layer over
  all devices (`spectra_layers` per device): the carry, the previous batch's gradients in
  the weights' dtype (none when G = 1 or `carry` is 'host'), and on several devices the
  copy of the weights the spectra read. C > 1 checkpoints are the stacked call
  (study.batched_gradient_fn): every part for all G batches, float32 gradients, times C (a
  call vmapped over a checkpoint axis holds each one's weights, outputs and activations);
  nothing beside.
  """
  if remat not in _ACTIVATION_VALUES:
    raise PlanError(f"remat={remat!r}: one of {', '.join(REMAT)}")
  D, M = mesh.get("data", 1), mesh.get("model", 1)
  b = DTYPE_BYTES[work.dtype]
  d, f, L, V, H, s, vocab_split = _dims(shape, M)
  grad_values = L * (2 * d * d + f * d) / M  # value, out and fc_out kernels
  streamed = checkpoints_per_call == 1
  G = work.gradient_batches
  batches = 1 if streamed else G  # gradient batches the call computes
  mb = microbatch or work.gradient_microbatch or work.gradient_sequences
  (ld, lf, ls), (wd, wf, ws), lv = _ACTIVATION_VALUES[remat]
  per_token = (
    L * (b * (ld * d + lf * f / M) + 4 * ls * (H / M) * s)
    + b * (wd * d + wf * f / M)
    + 4 * ws * (H / M) * s
  )
  tokens = mb / D * s
  # The loss holds float32 logits of one chunk of tokens at a time (model.lm_loss).
  logits = 4 * lv * V / vocab_split * min(tokens, LOSS_CHUNK_TOKENS)
  parts = {
    "params": _param_bytes(shape, work, mesh),
    "outputs": (b if streamed else 4) * batches * grad_values + 4 * batches,
    # The running sum and one microbatch's gradient of the attention kernels: XLA adds the
    # MLP's fc_out gradient into the sum in place (the dot's output fused with the add;
    # XLA:CPU's buffer assignment, float32).
    "accumulators": b * (grad_values + L * 2 * d * d / M),
    "activations": tokens * per_token + logits,
    "tokens": 4 * batches * work.gradient_sequences / D * (s + 1),
  }
  parts = {k: v * checkpoints_per_call for k, v in parts.items()}
  beside = spectra_layers(shape, mesh) * layer_gradient_values(shape) * b if streamed else 0.0
  parts["carry"] = beside if G > 1 and carry == "device" else 0.0
  parts["spectra_weights"] = beside if D * M > 1 else 0.0  # one device: the params themselves
  parts["total"] = sum(parts.values())
  return parts


def _param_bytes(shape: Shape, work: Work, mesh: dict[str, int]) -> float:
  M = mesh.get("model", 1)
  d, f, L, V = shape.d_model, shape.d_mlp, shape.n_layers, shape.vocab
  vocab_split = M if V % M == 0 else 1
  embeddings = (1 if shape.tied_embeddings else 2) * V * d / vocab_split
  layers = (shape.layer_params + L * (3 * d + f)) / M  # kernels and split biases
  small = L * (6 * d) + 2 * d  # LayerNorms, out/fc_out biases: replicated
  return DTYPE_BYTES[work.dtype] * (embeddings + layers + small)


def forward_call_bytes(
  shape: Shape,
  work: Work,
  mesh: dict[str, int],
  sequences: int,
  microbatch: int,
  logits: bool = False,
  checkpoints_per_call: int = 1,
) -> dict[str, float]:
  """{part: bytes} on one device of a forward call on `sequences` sequences, run
  `microbatch` at a time: the capture call (study.activation_fn: captured outputs) or,
  with `logits`, the loss call (study.loss_fn). A forward keeps one layer's intermediates
  at a time: the larger of the attention phase (input, normalised, q, k, v, rotated q and
  k, and the float32 scores and pattern) and the MLP phase (input, normalised,
  pre/post-activation, output)."""
  D, M = mesh.get("data", 1), mesh.get("model", 1)
  b = DTYPE_BYTES[work.dtype]
  d, f, L, V, H, s, vocab_split = _dims(shape, M)
  per_token = max(b * 6 * d + 4 * 2 * (H / M) * s, b * (3 * d + 2 * f / M))
  if logits:
    per_token += 3 * 4 * V / vocab_split
  # ov_head, ov, mlp and resid of every kept token, float32, twice (result and stacking).
  captured = 0.0 if logits else 2 * 4 * L * 4 * d * sequences / D * work.kept_positions
  parts = {
    "params": _param_bytes(shape, work, mesh),
    "outputs": captured,
    "activations": microbatch / D * s * per_token,
    "tokens": 4 * sequences / D * (s + 1),
  }
  parts = {k: v * checkpoints_per_call for k, v in parts.items()}
  parts["total"] = sum(parts.values())
  return parts


def spectra_layers(shape: Shape, mesh: dict[str, int]) -> int:
  """Layers each device holds in the spectra: L / gcd(L, devices) (sharding.layer_mesh)."""
  devices = mesh.get("data", 1) * mesh.get("model", 1)
  return shape.n_layers // math.gcd(shape.n_layers, devices)


def layer_gradient_values(shape: Shape) -> int:
  """Values of one layer's gradients (and of the weights the spectra read): the value and
  out kernels (d x d each) and fc_out (f x d); 'reference' adds query and key, not counted."""
  return 2 * shape.d_model**2 + shape.d_mlp * shape.d_model


def spectra_call_bytes(
  shape: Shape, work: Work, checkpoints_per_call: int = 1, mesh: dict[str, int] | None = None
) -> dict[str, float]:
  """{part: bytes} on one device of the gradient spectra call.

  One checkpoint per call (C = 1) is the sweep's per-batch call (streamed.gradient_terms, on a
  mesh streamed.spread_gradient_terms), split by layer over all devices (`spectra_layers` per
  device): the current and the previous batch's gradients and the weights the spectra
  read, in the weights' dtype, and one layer's float32 copies and SVD workspace
  (`workspace`), whatever L and G; beside it the rest of the params' shard.
  C > 1 is the stacked call (study.batched_gradient_metrics) on one device: G batches'
  float32 gradients and workspace, the layer weights in float32, times C. Held within 25%
  of XLA's figure on CPU for float32 (tests/test_memory.py; XLA:CPU computes bfloat16 in
  float32 and holds more).
  """
  d, f, L = shape.d_model, shape.d_mlp, shape.n_layers
  if checkpoints_per_call == 1:
    mesh = mesh or {}
    devices = mesh.get("data", 1) * mesh.get("model", 1)
    b = DTYPE_BYTES[work.dtype]
    held = spectra_layers(shape, mesh) * layer_gradient_values(shape) * b
    parts = {
      "gradients": 2 * held,  # G = 1: the first carry's zeros
      "weights": held,
      "workspace": 4 * 4 * layer_gradient_values(shape),
      # The rest of the params' shard waits beside the call (on one device the weights
      # the spectra read are the params themselves).
      "params": _param_bytes(shape, work, mesh) - (held if devices == 1 else 0),
    }
    parts["total"] = sum(parts.values())
    return parts
  G = work.gradient_batches
  parts = {
    "gradients": 4 * G * L * (2 * d * d + f * d),
    "weights": 4 * (shape.layer_params + L * (3 * d + f)),
    "workspace": 4 * G * L * f * d,
  }
  parts = {k: v * checkpoints_per_call for k, v in parts.items()}
  parts["total"] = sum(parts.values())
  return parts


def memory_per_device(
  shape: Shape, work: Work, mesh: dict[str, int], remat: str = "none", carry: str = "device"
) -> dict[str, float]:
  """{params, grads, activations, total}: bytes on one device under `mesh` ({'data': D,
  'model': M}) of the gradient call (work.gradient_microbatch, `remat`) or, without
  gradients, of the capture forward (all sequences at once)."""
  if work.gradients:
    g = gradient_call_bytes(
      shape, work, mesh, remat=remat, checkpoints_per_call=work.checkpoints_per_call, carry=carry
    )
    grads = g["outputs"] + g["accumulators"] + g["carry"] + g["spectra_weights"]
    out = {"params": g["params"], "grads": grads}
  else:
    g = forward_call_bytes(
      shape,
      work,
      mesh,
      work.n_sequences,
      work.n_sequences,
      checkpoints_per_call=work.checkpoints_per_call,
    )
    out = {"params": g["params"], "grads": 0.0}
  out["activations"] = g["total"] - sum(out.values())
  out["total"] = g["total"]
  return out


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one checkpoint's calls run on a device: microbatches and rematerialisation, with
  each call's planned peak (bytes per device) and the limit they were held under."""

  gradient_microbatch: int
  remat: str
  capture_microbatch: int
  loss_microbatch: int
  peaks: dict[str, float]  # {call: bytes}: capture, gradients, spectra, loss
  limit: float
  carry: str = "device"  # where the previous batch's gradients wait: device or host

  @property
  def peak(self) -> float:
    return max(self.peaks.values())

  @property
  def fits(self) -> bool:
    return self.peak <= self.limit

  def describe(self) -> str:
    grad = f"gradient microbatch {self.gradient_microbatch} (remat {self.remat}"
    grad += ", carry in host memory), " if self.carry == "host" else "), "
    return (
      (grad if "gradients" in self.peaks else "")
      + f"capture microbatch {self.capture_microbatch}: peak {_si(self.peak, 'B')} of "
      f"{_si(self.limit, 'B')} per device"
    )


def _microbatches(sequences: int, data: int) -> list[int]:
  """Sizes that divide `sequences` and split over the data axis, largest first."""
  return [m for m in range(sequences, 0, -1) if sequences % m == 0 and m % data == 0] or [sequences]


#: Tokens per device that already fill an accelerator's matmuls (8 sequences of 2048): a
#: larger gradient microbatch saves little, so beyond it less recomputation comes first.
FULL_MICROBATCH_TOKENS = 16384


def gradient_layouts(shape: Shape, work: Work, mesh: dict[str, int]) -> list[tuple[int, str]]:
  """(microbatch, remat) the gradient call may use, best first: larger microbatches first
  (fewer, fuller steps) up to FULL_MICROBATCH_TOKENS per device, then the least
  recomputation, then larger still. So remat is used when it makes a larger microbatch
  fit, unless the one that fits without it already fills the device. An explicit
  work.gradient_microbatch is the only size. (Checkpoints per call, once a call holds
  several, join this order.)"""
  D = mesh.get("data", 1)
  sizes = (
    [work.gradient_microbatch]
    if work.gradient_microbatch
    else _microbatches(work.gradient_sequences, D)
  )

  def merit(layout):
    mb, remat = layout
    return (min(mb / D * shape.seq_len, FULL_MICROBATCH_TOKENS), -REMAT.index(remat), mb)

  return sorted(((m, r) for m in sizes for r in REMAT), key=merit, reverse=True)


def _first_fit(candidates, cost, limit):
  """(candidate, bytes) of the first candidate whose cost fits `limit`, else the last."""
  for c in candidates:
    peak = cost(c)
    if peak <= limit:
      break
  return c, peak


def choose_layout(shape: Shape, work: Work, mesh: dict[str, int], device_bytes: float) -> Layout:
  """For each call of one checkpoint (the gradient batches streamed) the first of its
  candidates whose planned peak stays under HEADROOM x device_bytes (the gradient call:
  `gradient_layouts`; the forward calls: the largest microbatch). Where nothing fits, the
  most frugal candidate, and `fits` is False. Stacked checkpoints run under the same
  microbatches (`stacked_peaks`)."""
  limit = HEADROOM * device_bytes
  D = mesh.get("data", 1)
  peaks = {}
  capture, peaks["capture"] = _first_fit(
    _microbatches(work.n_sequences, D),
    lambda m: forward_call_bytes(shape, work, mesh, work.n_sequences, m)["total"],
    limit,
  )
  loss = 0
  if work.loss_sequences:
    loss, peaks["loss"] = _first_fit(
      _microbatches(work.loss_sequences, D),
      lambda m: forward_call_bytes(shape, work, mesh, work.loss_sequences, m, True)["total"],
      limit,
    )
  microbatch, remat, carry = 0, "none", "device"
  if work.gradients:
    # The previous batch's gradients wait on the devices unless only host memory lets the
    # gradient call fit (two transfers of a batch's gradients per batch).
    layouts = gradient_layouts(shape, work, mesh)
    (microbatch, remat, carry), peaks["gradients"] = _first_fit(
      [(*c, where) for where in ("device", "host") for c in layouts],
      lambda c: gradient_call_bytes(shape, work, mesh, c[0], c[1], carry=c[2])["total"],
      limit,
    )
    peaks["spectra"] = spectra_call_bytes(shape, work, mesh=mesh)["total"]
  return Layout(microbatch, remat, capture, loss, peaks, limit, carry)


def choose_mesh(shape: Shape, work: Work, devices: int, device_bytes: float | None) -> dict:
  """{'data': D, 'model': M} for `devices` when no mesh is given: the smallest model axis
  (a power of two dividing the devices, the heads and d_mlp) under which `choose_layout`
  fits, the rest on the data axis; the largest such axis when none fits; all on the data
  axis when the memory is unknown."""
  sizes = [m for m in (2**i for i in range(devices.bit_length())) if devices % m == 0]
  sizes = [m for m in sizes if shape.n_heads % m == 0 and shape.d_mlp % m == 0]
  meshes = [{"data": devices // m, "model": m} for m in sizes]
  if not device_bytes:
    return meshes[0]
  for mesh in meshes:
    if choose_layout(shape, work, mesh, device_bytes).fits:
      return mesh
  return meshes[-1]


def require_fit(name: str, layout: Layout, work: Work) -> Layout:
  """`layout` if it fits, else a PlanError naming the call, the value, the estimate and
  the limit."""
  if layout.fits:
    return layout
  call = max(layout.peaks, key=layout.peaks.get)
  if call == "gradients" and work.gradient_microbatch:
    what = f"--gradient_microbatch={layout.gradient_microbatch} (remat={layout.remat})"
    hint = "choose a smaller one, or 0 to let the sweep choose"
  else:
    size = {
      "gradients": f"gradient microbatch {layout.gradient_microbatch} (remat={layout.remat})",
      "capture": f"capture microbatch {layout.capture_microbatch}",
      "loss": f"loss microbatch {layout.loss_microbatch}",
      "spectra": "the gradient spectra (two batches' gradients, split by layer)",
    }[call]
    what, hint = f"even {size}", "use more devices (--mesh=model:N) or --dtype=bfloat16"
    if call == "spectra":
      what, hint = size, "use a device with more memory or --nogradients"
  raise PlanError(
    f"{name}: {what} needs an estimated {_si(layout.peaks[call], 'B')} per device, over the "
    f"limit of {_si(layout.limit, 'B')} ({HEADROOM:.0%} of --device_memory); {hint}"
  )


# The automatic C stacks at most this many per platform. On CPU one checkpoint already
# keeps the cores busy and stacking measured no reliable gain (benchmarks/bench_batched.py).
AUTO_MAX_CHECKPOINTS = {"cpu": 1, "gpu": 16, "tpu": 16}


def checkpoints_per_call(
  shape: Shape,
  work: Work,
  mesh: dict[str, int],
  device_bytes: float | None,
  requested: int = 0,
  platform: str = "cpu",
  flag: str = "--checkpoints_per_call",
) -> int:
  """C, the checkpoints of `shape` stacked per compiled call: `requested` (> 0) checked
  against HEADROOM x `device_bytes`, or (0: automatic) as many as fit under it, at most
  AUTO_MAX_CHECKPOINTS[platform], or 1 when not even 2 fit; 1 when the memory is unknown.
  C checkpoints run under the microbatches `choose_layout` picks for one, their peaks
  `stacked_peaks` (C x one checkpoint with all G gradient batches at once: stacking gives
  up streaming, so C = 1 may fit where C = 2 needs more than twice as much)."""
  if requested < 0:
    raise PlanError(f"{flag}={requested}: a number of checkpoints >= 1, or 0 (auto)")
  if not device_bytes:
    return requested or 1
  one = choose_layout(shape, dataclasses.replace(work, checkpoints_per_call=1), mesh, device_bytes)
  limit = HEADROOM * device_bytes

  def need(c: int) -> float:
    return max(stacked_peaks(shape, work, mesh, one, c).values())

  if requested:
    if requested > 1 and need(requested) > limit:
      raise PlanError(
        f"{flag}={requested}: {requested} checkpoints of {shape.name} need about "
        f"{_si(need(requested), 'B')} per device, over the limit of {_si(limit, 'B')}; "
        "use fewer (0: auto)"
      )
    return requested
  most = AUTO_MAX_CHECKPOINTS.get(platform, 1)
  return max((c for c in range(2, most + 1) if need(c) <= limit), default=1)


def stacked_peaks(
  shape: Shape, work: Work, mesh: dict[str, int], layout: Layout, checkpoints: int
) -> dict[str, float]:
  """{call: bytes} per device of `checkpoints` (> 1) checkpoints stacked in each call
  (sweep.Sweep.compute_batch) under `layout`'s microbatches: every call's peak times C,
  and the gradient and spectra calls hold all G batches at once (not streamed)."""
  if checkpoints < 2:
    raise PlanError(f"stacked_peaks of {checkpoints} checkpoint(s): one runs streamed")
  c = checkpoints
  peaks = {
    "capture": forward_call_bytes(
      shape, work, mesh, work.n_sequences, layout.capture_microbatch, checkpoints_per_call=c
    )["total"]
  }
  if work.loss_sequences:
    peaks["loss"] = forward_call_bytes(
      shape, work, mesh, work.loss_sequences, layout.loss_microbatch, True, c
    )["total"]
  if work.gradients:
    peaks["gradients"] = gradient_call_bytes(
      shape, work, mesh, layout.gradient_microbatch, layout.remat, c, layout.carry
    )["total"]
    peaks["spectra"] = spectra_call_bytes(shape, work, c)["total"]
  return peaks


def kept_positions(spec: str, seq_len: int) -> int:
  """Token positions per sequence a --positions spec keeps."""
  from jax_pythia.models import model as model

  try:
    kind, arg = model.parse_positions(spec, "--positions")
  except ValueError as e:
    raise PlanError(str(e)) from None
  return {"last": 1, "all": seq_len, "random": arg}.get(kind) or len(arg)


def sweep_work(options, seq_len: int) -> Work:
  """The Work of sweep.SweepOptions on sequences of seq_len tokens."""
  return Work(
    options.n_sequences,
    options.computes_gradients,  # no gradient pass without a selected gradient metric
    options.gradient_window,
    options.gradient_sequences,
    options.gradient_microbatch,
    options.loss_sequences,
    options.dtype,
    kept_positions(options.positions, seq_len),
  )


def sweep_layouts(
  models, options, seq_len: int, mesh: dict[str, int], device_bytes: float | None = None
) -> dict[str, Layout]:
  """{model name: Layout} for a sweep's models (sources.ModelSource) on devices of
  `device_bytes` (default: what the first local device reports). Raises PlanError, before
  anything is loaded, for a model that cannot fit; a Hub model of unknown shape gets no
  layout (its gradient batches run as --gradient_microbatch says)."""
  if device_bytes is None:
    device_bytes, _ = device_memory()
  work = sweep_work(options, seq_len)
  layouts = {}
  for m in models:
    shape = of_source(m, seq_len)
    if shape is not None:
      layouts[m.name] = require_fit(m.name, choose_layout(shape, work, mesh, device_bytes), work)
  return layouts


def measure_flops_per_device(seconds: float = 2.0, checkpoints_per_call: int = 1) -> float:
  """FLOP/s one local device reaches on a small model's forward (all its overheads in),
  run on `checkpoints_per_call` stacked copies of the model in one call, as the sweep
  does (what stacking gains shows here)."""
  import jax

  from jax_pythia.models import model as model

  config = GPTNeoXConfig(
    vocab_size=4096, d_model=512, n_layers=4, n_heads=8, d_mlp=2048, max_seq_len=256
  )
  c = checkpoints_per_call
  params = model.init_params(config, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: np.broadcast_to(x, (c, *x.shape)), params)
  tokens = np.zeros((8, 256), np.int32)
  forward = model.make_forward(config, return_logits=True)
  fn = jax.jit(jax.vmap(forward, in_axes=(0, None)))
  jax.block_until_ready(fn(params, tokens))
  shape = Shape("measure", 4, 512, 8, 2048, 4096, 256, (0,))
  flops = c * (2 * (shape.layer_params + 512 * 4096) * 8 * 256 + attention_flops(shape, 8))
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
  layout: Layout | None = None  # chosen from the device's memory, when it is known
  checkpoints_per_call: int = 1  # memory holds this many at once; FLOPs per checkpoint are
  # unchanged (stacking changes the rate reached, which --measure measures at C)
  mesh: dict | None = None  # {'data': D, 'model': M} planned under

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
  device_bytes: float | None = None,
) -> ModelPlan:
  """`flops_per_second`: what all devices together sustain (peak x utilisation).
  `device_bytes`: one device's memory; the plan then runs each call in the microbatches
  (and rematerialisation) that `choose_layout` picks, and reports memory under them."""
  try:
    chosen = suite.parse_steps(steps, shape.steps)
  except ValueError as e:
    raise PlanError(f"--steps for {shape.name}: {e}") from None
  if shape.steps[-1] not in chosen:
    chosen = chosen + (shape.steps[-1],)  # the sweep always adds the final checkpoint
  M = mesh.get("model", 1)
  if shape.n_heads % M or shape.d_mlp % M:
    raise PlanError(
      f"--mesh model axis of {M}: {shape.name} has {shape.n_heads} heads and d_mlp "
      f"{shape.d_mlp}, not both divisible by it"
    )
  flops = flops_per_checkpoint(shape, work)
  layout = None
  if device_bytes:
    layout = choose_layout(shape, work, mesh, device_bytes)
    work = dataclasses.replace(work, gradient_microbatch=layout.gradient_microbatch)
    g_seqs = work.gradient_batches * work.gradient_sequences
    # What rematerialisation recomputes: the attention core, or the whole layer's forward.
    extra = {
      "none": 0.0,
      "attention": attention_flops(shape, g_seqs),
      "layer": 2 * shape.layer_params * g_seqs * shape.seq_len + attention_flops(shape, g_seqs),
    }[layout.remat]
    flops = {**flops, "gradients": flops["gradients"] + extra, "total": flops["total"] + extra}
  memory = memory_per_device(
    shape, work, mesh, layout.remat if layout else "none", layout.carry if layout else "device"
  )
  if layout:
    c = work.checkpoints_per_call
    peak = layout.peak if c == 1 else max(stacked_peaks(shape, work, mesh, layout, c).values())
    memory = {**memory, "total": peak}
  return ModelPlan(
    shape,
    chosen,
    flops,
    memory,
    flops["total"] / flops_per_second,
    shape.bytes_per_checkpoint / bandwidth,
    layout,
    work.checkpoints_per_call,
    dict(mesh),
  )


def _si(x: float, unit: str) -> str:
  for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


def format_bytes(x: float) -> str:
  """1.6e10 -> '16 GB' (decimal prefixes, as --device_memory reads them)."""
  return _si(x, "B")


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
  memory_source: str = "",
  stream: tuple[str, int | None] = ("Pythia's training stream", PILE_BYTES),
) -> str:
  """The plan as text; `data_bytes` of training data in `data_batches` batches (what
  tools.fetch_data stages, from jax_pythia.sweep.run.batches_needed) go beside the
  checkpoints, and `stream`, (name, bytes or None when unknown), is what they come from."""
  lines = [
    f"plan for {devices} device(s) on {hosts} host(s); throughput "
    f"{_si(flops_per_second, 'FLOP/s')} in all ({source})",
  ]
  if memory_source:
    lines.append(f"memory: {memory_source}; peaks held under {HEADROOM:.0%} of it")
  lines.append("")
  header = (
    "model",
    "ckpts",
    "C",
    "params",
    "fetch",
    "FLOPs/ckpt",
    "(capture/grad)",
    "microbatch",
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
        str(p.checkpoints_per_call),
        _si(p.shape.params, ""),
        _si(p.fetch_bytes, "B"),
        _si(f["total"], ""),
        f"{_si(f['capture'], '')}/{_si(f['gradients'], '')}",
        _layout_cell(p.layout) + _mesh_cell(p.mesh),
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
  for p in plans:
    if p.layout and not p.layout.fits:
      call = max(p.layout.peaks, key=p.layout.peaks.get)
      lines.append(
        f"* {p.shape.name} does not fit: its {call} call needs "
        f"{_si(p.layout.peaks[call], 'B')} per device"
        + (" even at the smallest microbatch with remat" if call != "spectra" else "")
        + f", over {_si(p.layout.limit, 'B')}"
      )
  if data_bytes is not None:
    lines.append(
      f"training data: {_si(data_bytes, 'B')} to fetch ({data_batches} batches read by byte "
      f"range; tools.fetch_data stages them), {_stream_words(*stream)}"
    )
  return "\n".join(lines)


def _stream_words(name: str, size: int | None) -> str:
  """'not the whole 1.2 MB of x' (or 'from x' where its size is not known here)."""
  return f"not the whole {_si(size, 'B')} of {name}" if size else f"from {name}"


def _mesh_cell(mesh: dict | None) -> str:
  """' model:4' when the plan splits the weights over a model axis (pass --mesh so)."""
  return f" model:{mesh['model']}" if mesh and mesh.get("model", 1) > 1 else ""


def _layout_cell(layout: Layout | None) -> str:
  """'16' or '4 remat:attention' (the gradient microbatch), '*' marking a misfit."""
  if layout is None:
    return "given"
  cell = str(layout.gradient_microbatch or layout.capture_microbatch)
  if layout.remat != "none":
    cell += f" remat:{layout.remat}"
  if layout.carry == "host":
    cell += " carry:host"
  return cell if layout.fits else cell + " *"


# ------------------------------------------------------------------- device memory

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)


def parse_bytes(text: str, flag: str = "--device_memory") -> int:
  """'16GB' -> 16e9, '80GiB' -> 80 * 2**30, '512MB', '1.5T', '123456' (bytes)."""
  m = _SIZE_RE.match(str(text))
  if not m or float(m.group(1)) <= 0 or (m.group(3) and not m.group(2)):
    raise PlanError(f"{flag}={text!r}: expected a size such as 16GB, 80GiB or 512MB")
  number, prefix, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
  power = "kmgtp".find(prefix) + 1 if prefix else 0
  return int(number * (1024 if binary else 1000) ** power)


def available_ram() -> int:
  """Bytes of RAM free for new work: MemAvailable, else free pages."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory(device=None) -> tuple[int, str]:
  """(bytes, where from) of one device: its allocator's limit on GPU and TPU, free RAM on
  CPU (whose memory_stats() is None)."""
  import jax

  device = device or jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.platform} memory_stats()"
  return available_ram(), "available RAM"


# ------------------------------------------------------------------ gradient memory
