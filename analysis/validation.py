"""Input checks shared by the analysis functions.

Shape checks run at trace time (shapes are static under jit) and raise ValueError naming
the shapes. Value checks (NaN/Inf) cannot raise inside jit, so the numeric functions let
NaN propagate (documented per function) and `check_finite` is the host-side guard to call
on inputs or results outside jit.
"""

from __future__ import annotations

import numpy as np


def check_finite(name: str, array) -> None:
  """Host-side: raise ValueError if `array` (any shape) holds NaN or Inf, naming it.

  Not for use inside jit (it reads the values); call it on inputs before, or on results
  after, a compiled call.
  """
  values = np.asarray(array)
  if values.size == 0:
    raise ValueError(f"{name}: empty array of shape {values.shape}")
  if not np.issubdtype(values.dtype, np.number):
    raise ValueError(f"{name}: non-numeric dtype {values.dtype}")
  finite = np.isfinite(values)
  if not finite.all():
    bad = int(values.size - finite.sum())
    raise ValueError(
      f"{name}: {bad} of {values.size} entries are NaN or Inf (shape {values.shape})"
    )


def require_ndim(name: str, array, min_ndim: int) -> None:
  if array.ndim < min_ndim:
    raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {array.shape}")


def require_nonempty(name: str, array) -> None:
  if 0 in array.shape:
    raise ValueError(f"{name}: empty array of shape {array.shape}")


def require_rank_bound(k) -> int:
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise ValueError(f"rank bound k must be a positive Python int (static under jit), got {k!r}")
  return int(k)
