"""What figures and report.md call the models, and the order they show them in."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd


def model_order(metrics: pd.DataFrame, status: pd.DataFrame | None = None) -> list[str]:
  """Models smallest first: by parameter count (checkpoints.parquet's `parameters`), then
  by name (models without a count last)."""
  sizes = {}
  if status is not None and "parameters" in status:
    sizes = status.dropna(subset=["parameters"]).groupby("model")["parameters"].max().to_dict()
  names = list(dict.fromkeys(metrics["model"]))
  return sorted(names, key=lambda n: (n not in sizes, sizes.get(n, 0), n))


def suite_labels(models: Sequence[str], status: pd.DataFrame | None) -> dict[str, str]:
  """{model: what figures and report.md call it}: the model's name, followed by what tells
  the models apart when they differ in it: `model (suite, family)`, `model (suite)` or
  `model (family)` (checkpoints.parquet's `suite` and `family`; families by their title,
  GPT-NeoX, Llama, ...)."""
  from jax_pythia.models.family import FAMILIES

  titles = {f.model_type: f.title for f in FAMILIES.values()}
  columns = []
  for column in ("suite", "family"):
    if status is None or column not in status:
      continue
    values = status.dropna(subset=[column]).groupby("model")[column].first().to_dict()
    if len({values.get(m) for m in models}) > 1:
      columns.append({m: titles.get(v, v) if column == "family" else v for m, v in values.items()})
  labels = {}
  for m in models:
    shown = [str(c[m]) for c in columns if c.get(m)]
    labels[m] = f"{m} ({', '.join(shown)})" if shown else m
  return labels


def label_of(labels: dict[str, str] | None, model: str) -> str:
  return labels.get(model, model) if labels else model
