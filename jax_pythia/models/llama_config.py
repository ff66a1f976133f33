"""Configuration of the Llama family (Llama, OLMo, OLMo-2, pico-decoder) from config.json.

One dataclass for the four: they share the decoder (pre-norm or OLMo-2's post-norm,
SwiGLU MLP, rotary on the whole head, grouped-query attention, no biases) and differ in
the few fields below. As for GPT-NeoX, every key is understood, known not to change the
forward pass, or refused by name: a rope_scaling type, a sliding window, biases, a
pretraining_tp > 1 or any key this code does not know is a one-line ConfigError.

pico-decoder's own keys (`d_model`, `attention_n_kv_heads`, ...) map onto the same fields
(docs/families.md: the mapping and why it is exact).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jax_pythia.errors import ConfigError
from jax_pythia.models.config import _IGNORED_KEYS, _is_finite_number, _is_int, read_config_json

#: family -> (model_type, architecture) of config.json, and what the forward differs in.
VARIANTS = {
  "llama": ("llama", "LlamaForCausalLM"),
  "olmo": ("olmo", "OlmoForCausalLM"),
  "olmo2": ("olmo2", "Olmo2ForCausalLM"),
  "pico_decoder": ("pico_decoder", "PicoDecoderHF"),
}
_SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")

# config.json key -> field, per layout. Integers unless named in _NUMBERS.
_HF_FIELDS = {
  "vocab_size": "vocab_size",
  "hidden_size": "d_model",
  "num_hidden_layers": "n_layers",
  "num_attention_heads": "n_heads",
  "num_key_value_heads": "n_kv_heads",
  "intermediate_size": "d_mlp",
  "head_dim": "d_head",
  "max_position_embeddings": "max_seq_len",
  "rms_norm_eps": "norm_eps",
  "rope_theta": "rope_base",
  "tie_word_embeddings": "tie_embeddings",
  "clip_qkv": "clip_qkv",
}
_PICO_FIELDS = {
  "vocab_size": "vocab_size",
  "d_model": "d_model",
  "n_layers": "n_layers",
  "attention_n_heads": "n_heads",
  "attention_n_kv_heads": "n_kv_heads",
  "activation_hidden_dim": "d_mlp",
  "max_seq_len": "max_seq_len",
  "norm_eps": "norm_eps",
  "position_emb_theta": "rope_base",
}
_NUMBERS = {"norm_eps", "rope_base", "clip_qkv"}
_REQUIRED = ("vocab_size", "d_model", "n_layers", "n_heads", "d_mlp")
# Keys whose value must be exactly this, or the model computes something else.
_REQUIRED_VALUES: dict[str, Any] = {
  "hidden_act": "silu",
  "attention_bias": False,
  "mlp_bias": False,
  "rope_scaling": None,
  "pretraining_tp": 1,
}
# Keys that do not change the forward pass, beyond GPT-NeoX's list.
_ALSO_IGNORED = {"batch_size", "auto_map", "rope_parameters"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama-family decoder. `family` picks the variant (models.family.FAMILIES):
  'llama' and 'pico_decoder' (RMSNorm before attention and MLP), 'olmo' (LayerNorm without
  parameters, eps 1e-5, optional clip_qkv), 'olmo2' (RMSNorm after attention and MLP,
  RMSNorm on the full query and key projections)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_mlp: int
  n_kv_heads: int = None  # type: ignore[assignment]  # None: n_heads (no grouping)
  d_head: int = None  # type: ignore[assignment]  # None: d_model // n_heads
  max_seq_len: int = 2048
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  clip_qkv: float | None = None
  family: str = "llama"
  stored_dtype: str = "float32"  # the dtype of the weights on disk, informational

  def __post_init__(self):
    if self.family not in VARIANTS:
      raise ConfigError(f"family={self.family!r}: one of {', '.join(VARIANTS)}")
    if self.n_kv_heads is None and _is_int(self.n_heads) and self.n_heads > 0:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    if self.d_head is None and _is_int(self.d_model) and _is_int(self.n_heads) and self.n_heads > 0:
      object.__setattr__(self, "d_head", self.d_model // self.n_heads)
    key = self.key
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_mlp", "n_kv_heads", "d_head",
                 "max_seq_len"):  # fmt: skip
      value = getattr(self, name)
      if not _is_int(value) or value <= 0:
        raise ConfigError(f"{key(name)}={value!r}: must be a positive integer")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(
        f"{key('n_kv_heads')}={self.n_kv_heads} does not divide {key('n_heads')}={self.n_heads}"
      )
    if self.d_head % 2:
      raise ConfigError(f"{key('d_head')}={self.d_head}: rotate-half rotary needs it even")
    for name in ("rope_base", "norm_eps"):
      value = getattr(self, name)
      if not _is_finite_number(value) or value <= 0:
        raise ConfigError(f"{key(name)}={value!r}: must be a positive number")
    if self.clip_qkv is not None and (not _is_finite_number(self.clip_qkv) or self.clip_qkv <= 0):
      raise ConfigError(f"clip_qkv={self.clip_qkv!r}: must be null or a positive number")
    if self.clip_qkv is not None and self.family != "olmo":
      raise ConfigError(f"clip_qkv={self.clip_qkv!r}: only OLMo clips q, k and v")
    if not isinstance(self.tie_embeddings, bool):
      raise ConfigError(f"tie_word_embeddings={self.tie_embeddings!r}: must be true or false")
    if self.stored_dtype not in _SUPPORTED_DTYPES:
      raise ConfigError(f"dtype={self.stored_dtype!r}: supported are {_SUPPORTED_DTYPES}")

  def key(self, field: str) -> str:
    """The config.json key of `field` in this variant's layout (what errors name)."""
    fields = _PICO_FIELDS if self.family == "pico_decoder" else _HF_FIELDS
    return next((k for k, f in fields.items() if f == field), field)

  def dims(self) -> dict[str, int]:
    """Each dim symbol of the layout table (llama.params) -> its size."""
    return {
      "L": self.n_layers,
      "V": self.vocab_size,
      "d": self.d_model,
      "H": self.n_heads,
      "Hkv": self.n_kv_heads,
      "dh": self.d_head,
      "D": self.n_heads * self.d_head,
      "Dkv": self.n_kv_heads * self.d_head,
      "f": self.d_mlp,
    }

  def site_refusal(self, suffix: str) -> str | None:
    """Why this model has no per-layer capture site `suffix`, or None if it has it."""
    if self.family == "olmo2" and suffix in ("ln1.hook_normalized", "ln2.hook_normalized"):
      return "does not exist in OLMo-2: its norms follow attention and the MLP, none precede them"
    return None

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str = "config") -> LlamaConfig:
    """Reads a config.json of any variant; refuses by name what the model does not implement."""
    where = f"{source}: " if source else ""
    model_type = hf.get("model_type")
    family = next((f for f, (t, _) in VARIANTS.items() if t == model_type), None)
    if family is None:
      raise ConfigError(f"{where}model_type={model_type!r}: not a Llama-family model")
    fields = _PICO_FIELDS if family == "pico_decoder" else _HF_FIELDS
    kwargs = {"family": family, **_rope_base(hf, where)}
    for key, field in fields.items():
      if key not in hf or (hf[key] is None and field in ("n_kv_heads", "clip_qkv", "d_head")):
        continue
      value = hf[key]
      ok = _is_finite_number(value) if field in _NUMBERS else _is_int(value)
      if field == "tie_embeddings":
        ok = isinstance(value, bool)
      if not ok:
        raise ConfigError(f"{where}{key}={json.dumps(value)}: wrong type for this setting")
      kwargs[field] = value
    _refuse_unsupported(hf, fields, where)
    missing = [k for k, f in fields.items() if f in _REQUIRED and k not in hf]
    if missing:
      raise ConfigError(f"{where}missing required keys {missing}")
    stored = hf.get("dtype", hf.get("torch_dtype")) or "float32"
    kwargs["stored_dtype"] = str(stored).removeprefix("torch.")
    try:
      return cls(**kwargs)
    except ConfigError as e:
      raise ConfigError(f"{where}{e}") from None

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> LlamaConfig:
    path = os.fspath(path)
    return cls.from_hf_dict(read_config_json(path), source=path)

  def to_hf_dict(self) -> dict[str, Any]:
    """What `save_pretrained` of the variant's transformers class writes (pico: its own
    keys), loadable by `from_hf_dict` and by transformers."""
    model_type, architecture = VARIANTS[self.family]
    head = {"architectures": [architecture], "model_type": model_type, "dtype": self.stored_dtype}
    if self.family == "pico_decoder":
      fields = {f: k for k, f in _PICO_FIELDS.items()}
      return {**head, **{fields[f]: getattr(self, f) for f in fields}}
    hf = {k: getattr(self, f) for k, f in _HF_FIELDS.items() if f not in ("rope_base",)}
    if self.family != "olmo":
      hf.pop("clip_qkv")
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_base}
    hf.update(hidden_act="silu", attention_bias=False)
    if self.family == "llama":
      hf["mlp_bias"] = False
    if self.family == "olmo":
      hf.pop("rms_norm_eps")
    return {**head, **hf}


def _rope_base(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """{'rope_base': theta} from rope_parameters (transformers 5) if present; only the default
  rotary on the whole head is implemented."""
  rope = hf.get("rope_parameters")
  if rope is None:
    return {}
  if not isinstance(rope, dict):
    raise ConfigError(f"{where}unsupported rope_parameters={rope!r} (expected a mapping)")
  if rope.get("rope_type", "default") != "default":
    raise ConfigError(
      f"{where}unsupported rope_parameters.rope_type={rope['rope_type']!r} "
      "(only 'default' rotary is implemented)"
    )
  unknown = set(rope) - {"rope_type", "rope_theta", "partial_rotary_factor"}
  if unknown or rope.get("partial_rotary_factor", 1.0) != 1.0:
    bad = sorted(unknown) or f"partial_rotary_factor={rope['partial_rotary_factor']!r}"
    raise ConfigError(f"{where}unsupported rope_parameters {bad} (rotary on the whole head only)")
  theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
  if "rope_theta" in hf and hf["rope_theta"] != theta:
    raise ConfigError(f"{where}rope_theta={hf['rope_theta']!r} contradicts rope_parameters")
  if not _is_finite_number(theta):
    raise ConfigError(f"{where}rope_parameters.rope_theta={theta!r}: expected a finite number")
  return {"rope_base": theta}


def _refuse_unsupported(hf: dict[str, Any], fields: dict[str, str], where: str) -> None:
  """Refuses, by name, a key set to what this code does not implement, or not known."""
  for key, expected in _REQUIRED_VALUES.items():
    if key in hf and (hf[key] != expected or type(hf[key]) is not type(expected)):
      raise ConfigError(f"{where}unsupported {key}={hf[key]!r} (only {expected!r} is implemented)")
  understood = set(fields) | set(_REQUIRED_VALUES) | {"model_type"} | _ALSO_IGNORED
  unknown = sorted(set(hf) - understood - _IGNORED_KEYS)
  if unknown:
    details = ", ".join(f"{k}={hf[k]!r}" for k in unknown)
    raise ConfigError(
      f"{where}unsupported setting(s) {details}: this Llama-family implementation does not "
      "know what they change, so it refuses rather than compute something else"
    )
