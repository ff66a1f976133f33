"""The toy suite's options: its model sizes (GPT-NeoX and Llama), Pythia's learning-rate
law scaled down to them, and `ToySuiteOptions`, everything that determines the suite's
bits."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_pythia import suite
from jax_pythia.errors import ToySuiteError
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.models.llama_config import LlamaConfig
from jax_pythia.toy.corpus import VOCAB_SIZE

#: Pythia's rotary fraction needs an even rotary dimension: d_head a multiple of 8.
DEFAULT_D_HEAD = 16
#: The families a toy size may be (models.family.FAMILIES' names) and their name prefixes.
FAMILIES = {"gpt_neox": "toy", "llama": "toy-llama"}


# --------------------------------------------------------------------------- sizes and lr


@dataclasses.dataclass(frozen=True)
class ToySize:
  """One model of the toy suite: a GPT-NeoX (MLP 4 d wide, as in every Pythia size) or a
  Llama (SwiGLU 8 d / 3 wide, rounded up to a multiple of 8, so its three MLP matrices hold
  as many weights as GPT-NeoX's two; grouped-query attention with `n_kv_heads` key/value
  heads; the unembedding tied to the embedding when `tied`)."""

  n_layers: int
  d_model: int
  n_heads: int
  family: str = "gpt_neox"
  n_kv_heads: int = 0  # Llama: key/value heads (0: n_heads)
  tied: bool = False  # Llama: tie_word_embeddings

  def __post_init__(self):
    for field in ("n_layers", "d_model", "n_heads"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ToySuiteError(f"toy size {self.spec}: {field} must be a positive integer")
    if self.family not in FAMILIES:
      raise ToySuiteError(f"toy size {self.spec}: family one of {', '.join(FAMILIES)}")
    if self.family == "gpt_neox":
      if self.n_kv_heads or self.tied:
        raise ToySuiteError(f"toy size {self.spec}: GPT-NeoX has no GQA and no tied embeddings")
      if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 8:
        raise ToySuiteError(
          f"toy size {self.spec}: d_head = d_model / n_heads must be a multiple of 8 (the "
          "rotary quarter of a head must be even)"
        )
      return
    if not self.n_kv_heads:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
      raise ToySuiteError(f"toy size {self.spec}: d_head = d_model / n_heads must be even")
    if self.n_heads % self.n_kv_heads:
      raise ToySuiteError(f"toy size {self.spec}: n_kv_heads must divide n_heads")

  @property
  def name(self) -> str:
    return f"{FAMILIES[self.family]}-{self.n_layers}l-{self.d_model}d"

  @property
  def spec(self) -> str:
    """`LxDxH` (GPT-NeoX), `llama:LxDxHxKV[:tied]` (Llama): what parse_sizes reads."""
    dims = f"{self.n_layers}x{self.d_model}x{self.n_heads}"
    if self.family == "gpt_neox":
      return dims
    return f"{self.family}:{dims}x{self.n_kv_heads}" + (":tied" if self.tied else "")

  @property
  def d_head(self) -> int:
    return self.d_model // self.n_heads

  @property
  def d_mlp(self) -> int:
    if self.family == "gpt_neox":
      return 4 * self.d_model
    return -(-8 * self.d_model // 24) * 8  # ceil(8 d / 3) to a multiple of 8

  @property
  def non_embedding_params(self) -> int:
    """The layers' matrix weights, what Pythia's lr law is fitted on (biases and norms left
    out): 12 L d^2 for GPT-NeoX; q, o (d x d), k, v (d x H_kv dh) and three MLP matrices
    for Llama."""
    d, L = self.d_model, self.n_layers
    if self.family == "gpt_neox":
      return 12 * L * d**2
    return L * (2 * d * d + 2 * d * self.n_kv_heads * self.d_head + 3 * d * self.d_mlp)

  def config(self, seq_len: int):
    if self.family == "gpt_neox":
      return GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        d_model=self.d_model,
        n_layers=self.n_layers,
        n_heads=self.n_heads,
        d_mlp=self.d_mlp,
        max_seq_len=seq_len,
        stored_dtype="float32",
      )
    return LlamaConfig(
      vocab_size=VOCAB_SIZE,
      d_model=self.d_model,
      n_layers=self.n_layers,
      n_heads=self.n_heads,
      n_kv_heads=self.n_kv_heads,
      d_mlp=self.d_mlp,
      max_seq_len=seq_len,
      tie_embeddings=self.tied,
      family=self.family,
      stored_dtype="float32",
    )


def _parse_size(part: str) -> ToySize:
  """`LxD[xH]` (GPT-NeoX) or `llama:LxD[xH[xKV]][:tied]` -> a ToySize."""
  fields = part.strip().lower().split(":")
  family = fields.pop(0) if len(fields) > 1 else "gpt_neox"
  flag = fields.pop() if len(fields) == 2 else ""
  bits = fields[0].split("x") if len(fields) == 1 and flag in ("", "tied") else []
  most = 3 if family == "gpt_neox" else 4
  if not 2 <= len(bits) <= most or not all(b.isdigit() for b in bits) or family not in FAMILIES:
    raise ToySuiteError(
      f"toy size {part!r}: expected LAYERSxD_MODEL[xHEADS] (GPT-NeoX) or "
      "llama:LAYERSxD_MODEL[xHEADS[xKV_HEADS]][:tied], e.g. 4x64 or llama:4x64x4x2"
    )
  n_layers, d_model, *heads = (int(b) for b in bits)
  n_heads = heads[0] if heads else max(1, d_model // DEFAULT_D_HEAD)
  kv_heads = heads[1] if len(heads) > 1 else 0
  return ToySize(n_layers, d_model, n_heads, family, kv_heads, flag == "tied")


def parse_sizes(spec: str | Sequence[ToySize | str]) -> tuple[ToySize, ...]:
  """`"2x32,4x64x8,llama:4x64x4x2"` -> ToySizes (heads default to d_model/16, key/value
  heads to the heads)."""
  parts = spec.split(",") if isinstance(spec, str) else list(spec)
  sizes = [part if isinstance(part, ToySize) else _parse_size(part) for part in parts]
  if not sizes:
    raise ToySuiteError("no toy sizes given")
  names = [s.name for s in sizes]
  if len(set(names)) != len(names):
    raise ToySuiteError(f"toy sizes repeat a model name: {names}")
  return tuple(sizes)


@functools.cache
def pythia_lr_law() -> tuple[float, float]:
  """(exponent b, log-prefactor a) of lr = exp(a) * N^b fitted on Pythia's table.

  N is the non-embedding parameter count 12 L d^2 of each real size, lr its published
  learning rate; ordinary least squares in log-log space (b is about -0.27).
  """
  n = np.array([12 * s.n_layers * s.d_model**2 for s in suite.SIZES.values()], np.float64)
  lr = np.array([s.learning_rate for s in suite.SIZES.values()], np.float64)
  design = np.stack([np.log(n), np.ones_like(n)], axis=1)
  (b, a), *_ = np.linalg.lstsq(design, np.log(lr), rcond=None)
  return float(b), float(a)


def pythia_learning_rate(size: ToySize, scale: float = 1.0) -> float:
  """Pythia's lr law extrapolated to `size`, times `scale`, to 3 significant digits.

  Rounded so the manifest shows plain numbers; the rounding is part of the recipe, so
  every machine trains with the same rate.
  """
  b, a = pythia_lr_law()
  lr = scale * math.exp(a) * size.non_embedding_params**b
  return float(f"{lr:.3g}")


# --------------------------------------------------------------------------- options


#: Two families side by side, smallest first (by non_embedding_params): GPT-NeoX as Pythia,
#: and Llama with grouped-query attention (H_kv = H / 2), SwiGLU, tied (the smaller) and
#: untied embeddings.
DEFAULT_SIZES = parse_sizes("llama:2x32x2x1:tied,2x32,3x48,llama:4x64x4x2,4x64,4x96")


@dataclasses.dataclass(frozen=True)
class ToySuiteOptions:
  """Everything that determines the suite's bits. Two builds with equal options are equal."""

  sizes: tuple[ToySize, ...] = DEFAULT_SIZES
  seq_len: int = 64
  # 128: the study takes the first 128 sequences of a step's batch (docs/method.md), so a
  # batch must hold them; at 2 CPU cores that leaves ~200 steps for ~5 minutes.
  sequences_per_step: int = 128
  n_steps: int = 200
  # 19 checkpoints: the sweep computes gradients on 11 batches around each one, so more
  # checkpoints would cost the sweep more than the training itself.
  checkpoint_every: int = 20
  log_checkpoints_until: int = 128
  seed: int = 0
  lr_scale: float = 1.0
  warmup_fraction: float = 0.01
  min_lr_fraction: float = 0.1
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8

  def __post_init__(self):
    object.__setattr__(self, "sizes", parse_sizes(self.sizes))
    for field in (
      "seq_len",
      "sequences_per_step",
      "n_steps",
      "checkpoint_every",
      "log_checkpoints_until",
    ):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ToySuiteError(f"{field}={value!r}: must be a positive integer")
    if not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_fraction <= 1:
      raise ToySuiteError("warmup_fraction must be in [0, 1) and min_lr_fraction in [0, 1]")
    if self.lr_scale <= 0:
      raise ToySuiteError(f"lr_scale={self.lr_scale}: must be positive")

  @property
  def n_items(self) -> int:
    return self.n_steps * self.sequences_per_step

  @property
  def warmup_steps(self) -> int:
    return max(1, round(self.warmup_fraction * self.n_steps))

  def checkpoint_steps(self) -> tuple[int, ...]:
    """0, powers of two up to `log_checkpoints_until`, every `checkpoint_every`, and the end."""
    log_spaced = {2**i for i in range(64) if 2**i <= min(self.log_checkpoints_until, self.n_steps)}
    regular = set(range(0, self.n_steps + 1, self.checkpoint_every))
    return tuple(sorted({0, self.n_steps} | log_spaced | regular))

  def learning_rate(self, size: ToySize) -> float:
    return pythia_learning_rate(size, self.lr_scale)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["sizes"] = [s.spec for s in self.sizes]
    return out

  @classmethod
  def from_overrides(cls, **overrides) -> ToySuiteOptions:
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ToySuiteError(f"unknown toy-suite option(s) {unknown}")
    return cls(**overrides)


DEFAULT_OPTIONS = ToySuiteOptions()
#: Seconds to build on 2 CPU cores; what the tests use.
TINY_OPTIONS = ToySuiteOptions(
  sizes=parse_sizes("1x16x2,2x32x2"),
  seq_len=32,
  sequences_per_step=4,
  n_steps=40,
  checkpoint_every=10,
  log_checkpoints_until=8,
)
