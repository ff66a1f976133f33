"""The shapes and work a plan prices: a model's sizes (from the suite table or a local
config.json), the sweep's work per checkpoint, the mesh, and the FLOPs of that work
(2 * params * tokens forward, 6 * params * tokens forward + backward, plus attention and
the SVDs of the spectra), and the memory of the device they run on."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence

from jax_pythia import suite
from jax_pythia.errors import JaxPythiaError

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
  def kv_width(self) -> int:
    """H_kv * dh: the width of the key and of the value projection (d without GQA)."""
    return self.d_model * (self.n_kv_heads or self.n_heads) // self.n_heads

  @property
  def layer_params(self) -> int:
    """Matmul weights of the layers (what every token passes through): q and o (d x d),
    k and v (d x H_kv*dh each), and two MLP matrices (three when gated)."""
    d, kv = self.d_model, self.kv_width
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


def split_problem(n_heads: int, n_kv_heads: int, d_mlp: int, model_axis: int) -> str | None:
  """Why a model axis of `model_axis` devices cannot split these sizes (the heads, the
  key/value heads of grouped-query attention and d_mlp are each split over it), or None."""
  sizes = {"heads": n_heads, "key/value heads": n_kv_heads or n_heads, "d_mlp": d_mlp}
  if sizes["key/value heads"] == n_heads:  # no grouped-query attention: one count of heads
    del sizes["key/value heads"]
  bad = [f"{n} {what}" for what, n in sizes.items() if n % model_axis]
  if not bad:
    return None
  return f"a model axis of {model_axis} does not divide its {' and '.join(bad)}"


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
  # Gradient condition numbers refined in float64 (a selected refined metric): the spectra
  # call holds float64 copies and SVD workspace beside the float32 ones (memory.py).
  refine: bool = True
  captures: bool = True  # the forward capture pass (a selected activation metric)
  weight_spectra: bool = True  # the weights' SVDs (a selected spectral weight metric)

  @property
  def gradient_batches(self) -> int:
    return 2 * self.gradient_window + 1 if self.gradients else 0


def selected_work(selection, platform: str | None = None) -> dict:
  """The Work fields a selection (analysis.selection.Selection) decides, so the plan counts
  only the selected work (the gradient pass: SweepOptions.computes_gradients). The float64
  refinement runs only where `platform` (default: this process's backend) has float64:
  not on TPU, whose condition numbers stay float32's (analysis.spectra)."""
  from analysis.spectra import float64_supported

  return {
    "refine": selection.refines_gradients and float64_supported(platform),
    "captures": selection.needs_activations,
    "weight_spectra": bool(selection.of("weights", "spectral")),
  }


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
  capture *= work.captures
  g_seqs = work.gradient_batches * work.gradient_sequences
  gradients = 6 * with_unembed * g_seqs * s + 3 * attention_flops(shape, g_seqs)
  loss = 2 * with_unembed * work.loss_sequences * s + attention_flops(shape, work.loss_sequences)
  # Weights once, gradients once per batch: MLP (f x d), whole OV (d x d), heads' cores.
  per_set = L * (svd_flops(f, d) + svd_flops(d, d) + H * (2 * svd_flops(d, dh) + svd_flops(dh, dh)))
  spectra = per_set * (work.weight_spectra + work.gradient_batches)
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


def si(x: float, unit: str) -> str:
  for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


def format_bytes(x: float) -> str:
  """1.6e10 -> '16 GB' (decimal prefixes, as --device_memory reads them)."""
  return si(x, "B")


def kept_positions(spec: str, seq_len: int) -> int:
  """Token positions per sequence a --positions spec keeps."""
  from jax_pythia.models import model as model

  try:
    kind, arg = model.parse_positions(spec, "--positions")
  except ValueError as e:
    raise PlanError(str(e)) from None
  return {"last": 1, "all": seq_len, "random": arg}.get(kind) or len(arg)


def spectra_layers(shape: Shape, mesh: dict[str, int]) -> int:
  """Layers each device holds in the spectra: L / gcd(L, devices) (sharding.layer_mesh)."""
  devices = mesh.get("data", 1) * mesh.get("model", 1)
  return shape.n_layers // math.gcd(shape.n_layers, devices)


def layer_gradient_values(shape: Shape) -> int:
  """Values of one layer's gradients (and of the weights the spectra read): the value
  (d x H_kv dh) and out (d x d) kernels and fc_out (f x d); 'reference' adds query and
  key, not counted."""
  d = shape.d_model
  return d * shape.kv_width + d * d + shape.d_mlp * d
