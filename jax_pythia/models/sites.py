"""Capture sites (TransformerLens names) and token positions, for every family.

`LAYER_SITES` and `GLOBAL_SITES` are the one table of site names. A request names sites
per layer (`blocks.3.attn.hook_z`), for every layer stacked on a leading layer axis
(`blocks.*.attn.hook_z` -> [L, ...]), or globally (`hook_embed`). A family that lacks a
site refuses it by name (its config's `site_refusal`). Only requested sites are kept, and
only at the requested token positions, selected inside the compiled function so full
[batch, seq, ...] tensors never reach the host. Token-axis shapes use `k` for the number
of kept positions (1 for `last`); H_kv is the number of key/value heads (H but for
grouped-query attention).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: Per-layer capture sites: name -> (shape, meaning). Prefixed `blocks.{l}.` or `blocks.*.`.
LAYER_SITES: dict[str, tuple[str, str]] = {
  "hook_resid_pre": ("[b, k, d]", "residual stream entering the layer"),
  "ln1.hook_normalized": ("[b, k, d]", "input norm output (attention input)"),
  "attn.hook_q": ("[b, k, H, dh]", "query per head, before rotary (after OLMo-2's q norm)"),
  "attn.hook_k": ("[b, k, H_kv, dh]", "key per head, before rotary (after OLMo-2's k norm)"),
  "attn.hook_v": ("[b, k, H_kv, dh]", "value per head (the true per-head values)"),
  "attn.hook_rot_q": ("[b, k, H, dh]", "query after rotary"),
  "attn.hook_rot_k": ("[b, k, H_kv, dh]", "key after rotary"),
  "attn.hook_attn_scores": ("[b, H, k, s]", "scaled, masked scores (query rows selected)"),
  "attn.hook_pattern": ("[b, H, k, s]", "attention probabilities (query rows selected)"),
  "attn.hook_z": ("[b, k, H, dh]", "attention-weighted values per head"),
  "attn.hook_result": ("[b, k, H, d]", "per-head output z_h @ W_O[h] (no bias)"),
  "hook_attn_out": (
    "[b, k, d]",
    "attention output added to the residual (sum of heads, plus bias; after OLMo-2's output norm)",
  ),  # fmt: skip
  "hook_resid_mid": ("[b, k, d]", "residual after attention (sequential residual only)"),
  "ln2.hook_normalized": ("[b, k, d]", "the MLP's input norm output"),
  "mlp.hook_pre": ("[b, k, f]", "MLP pre-activation (dense_h_to_4h, or gate_proj)"),
  "mlp.hook_pre_linear": ("[b, k, f]", "gated MLP's linear branch (up_proj output)"),
  "mlp.hook_post": ("[b, k, f]", "MLP hidden after the activation (times up_proj if gated)"),
  "hook_mlp_out": (
    "[b, k, d]",
    "MLP output added to the residual (dense_4h_to_h or down_proj; after OLMo-2's output norm)",
  ),  # fmt: skip
  "hook_resid_post": ("[b, k, d]", "residual stream leaving the layer"),
}
#: Whole-model capture sites.
GLOBAL_SITES: dict[str, tuple[str, str]] = {
  "hook_embed": ("[b, k, d]", "token embedding (the first residual stream)"),
  "ln_final.hook_normalized": ("[b, k, d]", "final norm output (unembedding input)"),
}
SITE_RE = re.compile(r"^blocks\.(\d+|\*)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class SiteRequest:
  """A parsed, validated set of site names: what the compiled function must keep."""

  names: tuple[str, ...]
  layer_sites: frozenset[str]  # suffixes computed inside the layer scan
  global_sites: frozenset[str]

  @classmethod
  def parse(cls, names: str | Sequence[str], config: Any) -> SiteRequest:
    """`config` is any family's config: its `n_layers` and `site_refusal(suffix)` (why the
    family lacks a site, or None) decide what it can capture."""
    if isinstance(names, str):
      names = [n for n in names.split(",") if n.strip()]
    names = tuple(dict.fromkeys(n.strip() for n in names))
    layer_sites, global_sites = set(), set()
    for name in names:
      if name in GLOBAL_SITES:
        global_sites.add(name)
        continue
      m = SITE_RE.match(name)
      if not m or m.group(2) not in LAYER_SITES:
        raise ValueError(
          f"unknown capture site {name!r}; per-layer sites are blocks.<l|*>.<site> with "
          f"<site> in {', '.join(LAYER_SITES)}; global sites: {', '.join(GLOBAL_SITES)}"
        )
      layer, suffix = m.groups()
      if layer != "*" and int(layer) >= config.n_layers:
        raise ValueError(f"capture site {name!r}: the model has {config.n_layers} layers")
      refusal = config.site_refusal(suffix)
      if refusal:
        raise ValueError(f"capture site {name!r} {refusal}")
      layer_sites.add(suffix)
    return cls(names, frozenset(layer_sites), frozenset(global_sites))

  def stacked(self, per_layer: dict[str, Array]) -> dict[str, Array]:
    """The requested per-layer sites from the scan's stacked {suffix: [L, ...]}."""
    out = {}
    for name in self.names:
      m = SITE_RE.match(name)
      if m:
        layer, suffix = m.groups()
        out[name] = per_layer[suffix] if layer == "*" else per_layer[suffix][int(layer)]
    return out


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
