"""The sweep over a two-family local suite (GPT-NeoX beside Llama and OLMo-2 with
grouped-query attention): stored cells against torch weights and numpy formulas written
here (per-head OV PER with GQA, OV-head and MLP CKA), and the reference value slice
refused by name for a family without GPT-NeoX's fused qkv."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

from jax_pythia.checkpoints import sources
from jax_pythia.errors import ConfigError
from jax_pythia.models import family
from jax_pythia.models import model as model
from jax_pythia.study import checkpoint as study
from jax_pythia.sweep import results
from jax_pythia.sweep import run as sweep
from tests import suite_fixtures as sf
from tests.test_sweep import np_cka, np_per, value

OPTIONS = dict(
  n_sequences=6, positions="random:2", gradient_window=1, gradient_sequences=4, loss_sequences=4
)
STEPS = (0, 2, 4)


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
  return sf.write_suite(
    tmp_path_factory.mktemp("suite"), models=sf.FAMILY_SUITE_MODELS, steps=STEPS
  )


@pytest.fixture(scope="module")
def swept(suite_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out"))
  models = sources.resolve_models([str(suite_dir)])
  source = sources.open_data(None, models, None, None)
  runner = sweep.Sweep(models, "all", source, out, sweep.SweepOptions(**OPTIONS))
  runner.run()
  results.finalize(out)
  return out, runner


def torch_values(tm, tokens, idx):
  """Per sample (n = b*k): v_proj output [n, H_kv, dh] and down_proj output [n, d]."""
  store, handles = {}, []
  for l, block in enumerate(tm.model.layers):
    for kind, module in (("v", block.self_attn.v_proj), ("mlp", block.mlp)):
      hook = lambda m, a, o, key=(kind, l): store.__setitem__(key, o.detach().numpy())  # noqa: E731
      handles.append(module.register_forward_hook(hook))
  if tm.config.model_type == "olmo2":  # OLMo-2's MLP output is normed before the residual
    for l, block in enumerate(tm.model.layers):
      hook = lambda m, a, o, key=("mlp", l): store.__setitem__(key, o.detach().numpy())  # noqa: E731
      handles.append(block.post_feedforward_layernorm.register_forward_hook(hook))
  with torch.no_grad():
    tm(torch.tensor(tokens))
  for h in handles:
    h.remove()
  rows = np.arange(len(tokens))[:, None]
  dh = tm.config.hidden_size // tm.config.num_attention_heads
  out = {}
  for (kind, l), x in store.items():
    picked = x[rows, idx].reshape(-1, x.shape[-1])
    out[(kind, l)] = picked.reshape(len(picked), -1, dh) if kind == "v" else picked
  return out


@pytest.mark.parametrize("name", ["llama-gqa-2l", "olmo2-gqa-2l"])
def test_gqa_cells_equal_numpy(swept, suite_dir, name):
  out, runner = swept
  metrics = pd.read_parquet(os.path.join(out, "metrics.parquet"))
  m = next(m for m in runner.models if m.name == name)
  load = lambda step: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
    suite_dir / name / f"step{step}", dtype=torch.float32
  ).eval()
  tm, tf = load(2), load(4)
  cfg = tm.config
  H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
  dh = cfg.hidden_size // H
  tokens = runner.inputs(m)
  idx = np.asarray(model.position_index("random:2", tokens.shape[1], n=6, seed=0))
  at, af = torch_values(tm, tokens, idx), torch_values(tf, tokens, idx)
  for l in range(2):
    w = lambda t, proj, l=l: getattr(t.model.layers[l].self_attn, proj).weight.detach().numpy()  # noqa: E731
    whole = 0
    for h in range(H):
      g = h // (H // Hkv)  # the key/value head query head h reads
      w_o = w(tm, "o_proj")[:, h * dh : (h + 1) * dh]
      ov = w_o @ w(tm, "v_proj")[g * dh : (g + 1) * dh]  # W_OV,h = W_O[:, h] W_V[kv(h)]
      whole = whole + ov
      assert value(
        metrics, model=name, step=2, layer=l, component="ov_head", head=h, metric="per"
      ) == pytest.approx(np_per(np.linalg.svd(ov, compute_uv=False), dh), rel=1e-4)
      w_of = w(tf, "o_proj")[:, h * dh : (h + 1) * dh]
      head_cka = np_cka(at[("v", l)][:, g] @ w_o.T, af[("v", l)][:, g] @ w_of.T)
      assert value(
        metrics, model=name, step=2, layer=l, component="ov_head", head=h, metric="cka"
      ) == pytest.approx(head_cka, rel=1e-4)
    rank = min(cfg.hidden_size, Hkv * dh)  # W_OV factors through the H_kv * dh values
    assert value(
      metrics, model=name, step=2, layer=l, component="ov", head=-1, metric="per"
    ) == pytest.approx(np_per(np.linalg.svd(whole, compute_uv=False), rank), rel=1e-4)
    assert value(
      metrics, model=name, step=2, layer=l, component="mlp", head=-1, metric="cka"
    ) == pytest.approx(np_cka(at[("mlp", l)], af[("mlp", l)]), rel=1e-4)
    down = tm.model.layers[l].mlp.down_proj.weight.detach().numpy()
    assert value(
      metrics, model=name, step=2, layer=l, component="mlp", head=-1, metric="per"
    ) == pytest.approx(np_per(np.linalg.svd(down, compute_uv=False), min(down.shape)), rel=1e-4)


def test_every_family_swept_whole(swept):
  out, _ = swept
  metrics = pd.read_parquet(os.path.join(out, "metrics.parquet"))
  status = pd.read_parquet(os.path.join(out, "checkpoints.parquet"))
  assert (status.status == "ok").all() and len(status) == 3 * len(STEPS)
  assert set(metrics.model) == set(sf.FAMILY_SUITE_MODELS)
  final = metrics[(metrics.step == 4) & (metrics.metric == "cka")]
  np.testing.assert_allclose(final.value, 1.0, rtol=1e-4)
  # Gradients of a few tokens can be rank-deficient (GPT-NeoX's too): their condition number
  # is undefined. No weight metric is: the whole OV's rank bound is H_kv * dh under GQA.
  nan = metrics[metrics.value.isna() & (metrics.metric != "grad_condition_number")]
  assert nan.empty, nan.groupby(["model", "component", "metric"]).size().to_string()


def test_reference_value_slice_refused_for_llama(suite_dir):
  config = family.load_config(suite_dir / "llama-gqa-2l" / "step0" / "config.json")
  with pytest.raises(ConfigError, match=r"--value_slice=reference: .* this model is Llama"):
    study.activation_fn(config, "reference")
  with pytest.raises(ConfigError, match=r"--value_slice=reference"):
    study.batch_gradient_fn(config, "reference")
