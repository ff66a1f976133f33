"""One table across suites (issue 20 item 6): checkpoints.parquet names each model's family
and suite, and report.md / the figures put the suites' models side by side, smallest first,
labelled by suite; pairwise CKA compares checkpoints of one model only."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from jax_pythia.checkpoints import sources
from jax_pythia.sweep import report, results
from jax_pythia.sweep import run as sweep
from tests import suite_fixtures as sf

STEPS = (0, 2, 4)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  root = tmp_path_factory.mktemp("suites")
  # Two local suites, the larger model in the first: the report must reorder them.
  for label, name in (("suite-b", "large-3l"), ("suite-a", "small-2l")):
    d = sf.write_suite(root / label, models={name: sf.SUITE_MODELS[name]}, steps=STEPS)
    manifest = json.loads((d / "suite.json").read_text())
    (d / "suite.json").write_text(json.dumps({**manifest, "suite": label}))
  models = sources.resolve_models([str(root / "suite-b"), str(root / "suite-a")])
  data = sources.open_data(str(root / "suite-a" / "data" / "train"), models, None, 8)
  out = str(root / "out")
  options = sweep.SweepOptions(n_sequences=8, gradients=False)
  sweep.Sweep(models, "all", data, out, options).run()
  results.finalize(out)
  report.write_report(out)
  return out


def test_checkpoints_table_names_family_and_suite(swept):
  status = pd.read_parquet(f"{swept}/checkpoints.parquet")
  assert len(status) == 6 and (status.status == "ok").all()
  # Both fixtures' config.json say model_type gpt_neox (tests/hf_fixtures.py).
  assert set(status.family) == {"gpt_neox"}
  assert status.groupby("model").suite.unique().map(list).to_dict() == {
    "large-3l": ["suite-b"],
    "small-2l": ["suite-a"],
  }


def test_report_side_by_side_by_size_and_suite(swept):
  text = open(f"{swept}/report.md").read()
  status = pd.read_parquet(f"{swept}/checkpoints.parquet")
  sizes = status.groupby("model").parameters.max()
  assert sizes["small-2l"] < sizes["large-3l"]
  assert "Models (by parameter count): small-2l (suite-a), large-3l (suite-b)." in text
  assert f"| small-2l | suite-a | gpt_neox | {sizes['small-2l']:,} |" in text
  assert text.index("| small-2l | suite-a |") < text.index("| large-3l | suite-b |")
  assert "| small-2l (suite-a) | ov | cka |" in text


def test_pairwise_stays_within_a_model(swept):
  pair = pd.read_parquet(f"{swept}/pairwise_cka.parquet")
  assert set(pair.model) == {"small-2l", "large-3l"}
  for _, rows in pair.groupby("model"):
    assert set(rows.step) == set(rows.other_step) == set(STEPS)
    # 3 checkpoints: 9 ordered pairs per (layer, component, head, metric) of one model.
    assert (rows.groupby(["layer", "component", "head", "metric"]).size() == 9).all()


def test_report_lists_each_metric_with_its_formula(swept):
  # The formulas come from the registry (analysis.registry.formula): one row per metric.
  text = open(f"{swept}/report.md").read()
  section = text[text.index("## Metrics") :]
  metrics = pd.read_parquet(f"{swept}/metrics.parquet")
  for name in metrics.metric.unique():
    assert f"\n| {name} | " in section
  assert "| per | weights: Proportional effective rank PER = ER(top-k singular values)" in section
  assert "| cka_floor | activations: noise floor of cka" in section
  assert "| condition_number | weights: s_1 / s_k" in section and "float64" in section


def test_labels_name_what_tells_the_models_apart():
  """Suites and families: each named only when the models differ in it (families by title)."""
  status = pd.DataFrame(
    {
      "model": ["a", "a", "b", "c"],
      "suite": ["toy", "toy", "toy", "toy"],
      "family": ["gpt_neox", "gpt_neox", "llama", "olmo2"],
    }
  )
  assert report.suite_labels(["a", "b", "c"], status) == {
    "a": "a (GPT-NeoX)",
    "b": "b (Llama)",
    "c": "c (OLMo-2)",
  }
  status["suite"] = ["x", "x", "y", "y"]
  assert report.suite_labels(["a", "b"], status) == {"a": "a (x, GPT-NeoX)", "b": "b (y, Llama)"}
  assert report.suite_labels(["b", "c"], status.assign(family="llama")) == {"b": "b", "c": "c"}
