"""The parameter-layout table's vocabulary: which Hugging Face tensor feeds which Flax leaf,
its shapes, the transform between them, and the dimension split over a model axis.

Each family declares one table of `Param`s (gpt_neox.PARAMS, llama.params); conversion in
both directions (`convert`), the shapes and `sharding.param_specs` derive from it. Shapes
are written in dim symbols that the family's config sizes (`config.dims()`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
  """How one layer's HF tensor becomes a Flax leaf slice, and back.

  `to_flax(w, shape, part)` takes a numpy or jax array (methods only, so it runs under
  jit) and the Flax leaf's one-layer shape; `to_hf(parts, shape)` takes the numpy slices
  of every Flax leaf that one HF tensor feeds, in `part` order (three for GPT-NeoX's fused
  query_key_value, else one).
  """

  name: str
  to_flax: Callable[..., Any]
  to_hf: Callable[..., np.ndarray]


COPY = Transform("copy", lambda w, shape, j: w, lambda parts, shape: parts[0])
TRANSPOSE = Transform("transpose", lambda w, shape, j: w.T, lambda parts, shape: parts[0].T)
# A torch Linear weight [(H, dh) out, d in] -> kernel [d, H, dh] (q, k, v projections).
HEADS_OUT = Transform(
  "transpose, split the output per head",
  lambda w, shape, j: w.T.reshape(shape),
  lambda parts, shape: parts[0].reshape(parts[0].shape[0], -1).T,
)
# A torch Linear weight [d out, (H, dh) in] -> kernel [H, dh, d] (the output projection).
HEADS_IN = Transform(
  "transpose, split the input per head",
  lambda w, shape, j: w.T.reshape(shape),
  lambda parts, shape: parts[0].reshape(-1, parts[0].shape[-1]).T,
)


@dataclasses.dataclass(frozen=True)
class Param:
  """One Flax parameter: where it comes from in a HF checkpoint and how it is laid out.

  A `{l}` in `hf_name` makes it per-layer: the Flax leaf stacks the L layers' tensors on a
  leading axis. Shapes are dim symbols of one layer. `model_dim` is the dimension split
  over the mesh's model axis (None: replicated).
  """

  path: str
  hf_name: str
  shape: str
  hf_shape: str
  transform: Transform
  model_dim: str | None = None
  part: int = 0

  @property
  def per_layer(self) -> bool:
    return "{l}" in self.hf_name

  @property
  def dims(self) -> tuple[str, ...]:
    """Dim symbols of the whole Flax leaf (the layer axis first when per-layer)."""
    return ("L",) * self.per_layer + tuple(self.shape.split())

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(self.path.split("/"))

  def hf_names(self, n_layers: int) -> list[str]:
    """The source tensors, one per layer (per-layer) or one."""
    if not self.per_layer:
      return [self.hf_name]
    return [self.hf_name.format(l=l) for l in range(n_layers)]

  def layer_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
    """The Flax shape of one layer's slice (what `transform` works in)."""
    return tuple(sizes[s] for s in self.shape.split())


def param_tree(table: Sequence[Param], leaf: Callable[[Param], Any]) -> dict[str, Any]:
  """The Flax parameter tree of `table` with `leaf(param)` at each leaf."""
  tree: dict[str, Any] = {}
  for p in table:
    node = tree
    for key in p.keys[:-1]:
      node = node.setdefault(key, {})
    node[p.keys[-1]] = leaf(p)
  return tree
