"""The GPT-NeoX family (Pythia) in Flax: its modules and its parameter-layout table.

What is GPT-NeoX's and nobody else's lives here: the fused per-head `query_key_value`
layout, the parallel residual, the rotary fraction, biases everywhere, exact GELU and an
untied unembedding. The generic entry points (`models.model`: forward, loss, gradients)
take a `GPTNeoXConfig` and come here through the family registry (`models.family`).

Parameter layout (layer axis first; kernels are (in, out), i.e. `y = x @ kernel + bias`)::

  embed_in.embedding        [V, d]
  layers.ln_1.{scale,bias}  [L, d]
  layers.attn.query.kernel  [L, d, H, dh]    bias [L, H, dh]   (also key, value)
  layers.attn.out.kernel    [L, H, dh, d]    bias [L, d]
  layers.ln_2.{scale,bias}  [L, d]
  layers.mlp.fc_in.kernel   [L, d, f]        bias [L, f]
  layers.mlp.fc_out.kernel  [L, f, d]        bias [L, d]
  ln_f.{scale,bias}         [d]
  embed_out.embedding       [V, d]                       (HF's layout: logits = x @ E.T)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_pythia.models.common import (
  LayerNorm,
  attend,
  check_length,
  rotary_tables,
  scan_layers,
  select,
)
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.models.layout import COPY, HEADS_IN, TRANSPOSE, Param, Transform
from jax_pythia.models.sites import SiteRequest


def _init_std(config: GPTNeoXConfig) -> tuple[float, float]:
  # Pythia's small_init for inputs and wang_init for the layer's output projections.
  small = math.sqrt(2.0 / (5.0 * config.d_model))
  wang = 2.0 / (config.n_layers * math.sqrt(config.d_model))
  return small, wang


class Attention(nn.Module):
  config: GPTNeoXConfig
  sites: frozenset[str]

  @nn.compact
  def __call__(self, x, idx, cos, sin):
    cfg = self.config
    small, wang = _init_std(cfg)
    heads = (cfg.n_heads, cfg.d_head)
    dense = lambda name, std: nn.DenseGeneral(  # noqa: E731
      heads, name=name, dtype=x.dtype, param_dtype=x.dtype, kernel_init=nn.initializers.normal(std)
    )
    q, k, v = (dense(n, small)(x) for n in ("query", "key", "value"))
    out_proj = nn.DenseGeneral(
      cfg.d_model,
      axis=(-2, -1),
      name="out",
      dtype=x.dtype,
      param_dtype=x.dtype,
      kernel_init=nn.initializers.normal(wang),
    )
    return attend(self.sites, idx, q, k, v, cos, sin, out_proj)


class MLP(nn.Module):
  config: GPTNeoXConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    small, wang = _init_std(cfg)
    pre = nn.Dense(
      cfg.d_mlp,
      name="fc_in",
      dtype=x.dtype,
      param_dtype=x.dtype,
      kernel_init=nn.initializers.normal(small),
    )(x)
    post = jax.nn.gelu(pre, approximate=False)
    out = nn.Dense(
      cfg.d_model,
      name="fc_out",
      dtype=x.dtype,
      param_dtype=x.dtype,
      kernel_init=nn.initializers.normal(wang),
    )(post)
    return out, {"mlp.hook_pre": pre, "mlp.hook_post": post}


class Block(nn.Module):
  """One GPT-NeoX layer; returns the new residual and the captures it was asked for."""

  config: GPTNeoXConfig
  sites: frozenset[str]

  @nn.compact
  def __call__(self, x, idx, cos, sin):
    cfg, sites = self.config, self.sites
    captured = {}

    def keep(name, value):
      if name in sites:
        captured[name] = select(value, idx)

    keep("hook_resid_pre", x)
    h1 = LayerNorm(cfg.layer_norm_eps, name="ln_1")(x)
    keep("ln1.hook_normalized", h1)
    attn_out, attn_captured = Attention(cfg, sites, name="attn")(h1, idx, cos, sin)
    captured.update(attn_captured)
    keep("hook_attn_out", attn_out)
    if cfg.use_parallel_residual:
      h2 = LayerNorm(cfg.layer_norm_eps, name="ln_2")(x)
    else:
      x = x + attn_out
      keep("hook_resid_mid", x)
      h2 = LayerNorm(cfg.layer_norm_eps, name="ln_2")(x)
    keep("ln2.hook_normalized", h2)
    mlp_out, mlp_captured = MLP(cfg, name="mlp")(h2)
    for name, value in mlp_captured.items():
      keep(name, value)
    keep("hook_mlp_out", mlp_out)
    x = x + attn_out + mlp_out if cfg.use_parallel_residual else x + mlp_out
    keep("hook_resid_post", x)
    return x, captured


class GPTNeoX(nn.Module):
  """GPT-NeoX for causal LM. `__call__` returns (logits or None, captures by site name)."""

  config: GPTNeoXConfig
  dtype: Any = jnp.float32
  remat: str = "none"  # a key of common.REMAT_POLICIES

  @nn.compact
  def __call__(
    self, tokens, idx=None, sites: SiteRequest | None = None, return_logits: bool = True
  ):
    cfg = self.config
    sites = sites or SiteRequest((), frozenset(), frozenset())
    small, _ = _init_std(cfg)
    seq_len = tokens.shape[1]
    check_length(seq_len, cfg.max_seq_len)
    embed = lambda name: nn.Embed(  # noqa: E731
      cfg.vocab_size,
      cfg.d_model,
      name=name,
      dtype=self.dtype,
      param_dtype=self.dtype,
      embedding_init=nn.initializers.normal(small),
    )
    x = embed("embed_in")(tokens)
    captures = {}
    if "hook_embed" in sites.global_sites:
      captures["hook_embed"] = select(x, idx)
    cos, sin = rotary_tables(cfg.rotary_dim, cfg.rotary_base, seq_len)
    layers = scan_layers(Block, cfg, sites.layer_sites, self.remat)
    x, stacked = layers(x, idx, cos, sin)
    captures.update(sites.stacked(stacked))
    need_final = return_logits or "ln_final.hook_normalized" in sites.global_sites
    if not need_final:
      return None, captures
    x = LayerNorm(cfg.layer_norm_eps, name="ln_f")(x)
    if "ln_final.hook_normalized" in sites.global_sites:
      captures["ln_final.hook_normalized"] = select(x, idx)
    if not return_logits:
      return None, captures
    logits = embed("embed_out").attend(x)
    return logits.astype(jnp.float32), captures


#: Weights whose gradients `loss_and_grads` forms by default, as paths in params["layers"].
GRADIENT_WEIGHTS: tuple[str, ...] = (
  "attn.query.kernel",
  "attn.key.kernel",
  "attn.value.kernel",
  "attn.out.kernel",
  "mlp.fc_in.kernel",
  "mlp.fc_out.kernel",
)

# --------------------------------------------------------------------------- layout

#: Dimension symbols used in the shape columns of PARAMS (sized by `GPTNeoXConfig.dims`).
DIM_SYMBOLS = ("L", "V", "d", "3d", "H", "dh", "f")

# The fused query_key_value rows are [H, 3, dh] (docs/pythia.md: the weight layout): part j
# (0 query, 1 key, 2 value) of each head, NOT the j-th third of the rows.
QKV_KERNEL = Transform(
  "qkv split per head, transpose",
  lambda w, shape, j: w.reshape(shape[1], 3, shape[2], w.shape[1])[:, j].transpose(2, 0, 1),
  lambda parts, shape: np.stack([k.transpose(1, 2, 0) for k in parts], axis=1).reshape(
    3 * shape[1] * shape[2], -1
  ),
)
QKV_BIAS = Transform(
  "qkv split per head",
  lambda b, shape, j: b.reshape(shape[0], 3, shape[1])[:, j],
  lambda parts, shape: np.stack(parts, axis=1).reshape(3 * shape[0] * shape[1]),
)

_L = "gpt_neox.layers.{l}."

# Kernels are (in, out): y = x @ kernel + bias. The unembedding keeps HF's [V, d] layout (an
# embedding table, read as x @ E.T), so loading copies it instead of transposing V x d.
PARAMS: tuple[Param, ...] = (
  # Flax path, HF name, Flax shape (one layer), HF shape, transform, model_dim, part
  Param("embed_in/embedding", "gpt_neox.embed_in.weight", "V d", "V d", COPY, "V"),
  Param("layers/ln_1/scale", _L + "input_layernorm.weight", "d", "d", COPY),
  Param("layers/ln_1/bias", _L + "input_layernorm.bias", "d", "d", COPY),
  *(
    Param(f"layers/attn/{name}/kernel", _L + "attention.query_key_value.weight",
          "d H dh", "3d d", QKV_KERNEL, "H", j)  # fmt: skip
    for j, name in enumerate(("query", "key", "value"))
  ),
  *(
    Param(f"layers/attn/{name}/bias", _L + "attention.query_key_value.bias",
          "H dh", "3d", QKV_BIAS, "H", j)  # fmt: skip
    for j, name in enumerate(("query", "key", "value"))
  ),
  Param("layers/attn/out/kernel", _L + "attention.dense.weight", "H dh d", "d d", HEADS_IN, "H"),
  Param("layers/attn/out/bias", _L + "attention.dense.bias", "d", "d", COPY),
  Param("layers/ln_2/scale", _L + "post_attention_layernorm.weight", "d", "d", COPY),
  Param("layers/ln_2/bias", _L + "post_attention_layernorm.bias", "d", "d", COPY),
  Param("layers/mlp/fc_in/kernel", _L + "mlp.dense_h_to_4h.weight", "d f", "f d", TRANSPOSE, "f"),
  Param("layers/mlp/fc_in/bias", _L + "mlp.dense_h_to_4h.bias", "f", "f", COPY, "f"),
  Param("layers/mlp/fc_out/kernel", _L + "mlp.dense_4h_to_h.weight", "f d", "d f", TRANSPOSE, "f"),
  Param("layers/mlp/fc_out/bias", _L + "mlp.dense_4h_to_h.bias", "d", "d", COPY),
  Param("ln_f/scale", "gpt_neox.final_layer_norm.weight", "d", "d", COPY),
  Param("ln_f/bias", "gpt_neox.final_layer_norm.bias", "d", "d", COPY),
  Param("embed_out/embedding", "embed_out.weight", "V d", "V d", COPY, "V"),
)  # fmt: skip


def canonical_name(name: str) -> str:
  """The HF name this project writes: `gpt_neox.` prefix, `embed_out.weight` head."""
  if name == "lm_head.weight":  # transformers 5's in-memory name of embed_out
    return "embed_out.weight"
  if name == "embed_out.weight" or name.startswith("gpt_neox."):
    return name
  return "gpt_neox." + name
