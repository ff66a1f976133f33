"""The model-family seam: what the study needs of a model, for every architecture.

A `Family` is one architecture behind one small interface:
  - its config class, read from config.json (`from_hf_dict`: every attribute understood,
    known not to matter, or refused by name in one line) with `dims()` (the layout table's
    dim sizes) and `site_refusal(suffix)` (the capture sites it lacks, refused by name);
  - its Flax module: `module(config, dtype=, remat=)` whose `__call__(tokens, idx, sites,
    return_logits)` is the forward with capture sites (`models.sites`); `models.model`
    builds forward, loss and gradients on it for every family;
  - its parameter-layout table (`params(config)`: layout.Param rows), which drives the
    conversion from and to Hugging Face checkpoints (`models.convert`) and the sharding;
  - the per-layer study factors, the same leaves in every family's tree, in ONE layout
    (kernels (in, out), layer axis first; `study_factors` picks them):
      attn.query.kernel [L, d, H, dh]      W_Q[h] = query.kernel[:, h, :].T   (dh x d)
      attn.key.kernel   [L, d, H_kv, dh]   W_K[g] likewise, g a key/value head
      attn.value.kernel [L, d, H_kv, dh]   W_V[g] = value.kernel[:, g, :].T   (dh x d)
      attn.out.kernel   [L, H, dh, d]      W_O[:, h] = out.kernel[h].T        (d x dh)
      mlp.fc_out.kernel [L, f, d]          the MLP output matrix (dense_4h_to_h, down_proj)
    Query head h reads key/value head h // (H / H_kv) (grouped-query attention).

The family is chosen from config.json's `model_type` (and `architectures`, checked to
agree) through FAMILIES. Adding one is a module with a config class, a Flax module and a
table, one entry below, and its parity test.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from jax_pythia.errors import ConfigError
from jax_pythia.models import gpt_neox, llama
from jax_pythia.models.config import GPTNeoXConfig, read_config_json
from jax_pythia.models.layout import Param
from jax_pythia.models.llama_config import VARIANTS, LlamaConfig


@dataclasses.dataclass(frozen=True)
class Family:
  """One architecture (module doc)."""

  name: str
  title: str  # how errors and docs name it
  model_type: str  # config.json's model_type
  architectures: tuple[str, ...]  # config.json's architectures it accepts
  config_class: type
  module: Callable[..., Any]  # module(config, dtype=, remat=) -> flax Module
  params: Callable[[Any], tuple[Param, ...]]  # the layout table of a config
  gradient_weights: tuple[str, ...]  # default `wrt` of loss_and_grads
  canonical_name: Callable[[str], str]  # a stored tensor name -> the table's name
  fused_qkv: bool = False  # GPT-NeoX's fused query_key_value (the reference value slice)


TITLES = {"llama": "Llama", "olmo": "OLMo", "olmo2": "OLMo-2", "pico_decoder": "pico-decoder"}


def _llama(name: str) -> Family:
  model_type, architecture = VARIANTS[name]
  return Family(
    name=name,
    title=TITLES[name],
    model_type=model_type,
    architectures=(architecture,),
    config_class=LlamaConfig,
    module=llama.Llama,
    params=llama.params,
    gradient_weights=llama.GRADIENT_WEIGHTS,
    canonical_name=llama.canonical_name,
  )


FAMILIES: dict[str, Family] = {
  "gpt_neox": Family(
    name="gpt_neox",
    title="GPT-NeoX",
    model_type="gpt_neox",
    architectures=("GPTNeoXForCausalLM",),
    config_class=GPTNeoXConfig,
    module=gpt_neox.GPTNeoX,
    params=lambda config: gpt_neox.PARAMS,
    gradient_weights=gpt_neox.GRADIENT_WEIGHTS,
    canonical_name=gpt_neox.canonical_name,
    fused_qkv=True,
  ),
  **{name: _llama(name) for name in VARIANTS},
}


def family_of(config: Any) -> Family:
  """The family of a config object (its `family` attribute)."""
  try:
    return FAMILIES[config.family]
  except (AttributeError, KeyError):
    raise ConfigError(f"{type(config).__name__}: not the config of a known model family") from None


def config_from_hf(hf: dict[str, Any], source: str = "config") -> Any:
  """The family's config object for a config.json dict, chosen by `model_type`; refuses
  an unknown model_type, or `architectures` naming another family's class, by name."""
  where = f"{source}: " if source else ""
  if not isinstance(hf, dict):
    raise ConfigError(f"{where}expected a config object, found {type(hf).__name__}")
  model_type = hf.get("model_type")
  if model_type is None and "d_model" not in hf:
    archs = hf.get("architectures")
    named = [f for f in FAMILIES.values() if isinstance(archs, list) and archs
             and archs[0] in f.architectures and f.name != "gpt_neox"]  # fmt: skip
    if named:  # else GPT-NeoX's reader blames the first Llama key it meets (hidden_act)
      raise ConfigError(
        f"{where}no model_type; architectures={json.dumps(archs)} is {named[0].title}'s "
        f'(add "model_type": "{named[0].model_type}")'
      )
    # Pythia's Hub configs always name it; without one only GPT-NeoX's reader explains.
    return GPTNeoXConfig.from_hf_dict(hf, source)
  family = next((f for f in FAMILIES.values() if f.model_type == model_type), None)
  if family is None:
    known = ", ".join(f.model_type for f in FAMILIES.values())
    raise ConfigError(f"{where}unsupported model_type={model_type!r} (supported: {known})")
  archs = hf.get("architectures") or []
  if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
    raise ConfigError(
      f"{where}architectures={json.dumps(archs)}: expected a list of class names such as "
      f"{json.dumps(list(family.architectures))}"
    )
  others = {a: f.name for f in FAMILIES.values() if f is not family for a in f.architectures}
  if any(a in others for a in archs):
    raise ConfigError(
      f"{where}architectures={archs!r} disagrees with model_type={model_type!r} "
      f"(expected {list(family.architectures)})"
    )
  return family.config_class.from_hf_dict(hf, source=source)


def load_config(path: str | os.PathLike) -> Any:
  """The config of the checkpoint whose config.json is at `path`, of whichever family."""
  path = os.fspath(path)
  return config_from_hf(read_config_json(path), source=path)


def table(config: Any) -> tuple[Param, ...]:
  """The parameter-layout table of `config`'s model."""
  return family_of(config).params(config)


STUDY_LEAVES = ("attn.query.kernel", "attn.key.kernel", "attn.value.kernel", "attn.out.kernel",
                "mlp.fc_out.kernel")  # fmt: skip


def study_factors(layers: dict) -> dict:
  """The per-layer study factors (module doc) out of params['layers'] of any family, as
  {'attn': {'query'|'key'|'value'|'out': {'kernel': ...}}, 'mlp': {'fc_out': {'kernel'}}}."""
  out: dict = {}
  for path in STUDY_LEAVES:
    node, src = out, layers
    *heads, leaf = path.split(".")
    for key in heads:
      node, src = node.setdefault(key, {}), src[key]
    node[leaf] = src[leaf]
  return out
