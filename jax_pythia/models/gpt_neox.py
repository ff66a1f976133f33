"""GPT-NeoX (Pythia) in Flax, with named capture sites.

The model is a pure function of (params, tokens): `forward` can be jitted, vmapped over
a stacked checkpoint axis and differentiated. Layers run under `nn.scan` over the
stacked layer axis, so compile time does not grow with depth.

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

Capture sites are named as in TransformerLens. `SITES` below is the one table of them.
A request names sites per layer (`blocks.3.attn.hook_z`), for every layer stacked on a
leading layer axis (`blocks.*.attn.hook_z` -> [L, ...]), or globally (`hook_embed`).
Only requested sites are kept, and only at the requested token positions, selected
inside the compiled function so full [batch, seq, ...] tensors never reach the host.
Token-axis shapes below use `k` for the number of selected positions (1 for `last`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_pythia.models.config import GPTNeoXConfig

Array = jax.Array
Params = Mapping[str, Any]

#: Per-layer capture sites: name -> (shape, meaning). Prefixed `blocks.{l}.` or `blocks.*.`.
LAYER_SITES: dict[str, tuple[str, str]] = {
  "hook_resid_pre": ("[b, k, d]", "residual stream entering the layer"),
  "ln1.hook_normalized": ("[b, k, d]", "input LayerNorm output (attention input)"),
  "attn.hook_q": ("[b, k, H, dh]", "query per head, before rotary"),
  "attn.hook_k": ("[b, k, H, dh]", "key per head, before rotary"),
  "attn.hook_v": ("[b, k, H, dh]", "value per head (the true per-head values)"),
  "attn.hook_rot_q": ("[b, k, H, dh]", "query after rotary"),
  "attn.hook_rot_k": ("[b, k, H, dh]", "key after rotary"),
  "attn.hook_attn_scores": ("[b, H, k, s]", "scaled, masked scores (query rows selected)"),
  "attn.hook_pattern": ("[b, H, k, s]", "attention probabilities (query rows selected)"),
  "attn.hook_z": ("[b, k, H, dh]", "attention-weighted values per head"),
  "attn.hook_result": ("[b, k, H, d]", "per-head output z_h @ W_O[h] (no bias)"),
  "hook_attn_out": ("[b, k, d]", "attention output, sum of heads plus bias"),
  "hook_resid_mid": ("[b, k, d]", "residual after attention (sequential residual only)"),
  "ln2.hook_normalized": ("[b, k, d]", "post-attention LayerNorm output (MLP input)"),
  "mlp.hook_pre": ("[b, k, f]", "MLP pre-activation, dense_h_to_4h output"),
  "mlp.hook_post": ("[b, k, f]", "MLP after exact GELU"),
  "hook_mlp_out": ("[b, k, d]", "MLP output, dense_4h_to_h output"),
  "hook_resid_post": ("[b, k, d]", "residual stream leaving the layer"),
}
#: Whole-model capture sites.
GLOBAL_SITES: dict[str, tuple[str, str]] = {
  "hook_embed": ("[b, k, d]", "token embedding (the first residual stream)"),
  "ln_final.hook_normalized": ("[b, k, d]", "final LayerNorm output (unembedding input)"),
}
_SITE_RE = re.compile(r"^blocks\.(\d+|\*)\.(.+)$")

#: What the backward pass recomputes instead of keeping, per layer (`jax.checkpoint` on the
#: scanned layer). "none" keeps every residual; "attention" keeps the weight matmuls'
#: outputs (q, k, v, attention and MLP projections) and recomputes the s x s attention
#: scores, softmax and GELU, the largest residuals at long sequences, for little compute;
#: "layer" keeps only each layer's input and recomputes the whole layer (one more forward).
REMAT_POLICIES: dict[str, Any] = {
  "none": None,
  "attention": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "layer": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class SiteRequest:
  """A parsed, validated set of site names: what the compiled function must keep."""

  names: tuple[str, ...]
  layer_sites: frozenset[str]  # suffixes computed inside the layer scan
  global_sites: frozenset[str]

  @classmethod
  def parse(cls, names: str | Sequence[str], config: GPTNeoXConfig) -> SiteRequest:
    if isinstance(names, str):
      names = [n for n in names.split(",") if n.strip()]
    names = tuple(dict.fromkeys(n.strip() for n in names))
    layer_sites, global_sites = set(), set()
    for name in names:
      if name in GLOBAL_SITES:
        global_sites.add(name)
        continue
      m = _SITE_RE.match(name)
      if not m or m.group(2) not in LAYER_SITES:
        raise ValueError(
          f"unknown capture site {name!r}; per-layer sites are blocks.<l|*>.<site> with "
          f"<site> in {', '.join(LAYER_SITES)}; global sites: {', '.join(GLOBAL_SITES)}"
        )
      layer, suffix = m.groups()
      if layer != "*" and int(layer) >= config.n_layers:
        raise ValueError(f"capture site {name!r}: the model has {config.n_layers} layers")
      if suffix == "hook_resid_mid" and config.use_parallel_residual:
        raise ValueError(
          f"capture site {name!r} exists only with sequential residual "
          "(use_parallel_residual=False)"
        )
      layer_sites.add(suffix)
    return cls(names, frozenset(layer_sites), frozenset(global_sites))


def parse_positions(spec: str, what: str = "positions") -> tuple[str, Any]:
  """The one parser of a positions spec: `last`, `all`, `random:K` (K >= 1) or a comma
  list of indices -> ("last", None), ("all", None), ("random", K) or ("indices", [k]).

  `what` names the flag in the error (`--positions`).
  """
  if spec in ("last", "all"):
    return spec, None
  random = re.match(r"^random:(\d+)$", spec)
  if random and int(random.group(1)) >= 1:
    return "random", int(random.group(1))
  try:
    return "indices", np.array([int(p) for p in spec.split(",")], dtype=np.int32)
  except ValueError:
    raise ValueError(
      f"{what}={spec!r}: expected last, all, random:K (K >= 1) or a comma list of integers"
    ) from None


def position_index(
  positions: str | Sequence[int] | np.ndarray | Array | None,
  seq_len: int,
  *,
  n: int | None = None,
  seed: int = 0,
  what: str = "positions",
) -> Array | None:
  """Token positions to keep: None (all), [k] shared by the batch, or [n, k] per sequence.

  `positions` is a spec for `parse_positions` (`random:K` draws K distinct sorted positions
  for each of the `n` sequences from `seed`), or integer indices [k] / [b, k] (negative
  counts from the end).
  """
  if positions is None:
    return None
  if isinstance(positions, str):
    kind, arg = parse_positions(positions, what)
    if kind == "all":
      return None
    if kind == "last":
      return jnp.array([seq_len - 1], dtype=jnp.int32)
    if kind == "random":
      if arg > seq_len:
        raise ValueError(f"{what}={positions}: only {seq_len} positions per sequence")
      if n is None:
        raise ValueError(f"{what}={positions}: random positions need the number of sequences")
      rng = np.random.default_rng(seed)
      draws = np.stack([rng.choice(seq_len, arg, replace=False) for _ in range(n)])
      return jnp.asarray(np.sort(draws, axis=1), dtype=jnp.int32)
    positions = arg
  if isinstance(positions, jax.core.Tracer):
    return positions
  idx = np.asarray(positions)
  if idx.ndim not in (1, 2) or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(
      f"{what}: expected a non-empty [k] or [b, k] integer array, got "
      f"shape {idx.shape} dtype {idx.dtype}"
    )
  if idx.min() < -seq_len or idx.max() >= seq_len:
    raise ValueError(
      f"{what} out of range for sequence length {seq_len}: [{idx.min()}, {idx.max()}]"
    )
  return jnp.asarray(idx % seq_len, dtype=jnp.int32)


def _select(x: Array, idx: Array | None, axis: int = 1) -> Array:
  """Keeps the token positions `idx` ([k] or [b, k]) along `axis` of x ([b, ...])."""
  if idx is None:
    return x
  if idx.ndim == 1:
    return jnp.take(x, idx, axis=axis)
  shape = [1] * x.ndim
  shape[0], shape[axis] = idx.shape
  return jnp.take_along_axis(x, idx.reshape(shape), axis=axis)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the parameter dtype."""

  eps: float

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rotary_tables(config: GPTNeoXConfig, seq_len: int) -> tuple[Array, Array]:
  """cos, sin [s, rotary_dim] of GPT-NeoX's rotate-half rotary embedding, in float32."""
  dim = config.rotary_dim
  inv_freq = 1.0 / (config.rotary_base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  freqs = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)
  return jnp.asarray(np.cos(emb)), jnp.asarray(np.sin(emb))


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates the first rotary_dim features of x [b, s, H, dh]; the rest pass through."""
  dim = cos.shape[-1]
  rot, keep = x[..., :dim].astype(jnp.float32), x[..., dim:]
  half = dim // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  return jnp.concatenate([(rot * c + rotated * s).astype(x.dtype), keep], axis=-1)


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
    cfg, sites = self.config, self.sites
    small, wang = _init_std(cfg)
    heads = (cfg.n_heads, cfg.d_head)
    dense = lambda name, std: nn.DenseGeneral(  # noqa: E731
      heads, name=name, dtype=x.dtype, param_dtype=x.dtype, kernel_init=nn.initializers.normal(std)
    )
    q, k, v = (dense(n, small)(x) for n in ("query", "key", "value"))
    rot_q, rot_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = jnp.einsum(
      "bqhd,bkhd->bhqk", rot_q, rot_k, preferred_element_type=jnp.float32
    ) / math.sqrt(cfg.d_head)
    s = x.shape[1]
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    pattern = jax.nn.softmax(scores, axis=-1)
    z = jnp.einsum("bhqk,bkhd->bqhd", pattern.astype(v.dtype), v)
    out_proj = nn.DenseGeneral(
      cfg.d_model,
      axis=(-2, -1),
      name="out",
      dtype=x.dtype,
      param_dtype=x.dtype,
      kernel_init=nn.initializers.normal(wang),
    )
    out = out_proj(z)
    captured = {}
    for name, value in (
      ("attn.hook_q", q),
      ("attn.hook_k", k),
      ("attn.hook_v", v),
      ("attn.hook_rot_q", rot_q),
      ("attn.hook_rot_k", rot_k),
      ("attn.hook_z", z),
    ):
      if name in sites:
        captured[name] = _select(value, idx)
    if "attn.hook_attn_scores" in sites:
      captured["attn.hook_attn_scores"] = _select(scores, idx, axis=2)
    if "attn.hook_pattern" in sites:
      captured["attn.hook_pattern"] = _select(pattern, idx, axis=2)
    if "attn.hook_result" in sites:
      # Per-head outputs only at the kept positions: [b, k, H, d] at every token would be
      # the largest tensor of the pass.
      kernel = out_proj.variables["params"]["kernel"]
      captured["attn.hook_result"] = jnp.einsum("bkhd,hdm->bkhm", _select(z, idx), kernel)
    return out, captured


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
        captured[name] = _select(value, idx)

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
  remat: str = "none"  # a key of REMAT_POLICIES

  @nn.compact
  def __call__(
    self, tokens, idx=None, sites: SiteRequest | None = None, return_logits: bool = True
  ):
    cfg = self.config
    sites = sites or SiteRequest((), frozenset(), frozenset())
    small, _ = _init_std(cfg)
    seq_len = tokens.shape[1]
    if seq_len > cfg.max_seq_len:
      raise ValueError(
        f"sequence length {seq_len} exceeds max_position_embeddings {cfg.max_seq_len}"
      )
    x = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      name="embed_in",
      dtype=self.dtype,
      param_dtype=self.dtype,
      embedding_init=nn.initializers.normal(small),
    )(tokens)
    captures = {}
    if "hook_embed" in sites.global_sites:
      captures["hook_embed"] = _select(x, idx)
    cos, sin = rotary_tables(cfg, seq_len)
    block = Block
    if self.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    layers = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
      length=cfg.n_layers,
    )(cfg, sites.layer_sites, name="layers")
    x, stacked = layers(x, idx, cos, sin)
    for name in sites.names:
      m = _SITE_RE.match(name)
      if m:
        layer, suffix = m.groups()
        captures[name] = stacked[suffix] if layer == "*" else stacked[suffix][int(layer)]
    need_final = return_logits or "ln_final.hook_normalized" in sites.global_sites
    if not need_final:
      return None, captures
    x = LayerNorm(cfg.layer_norm_eps, name="ln_f")(x)
    if "ln_final.hook_normalized" in sites.global_sites:
      captures["ln_final.hook_normalized"] = _select(x, idx)
    if not return_logits:
      return None, captures
    logits = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      name="embed_out",
      dtype=self.dtype,
      param_dtype=self.dtype,
      embedding_init=nn.initializers.normal(small),
    ).attend(x)
    return logits.astype(jnp.float32), captures


def params_dtype(params: Params):
  return params["embed_in"]["embedding"].dtype


def forward(
  params: Params,
  tokens: Array,
  config: GPTNeoXConfig,
  sites: SiteRequest | str | Sequence[str] = (),
  positions: str | Sequence[int] | Array = "last",
  return_logits: bool = True,
  remat: str = "none",
) -> tuple[Array | None, dict[str, Array]]:
  """Runs the model on tokens [b, s]: (logits [b, s, V] float32 or None, captures).

  The one place the Flax module is applied; `make_forward`, the study and the loss call it.

  Pure in (params, tokens); wrap in `jax.jit` with `config`, `sites` and `return_logits`
  static (see `make_forward`), or vmap over a stacked checkpoint axis of params.
  Captures map each requested site name to its array, at the kept `positions`.
  `remat` (REMAT_POLICIES) changes only what a backward pass keeps, never the values.
  """
  if not isinstance(sites, SiteRequest):
    sites = SiteRequest.parse(sites, config)
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: one of {', '.join(REMAT_POLICIES)}")
  idx = position_index(positions, tokens.shape[1])
  model = GPTNeoX(config, dtype=params_dtype(params), remat=remat)
  return model.apply({"params": params}, tokens, idx, sites, return_logits)


def make_forward(
  config: GPTNeoXConfig, sites: SiteRequest | str | Sequence[str] = (), return_logits: bool = True
):
  """A jitted `fn(params, tokens, positions_index)`; see `position_index`."""
  if not isinstance(sites, SiteRequest):
    sites = SiteRequest.parse(sites, config)

  @jax.jit
  def fn(params, tokens, idx=None):
    return forward(params, tokens, config, sites, idx, return_logits)

  return fn


def init_params(config: GPTNeoXConfig, key: Array, dtype=jnp.float32) -> Params:
  """Random parameters with Pythia's initialisation (small_init, wang_init)."""
  tokens = jnp.zeros((1, 2), dtype=jnp.int32)
  return GPTNeoX(config, dtype=dtype).init(key, tokens)["params"]


# --- loss and gradients -------------------------------------------------------------

#: Weights whose gradients the study uses, as paths inside params["layers"].
GRADIENT_WEIGHTS: tuple[str, ...] = (
  "attn.query.kernel",
  "attn.key.kernel",
  "attn.value.kernel",
  "attn.out.kernel",
  "mlp.fc_in.kernel",
  "mlp.fc_out.kernel",
)


#: Tokens per unembedding chunk of the loss: float32 logits of one chunk are
#: LOSS_CHUNK_TOKENS x vocab (about 200 MiB at Pythia's 50304), never [b, s, vocab].
LOSS_CHUNK_TOKENS = 1024


def unembedding(params: Params) -> Array:
  """The unembedding matrix E [V, d] (HF's layout): logits = x @ E.T."""
  return params["embed_out"]["embedding"]


def _chunk_logits(h: Array, unembed: Array) -> Array:
  """float32 logits [c, V] of one chunk h [c, d] (accumulated in float32 whatever the dtype)."""
  return jnp.einsum("cd,vd->cv", h, unembed, preferred_element_type=jnp.float32)


def _chunk_terms(h, unembed, targets, weights):
  """(weighted loss sum, logits [c, V], logsumexp [c]) of one chunk."""
  logits = _chunk_logits(h, unembed)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return ((lse - target) * weights).sum(), logits, lse


@jax.custom_vjp
def _chunked_cross_entropy(h, unembed, targets, weights):
  """Sum over chunks of weighted token cross-entropies: h [k, c, d], unembed [V, d],
  targets and weights [k, c]. One chunk's logits live at a time (a scan)."""

  def step(total, chunk):
    hc, tc, wc = chunk
    loss, _, _ = _chunk_terms(hc, unembed, tc, wc)
    return total + loss, None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (h, targets, weights))
  return total


def _chunked_cross_entropy_fwd(h, unembed, targets, weights):
  # The gradient is formed in the same pass as the loss (softmax minus one-hot, one matmul
  # back to d), so the backward recomputes nothing and keeps no logits; the gradient of
  # the unembedding itself is formed only when the caller differentiates it (training).
  want_h, want_unembed = h.perturbed, unembed.perturbed
  h, unembed, targets, weights = h.value, unembed.value, targets.value, weights.value
  vocab = unembed.shape[0]

  def step(carry, chunk):
    total, d_unembed = carry
    hc, tc, wc = chunk
    loss, logits, lse = _chunk_terms(hc, unembed, tc, wc)
    d_logits = jnp.exp(logits - lse[:, None]) - (jnp.arange(vocab) == tc[:, None])
    d_logits = (d_logits * wc[:, None]).astype(h.dtype)
    dh = (
      jnp.einsum("cv,vd->cd", d_logits, unembed, preferred_element_type=jnp.float32).astype(h.dtype)
      if want_h
      else None
    )
    if want_unembed:
      d_unembed = d_unembed + jnp.einsum(
        "cv,cd->vd", d_logits, hc, preferred_element_type=jnp.float32
      )
    return (total + loss, d_unembed), dh

  d_unembed0 = jnp.zeros(unembed.shape, jnp.float32) if want_unembed else None
  (total, d_unembed), dh = jax.lax.scan(
    step, (jnp.zeros((), jnp.float32), d_unembed0), (h, targets, weights)
  )
  if want_unembed:
    d_unembed = d_unembed.astype(unembed.dtype)
  return total, (dh, d_unembed)


def _chunked_cross_entropy_bwd(residuals, g):
  dh, d_unembed = residuals
  scale = lambda x: None if x is None else (g * x).astype(x.dtype)  # noqa: E731
  return scale(dh), scale(d_unembed), None, None


_chunked_cross_entropy.defvjp(
  _chunked_cross_entropy_fwd, _chunked_cross_entropy_bwd, symbolic_zeros=True
)


def token_cross_entropy(
  h: Array, unembed: Array, targets: Array, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> Array:
  """Mean cross-entropy of next tokens targets [n] from final hidden states h [n, d]
  through the unembedding unembed [V, d], in chunks of `chunk_tokens` tokens: neither the
  loss nor its gradient ever holds more than one chunk's [chunk, V] float32 logits."""
  n = h.shape[0]
  chunk = max(1, min(chunk_tokens, n))
  k = -(-n // chunk)
  pad = k * chunk - n
  weights = jnp.pad(jnp.ones((n,), jnp.float32), (0, pad))
  h = jnp.pad(h, ((0, pad), (0, 0))).reshape(k, chunk, -1)
  targets = jnp.pad(targets.astype(jnp.int32), (0, pad)).reshape(k, chunk)
  return _chunked_cross_entropy(h, unembed, targets, weights.reshape(k, chunk)) / n


def lm_loss(
  params: Params,
  tokens: Array,
  config: GPTNeoXConfig,
  chunk_tokens: int = LOSS_CHUNK_TOKENS,
  remat: str = "none",
) -> Array:
  """Mean next-token cross-entropy of tokens [b, s+1] (inputs [:, :-1], targets [:, 1:]).

  The unembedding and log-softmax run in chunks of `chunk_tokens` tokens
  (`token_cross_entropy`); gradients flow to whichever params the caller differentiates.
  """
  request = SiteRequest.parse(["ln_final.hook_normalized"], config)
  _, caps = forward(
    params, tokens[:, :-1], config, request, positions="all", return_logits=False, remat=remat
  )
  h = caps["ln_final.hook_normalized"]
  return token_cross_entropy(
    h.reshape(-1, h.shape[-1]), unembedding(params), tokens[:, 1:].reshape(-1), chunk_tokens
  )


def get_path(tree, path):
  """tree["a"]["b"]["c"] for path "a.b.c"."""
  for part in path.split("."):
    tree = tree[part]
  return tree


def _set(tree, path, value):
  """A copy of nested dict `tree` with `path` replaced (only the dicts on the path copied)."""
  head, _, rest = path.partition(".")
  new = dict(tree)
  new[head] = _set(tree[head], rest, value) if rest else value
  return new


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'attn.value.kernel': x} -> {'attn': {'value': {'kernel': x}}}."""
  out: dict[str, Any] = {}
  for path, value in flat.items():
    parts = path.split(".")
    node = out
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return out


def loss_and_grads(
  params: Params,
  tokens: Array,
  config: GPTNeoXConfig,
  wrt: Sequence[str] = GRADIENT_WEIGHTS,
  chunk_tokens: int = LOSS_CHUNK_TOKENS,
  remat: str = "none",
) -> tuple[Array, dict[str, Any]]:
  """LM loss of tokens [b, s+1] and its gradient w.r.t. the layer weights `wrt` only.

  Returns (loss, grads) with grads nested like params["layers"] but holding only the
  requested leaves (e.g. grads["attn"]["value"]["kernel"] [L, d, H, dh]); gradients of
  other weights, the embedding and unembedding included, are never formed, and the
  logits exist one chunk of `chunk_tokens` tokens at a time (`token_cross_entropy`).
  `remat` trades memory for recomputation (REMAT_POLICIES).
  """
  for path in wrt:
    try:
      get_path(params["layers"], path)
    except (KeyError, TypeError):
      raise ValueError(f"no layer weight {path!r}; choose from {GRADIENT_WEIGHTS}") from None
  chosen = {path: get_path(params["layers"], path) for path in wrt}

  def loss_of(chosen):
    layers = params["layers"]
    for path, value in chosen.items():
      layers = _set(layers, path, value)
    return lm_loss({**params, "layers": layers}, tokens, config, chunk_tokens, remat)

  loss, grads = jax.value_and_grad(loss_of)(chosen)
  return loss, nest(grads)
