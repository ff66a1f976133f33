"""Loading one checkpoint for the sweep: read, hash and convert (or open its orbax cache),
in the prefetch thread while the previous checkpoint computes."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from jax_pythia import suite
from jax_pythia.checkpoints import converted, integrity
from jax_pythia.checkpoints import hub as checkpoints
from jax_pythia.checkpoints.sources import ModelSource
from jax_pythia.errors import JaxPythiaError
from jax_pythia.models import family, weights
from jax_pythia.models.config import GPTNeoXConfig


@dataclasses.dataclass
class Loaded:
  step: int
  config: GPTNeoXConfig | None = None
  params: Any = None
  directory: str | None = None
  error: str | None = None
  seconds: float = 0.0
  weights_hash: integrity.WeightsHash | None = None  # None: restored from a converted cache


def parameter_count(config: GPTNeoXConfig) -> int:
  """Parameters of a model of `config` (every weight and bias, embeddings included)."""
  shapes = jax.tree.leaves(weights.param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
  return int(sum(np.prod(shape) for shape in shapes))


def load(m: ModelSource, step: int, dtype: str) -> Loaded:
  """Reads, hashes and converts one checkpoint (or opens its orbax cache, restored later
  straight onto the mesh); a failure is recorded in `Loaded.error`, not raised."""
  start = time.perf_counter()
  try:
    local = None if m.is_hub else os.path.join(m.location, suite.revision(step))
    if local and converted.is_converted(local):
      # An orbax cache: restored in compute, straight onto the mesh's shardings.
      return Loaded(
        step,
        converted.converted_config(local),
        converted.Converted(local),
        local,
        seconds=time.perf_counter() - start,
      )
    directory = checkpoints.resolve_checkpoint(m.spec(step))
    config = family.load_config(os.path.join(directory, weights.CONFIG_FILE))
    state = weights.read_state_dict(directory)
    # Hashed as read (the hash's pass faults the mmap in; conversion then reads the page
    # cache), in this prefetch thread, so it overlaps the previous checkpoint's compute.
    digest = integrity.checked_hash(state, directory)
    params = weights.convert_state_dict(state, config, dtype)
    seconds = time.perf_counter() - start
    return Loaded(step, config, params, directory, seconds=seconds, weights_hash=digest)
  except JaxPythiaError as e:
    return Loaded(step, error=str(e), seconds=time.perf_counter() - start)
