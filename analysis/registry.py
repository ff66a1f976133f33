"""One name per spectral metric: the registry the sweep iterates over.

Every metric registered here runs in the sweep, for the weights and for the gradients:
`spectral_metrics` calls each on the singular values of every component, so the weights
get a column `<name>` and the gradients (of their mean singular values) `grad_<name>`
(`analysis.summary.metric_table`). Adding a metric is one function and a
`register_metric` line. The signature is fn(s [..., m]) or fn(s [..., m], k) -> [...]
(singular values, descending; k the rank bound when `needs_rank_bound`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType

FAMILIES = ("spectral",)


@dataclasses.dataclass(frozen=True)
class Metric:
  """A registered metric: its name, family, function and whether it takes a rank bound k."""

  name: str
  family: str
  fn: Callable
  needs_rank_bound: bool = False
  description: str = ""
  refined: bool = False  # reads float64-refined singular values where float32 cannot resolve

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


_REGISTRY: dict[str, Metric] = {}
# Read-only view so callers cannot bypass `register_metric` (and its duplicate check).
METRICS: Mapping[str, Metric] = MappingProxyType(_REGISTRY)


def register_metric(
  name: str,
  family: str,
  *,
  needs_rank_bound: bool = False,
  description: str = "",
  refined: bool = False,
) -> Callable[[Callable], Callable]:
  """Decorator registering `fn` under `name`; returns `fn` unchanged.

  Raises ValueError for an unknown family or a name that is already taken (two functions
  silently sharing a column name would corrupt the sweep's table).
  """
  if family not in FAMILIES:
    raise ValueError(f"unknown metric family {family!r}; expected one of {FAMILIES}")

  def decorate(fn: Callable) -> Callable:
    if name in _REGISTRY and _REGISTRY[name].fn is not fn:
      raise ValueError(f"metric name {name!r} is already registered")
    doc = description or (fn.__doc__ or "").strip().split("\n")[0]
    _REGISTRY[name] = Metric(name, family, fn, needs_rank_bound, doc, refined)
    return fn

  return decorate


def metrics_in_family(family: str) -> dict[str, Metric]:
  """All registered metrics of one family, in registration order."""
  if family not in FAMILIES:
    raise ValueError(f"unknown metric family {family!r}; expected one of {FAMILIES}")
  return {name: m for name, m in _REGISTRY.items() if m.family == family}
