"""Loss and gradients of any family: the chunked next-token cross-entropy (the unembedding
and log-softmax one chunk of tokens at a time, forward and backward), the LM loss, and the
gradient of the layer weights only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jax_pythia.models.apply import forward, unembedding
from jax_pythia.models.family import family_of
from jax_pythia.models.sites import SiteRequest

Array = jax.Array
Params = Mapping[str, Any]

#: Tokens per unembedding chunk of the loss: float32 logits of one chunk are
#: LOSS_CHUNK_TOKENS x vocab (about 200 MiB at Pythia's 50304), never [b, s, vocab].
LOSS_CHUNK_TOKENS = 1024


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
  config: Any,
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
  config: Any,
  wrt: Sequence[str] | None = None,
  chunk_tokens: int = LOSS_CHUNK_TOKENS,
  remat: str = "none",
) -> tuple[Array, dict[str, Any]]:
  """LM loss of tokens [b, s+1] and its gradient w.r.t. the layer weights `wrt` only.

  Returns (loss, grads) with grads nested like params["layers"] but holding only the
  requested leaves (e.g. grads["attn"]["value"]["kernel"] [L, d, H, dh]); gradients of
  other weights, the embedding and unembedding included, are never formed, and the
  logits exist one chunk of `chunk_tokens` tokens at a time (`token_cross_entropy`).
  `remat` trades memory for recomputation (REMAT_POLICIES). `wrt` None: the family's
  GRADIENT_WEIGHTS (every weight matrix of the layers).
  """
  default = family_of(config).gradient_weights
  wrt = default if wrt is None else wrt
  for path in wrt:
    try:
      get_path(params["layers"], path)
    except (KeyError, TypeError):
      raise ValueError(f"no layer weight {path!r}; choose from {default}") from None
  chosen = {path: get_path(params["layers"], path) for path in wrt}

  def loss_of(chosen):
    layers = params["layers"]
    for path, value in chosen.items():
      layers = _set(layers, path, value)
    return lm_loss({**params, "layers": layers}, tokens, config, chunk_tokens, remat)

  loss, grads = jax.value_and_grad(loss_of)(chosen)
  return loss, nest(grads)
