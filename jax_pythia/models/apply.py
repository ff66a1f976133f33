"""The forward pass of any family: the one place a family's Flax module is applied.

Pure in (params, tokens): `forward` can be jitted, vmapped over a stacked checkpoint axis
and differentiated. Layers run under `nn.scan` over the stacked layer axis, so compile
time does not grow with depth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jax_pythia.models.common import REMAT_POLICIES
from jax_pythia.models.family import family_of
from jax_pythia.models.sites import SiteRequest, position_index

Array = jax.Array
Params = Mapping[str, Any]


def params_dtype(params: Params):
  return params["embed_in"]["embedding"].dtype


def unembedding(params: Params) -> Array:
  """The unembedding matrix E [V, d] (HF's layout): logits = x @ E.T; the embedding itself
  when the model ties them (no `embed_out` leaf)."""
  return params.get("embed_out", params["embed_in"])["embedding"]


def forward(
  params: Params,
  tokens: Array,
  config: Any,
  sites: SiteRequest | str | Sequence[str] = (),
  positions: str | Sequence[int] | Array = "last",
  return_logits: bool = True,
  remat: str = "none",
) -> tuple[Array | None, dict[str, Array]]:
  """Runs the model of `config` (any family) on tokens [b, s]: (logits [b, s, V] float32
  or None, captures).

  Wrap in `jax.jit` with `config`, `sites` and `return_logits` static (see
  `make_forward`), or vmap over a stacked checkpoint axis of params. Captures map each
  requested site name to its array, at the kept `positions`. `remat` (REMAT_POLICIES)
  changes only what a backward pass keeps, never the values.
  """
  if not isinstance(sites, SiteRequest):
    sites = SiteRequest.parse(sites, config)
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: one of {', '.join(REMAT_POLICIES)}")
  idx = position_index(positions, tokens.shape[1])
  model = family_of(config).module(config, dtype=params_dtype(params), remat=remat)
  return model.apply({"params": params}, tokens, idx, sites, return_logits)


def make_forward(
  config: Any, sites: SiteRequest | str | Sequence[str] = (), return_logits: bool = True
):
  """A jitted `fn(params, tokens, positions_index)`; see `position_index`."""
  if not isinstance(sites, SiteRequest):
    sites = SiteRequest.parse(sites, config)

  @jax.jit
  def fn(params, tokens, idx=None):
    return forward(params, tokens, config, sites, idx, return_logits)

  return fn


def init_params(config: Any, key: Array, dtype=jnp.float32) -> Params:
  """Random parameters of `config`'s family (GPT-NeoX: Pythia's small_init, wang_init)."""
  tokens = jnp.zeros((1, 2), dtype=jnp.int32)
  return family_of(config).module(config, dtype=dtype).init(key, tokens)["params"]
