"""The sweep's result tables: tidy rows, per-checkpoint files and the gathered tables.

Per checkpoint (written by `jax_pythia.sweep` as it finishes):
  <out>/checkpoints/<model>/step<N>.parquet  its metric rows (`METRIC_COLUMNS`)
  <out>/activations/<model>/step<N>.npz      the sampled activations pairwise CKA needs
  <out>/status/<model>/step<N>.json          one status record (`STATUS_COLUMNS`)
`finalize` gathers them into `metrics.parquet`, `pairwise_cka.parquet` and
`checkpoints.parquet` (one row per checkpoint, `STATUS_COLUMNS`: its model's `family` and
`suite` beside its status, so models of several suites share one table).

metrics.parquet columns (`METRIC_COLUMNS`): model, step, layer, component, head, metric,
value; head is -1 for whole-layer values, layer -1 for whole-model values (loss).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

import analysis
from jax_pythia.checkpoints import integrity
from jax_pythia.errors import SweepError
from jax_pythia.files import atomic_write
from jax_pythia.study import checkpoint as study

METRIC_COLUMNS = ("model", "step", "layer", "component", "head", "metric", "value")
PAIRWISE_COLUMNS = ("model", "step", "other_step", "layer", "component", "head", "metric", "value")
STATUS_COLUMNS = (
  "model",
  "family",  # the model's architecture: models.family's model_type (gpt_neox for Pythia)
  "suite",  # the checkpoint suite it comes from (jax_pythia.checkpoints.suites)
  "step",
  "status",
  "message",
  "parameters",
  "load_s",
  "compute_s",
  integrity.HASH_COLUMN,
  integrity.SHARDS_COLUMN,
)


def checkpoint_paths(out_dir: str, model: str, step: int) -> tuple[str, str, str]:
  """(metric rows .parquet, activations .npz, status .json) of one checkpoint."""
  base = os.path.join(out_dir, "{}", model, f"step{step}")
  return (
    base.format("checkpoints") + ".parquet",
    base.format("activations") + ".npz",
    base.format("status") + ".json",
  )


def metric_rows(model: str, step: int, component: str, metric: str, values: Any) -> pd.DataFrame:
  """Tidy rows from values [] (whole model), [L] (per layer) or [L, H] (per head)."""
  v = np.asarray(values, dtype=np.float64)
  if v.ndim == 0:
    layer, head, flat = np.array([-1]), np.array([-1]), v.reshape(1)
  elif v.ndim == 1:
    layer, head, flat = np.arange(v.shape[0]), np.full(v.shape[0], -1), v
  elif v.ndim == 2:
    layer, head = np.meshgrid(np.arange(v.shape[0]), np.arange(v.shape[1]), indexing="ij")
    layer, head, flat = layer.ravel(), head.ravel(), v.ravel()
  else:
    raise ValueError(f"metric {metric!r} of {component!r}: unexpected shape {v.shape}")
  return pd.DataFrame(
    {
      "model": model,
      "step": np.int64(step),
      "layer": layer.astype(np.int64),
      "component": component,
      "head": head.astype(np.int64),
      "metric": metric,
      "value": flat,
    }
  )


def write_parquet(frame: pd.DataFrame, path: str) -> None:
  atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False), ".parquet")


def write_json(path: str, obj: Any) -> None:
  atomic_write(path, lambda tmp: _dump_json(tmp, obj), ".json")


def _dump_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)


def read_json(path: str, what: str) -> Any:
  """A JSON file of --out (`what` it is, for the message); a damaged one is named."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise SweepError(
      f"{path}: {what} is damaged ({type(e).__name__}: {e}); remove it and rerun"
    ) from None


def load_activations(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise SweepError(_damaged(path, e)) from None


def _read_parquet(path: str) -> pd.DataFrame:
  try:
    return pd.read_parquet(path)
  except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
    raise SweepError(_damaged(path, e)) from None


def _damaged(path: str, error: Exception) -> str:
  return f"{path}: damaged ({type(error).__name__}: {error}); rerun the sweep to compute it again"


def check_finished(metrics_path: str, acts_path: str, status: Mapping[str, Any] | None) -> str:
  """'' when a finished checkpoint's files are whole (they open; the rows are as many as
  its status says), else why not. Reads only the parquet footer and the .npz directory."""
  import pyarrow.parquet as pq

  try:
    rows = pq.read_metadata(metrics_path).num_rows
  except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
    return f"{metrics_path} does not open ({type(e).__name__}: {e})"
  expected = (status or {}).get("rows")
  if not rows or (expected is not None and rows != expected):
    return f"{metrics_path} holds {rows} rows, expected {expected or 'some'}"
  try:
    with np.load(acts_path) as f:
      # (none is whole when the status says none were captured: no activation metric selected)
      if not f.files and (status or {}).get("activations", True):
        return f"{acts_path} holds no activations"
  except FileNotFoundError:
    return f"{acts_path} is missing"
  except Exception as e:  # noqa: BLE001 - zipfile/numpy raise several kinds
    return f"{acts_path} does not open ({type(e).__name__}: {e})"
  return ""


def check_gatherable(out_dir: str) -> None:
  """Refuses, in one line naming the file, a finished checkpoint whose files are not whole
  (`check_finished`) or whose status is missing or not ok: gathered, it would replace good
  tables with smaller or wrong ones. The sweep repairs such files (outdir.verify_finished);
  a gather alone must not paper over them."""
  root = os.path.join(out_dir, "checkpoints")
  for dirpath, _, names in sorted(os.walk(root)):
    for name in sorted(names):
      if not name.endswith(".parquet") or name.startswith(".tmp-"):
        continue
      metrics_path = os.path.join(dirpath, name)
      stem = os.path.relpath(metrics_path, root)[: -len(".parquet")]
      acts_path = os.path.join(out_dir, "activations", stem + ".npz")
      status_path = os.path.join(out_dir, "status", stem + ".json")
      status = read_json(status_path, "a status record") if os.path.exists(status_path) else None
      if not isinstance(status, dict) or status.get("status") != "ok":
        why = f"{status_path} is missing or not an ok status for {metrics_path}"
      else:
        why = check_finished(metrics_path, acts_path, status)
      if why:
        raise SweepError(
          f"{why}; the tables were left as they were: rerun the sweep to compute it again"
        )


def collect(out_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
  """(metrics, status) gathered from the per-checkpoint files under out_dir."""
  frames = []
  root = os.path.join(out_dir, "checkpoints")
  for dirpath, _, files in sorted(os.walk(root)):
    frames += [
      _read_parquet(os.path.join(dirpath, f))
      for f in sorted(files)
      if f.endswith(".parquet") and not f.startswith(".tmp-")
    ]
  metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=METRIC_COLUMNS)
  metrics = metrics.sort_values(
    ["model", "step", "component", "metric", "layer", "head"], kind="stable", ignore_index=True
  )
  statuses = []
  for dirpath, _, files in sorted(os.walk(os.path.join(out_dir, "status"))):
    for f in sorted(files):
      if f.endswith(".json") and not f.startswith(".tmp-"):
        path = os.path.join(dirpath, f)
        record = read_json(path, "a status record")
        if not (
          isinstance(record, dict)
          and isinstance(record.get("model"), str)
          and type(record.get("step")) is int
        ):
          raise SweepError(f"{path}: not a status record (no model name and integer step)")
        statuses.append(record)
  status = pd.DataFrame(statuses, columns=STATUS_COLUMNS)
  return metrics, status.sort_values(["model", "step"], ignore_index=True)


def pairwise(
  out_dir: str, model: str, steps: Sequence[int], plan: dict | None = None
) -> pd.DataFrame:
  """The similarity metrics between every pair of swept checkpoints of one model, per layer
  and component. plan: {component: registry names} (default: both CKA estimators on every
  component: `Selection.of('activations', 'similarity')` of the paper's protocol)."""
  if plan is None:
    plan = {c: tuple(analysis.CKA_ESTIMATORS) for c in analysis.ACTIVATION_COMPONENTS}
  paths = [checkpoint_paths(out_dir, model, s)[1] for s in steps]
  present = [(s, p) for s, p in zip(steps, paths) if os.path.exists(p)]
  if len(present) < 2:
    return pd.DataFrame(columns=PAIRWISE_COLUMNS)
  steps = [s for s, _ in present]
  loaded = [load_activations(p) for _, p in present]
  frames = []
  for component in loaded[0]:
    stacked = np.stack([a[component] for a in loaded])  # [C, L, (H,) n, e]
    for metric in plan.get(component, ()):
      matrix = np.asarray(study.pairwise_similarity(stacked, metric))  # [L, (H,) C, C]
      lead = matrix.shape[:-2]
      for index in np.ndindex(*lead):
        layer = index[0]
        head = index[1] if len(index) > 1 else -1
        m = matrix[index]
        a, b = np.meshgrid(np.arange(len(steps)), np.arange(len(steps)), indexing="ij")
        frames.append(
          pd.DataFrame(
            {
              "model": model,
              "step": np.asarray(steps)[a.ravel()],
              "other_step": np.asarray(steps)[b.ravel()],
              "layer": layer,
              "component": component,
              "head": head,
              "metric": metric,
              "value": m.ravel().astype(np.float64),
            }
          )
        )
  if not frames:
    return pd.DataFrame(columns=PAIRWISE_COLUMNS)
  return pd.concat(frames, ignore_index=True)


def finalize(out_dir: str, selection=None) -> dict[str, str]:
  """Writes metrics.parquet, checkpoints.parquet and pairwise_cka.parquet from everything
  in `out_dir` (every model any run put there, not only the last run's); their paths.
  selection: the sweep's (analysis.selection; default the paper's protocol): its
  similarity metrics are the pairwise ones (none: an empty pairwise table)."""
  plan = None if selection is None else selection.of("activations", "similarity")
  check_gatherable(out_dir)
  metrics, status = collect(out_dir)
  if metrics.empty:
    raise SweepError(f"{out_dir}: no finished checkpoints to gather")
  paths = {
    name: os.path.join(out_dir, name + ".parquet")
    for name in ("metrics", "checkpoints", "pairwise_cka")
  }
  write_parquet(metrics, paths["metrics"])
  # Duplicate weights flagged (jax_pythia.checkpoints.integrity): same as an earlier step, or
  # the final.
  write_parquet(integrity.flag_duplicates(status), paths["checkpoints"])
  pair = [
    pairwise(out_dir, name, sorted(metrics.loc[metrics.model == name, "step"].unique()), plan)
    for name in sorted(metrics["model"].unique())
  ]
  write_parquet(pd.concat(pair, ignore_index=True), paths["pairwise_cka"])
  return paths
