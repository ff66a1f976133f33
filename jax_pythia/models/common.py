"""Flax pieces every family shares: norms computed in float32, rotate-half rotary, causal
softmax attention with grouped key/value heads, and the backward-pass remat policies.

Shapes: b batch, s sequence, H query heads, H_kv key/value heads (H_kv divides H), dh
head width.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: What the backward pass recomputes instead of keeping, per layer (`jax.checkpoint` on the
#: scanned layer). "none" keeps every residual; "attention" keeps the weight matmuls'
#: outputs (q, k, v, attention and MLP projections) and recomputes the s x s attention
#: scores, softmax and the activation, the largest residuals at long sequences, for little
#: compute; "layer" keeps only each layer's input and recomputes the whole layer.
REMAT_POLICIES: dict[str, Any] = {
  "none": None,
  "attention": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "layer": jax.checkpoint_policies.nothing_saveable,
}


def check_length(seq_len: int, max_seq_len: int) -> None:
  if seq_len > max_seq_len:
    raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings {max_seq_len}")


def select(x: Array, idx: Array | None, axis: int = 1) -> Array:
  """Keeps the token positions `idx` ([k] or [b, k]) along `axis` of x ([b, ...])."""
  if idx is None:
    return x
  if idx.ndim == 1:
    return jnp.take(x, idx, axis=axis)
  shape = [1] * x.ndim
  shape[0], shape[axis] = idx.shape
  return jnp.take_along_axis(x, idx.reshape(shape), axis=axis)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the parameter dtype; `parametric=False` is
  OLMo's (no scale, no bias)."""

  eps: float
  parametric: bool = True

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if not self.parametric:
      return y.astype(x.dtype)
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, statistics in float32.

  `scale_in_float32` is OLMo-2's order (scale times the float32 value, then cast); Llama's
  (and pico's) casts first and scales in the parameter dtype. Identical in float32.
  """

  eps: float
  scale_in_float32: bool = False

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    if self.scale_in_float32:
      return (y * scale.astype(jnp.float32)).astype(x.dtype)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def rotary_tables(dim: int, base: float, seq_len: int) -> tuple[Array, Array]:
  """cos, sin [s, dim] of the rotate-half rotary embedding on `dim` features, float32."""
  inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  freqs = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)
  return jnp.asarray(np.cos(emb)), jnp.asarray(np.sin(emb))


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates the first rotary dim features of x [b, s, H, dh]; the rest pass through."""
  dim = cos.shape[-1]
  rot, keep = x[..., :dim].astype(jnp.float32), x[..., dim:]
  half = dim // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.concatenate([(rot * c + rotated * s).astype(x.dtype), keep], axis=-1)


def repeat_kv(x: Array, heads: int, axis: int = -2) -> Array:
  """Key/value heads [..., H_kv, ...] -> [..., H, ...]: query head h reads kv head
  h // (H / H_kv) (grouped-query attention; a no-op when H_kv = H)."""
  kv = x.shape[axis]
  return x if kv == heads else jnp.repeat(x, heads // kv, axis=axis)


def causal_attention(rot_q: Array, rot_k: Array, v: Array) -> tuple[Array, Array, Array]:
  """(scores [b, H, s, s] float32 scaled and masked, pattern [b, H, s, s], z [b, s, H, dh])
  of rot_q [b, s, H, dh] against rot_k, v [b, s, H_kv, dh]."""
  heads = rot_q.shape[2]
  rot_k, v = repeat_kv(rot_k, heads), repeat_kv(v, heads)
  scores = jnp.einsum(
    "bqhd,bkhd->bhqk", rot_q, rot_k, preferred_element_type=jnp.float32
  ) / math.sqrt(rot_q.shape[-1])
  s = rot_q.shape[1]
  causal = jnp.tril(jnp.ones((s, s), dtype=bool))
  scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
  pattern = jax.nn.softmax(scores, axis=-1)
  z = jnp.einsum("bhqk,bkhd->bqhd", pattern.astype(v.dtype), v)
  return scores, pattern, z


def attend(sites, idx, q: Array, k: Array, v: Array, cos, sin, out_proj) -> tuple[Array, dict]:
  """Rotary on q and k, causal attention and `out_proj` ([b, s, H, dh] -> [b, s, d]);
  returns the output and the attention sites requested in `sites`: per-token values, the
  score and pattern rows of the kept queries, and hook_result (z_h @ W_O[h], formed only at
  the kept positions: [b, k, H, d] at every token would be the pass's largest)."""
  rot_q, rot_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
  scores, pattern, z = causal_attention(rot_q, rot_k, v)
  out = out_proj(z)
  values = {
    "attn.hook_q": q,
    "attn.hook_k": k,
    "attn.hook_v": v,
    "attn.hook_rot_q": rot_q,
    "attn.hook_rot_k": rot_k,
    "attn.hook_z": z,
  }
  captured = {name: select(x, idx) for name, x in values.items() if name in sites}
  if "attn.hook_attn_scores" in sites:
    captured["attn.hook_attn_scores"] = select(scores, idx, axis=2)
  if "attn.hook_pattern" in sites:
    captured["attn.hook_pattern"] = select(pattern, idx, axis=2)
  if "attn.hook_result" in sites:
    kernel = out_proj.variables["params"]["kernel"]
    captured["attn.hook_result"] = jnp.einsum("bkhd,hdm->bkhm", select(z, idx), kernel)
  return out, captured


def scan_layers(block, config, layer_sites, remat: str, name: str = "layers"):
  """`block` scanned over the stacked layer axis (params [L, ...]), under `remat`."""
  if remat != "none":
    block = nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return nn.scan(
    block,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
    length=config.n_layers,
  )(config, layer_sites, name=name)
