"""The registry of metrics: what exists, on which data types and components, by which
function and formula. It is the run: the study computes what a `Selection` of it names.

A metric is one registered function, of one family (its input):
  'spectral'    fn(s [..., m]) or fn(s [..., m], k) -> [...]: singular values (descending;
                k the rank bound when `needs_rank_bound`). Weights: of each matrix;
                gradients: of the singular values averaged over the G batches;
                activations: of the captured [n, d] matrix.
  'entries'     fn(x [..., m]) -> [...]: the entries of each matrix, flattened (sparsity).
                Gradients: averaged over the G batches.
  'similarity'  fn(x [..., n, dx], y [..., n, dy]) -> [...]: activations of a checkpoint
                against the final checkpoint's, and between every pair of checkpoints.
  'gradient'    fn(values [G, ...]) -> [...]: a per-batch gradient statistic (its Frobenius
                norm, its cosine with the previous batch) reduced over the G batches.
  'model'       fn(losses [G] or []) -> []: whole-model values (component 'model').
Data types: 'weights', 'gradients', 'activations'. Components: 'ov_head' (per head,
[L, H]), 'ov', 'mlp' ([L]), 'resid' ([L], activations only), 'model' ([]).

Table names (the `metric` column): a spectral or entries metric is `<name>` on weights,
`grad_<name>` on gradients, `act_<name>` on activations; a similarity metric is `<name>`
(and `<name>_floor`, its value against row-permuted activations, for CKA); a gradient
statistic `grad_<name>`; a model metric `<name>`. `table_names()` lists them.

`default` says on which data types a metric belongs to the paper's protocol (the sweep's
default); anything else runs when selected (`analysis.selection`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType

FAMILIES = ("spectral", "entries", "similarity", "gradient", "model")
DATA_TYPES = ("weights", "gradients", "activations")
#: Components with weights (and gradients): the OV circuit per head and whole, the MLP.
COMPONENTS = ("ov_head", "ov", "mlp")
#: Components with activations: those and the residual stream.
ACTIVATION_COMPONENTS = (*COMPONENTS, "resid")
_PREFIX = {"weights": "", "gradients": "grad_", "activations": "act_"}
# What each family takes: its data types, and where each type lives.
_FAMILY_DATA = {
  "spectral": DATA_TYPES,
  "entries": DATA_TYPES,
  "similarity": ("activations",),
  "gradient": ("gradients",),
  "model": ("model",),  # train_loss comes with the gradient pass, heldout_loss its own
}


@dataclasses.dataclass(frozen=True)
class Metric:
  """A registered metric (module doc): name, family, function, the data types it applies
  to, those of the paper's protocol, whether it takes a rank bound k, whether it reads
  float64-refined singular values (the condition number), and its formula."""

  name: str
  family: str
  fn: Callable
  needs_rank_bound: bool = False
  description: str = ""
  refined: bool = False
  data: tuple[str, ...] = DATA_TYPES
  default: tuple[str, ...] = ()
  user: bool = False  # registered by a --metrics_module

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def table_name(self, data: str) -> str:
    """The `metric` column of its rows on `data`."""
    if self.family in ("similarity", "model"):
      return self.name
    return _PREFIX[data] + self.name

  def components(self, data: str) -> tuple[str, ...]:
    if data == "model":
      return ("model",)
    return ACTIVATION_COMPONENTS if data == "activations" else COMPONENTS


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
  data: tuple[str, ...] | None = None,
  default: tuple[str, ...] = (),
  user: bool = False,
) -> Callable[[Callable], Callable]:
  """Decorator registering `fn` under `name`; returns `fn` unchanged.

  Args:
    family: one of FAMILIES (the function's input, module doc).
    data: the data types it applies to (default: all its family takes).
    default: the data types on which it is part of the sweep's default protocol.
    description: its formula (default: the first line of fn's docstring).
  Raises ValueError for an unknown family or data type, or a name that is taken (or whose
  table names are: two functions silently sharing a column would corrupt the tables).
  """
  if family not in FAMILIES:
    raise ValueError(f"unknown metric family {family!r}; expected one of {FAMILIES}")
  data = tuple(data or _FAMILY_DATA[family])
  bad = [d for d in (*data, *default) if d not in _FAMILY_DATA[family] or d not in data]
  if bad:
    raise ValueError(f"metric {name!r}: data types {bad} are not among {data}")

  def decorate(fn: Callable) -> Callable:
    if name in _REGISTRY and _REGISTRY[name].fn is not fn:
      raise ValueError(f"metric name {name!r} is already registered")
    doc = description or (fn.__doc__ or "").strip().split("\n")[0]
    metric = Metric(name, family, fn, needs_rank_bound, doc, refined, data, tuple(default), user)
    taken = {t: m for m in _REGISTRY.values() if m.name != name for t in _names(m)}
    clash = [t for t in _names(metric) if t in taken]
    if clash:
      raise ValueError(
        f"metric {name!r}: table name {clash[0]!r} is taken by {taken[clash[0]].name!r}"
      )
    _REGISTRY[name] = metric
    return fn

  return decorate


def _names(metric: Metric) -> list[str]:
  return [metric.table_name(d) for d in metric.data]


def metrics_in_family(family: str) -> dict[str, Metric]:
  """All registered metrics of one family, in registration order."""
  if family not in FAMILIES:
    raise ValueError(f"unknown metric family {family!r}; expected one of {FAMILIES}")
  return {name: m for name, m in _REGISTRY.items() if m.family == family}


def table_names() -> dict[str, tuple[Metric, str]]:
  """{table name: (metric, data type)} of everything registered, in registration order."""
  return {m.table_name(d): (m, d) for m in _REGISTRY.values() for d in m.data}


def formula(table_name: str) -> str:
  """How a `metric` column's rows were formed: data type and formula, from the registry
  ('' for a name registered nowhere here, e.g. another process's --metrics_module)."""
  if table_name.endswith("_floor"):  # written beside a CKA estimator (analysis.summary)
    of = table_name[: -len("_floor")]
    return f"activations: noise floor of {of}, the final checkpoint against itself rows permuted"
  metric, data = table_names().get(table_name, (None, ""))
  return f"{data}: {metric.description}" if metric else ""


def unregister_user_metrics() -> None:
  """Forget the metrics a --metrics_module registered (tests, a second run in a process)."""
  for name in [n for n, m in _REGISTRY.items() if m.user]:
    del _REGISTRY[name]


def mark_user(names) -> None:
  """Flag metrics as registered by a --metrics_module (`unregister_user_metrics` drops them)."""
  for name in names:
    _REGISTRY[name] = dataclasses.replace(_REGISTRY[name], user=True)


def _probe_inputs(metric: Metric):
  """(args, the shape the result must have) of a small call in the metric's family."""
  import jax.numpy as jnp  # here: the registry itself needs no jax

  ramp = jnp.linspace(1.0, 2.0, 2 * 3 * 40, dtype=jnp.float32)
  if metric.family == "spectral":
    s = jnp.sort(ramp[:48].reshape(2, 3, 8), axis=-1)[..., ::-1]
    return ((s, 8) if metric.needs_rank_bound else (s,)), (2, 3)
  if metric.family == "entries":
    return (ramp[:96].reshape(2, 3, 16) - 1.5,), (2, 3)
  if metric.family == "similarity":
    x = jnp.sin(ramp[:240].reshape(2, 40, 3) * jnp.arange(1, 4))
    y = jnp.cos(ramp[:160].reshape(2, 40, 2) * jnp.arange(1, 3))
    return (x, y), (2,)
  if metric.family == "gradient":
    return (ramp[:24].reshape(4, 2, 3),), (2, 3)
  return (ramp[:4],), ()


def probe(metric: Metric) -> str | None:
  """None if `metric` runs under jit on a small input of its family and returns the shape
  its family promises (module doc); else one line saying what went wrong."""
  import jax

  _NOT_JITABLE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.UnexpectedTracerError,
  )
  args, want = _probe_inputs(metric)
  static = (1,) if metric.family == "spectral" and metric.needs_rank_bound else ()
  try:
    out = jax.jit(metric.fn, static_argnums=static)(*args)
  except _NOT_JITABLE as e:  # bool(tracer), np.asarray(tracer), leaked tracers
    return f"metric {metric.name!r} is not jit-able: {type(e).__name__}: {str(e).splitlines()[0]}"
  except Exception as e:  # noqa: BLE001 - a user's function may raise anything
    first = (str(e).splitlines() or [""])[0]
    return f"metric {metric.name!r} raised {type(e).__name__}: {first}"
  shape = getattr(out, "shape", None)
  if shape != want:
    return (
      f"metric {metric.name!r} ({metric.family}) returned shape {shape} for inputs "
      f"{[getattr(a, 'shape', a) for a in args]}; expected {want}"
    )
  return None
