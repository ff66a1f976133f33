"""The Llama family in Flax: Llama, OLMo, OLMo-2 and pico-decoder, and their layout tables.

One decoder, three variants (`LlamaConfig.family`):
  llama, pico_decoder  x + attn(rms(x)), then x + mlp(rms(x)); RMSNorm with a scale
  olmo                 the same with LayerNorm without scale or bias (eps 1e-5), and q, k,
                       v clipped to [-clip_qkv, clip_qkv] when clip_qkv is set
  olmo2                x + rms(attn(x)), then x + rms(mlp(x)) (norms AFTER, not before), and
                       RMSNorm on the full query and key projections (over H*dh, H_kv*dh)
Every variant: SwiGLU MLP down(silu(gate(x)) * up(x)), rotate-half rotary on the whole
head, grouped-query attention (query head h reads key/value head h // (H / H_kv)), no
biases, the unembedding tied to the embedding or not.

Parameter layout (layer axis first; kernels (in, out); absent leaves as noted)::

  embed_in.embedding              [V, d]
  layers.ln_1.scale, ln_2.scale   [L, d]           (llama, pico_decoder)
  layers.attn.query.kernel        [L, d, H, dh]
  layers.attn.key.kernel          [L, d, H_kv, dh]  (also value)
  layers.attn.out.kernel          [L, H, dh, d]
  layers.attn.{q,k}_norm.scale    [L, H*dh], [L, H_kv*dh]   (olmo2)
  layers.{attn,mlp}_out_norm.scale [L, d]          (olmo2)
  layers.mlp.gate.kernel          [L, d, f]        (also up: the linear branch)
  layers.mlp.fc_out.kernel        [L, f, d]        (down_proj: the MLP output matrix)
  ln_f.scale                      [d]              (not olmo)
  embed_out.embedding             [V, d]           (untied only)

pico-decoder's RoPE rotates interleaved pairs (2i, 2i+1); HF Llama's rotates halves (i,
i + dh/2). Loading permutes the rows of each head of q_proj and k_proj from the first to
the second (ROPE_INTERLEAVED below), which leaves every attention score unchanged
(docs/families.md).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_pythia.models.common import (
  LayerNorm,
  RMSNorm,
  attend,
  check_length,
  rotary_tables,
  scan_layers,
  select,
)
from jax_pythia.models.layout import COPY, HEADS_IN, HEADS_OUT, TRANSPOSE, Param, Transform
from jax_pythia.models.llama_config import LlamaConfig
from jax_pythia.models.sites import SiteRequest

_INIT = nn.initializers.normal(0.02)  # HF's initializer_range; only for random models


def _norm(cfg: LlamaConfig, name: str):
  if cfg.family == "olmo":
    return LayerNorm(1e-5, parametric=False, name=name)
  return RMSNorm(cfg.norm_eps, scale_in_float32=cfg.family == "olmo2", name=name)


class Attention(nn.Module):
  config: LlamaConfig
  sites: frozenset[str]

  @nn.compact
  def __call__(self, x, idx, cos, sin):
    cfg = self.config
    proj = lambda name, heads: nn.DenseGeneral(  # noqa: E731
      (heads, cfg.d_head), use_bias=False, name=name, dtype=x.dtype, param_dtype=x.dtype,
      kernel_init=_INIT,
    )  # fmt: skip
    q, k, v = (
      proj("query", cfg.n_heads)(x),
      proj("key", cfg.n_kv_heads)(x),
      proj("value", cfg.n_kv_heads)(x),
    )
    if cfg.clip_qkv is not None:
      q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    if cfg.family == "olmo2":
      # The norm spans all heads of the projection (H * dh), not each head.
      q = RMSNorm(cfg.norm_eps, True, name="q_norm")(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
      k = RMSNorm(cfg.norm_eps, True, name="k_norm")(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
    out_proj = nn.DenseGeneral(
      cfg.d_model, axis=(-2, -1), use_bias=False, name="out", dtype=x.dtype, param_dtype=x.dtype,
      kernel_init=_INIT,
    )  # fmt: skip
    return attend(self.sites, idx, q, k, v, cos, sin, out_proj)


class MLP(nn.Module):
  """SwiGLU: fc_out(silu(gate(x)) * up(x)); fc_out is HF's down_proj."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda width, name: nn.Dense(  # noqa: E731
      width, use_bias=False, name=name, dtype=x.dtype, param_dtype=x.dtype, kernel_init=_INIT
    )
    pre, linear = dense(cfg.d_mlp, "gate")(x), dense(cfg.d_mlp, "up")(x)
    post = jax.nn.silu(pre) * linear
    out = dense(cfg.d_model, "fc_out")(post)
    return out, {"mlp.hook_pre": pre, "mlp.hook_pre_linear": linear, "mlp.hook_post": post}


class Block(nn.Module):
  """One layer (module doc: pre-norm, or OLMo-2's post-norm); returns the new residual and
  the captures it was asked for."""

  config: LlamaConfig
  sites: frozenset[str]

  @nn.compact
  def __call__(self, x, idx, cos, sin):
    cfg, sites = self.config, self.sites
    post_norm = cfg.family == "olmo2"
    captured = {}

    def keep(name, value):
      if name in sites:
        captured[name] = select(value, idx)

    keep("hook_resid_pre", x)
    h1 = x if post_norm else _norm(cfg, "ln_1")(x)
    keep("ln1.hook_normalized", h1)
    attn_out, attn_captured = Attention(cfg, sites, name="attn")(h1, idx, cos, sin)
    captured.update(attn_captured)
    if post_norm:
      attn_out = _norm(cfg, "attn_out_norm")(attn_out)
    keep("hook_attn_out", attn_out)
    x = x + attn_out
    keep("hook_resid_mid", x)
    h2 = x if post_norm else _norm(cfg, "ln_2")(x)
    keep("ln2.hook_normalized", h2)
    mlp_out, mlp_captured = MLP(cfg, name="mlp")(h2)
    for name, value in mlp_captured.items():
      keep(name, value)
    if post_norm:
      mlp_out = _norm(cfg, "mlp_out_norm")(mlp_out)
    keep("hook_mlp_out", mlp_out)
    x = x + mlp_out
    keep("hook_resid_post", x)
    return x, captured


class Llama(nn.Module):
  """A Llama-family causal LM. `__call__` returns (logits or None, captures by site name)."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  remat: str = "none"  # a key of common.REMAT_POLICIES

  @nn.compact
  def __call__(
    self, tokens, idx=None, sites: SiteRequest | None = None, return_logits: bool = True
  ):
    cfg = self.config
    sites = sites or SiteRequest((), frozenset(), frozenset())
    seq_len = tokens.shape[1]
    check_length(seq_len, cfg.max_seq_len)
    embed = lambda name: nn.Embed(  # noqa: E731
      cfg.vocab_size, cfg.d_model, name=name, dtype=self.dtype, param_dtype=self.dtype,
      embedding_init=_INIT,
    )  # fmt: skip
    embed_in = embed("embed_in")
    x = embed_in(tokens)
    captures = {}
    if "hook_embed" in sites.global_sites:
      captures["hook_embed"] = select(x, idx)
    cos, sin = rotary_tables(cfg.d_head, cfg.rope_base, seq_len)
    x, stacked = scan_layers(Block, cfg, sites.layer_sites, self.remat)(x, idx, cos, sin)
    captures.update(sites.stacked(stacked))
    if not (return_logits or "ln_final.hook_normalized" in sites.global_sites):
      return None, captures
    x = _norm(cfg, "ln_f")(x)
    if "ln_final.hook_normalized" in sites.global_sites:
      captures["ln_final.hook_normalized"] = select(x, idx)
    if not return_logits:
      return None, captures
    unembed = embed_in if cfg.tie_embeddings else embed("embed_out")
    return unembed.attend(x).astype(jnp.float32), captures


#: Weights whose gradients `loss_and_grads` forms by default, as paths in params["layers"].
GRADIENT_WEIGHTS: tuple[str, ...] = (
  "attn.query.kernel",
  "attn.key.kernel",
  "attn.value.kernel",
  "attn.out.kernel",
  "mlp.gate.kernel",
  "mlp.up.kernel",
  "mlp.fc_out.kernel",
)

# --------------------------------------------------------------------------- layout


def _interleaved_to_flax(w, shape, j):
  d, heads, dh = shape
  return (
    w.reshape(heads, dh // 2, 2, d).transpose(0, 2, 1, 3).reshape(heads * dh, d).T.reshape(shape)
  )


def _interleaved_to_hf(parts, shape):
  d, heads, dh = shape
  return parts[0].reshape(d, heads, 2, dh // 2).transpose(0, 1, 3, 2).reshape(d, -1).T


# pico's q_proj/k_proj rows per head are RoPE pairs (2i, 2i+1); HF Llama's are (i, i+dh/2).
ROPE_INTERLEAVED = Transform(
  "transpose, split per head, interleaved rotary pairs to halves",
  _interleaved_to_flax,
  _interleaved_to_hf,
)

# HF names per family: (layer prefix, {role: name}); roles absent from a family are absent.
_NAMES = {
  "hf": ("model.layers.{l}.", {
    "embed": "model.embed_tokens.weight", "ln_1": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "ln_2": "post_attention_layernorm.weight", "attn_out_norm": "post_attention_layernorm.weight",
    "mlp_out_norm": "post_feedforward_layernorm.weight", "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight", "ln_f": "model.norm.weight",
    "unembed": "lm_head.weight",
  }),
  "pico": ("pico_decoder.layers.{l}.", {
    "embed": "pico_decoder.embedding_proj.weight", "ln_1": "attention_norm.weight",
    "q": "attention.q_proj.weight", "k": "attention.k_proj.weight",
    "v": "attention.v_proj.weight", "o": "attention.o_proj.weight",
    "ln_2": "swiglu_norm.weight", "gate": "swiglu.w_0.weight", "up": "swiglu.w_1.weight",
    "down": "swiglu.w_2.weight", "ln_f": "pico_decoder.output_norm.weight",
    "unembed": "pico_decoder.de_embedding_proj.weight",
  }),
}  # fmt: skip


def params(cfg: LlamaConfig) -> tuple[Param, ...]:
  """The layout table of `cfg`'s variant (the module doc's tree), in `layout.Param` terms."""
  prefix, n = _NAMES["pico" if cfg.family == "pico_decoder" else "hf"]
  L = lambda role: prefix + n[role]  # noqa: E731
  qk = ROPE_INTERLEAVED if cfg.family == "pico_decoder" else HEADS_OUT
  table = [Param("embed_in/embedding", n["embed"], "V d", "V d", COPY, "V")]
  if cfg.family != "olmo2" and cfg.family != "olmo":
    table.append(Param("layers/ln_1/scale", L("ln_1"), "d", "d", COPY))
  table += [
    Param("layers/attn/query/kernel", L("q"), "d H dh", "D d", qk, "H"),
    Param("layers/attn/key/kernel", L("k"), "d Hkv dh", "Dkv d", qk, "Hkv"),
    Param("layers/attn/value/kernel", L("v"), "d Hkv dh", "Dkv d", HEADS_OUT, "Hkv"),
    Param("layers/attn/out/kernel", L("o"), "H dh d", "d D", HEADS_IN, "H"),
  ]
  if cfg.family == "olmo2":
    table += [
      Param("layers/attn/q_norm/scale", L("q_norm"), "D", "D", COPY),
      Param("layers/attn/k_norm/scale", L("k_norm"), "Dkv", "Dkv", COPY),
      Param("layers/attn_out_norm/scale", L("attn_out_norm"), "d", "d", COPY),
      Param("layers/mlp_out_norm/scale", L("mlp_out_norm"), "d", "d", COPY),
    ]
  elif cfg.family != "olmo":
    table.append(Param("layers/ln_2/scale", L("ln_2"), "d", "d", COPY))
  table += [
    Param("layers/mlp/gate/kernel", L("gate"), "d f", "f d", TRANSPOSE, "f"),
    Param("layers/mlp/up/kernel", L("up"), "d f", "f d", TRANSPOSE, "f"),
    Param("layers/mlp/fc_out/kernel", L("down"), "f d", "d f", TRANSPOSE, "f"),
  ]
  if cfg.family != "olmo":
    table.append(Param("ln_f/scale", n["ln_f"], "d", "d", COPY))
  if not cfg.tie_embeddings:
    table.append(Param("embed_out/embedding", n["unembed"], "V d", "V d", COPY, "V"))
  return tuple(table)


def canonical_name(name: str) -> str:
  """Llama-family checkpoints are read under their stored names."""
  return name
