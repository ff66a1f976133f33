"""Device meshes, parameter/batch shardings and multi-host work splitting.

Everything here is JAX's own runtime: a `jax.sharding.Mesh` with named axes, GSPMD
shardings on the inputs of the study's compiled functions (the compiler partitions the
rest), `jax.distributed` for several processes and `multihost_utils` barriers. No
scheduler of our own: the only shared state between processes is the sweep's --out
(a directory, or an fsspec URL for hosts that share no disk), whose per-checkpoint files
already make results idempotent.

Mesh axes (`--mesh=data:4,model:2`; a size of -1 takes the remaining devices):
  data   token batches: the activation batch [n, s] and each gradient microbatch are
         split by sequence
  model  layer weights split by heads and hidden units: query/key/value kernels
         [L, d, H, dh] and the out kernel [L, H, dh, d] on H, fc_in [L, d, f] and
         fc_out [L, f, d] on f, their biases alike; the embedding and unembedding on
         vocab when it divides, else replicated; LayerNorms replicated.
A checkpoint axis (several small checkpoints at once) is not implemented.

Several processes (`Placement.split`):
  checkpoints  each process sweeps its own checkpoints on its local devices: process 0
               computes every model's final checkpoint (the CKA reference) first while
               the others wait at a barrier, then the pending non-final checkpoints are
               dealt round-robin (process i takes i, i+P, ...); each process fetches only
               its own checkpoints and writes their files to the shared --out (a
               folder every host sees, or a URL: jax_pythia.sweep.store).
  shard        every process runs every checkpoint together on one global mesh (for
               models too big for one host); all of them compute, process 0 writes.
Either way the caller runs `results.finalize` on process 0 only, after `barrier("done")`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_pythia.checkpoints import converted
from jax_pythia.errors import JaxPythiaError
from jax_pythia.models import weights
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.scale import xla_cpu
from jax_pythia.scale.shapes import split_problem

AXES = ("data", "model")
SPLITS = ("checkpoints", "shard")
_MESH_RE = re.compile(r"^([a-z]+):(-1|\d+)$")


class ShardingError(JaxPythiaError, ValueError):
  """A mesh, split or distributed setup that cannot work as asked."""


# ------------------------------------------------------------------------------- mesh


def parse_mesh(spec: str | None) -> dict[str, int] | None:
  """`data:4,model:2` -> {'data': 4, 'model': 2} (in the given order); None/'' -> None."""
  if spec is None or not spec.strip():
    return None
  sizes: dict[str, int] = {}
  for part in spec.split(","):
    m = _MESH_RE.match(part.strip())
    if not m:
      raise ShardingError(
        f"--mesh={spec!r}: expected AXIS:SIZE[,AXIS:SIZE] with AXIS in "
        f"{', '.join(AXES)} and SIZE a positive integer or -1"
      )
    axis, size = m.group(1), int(m.group(2))
    if axis not in AXES:
      raise ShardingError(
        f"--mesh={spec!r}: unknown axis {axis!r}; axes: {', '.join(AXES)} "
        "(a checkpoint axis is not implemented)"
      )
    if axis in sizes:
      raise ShardingError(f"--mesh={spec!r}: axis {axis!r} given twice")
    if size == 0:
      raise ShardingError(f"--mesh={spec!r}: axis {axis!r} has size 0")
    sizes[axis] = size
  if list(sizes.values()).count(-1) > 1:
    raise ShardingError(f"--mesh={spec!r}: at most one axis may be -1")
  return sizes


def make_mesh(
  spec: str | Mapping[str, int] | None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A Mesh over `devices` (default: every device) with both axes `AXES`.

  Axes left out have size 1, so partition specs may always name both. The product of
  the sizes must equal the device count (one size may be -1: the rest).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(parse_mesh(spec) or {}) if spec is None or isinstance(spec, str) else dict(spec)
  if not sizes:
    sizes = {"data": len(devices)}
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  for axis, size in sizes.items():
    if size == -1:
      if len(devices) % known:
        raise ShardingError(
          f"mesh {_fmt(sizes)}: {len(devices)} devices are not a multiple of {known}"
        )
      sizes[axis] = len(devices) // known
  for axis in AXES:
    sizes.setdefault(axis, 1)
  total = int(np.prod(list(sizes.values())))
  if total != len(devices):
    raise ShardingError(
      f"mesh {_fmt(sizes)} needs {total} devices; there are {len(devices)} ({devices[0].platform})"
    )
  local = sum(d.process_index == jax.process_index() for d in devices)
  if devices[0].platform == "cpu" and (problem := xla_cpu.mesh_problem(local, os.environ)):
    raise ShardingError(f"mesh {_fmt(sizes)}: {problem}")  # refused: it would hang
  shape = tuple(sizes.values())
  try:
    # Topology-aware order on TPU (neighbouring chips on the model axis).
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except Exception:  # noqa: BLE001 -- any device kind it does not know: plain order
    grid = np.array(devices, dtype=object).reshape(shape)
  return Mesh(grid, tuple(sizes))


def _fmt(sizes: Mapping[str, int]) -> str:
  return ",".join(f"{k}:{v}" for k, v in sizes.items())


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
  return dict(mesh.shape)


# ------------------------------------------------------------------------- shardings


def param_specs(config: GPTNeoXConfig, model_size: int = 1) -> dict[str, Any]:
  """PartitionSpecs of the Flax params on the model axis: each leaf splits the dimension
  named by its `model_dim` in weights.PARAMS (heads, MLP width or vocab), or is replicated.

  Raises if the heads or the MLP width cannot be split evenly. Embeddings are split on
  vocab only when it divides (Pythia's 50,304 does for every power of two up to 128).
  """
  H, f, V = config.n_heads, config.d_mlp, config.vocab_size
  if problem := split_problem(H, config.n_kv_heads, f, model_size):
    raise ShardingError(f"--mesh: {problem}")
  mdl = "model" if model_size > 1 else None

  def spec(p: weights.Param) -> P:
    axes = [None] * len(p.dims)
    if p.model_dim is not None and not (p.model_dim == "V" and V % model_size):
      axes[p.dims.index(p.model_dim)] = mdl
    return P(*axes)

  return weights.param_tree(weights.table(config), spec)


def param_shardings(config: GPTNeoXConfig, mesh: Mesh) -> dict[str, Any]:
  """NamedShardings of the params on `mesh` (see `param_specs`)."""
  specs = param_specs(config, mesh_sizes(mesh).get("model", 1))
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
  """Splits dimension `axis` of an ndim-array over the data axis, replicates the rest."""
  spec = [None] * ndim
  spec[axis] = "data"
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array onto `sharding`; across processes each one supplies only its shards
  (every process holds the same host value)."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: Any) -> np.ndarray:
  """A (possibly multi-process) jax.Array as a numpy array on every process.

  A collective when the array spans processes: every process must call it in the same
  order (the `shard` split runs identical code on all of them).
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_shards[0].data)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def layer_mesh(devices: Sequence[jax.Device], n_layers: int) -> Mesh:
  """A mesh over all of `devices` with axes ('layers', 'copies'): the spectra's matrices
  (weights and gradients) split by layer into k = gcd(L, n) groups, each group's L / k
  layers on n / k devices that reduce them alike. No device holds the whole model's
  matrices unless k = 1. All devices, in their order: a jitted move reaches it from the
  compute mesh across processes, where `jax.device_put` cannot (`onto_layers`).
  (Pythia's L on 8 devices: 6 -> 2 groups, 12 -> 4, 16, 24, 32 -> 8, 36 -> 4.)"""
  k = math.gcd(n_layers, len(devices))
  return Mesh(np.array(list(devices), dtype=object).reshape(k, -1), ("layers", "copies"))


@functools.cache
def _mover(sharding: NamedSharding):
  return jax.jit(lambda tree: tree, out_shardings=sharding)


def _move(tree: Any, sharding: NamedSharding) -> Any:
  return _mover(sharding)(tree)


# ------------------------------------------------------------------------ processes


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto: bool = False,
) -> bool:
  """Starts JAX's multi-process runtime; must run before any other JAX call.

  With a coordinator (`host:port`), the process count and this process's id: an explicit
  cluster (CPU hosts, GPUs, tests). With `auto`: `jax.distributed.initialize()` with no
  arguments, which reads TPU pod (and SLURM, ...) metadata. Neither: one process, False.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ShardingError(
        "--coordinator_address, --num_processes and --process_id go "
        "together (or pass --distributed alone on a TPU pod)"
      )
    if not 0 <= process_id < num_processes:
      raise ShardingError(f"--process_id={process_id} must be in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if auto:
    jax.distributed.initialize()
    return True
  return False


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------ placement


@dataclasses.dataclass
class Placement:
  """Where a sweep's arrays go and which checkpoints this process runs.

  `mesh=None` and one process is the plain single-device sweep (arrays stay where
  `jax.device_put` puts them). Made by `Placement.create`.
  """

  mesh: Mesh | None = None
  split: str = "checkpoints"

  def __post_init__(self):
    if self.split not in SPLITS:
      raise ShardingError(f"--split={self.split!r}: one of {', '.join(SPLITS)}")

  @classmethod
  def create(cls, mesh: str | None = None, split: str = "checkpoints") -> Placement:
    """A mesh over the local devices (split=checkpoints) or all devices (split=shard)."""
    if split not in SPLITS:
      raise ShardingError(f"--split={split!r}: one of {', '.join(SPLITS)}")
    multi = jax.process_count() > 1
    if not mesh and not (multi and split == "shard"):
      return cls(None, split)
    devices = jax.devices() if split == "shard" else jax.local_devices()
    return cls(make_mesh(mesh, devices), split)

  # -- processes

  @property
  def process_index(self) -> int:
    return jax.process_index()

  @property
  def process_count(self) -> int:
    return jax.process_count()

  @property
  def is_writer(self) -> bool:
    """Whether this process writes a checkpoint's results it computed."""
    return self.split == "checkpoints" or self.process_index == 0

  def barrier(self, name: str) -> None:
    barrier(f"jax_pythia:{name}")

  def schedule(self, queue: Sequence[tuple[Any, int]]) -> Iterator[list[tuple[Any, int]]]:
    """Phases of (model, step) work for this process, with barriers between them.

    `queue` is the pending work in sweep order, identical on every process (the caller
    computes it before the first barrier, i.e. before anyone writes).
    """
    self.barrier("plan")
    if self.process_count == 1 or self.split == "shard":
      yield list(queue)
      return
    finals = [(m, s) for m, s in queue if s == m.final_step]
    rest = [(m, s) for m, s in queue if s != m.final_step]
    yield finals if self.process_index == 0 else []
    # Every later checkpoint reads the final's activations from the shared --out.
    self.barrier("finals")
    yield rest[self.process_index :: self.process_count]

  # -- arrays

  def params(self, params: Any, config: GPTNeoXConfig) -> Any:
    """Converted params (weights.convert_state_dict) or a `checkpoints.Converted` cache onto
    the devices."""
    target = None if self.mesh is None else param_shardings(config, self.mesh)
    if isinstance(params, converted.Converted):
      _, restored = converted.restore_converted(params.directory, sharding=target)
      return restored
    if target is None:
      return jax.device_put(params)
    shapes = weights.param_shapes(config)
    found = jax.tree.map(lambda x: tuple(x.shape), params)
    if found != shapes:
      raise ShardingError("params do not match the config's shapes")
    return jax.tree.map(put, params, target)

  def batch(self, x: np.ndarray, axis: int = 0, what: str = "batch") -> Any:
    """Tokens split over the data axis at `axis` (left on the host without a mesh)."""
    if self.mesh is None:
      return x
    n = mesh_sizes(self.mesh)["data"]
    if x.shape[axis] % n:
      raise ShardingError(
        f"{what} of {x.shape[axis]} sequences cannot be split over the "
        f"data axis of size {n}; choose a multiple of {n}"
      )
    return put(x, batch_sharding(self.mesh, x.ndim, axis))

  def replicate(self, x: Any) -> Any:
    if self.mesh is None or x is None:
      return x
    return put(x, replicated(self.mesh))

  def host(self, x: Any) -> np.ndarray:
    return to_host(x)

  def layer_mesh(self, n_layers: int) -> Mesh | None:
    """The mesh the spectra run on (`layer_mesh`), over this placement's devices; None
    without a mesh (one device: the params are already there)."""
    if self.mesh is None:
      return None
    return layer_mesh(list(self.mesh.devices.flat), n_layers)

  def onto_layers(self, tree: Any, mesh: Mesh | None) -> Any:
    """A pytree of [L, ...] arrays split on L over `mesh` (a `layer_mesh`); unchanged when
    None. The move is a compiled call of its own (collectives apart from any LAPACK
    program: XLA:CPU), which works across processes."""
    if mesh is None:
      return tree
    return _move(tree, NamedSharding(mesh, P("layers")))

  def describe(self) -> str:
    where = (
      "1 device"
      if self.mesh is None
      else f"mesh {_fmt(mesh_sizes(self.mesh))} ({self.mesh.devices.size} devices)"
    )
    if self.process_count > 1:
      where += f", process {self.process_index} of {self.process_count}, split={self.split}"
    return where
