"""GPT-NeoX configuration read from a Hugging Face `config.json`.

Both layouts of docs/pythia.md load: the Hub's transformers-4 keys (`rotary_pct`,
`rotary_emb_base`, `torch_dtype`) and what transformers 5 writes (`rope_parameters`,
`dtype`, `attention_bias`). Every key is either understood, known not to change the
forward pass, or refused: a setting the model does not implement is an error naming the
key and value, never silently ignored (the same policy as penzai's GPT-NeoX converter).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, ClassVar

from jax_pythia.errors import ConfigError

# Keys that do not change what the forward pass computes (training-only, generation,
# bookkeeping). Dropout is off at analysis time; Pythia trained without it.
_IGNORED_KEYS = frozenset(
  {
    "_name_or_path",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "hidden_dropout",
    "classifier_dropout",
    "is_decoder",
    "tokenizer_class",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "tie_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "finetuning_task",
    "prefix",
    "task_specific_params",
    "sep_token_id",
    "decoder_start_token_id",
    "_attn_implementation",
    "attn_implementation",
    "_attn_implementation_autoset",
    "gradient_checkpointing",
    "max_length",
    "min_length",
    "do_sample",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "rope_scaling_type",
    "layer_types",
    "output_scores",
    "return_dict_in_generate",
    "pruned_heads",
    "tf_legacy_loss",
    "use_bfloat16",
    "embedding_size",
    "jax_pythia",
  }
)

# Keys whose value must be exactly this, or the model computes something else.
_REQUIRED_VALUES: dict[str, Any] = {
  "model_type": "gpt_neox",
  "hidden_act": "gelu",  # exact (erf) GELU; gelu_new/gelu_fast are tanh approximations
  "tie_word_embeddings": False,
  "attention_bias": True,
  "rope_scaling": None,
}

_SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


# The type every understood key must have; JSON allows anything, and a string "false" or
# a null would otherwise run a different model or fail deep inside the forward pass.
_INT_KEYS = (
  "vocab_size",
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "intermediate_size",
  "max_position_embeddings",
)
_NUMBER_KEYS = (
  "layer_norm_eps",
  "rotary_pct",
  "rotary_emb_base",
  "rope_theta",
  "partial_rotary_factor",
)
_BOOL_KEYS = ("use_parallel_residual",)
_ROPE_NUMBER_KEYS = ("rope_theta", "partial_rotary_factor")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_types(hf: dict[str, Any], where: str) -> None:
  """Refuses, naming the key and value, an understood key whose JSON value has the wrong type."""

  def refuse(key, value, expected):
    shown = json.dumps(value) if isinstance(value, (str, bool, type(None))) else repr(value)
    raise ConfigError(f"{where}{key}={shown}: expected {expected}")

  for key in _INT_KEYS:
    if key in hf and not _is_int(hf[key]):
      refuse(key, hf[key], "an integer")
  for key in _NUMBER_KEYS:
    if key in hf and not _is_finite_number(hf[key]):
      refuse(key, hf[key], "a finite number")
  for key in _BOOL_KEYS:
    if key in hf and not isinstance(hf[key], bool):
      refuse(key, hf[key], "true or false")
  rope = hf.get("rope_parameters")
  if isinstance(rope, dict):
    for key in _ROPE_NUMBER_KEYS:
      if key in rope and not _is_finite_number(rope[key]):
        refuse(f"rope_parameters.{key}", rope[key], "a finite number")
    if "rope_type" in rope and not isinstance(rope["rope_type"], str):
      refuse("rope_parameters.rope_type", rope["rope_type"], "a string")
  for key in ("dtype", "torch_dtype"):
    if hf.get(key) is not None and not isinstance(hf[key], str):
      refuse(key, hf[key], 'a dtype name such as "float16"')


# config.json key -> field.
_HF_FIELDS = {
  "vocab_size": "vocab_size",
  "hidden_size": "d_model",
  "num_hidden_layers": "n_layers",
  "num_attention_heads": "n_heads",
  "intermediate_size": "d_mlp",
  "max_position_embeddings": "max_seq_len",
  "layer_norm_eps": "layer_norm_eps",
  "use_parallel_residual": "use_parallel_residual",
}


def _rotary(hf: dict[str, Any], refuse) -> tuple[Any, Any]:
  """(rotary_pct, rotary_base) from rope_parameters (transformers 5), the 4.x keys
  (`rotary_pct`, `rotary_emb_base`) or flattened rope keys; contradictions refused."""
  rotary_pct, rotary_base = 0.25, 10_000.0
  rope = hf.get("rope_parameters")
  if rope is not None:
    if not isinstance(rope, dict):
      refuse("rope_parameters", rope, "expected a mapping")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
      refuse("rope_parameters.rope_type", rope_type, "only 'default' rotary is implemented")
    unknown = set(rope) - {"rope_type", "rope_theta", "partial_rotary_factor"}
    if unknown:
      refuse("rope_parameters", sorted(unknown), "unknown rotary settings")
    rotary_pct = rope.get("partial_rotary_factor", 1.0)
    rotary_base = rope.get("rope_theta", rotary_base)
  # transformers-4 keys (the Hub's Pythia repos); they win only when no rope_parameters.
  if "rotary_pct" in hf and rope is None:
    rotary_pct = hf["rotary_pct"]
  if "rotary_emb_base" in hf and rope is None:
    rotary_base = hf["rotary_emb_base"]
  if rope is not None:
    for legacy, value in (("rotary_pct", rotary_pct), ("rotary_emb_base", rotary_base)):
      if legacy in hf and hf[legacy] != value:
        refuse(legacy, hf[legacy], f"contradicts rope_parameters ({value!r})")

  for key in ("rope_theta", "partial_rotary_factor"):
    # Some exports flatten rope settings to the top level.
    if key in hf:
      value = rotary_base if key == "rope_theta" else rotary_pct
      if rope is None:
        if key == "rope_theta":
          rotary_base = hf[key]
        else:
          rotary_pct = hf[key]
      elif hf[key] != value:
        refuse(key, hf[key], f"contradicts rope_parameters ({value!r})")
  return rotary_pct, rotary_base


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
  """The GPT-NeoX architecture this project implements (see docs/pythia.md)."""

  family: ClassVar[str] = "gpt_neox"  # its entry in models.family.FAMILIES
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_mlp: int
  max_seq_len: int = 2048
  rotary_pct: float = 0.25
  rotary_base: float = 10_000.0
  layer_norm_eps: float = 1e-5
  use_parallel_residual: bool = True
  stored_dtype: str = "float16"  # the dtype of the weights on disk, informational

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_mlp", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r}: must be a positive integer")
    for name in ("rotary_pct", "rotary_base", "layer_norm_eps"):
      if not _is_finite_number(getattr(self, name)):
        raise ConfigError(f"{name}={getattr(self, name)!r}: must be a finite number")
    if not isinstance(self.use_parallel_residual, bool):
      raise ConfigError(
        f"use_parallel_residual={self.use_parallel_residual!r}: must be true or false"
      )
    if self.d_model % self.n_heads:
      raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if not 0.0 < self.rotary_pct <= 1.0:
      raise ConfigError(f"rotary_pct={self.rotary_pct!r}: must be in (0, 1]")
    if self.rotary_dim % 2:
      raise ConfigError(
        f"rotary_pct={self.rotary_pct} gives an odd rotary dimension {self.rotary_dim} "
        f"of d_head={self.d_head}; rotate-half needs it even"
      )
    if not (self.rotary_base > 0 and math.isfinite(self.rotary_base)):
      raise ConfigError(f"rotary_base={self.rotary_base!r}: must be positive")
    if not self.layer_norm_eps > 0:
      raise ConfigError(f"layer_norm_eps={self.layer_norm_eps!r}: must be positive")
    if self.stored_dtype not in _SUPPORTED_DTYPES:
      raise ConfigError(f"dtype={self.stored_dtype!r}: supported are {_SUPPORTED_DTYPES}")

  @property
  def d_head(self) -> int:
    return self.d_model // self.n_heads

  @property
  def rotary_dim(self) -> int:
    # Hugging Face truncates, int(d_head * rotary_pct); so do we.
    return int(self.d_head * self.rotary_pct)

  @property
  def n_kv_heads(self) -> int:
    return self.n_heads

  def dims(self) -> dict[str, int]:
    """Each dim symbol of the layout table (gpt_neox.DIM_SYMBOLS) -> its size."""
    d = self.d_model
    return {
      "L": self.n_layers,
      "V": self.vocab_size,
      "d": d,
      "3d": 3 * d,
      "H": self.n_heads,
      "dh": self.d_head,
      "f": self.d_mlp,
    }

  def site_refusal(self, suffix: str) -> str | None:
    """Why this model has no per-layer capture site `suffix`, or None if it has it."""
    if suffix == "hook_resid_mid" and self.use_parallel_residual:
      return "exists only with sequential residual (use_parallel_residual=False)"
    if suffix == "mlp.hook_pre_linear":
      return "exists only in gated (SwiGLU) MLPs; GPT-NeoX's MLP is not gated"
    return None

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str = "config") -> GPTNeoXConfig:
    """Reads either config.json layout; refuses what the model does not implement."""
    hf = dict(hf)
    where = f"{source}: " if source else ""

    def refuse(key, value, why):
      raise ConfigError(f"{where}unsupported {key}={value!r} ({why})")

    for key, expected in _REQUIRED_VALUES.items():
      # type() too: 1 == True and 0 == False, but a config holding them is not a bool.
      if key in hf and (hf[key] != expected or type(hf[key]) is not type(expected)):
        refuse(key, hf[key], f"only {expected!r} is implemented")
    _check_types(hf, where)
    if "model_type" not in hf:
      raise ConfigError(f"{where}no model_type; expected 'gpt_neox'")

    rotary_pct, rotary_base = _rotary(hf, refuse)

    intermediate = hf.get("intermediate_size")
    if intermediate is None:
      refuse("intermediate_size", None, "required")
    stored = str(hf.get("dtype", hf.get("torch_dtype")) or "float32").removeprefix("torch.")

    missing = [
      k
      for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
      if k not in hf
    ]
    if missing:
      raise ConfigError(f"{where}missing required keys {missing}")
    kwargs = {field: hf[key] for key, field in _HF_FIELDS.items() if key in hf}

    understood = (
      set(_HF_FIELDS)
      | set(_REQUIRED_VALUES)
      | {
        "rope_parameters",
        "rotary_pct",
        "rotary_emb_base",
        "rope_theta",
        "partial_rotary_factor",
      }
    )
    unknown = sorted(set(hf) - understood - _IGNORED_KEYS)
    if unknown:
      details = ", ".join(f"{k}={hf[k]!r}" for k in unknown)
      raise ConfigError(
        f"{where}unsupported setting(s) {details}: this GPT-NeoX implementation does not "
        "know what they change, so it refuses rather than compute something else"
      )
    try:
      return cls(
        rotary_pct=float(rotary_pct),
        rotary_base=float(rotary_base),
        stored_dtype=str(stored),
        **kwargs,
      )
    except ConfigError as e:
      raise ConfigError(f"{where}{e}") from None

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> GPTNeoXConfig:
    path = os.fspath(path)
    return cls.from_hf_dict(read_config_json(path), source=path)

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers-5 layout (what `save_pretrained` writes), loadable by both."""
    return _to_hf_dict(self)


def read_config_json(path: str) -> dict[str, Any]:
  """The JSON object of a config.json; a ConfigError naming the file if it is not one."""
  try:
    with open(path, encoding="utf-8") as f:
      hf = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{path}: no such config file") from None
  except UnicodeDecodeError as e:
    raise ConfigError(
      f"{path}: not UTF-8 text, so not a config.json ({e.reason} at byte {e.start})"
    ) from None
  except (json.JSONDecodeError, RecursionError) as e:
    raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
  if not isinstance(hf, dict):
    raise ConfigError(f"{path}: expected a JSON object")
  return hf


def _to_hf_dict(self: GPTNeoXConfig) -> dict[str, Any]:
  return {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "vocab_size": self.vocab_size,
    "hidden_size": self.d_model,
    "num_hidden_layers": self.n_layers,
    "num_attention_heads": self.n_heads,
    "intermediate_size": self.d_mlp,
    "max_position_embeddings": self.max_seq_len,
    "rope_parameters": {
      "partial_rotary_factor": self.rotary_pct,
      "rope_theta": self.rotary_base,
      "rope_type": "default",
    },
    # transformers-4 spelling too, so older readers get the same model.
    "rotary_pct": self.rotary_pct,
    "rotary_emb_base": self.rotary_base,
    "layer_norm_eps": self.layer_norm_eps,
    "use_parallel_residual": self.use_parallel_residual,
    "hidden_act": "gelu",
    "attention_bias": True,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "dtype": self.stored_dtype,
  }
