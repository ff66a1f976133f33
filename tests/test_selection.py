"""Choosing what a sweep computes: a selection computes only what it names (no gradient
call for CKA alone, counted), its rows equal the full run's, --out records it, and a
user's metric runs through a sweep (checked against numpy on the torch weights)."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPTNeoXForCausalLM

from analysis import registry
from analysis import selection as selection_lib
from jax_pythia import sweep
from jax_pythia.checkpoints import sources
from jax_pythia.errors import ConfigError, SweepError
from jax_pythia.study import checkpoint as study
from jax_pythia.sweep import results
from tests import suite_fixtures as sf
from tools import _cli

OPTIONS = dict(
  n_sequences=6, positions="random:2", gradient_window=1, gradient_sequences=4, loss_sequences=4
)
MODEL = "small-2l"
KEY = ["model", "step", "layer", "component", "head", "metric"]


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
  shape = {MODEL: sf.SUITE_MODELS[MODEL]}
  return sf.write_suite(tmp_path_factory.mktemp("suite"), models=shape, steps=(0, 4, 8))


def run(suite_dir, out, selection=None, per_call=0, **changes):
  models = sources.resolve_models([str(suite_dir)])
  source = sources.open_data(None, models, None, None)
  options = sweep.SweepOptions(**{**OPTIONS, **changes}, selection=selection)
  sweep.Sweep(models, "all", source, str(out), options, checkpoints_per_call=per_call).run()
  results.finalize(str(out), options.chosen)
  read = lambda name: pd.read_parquet(os.path.join(out, name + ".parquet"))  # noqa: E731
  return read("metrics"), read("pairwise_cka")


@pytest.fixture
def gradient_calls(monkeypatch):
  """Counts calls of the compiled gradient functions the sweep uses (one checkpoint's
  batch, and stacked checkpoints)."""
  calls = []

  def counting(factory):
    def make(*args, **kwargs):
      fn = factory(*args, **kwargs)

      def call(*a, **k):
        calls.append(factory.__name__)
        return fn(*a, **k)

      return call

    return make

  for name in ("batch_gradient_fn", "batched_gradient_fn"):
    monkeypatch.setattr(study, name, counting(getattr(study, name)))
  return calls


@pytest.fixture(scope="module")
def full(suite_dir, tmp_path_factory):
  return run(suite_dir, tmp_path_factory.mktemp("full"))


def test_full_run_counts_gradient_calls(suite_dir, tmp_path, gradient_calls):
  # The counter sees the default protocol's gradient pass: 3 batches x 3 checkpoints.
  metrics, _ = run(suite_dir, tmp_path / "out")
  assert gradient_calls == ["batch_gradient_fn"] * 9
  assert {"grad_per", "grad_condition_number", "nuclear_norm"} <= set(metrics.metric)
  # Resolved in float64 where float32 could not (the tiny suite had NaN here before).
  assert metrics[metrics.metric.str.contains("condition_number")].value.notna().all()


@pytest.mark.parametrize("per_call", [1, 2])
def test_cka_alone_makes_no_gradient_call_and_equals_the_full_run(
  suite_dir, tmp_path, full, gradient_calls, per_call
):
  selection = selection_lib.select(["cka"], ["ov", "mlp"])
  metrics, pair = run(suite_dir, tmp_path / "out", selection, per_call)
  assert gradient_calls == []
  assert set(metrics.metric) == {"cka", "cka_floor"}
  assert set(metrics.component) == {"ov", "mlp"}
  merged = metrics.merge(full[0], on=KEY, how="left", suffixes=("", "_full"))
  assert len(merged) == len(metrics) and merged.value_full.notna().all()
  np.testing.assert_allclose(merged.value, merged.value_full, rtol=1e-6, atol=1e-7)
  assert set(pair.metric) == {"cka"} and set(pair.component) == {"ov", "mlp"}
  full_pair = full[1][full[1].metric == "cka"]
  both = pair.merge(full_pair, on=[*KEY, "other_step"], suffixes=("", "_full"))
  assert len(both) == len(pair) > 0
  np.testing.assert_allclose(both.value, both.value_full, rtol=1e-6, atol=1e-7)


def test_analysis_entries_choose_data_components_and_layers(suite_dir, tmp_path, full):
  entries = [
    {"metric": "per", "data": ["weights"], "components": ["ov"], "layers": [1]},
    "grad_norm",
  ]
  metrics, pair = run(suite_dir, tmp_path / "out", selection_lib.select(analysis=entries))
  per = metrics[metrics.metric == "per"]
  assert set(per.component) == {"ov"} and set(per.layer) == {1}
  assert set(metrics.metric) == {"per", "grad_norm"} and pair.empty
  merged = metrics.merge(full[0], on=KEY, suffixes=("", "_full"))
  assert len(merged) == len(metrics)
  np.testing.assert_allclose(merged.value, merged.value_full, rtol=1e-6)


def test_rerun_with_another_selection_is_refused_naming_the_flag(suite_dir, tmp_path):
  out = tmp_path / "out"
  run(suite_dir, out, selection_lib.select(["cka"]))
  record = json.loads((out / "sweep.json").read_text())
  # --out records the selection: (component, table name, layers) entries.
  assert {(c, n) for c, n, _ in record["options"]["metrics"]} == {
    (c, "cka") for c in ("ov_head", "ov", "mlp", "resid")
  }
  with pytest.raises(SweepError, match="--metrics: old"):
    run(suite_dir, out, selection_lib.select(["per"]))


def test_record_from_before_metrics_is_read_and_refused_naming_the_flag(suite_dir, tmp_path):
  out = tmp_path / "out"
  run(suite_dir, out, selection_lib.select(["cka"]))
  record = json.loads((out / "sweep.json").read_text())
  del record["options"]["metrics"]  # as written before --metrics existed
  (out / "sweep.json").write_text(json.dumps(record))
  with pytest.raises(SweepError) as e:
    run(suite_dir, out)
  message = str(e.value)
  assert "\n" not in message and '--metrics: old "the protocol before --metrics' in message
  assert 'new "default"' in message


def test_unknown_names_are_refused():
  with pytest.raises(ValueError, match="unknown metric 'perr'"):
    selection_lib.select(["perr"])
  with pytest.raises(ValueError, match="unknown component 'attn'"):
    selection_lib.select(["cka"], ["attn"])
  with pytest.raises(ValueError, match="data"):
    selection_lib.select(analysis=[{"metric": "cka", "data": ["weights"]}])


USER_METRIC = """
import jax.numpy as jnp
from analysis import register_metric

@register_metric("top_share", "spectral")
def top_share(s):
  '''s_1 / sum(s): the share of the largest singular value.'''
  return jnp.max(s, axis=-1) / jnp.sum(s, axis=-1)
"""


def write_module(tmp_path, text, name="my_metrics.py"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text))
  return str(path)


def test_user_metric_runs_through_a_sweep(suite_dir, tmp_path):
  try:
    assert _cli.load_metrics_module(write_module(tmp_path, USER_METRIC)) == ["top_share"]
    selection = selection_lib.select(["top_share", "grad_top_share", "act_top_share"])
    metrics, _ = run(suite_dir, tmp_path / "out", selection)
  finally:
    registry.unregister_user_metrics()
  assert {"top_share", "grad_top_share", "act_top_share"} == set(metrics.metric)
  tm = GPTNeoXForCausalLM.from_pretrained(suite_dir / MODEL / "step4", dtype=torch.float32)
  for layer in range(2):
    w = tm.gpt_neox.layers[layer].mlp.dense_4h_to_h.weight.detach().double().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    row = metrics[
      (metrics.step == 4)
      & (metrics.metric == "top_share")
      & (metrics.component == "mlp")
      & (metrics.layer == layer)
    ]
    assert abs(float(row.value.iloc[0]) - s[0] / s.sum()) < 1e-5


@pytest.mark.parametrize(
  "body, why",
  [
    ("def bad(s):\n  raise RuntimeError('boom')", "raised RuntimeError: boom"),
    ("def bad(s):\n  return s", "returned shape (2, 3, 8)"),
    ("def bad(s):\n  return jnp.max(s, -1) if float(s[0, 0, 0]) > 0 else s", "not jit-able"),
  ],
)
def test_broken_user_metric_is_named_in_one_line(tmp_path, body, why):
  text = "import jax.numpy as jnp\nfrom analysis import register_metric\n\n"
  text += f'@register_metric("bad_metric", "spectral")\n{body}\n'
  try:
    with pytest.raises(ConfigError) as e:
      _cli.load_metrics_module(write_module(tmp_path, text))
  finally:
    registry.unregister_user_metrics()
  message = str(e.value)
  assert "\n" not in message and "'bad_metric'" in message and why in message
  assert "my_metrics.py" in message


def test_plan_counts_only_the_selected_work(suite_dir):
  from jax_pythia.scale import plan

  models = sources.resolve_models([str(suite_dir)])
  cka = sweep.SweepOptions(**OPTIONS, selection=selection_lib.select(["cka"]))
  full = sweep.SweepOptions(**OPTIONS)
  assert plan.sweep_work(full, 16).gradients and not plan.sweep_work(cka, 16).gradients
  # The float64 refinement's memory only with a selected gradient condition number.
  no_condition = sweep.SweepOptions(**OPTIONS, selection=selection_lib.select(["grad_per"]))
  shape = plan.Shape("t", 2, 64, 4, 256, 64, 16, (0,))
  refine = {
    name: plan.spectra_call_bytes(shape, plan.sweep_work(o, 16))["refine"]
    for name, o in (("full", full), ("grad_per", no_condition))
  }
  assert refine["full"] == 20 * 2 * 64 * 64 + 20 * 256 * 64 and refine["grad_per"] == 0
  # FLOPs: CKA alone captures and takes no SVD; PER of the weights alone captures nothing
  # and takes one set of SVDs where the full run takes 1 + G (G = 3 gradient batches).
  per = sweep.SweepOptions(**OPTIONS, selection=selection_lib.select(["per"]))
  flops = {
    name: plan.flops_per_checkpoint(shape, plan.sweep_work(o, 16))
    for name, o in (("full", full), ("cka", cka), ("per", per))
  }
  assert flops["cka"]["capture"] == flops["full"]["capture"] > 0
  assert flops["cka"]["spectra"] == flops["cka"]["gradients"] == 0
  assert flops["per"]["capture"] == flops["per"]["gradients"] == 0
  assert flops["per"]["spectra"] * 4 == flops["full"]["spectra"] > 0
  # Memory: PER of the weights alone runs no capture call; its weights hold their
  # bytes (float32 GPT-NeoX: embedding and unembedding; per layer two LayerNorms, qkv,
  # out, fc_in and fc_out with their biases; the final LayerNorm).
  layouts = {
    name: plan.choose_layout(shape, plan.sweep_work(o, 16), {}, 1e12)
    for name, o in (("full", full), ("per", per))
  }
  assert "capture" in layouts["full"].peaks and "capture" not in layouts["per"].peaks
  d, f, L, V = 64, 256, 2, 64
  weights = 2 * V * d + L * (4 * d * d + 2 * d * f + 9 * d + f) + 2 * d
  assert layouts["per"].peaks["weights"] == pytest.approx(4 * weights, rel=0.02)
  assert layouts["full"].peaks["capture"] > layouts["per"].peaks["weights"]
  assert layouts["per"].peak == layouts["per"].peaks["loss"]  # --loss_sequences=4
  # The batches read: the fixed inputs and the held-out batch, no gradient windows.
  assert set(sweep.batches_needed(models, "all", cka)) == {7, 8}
  assert len(sweep.batches_needed(models, "all", full)) > 2


def test_sparsity_and_activation_spectra_through_a_sweep_equal_numpy(suite_dir, tmp_path):
  selection = selection_lib.select(["gini", "hoyer", "act_gini", "act_per", "act_nuclear_norm"])
  metrics, _ = run(suite_dir, tmp_path / "out", selection)
  assert set(metrics.metric) == {"gini", "hoyer", "act_gini", "act_per", "act_nuclear_norm"}
  tm = GPTNeoXForCausalLM.from_pretrained(suite_dir / MODEL / "step4", dtype=torch.float32)
  acts = results.load_activations(results.checkpoint_paths(str(tmp_path / "out"), MODEL, 4)[1])

  def value(name, layer):
    row = metrics[
      (metrics.step == 4)
      & (metrics.metric == name)
      & (metrics.component == "mlp")
      & (metrics.layer == layer)
    ]
    return float(row.value.iloc[0])

  for layer in range(2):
    w = tm.gpt_neox.layers[layer].mlp.dense_4h_to_h.weight.detach().double().numpy().ravel()
    a = np.sort(np.abs(w))  # Gini (Hurley & Rickard): 1 - 2 sum_k a_k/|a|_1 (m - k + 1/2)/m
    m = a.size
    gini = 1 - 2 * np.sum(a / a.sum() * (m - np.arange(1, m + 1) + 0.5) / m)
    hoyer = (np.sqrt(m) - a.sum() / np.sqrt((a**2).sum())) / (np.sqrt(m) - 1)
    assert abs(value("gini", layer) - gini) < 1e-5 and abs(value("hoyer", layer) - hoyer) < 1e-5
    x = acts["mlp"][layer].astype(np.float64)  # [n, d], as captured (not centred)
    b = np.sort(np.abs(x.ravel()))
    gini = 1 - 2 * np.sum(b / b.sum() * (b.size - np.arange(1, b.size + 1) + 0.5) / b.size)
    assert abs(value("act_gini", layer) - gini) < 1e-5
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()  # k = min(n, d): every singular value
    assert abs(value("act_per", layer) - np.exp(-(p * np.log(p)).sum()) / s.size) < 1e-4
    assert abs(value("act_nuclear_norm", layer) / s.sum() - 1) < 1e-5


def test_gradient_sparsity_through_a_sweep_equals_torch(suite_dir, tmp_path):
  """grad_gini / grad_hoyer: the mean over the gradient batches of each batch's Gini and
  Hoyer of the MLP output matrix's gradient, against torch's gradients and numpy."""
  metrics, _ = run(suite_dir, tmp_path / "out", selection_lib.select(["grad_gini", "grad_hoyer"]))
  assert set(metrics.metric) == {"grad_gini", "grad_hoyer"}
  models = sources.resolve_models([str(suite_dir)])
  source = sources.open_data(None, models, None, None)
  tm = GPTNeoXForCausalLM.from_pretrained(suite_dir / MODEL / "step4", dtype=torch.float32)
  per_batch = []
  for step in sweep.gradient_steps(4, 1, 7):  # the batches of steps 3, 4, 5
    batch = torch.tensor(source.batch(step, 4).astype(np.int64))
    tm.zero_grad()
    logits = tm(batch[:, :-1]).logits
    torch.nn.functional.cross_entropy(
      logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    ).backward()
    per_batch.append([b.mlp.dense_4h_to_h.weight.grad.double().numpy() for b in tm.gpt_neox.layers])
  for layer in range(2):
    gini, hoyer = [], []
    for grads in per_batch:
      a = np.sort(np.abs(grads[layer].ravel()))
      m = a.size
      gini.append(1 - 2 * np.sum(a / a.sum() * (m - np.arange(1, m + 1) + 0.5) / m))
      hoyer.append((np.sqrt(m) - a.sum() / np.sqrt((a**2).sum())) / (np.sqrt(m) - 1))
    for name, expected in (("grad_gini", np.mean(gini)), ("grad_hoyer", np.mean(hoyer))):
      row = metrics[
        (metrics.step == 4)
        & (metrics.metric == name)
        & (metrics.component == "mlp")
        & (metrics.layer == layer)
      ]
      assert float(row.value.iloc[0]) == pytest.approx(expected, rel=1e-4), (name, layer)


def test_help_lists_the_registry():
  from tests.tool_runs import run_tool

  result = run_tool("sweep", "--help")  # absl's --help exits 1 after printing
  text = " ".join(result.stdout.split())  # absl wraps the help text
  text = text[text.index("--metrics:") : text.index("--metrics_module:")]
  for name in ("svcca", "pwcca", "act_gini", "grad_hoyer", "nuclear_norm", "act_per", "cka"):
    assert name in text
  assert all(name in text for name in registry.table_names())


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--metrics=cka,perr", "--metrics=cka,perr: unknown metric 'perr'"),
    ("--components=ov,attn", "--components=ov,attn: unknown component 'attn'"),
  ],
)
def test_cli_names_a_bad_selection_in_one_line(tmp_path, flag, message):
  from tests.tool_runs import run_tool

  result = run_tool("sweep", flag, f"--out={tmp_path / 'out'}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_svcca_and_pwcca_through_a_sweep_equal_numpy(suite_dir, tmp_path):
  from tests.test_analysis_cca import np_pwcca, np_svcca

  selection = selection_lib.select(["svcca", "pwcca"], ["ov_head", "mlp"])
  # every position: 96 tokens, above dx + dy for a head (8 + 8) and the MLP (32 + 32)
  metrics, pair = run(suite_dir, tmp_path / "out", selection, positions="all")
  acts = {
    s: results.load_activations(results.checkpoint_paths(str(tmp_path / "out"), MODEL, s)[1])
    for s in (4, 8)
  }
  # (PWCCA only on the head: this toy MLP's outputs at steps 4 and 8 share three directions
  # exactly, canonical correlations 1, 1, 1, where PWCCA's weights are not defined)
  cases = (
    ("ov_head", 1, 2, lambda a: a["ov_head"][1, 2], (("svcca", np_svcca), ("pwcca", np_pwcca))),
    ("mlp", 0, -1, lambda a: a["mlp"][0], (("svcca", np_svcca),)),
  )
  for component, layer, head, take, metric_refs in cases:
    x, y = (take(acts[s]).astype(np.float64) for s in (4, 8))
    for name, ref in metric_refs:

      def here(t, name=name, component=component, layer=layer, head=head):
        return (
          (t.metric == name) & (t.component == component) & (t.layer == layer) & (t["head"] == head)
        )

      row = metrics[here(metrics) & (metrics.step == 4)]
      assert abs(float(row.value.iloc[0]) - ref(x, y)) < 1e-4, (component, name)
      cell = pair[here(pair) & (pair.step == 8) & (pair.other_step == 4)]
      assert abs(float(cell.value.iloc[0]) - ref(y, x)) < 1e-4, (component, name)
