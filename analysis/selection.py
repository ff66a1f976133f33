"""Which metrics a run computes: a `Selection` of the registry (analysis.registry).

`select(metrics, components, analysis_file)` turns the sweep's `--metrics`, `--components`
and the analysis file's entries into a Selection, a hashable set of (component, table
name) with optional layers per entry; the study computes what it names and nothing else
(`needs_gradients`: no gradient pass without a gradient metric; `pairwise`: no pairwise
matrices without a similarity metric).

`--metrics` items are table names (`per`, `grad_per`, `act_gini`, `cka`, `svcca`,
`grad_norm`, `train_loss`, ...; `analysis.registry` says how they are formed) or the words
`default` (the paper's protocol: every metric on its `default` data types) and `all`
(every registered metric on every data type). Selecting `cka` (or `cka_debiased`) also
writes its noise floor `cka_floor`. The analysis file (JSON) lists entries, each a table
name or {"metric": registry name, "data": [data types], "components": [...],
"layers": [...]} (every key but "metric" optional); layers only filter the rows written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from analysis import registry

#: The selection words of --metrics.
KEYWORDS = ("default", "all")


@dataclasses.dataclass(frozen=True)
class Selection:
  """(component, table name, layers or None) entries, sorted; hashable (a jit static)."""

  entries: tuple[tuple[str, str, tuple[int, ...] | None], ...]

  def wants(self, component: str, name: str) -> bool:
    return any(c == component and n == name for c, n, _ in self.entries)

  def names(self, component: str) -> tuple[str, ...]:
    return tuple(sorted({n for c, n, _ in self.entries if c == component}))

  def of(self, data: str, family: str | None = None) -> dict[str, tuple[str, ...]]:
    """{component: registry names} selected on `data` (of one family if given)."""
    out: dict[str, list[str]] = {}
    for c, n, _ in self.entries:
      metric, d = registry.table_names()[n]
      if d == data and (family is None or metric.family == family):
        out.setdefault(c, []).append(metric.name)
    return {c: tuple(sorted(set(v))) for c, v in out.items()}

  @property
  def needs_gradients(self) -> bool:
    return bool(self.of("gradients")) or any(n == "train_loss" for _, n, _ in self.entries)

  @property
  def refines_gradients(self) -> bool:
    """Whether a selected gradient metric reads float64-refined singular values (the
    condition number): the gradient spectra then refine them (analysis.spectra)."""
    names = {n for names in self.of("gradients").values() for n in names}
    return any(registry.METRICS[n].refined for n in names)

  @property
  def needs_activations(self) -> bool:
    return bool(self.of("activations"))

  @property
  def pairwise(self) -> tuple[str, ...]:
    """Similarity metrics selected, computed between every pair of checkpoints too."""
    return tuple(
      sorted({n for names in self.of("activations", "similarity").values() for n in names})
    )

  def keeps(self, component: str, name: str, layer: int) -> bool:
    """Whether a row is written (its metric selected there, its layer among the chosen)."""
    if name.endswith("_floor"):
      name = name.removesuffix("_floor")
    for c, n, layers in self.entries:
      if c == component and n == name and (layers is None or layer in layers or layer < 0):
        return True
    return False

  def record(self) -> list[list]:
    """The selection as JSON (what --out records)."""
    return [[c, n, None if layers is None else list(layers)] for c, n, layers in self.entries]


def _entries(metric: registry.Metric, data: Iterable[str], components, layers=None):
  for d in data:
    for c in metric.components(d):
      if components is None or c in components or c == "model":
        yield (c, metric.table_name(d), layers)


def _named(name: str, components) -> list:
  if name == "default":
    return [e for m in registry.METRICS.values() for e in _entries(m, m.default, components)]
  if name == "all":
    return [e for m in registry.METRICS.values() for e in _entries(m, m.data, components)]
  names = registry.table_names()
  if name not in names:
    known = ", ".join([*KEYWORDS, *names])
    raise ValueError(f"unknown metric {name!r}; known: {known}")
  metric, data = names[name]
  return list(_entries(metric, [data], components))


def _from_file(entry, components) -> list:
  if isinstance(entry, str):
    return _named(entry, components)
  if not isinstance(entry, dict) or "metric" not in entry:
    raise ValueError(f"analysis entry {entry!r}: a table name or an object with a 'metric' key")
  unknown = set(entry) - {"metric", "data", "components", "layers"}
  if unknown:
    raise ValueError(f"analysis entry {entry!r}: unknown keys {sorted(unknown)}")
  metric = registry.METRICS.get(entry["metric"])
  if metric is None:
    raise ValueError(
      f"analysis entry: unknown metric {entry['metric']!r}; known: {', '.join(registry.METRICS)}"
    )
  data = entry.get("data", metric.data)
  bad = [d for d in data if d not in metric.data]
  if bad:
    raise ValueError(f"analysis entry {metric.name!r}: data {bad}; it takes {list(metric.data)}")
  own = entry.get("components")
  if own is not None:
    _check_components(own)
  allowed = own if components is None else [c for c in (own or components) if c in components]
  layers = entry.get("layers")
  layers = None if layers is None else tuple(sorted(int(x) for x in layers))
  return list(_entries(metric, data, allowed, layers))


def _check_components(components: Sequence[str]) -> None:
  bad = [c for c in components if c not in registry.ACTIVATION_COMPONENTS]
  if bad:
    raise ValueError(
      f"unknown component {bad[0]!r}; known: {', '.join(registry.ACTIVATION_COMPONENTS)}"
    )


def select(
  metrics: Sequence[str] | None = None,
  components: Sequence[str] | None = None,
  analysis: Sequence | None = None,
) -> Selection:
  """The Selection of `--metrics` (None: default), `--components` (None: all) and the
  analysis file's entries (a list, replacing --metrics when given). Raises ValueError
  naming an unknown metric, component or data type, or a selection that selects nothing."""
  if components is not None:
    _check_components(components)
  entries: list = []
  if analysis is not None:
    for entry in analysis:
      entries += _from_file(entry, components)
  else:
    for name in metrics or ["default"]:
      entries += _named(name, components)
  merged: dict = {}
  for c, n, layers in entries:  # one entry per (component, name); None = every layer
    old = merged.get((c, n), ())
    if (c, n) in merged and (old is None or layers is None):
      merged[(c, n)] = None
    else:
      merged[(c, n)] = None if layers is None else tuple(sorted(set(old) | set(layers)))
  if not merged:
    raise ValueError("the selection names no metric on the chosen components")
  return Selection(tuple(sorted((c, n, layers) for (c, n), layers in merged.items())))


def default() -> Selection:
  """The paper's protocol: every registered metric on its `default` data types."""
  return select()
