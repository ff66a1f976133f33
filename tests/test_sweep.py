"""The sweep end to end on a local suite: stored numbers against torch + numpy ground truth,
schema, figures, resume after a real kill, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPTNeoXForCausalLM

import analysis
from jax_pythia import sweep
from jax_pythia.checkpoints import sources
from jax_pythia.errors import SweepError
from jax_pythia.models import model as model
from jax_pythia.sweep import report, results
from tests import suite_fixtures as sf

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(
  n_sequences=6, positions="random:2", gradient_window=1, gradient_sequences=4, loss_sequences=4
)
CLI_OPTIONS = [
  "--n_sequences=6",
  "--positions=random:2",
  "--gradient_window=1",
  "--gradient_sequences=4",
  "--loss_sequences=4",
]


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
  return sf.write_suite(tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def swept(suite_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out"))
  models = sources.resolve_models([str(suite_dir)])
  source = sources.open_data(None, models, None, None)
  runner = sweep.Sweep(models, "all", source, out, sweep.SweepOptions(**OPTIONS))
  runner.run()
  results.finalize(out)
  written = report.write_report(out)
  return out, runner, written


# --- independent ground truth: torch model + numpy formulas ---------------------------


def np_cka(x, y):
  x = x - x.mean(0)
  y = y - y.mean(0)
  return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def np_cka_debiased(x, y):
  """Song et al. (2007) unbiased HSIC, written out."""

  def hsic(k, l):
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    ones = np.ones(n)
    return (
      np.trace(k @ l)
      + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
      - 2 / (n - 2) * (ones @ k @ l @ ones)
    ) / (n * (n - 3))

  k, l = x @ x.T, y @ y.T
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def np_per(s, k):
  s = np.sort(s)[::-1][:k]
  p = s / s.sum()
  return np.exp(-(p * np.log(p)).sum()) / k


def torch_model(suite_dir, name, step):
  return GPTNeoXForCausalLM.from_pretrained(
    suite_dir / name / f"step{step}", dtype=torch.float32
  ).eval()


def torch_site_values(tm, tokens, idx):
  """Per sample (n = b*k): value vectors [n, H, dh] and MLP output [n, d] at idx."""
  store = {}
  layer = tm.gpt_neox.layers
  handles = []
  for l, block in enumerate(layer):
    handles.append(
      block.attention.query_key_value.register_forward_hook(
        lambda m, a, o, l=l: store.__setitem__(("qkv", l), o.detach().numpy())
      )
    )
    handles.append(
      block.mlp.dense_4h_to_h.register_forward_hook(
        lambda m, a, o, l=l: store.__setitem__(("mlp", l), o.detach().numpy())
      )
    )
  with torch.no_grad():
    tm(torch.tensor(tokens))
  for h in handles:
    h.remove()
  rows = np.arange(len(tokens))[:, None]
  heads = tm.config.num_attention_heads
  out = {}
  for (kind, l), value in store.items():
    picked = value[rows, idx].reshape(-1, value.shape[-1])  # [n, features]
    if kind == "qkv":
      picked = picked.reshape(len(picked), heads, 3, -1)[:, :, 2]  # per-head v
    out[(kind, l)] = picked
  return out


def head_ov(tm, l, h):
  """W_O[:, h] @ W_V[h, :] (torch layout) from the fused per-head qkv rows."""
  block = tm.gpt_neox.layers[l]
  dh = tm.config.hidden_size // tm.config.num_attention_heads
  w_qkv = block.attention.query_key_value.weight.detach().numpy()
  w_v = w_qkv[h * 3 * dh + 2 * dh : (h + 1) * 3 * dh]
  w_o = block.attention.dense.weight.detach().numpy()[:, h * dh : (h + 1) * dh]
  return w_o @ w_v, w_o


def value(metrics, **where):
  rows = metrics
  for k, v in where.items():
    rows = rows[rows[k] == v]
  assert len(rows) == 1, (where, len(rows))
  return float(rows.value.iloc[0])


def test_stored_metrics_equal_torch_and_numpy_ground_truth(swept, suite_dir):
  out, runner, _ = swept
  metrics = pd.read_parquet(os.path.join(out, "metrics.parquet"))
  name, step, final = "large-3l", 2, 8
  m = runner.models[1]
  assert m.name == name
  tokens = runner.inputs(m)
  np.testing.assert_array_equal(tokens, runner.source.batch(7, 6)[:, :-1])
  idx = np.asarray(model.position_index("random:2", tokens.shape[1], n=6, seed=0))
  tm, tf = torch_model(suite_dir, name, step), torch_model(suite_dir, name, final)
  at, af = torch_site_values(tm, tokens, idx), torch_site_values(tf, tokens, idx)
  for l in range(3):
    cka = np_cka(at[("mlp", l)], af[("mlp", l)])
    assert value(
      metrics, model=name, step=step, layer=l, component="mlp", head=-1, metric="cka"
    ) == pytest.approx(cka, rel=1e-4)
    ov_t = (
      at[("qkv", l)].reshape(12, -1)
      @ tm.gpt_neox.layers[l].attention.dense.weight.detach().numpy().T
    )
    ov_f = (
      af[("qkv", l)].reshape(12, -1)
      @ tf.gpt_neox.layers[l].attention.dense.weight.detach().numpy().T
    )
    assert value(
      metrics, model=name, step=step, layer=l, component="ov", head=-1, metric="cka_debiased"
    ) == pytest.approx(np_cka_debiased(ov_t, ov_f), rel=1e-3, abs=1e-4)
    for h in (0, 3):
      _, wo_t = head_ov(tm, l, h)
      _, wo_f = head_ov(tf, l, h)
      head_cka = np_cka(at[("qkv", l)][:, h] @ wo_t.T, af[("qkv", l)][:, h] @ wo_f.T)
      assert value(
        metrics, model=name, step=step, layer=l, component="ov_head", head=h, metric="cka"
      ) == pytest.approx(head_cka, rel=1e-4)
      ov, _ = head_ov(tm, l, h)
      assert value(
        metrics, model=name, step=step, layer=l, component="ov_head", head=h, metric="per"
      ) == pytest.approx(np_per(np.linalg.svd(ov, compute_uv=False), 16), rel=1e-4)
    w_mlp = tm.gpt_neox.layers[l].mlp.dense_4h_to_h.weight.detach().numpy()
    assert value(
      metrics, model=name, step=step, layer=l, component="mlp", head=-1, metric="per"
    ) == pytest.approx(np_per(np.linalg.svd(w_mlp, compute_uv=False), 64), rel=1e-4)


def test_gradient_and_loss_metrics_equal_torch(swept, suite_dir):
  out, runner, _ = swept
  metrics = pd.read_parquet(os.path.join(out, "metrics.parquet"))
  name, step = "small-2l", 4
  tm = torch_model(suite_dir, name, step)
  grads = []
  for s in sweep.gradient_steps(step, 1, 7):  # the batches of steps 3, 4, 5
    batch = torch.tensor(runner.source.batch(s, 4).astype(np.int64))
    tm.zero_grad()
    logits = tm(batch[:, :-1]).logits
    torch.nn.functional.cross_entropy(
      logits.reshape(-1, sf.VOCAB), batch[:, 1:].reshape(-1)
    ).backward()
    grads.append([b.mlp.dense_4h_to_h.weight.grad.numpy().copy() for b in tm.gpt_neox.layers])
  for l in range(2):
    g = [batch_grads[l] for batch_grads in grads]
    mean_s = np.mean([np.linalg.svd(x, compute_uv=False) for x in g], axis=0)
    assert value(
      metrics, model=name, step=step, layer=l, component="mlp", head=-1, metric="grad_per"
    ) == pytest.approx(np_per(mean_s, 32), rel=1e-3)
    cos = np.mean(
      [np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(g[:-1], g[1:])]
    )
    assert value(
      metrics, model=name, step=step, layer=l, component="mlp", head=-1, metric="grad_cosine"
    ) == pytest.approx(cos, rel=1e-3, abs=1e-5)
    assert value(
      metrics, model=name, step=step, layer=l, component="mlp", head=-1, metric="grad_norm"
    ) == pytest.approx(np.mean([np.linalg.norm(x) for x in g]), rel=1e-3)
  heldout = torch.tensor(runner.source.batch(8, 4).astype(np.int64))
  with torch.no_grad():
    logits = tm(heldout[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(
      logits.reshape(-1, sf.VOCAB), heldout[:, 1:].reshape(-1)
    ).item()
  assert value(
    metrics, model=name, step=step, layer=-1, component="model", metric="heldout_loss"
  ) == pytest.approx(loss, rel=1e-4)


def test_schema_pairwise_and_figures(swept, suite_dir):
  out, _, written = swept
  metrics = pd.read_parquet(os.path.join(out, "metrics.parquet"))
  assert list(metrics.columns) == list(results.METRIC_COLUMNS)
  assert not metrics.duplicated(["model", "step", "layer", "component", "head", "metric"]).any()
  assert set(metrics.model) == set(sf.SUITE_MODELS)
  assert sorted(metrics.step.unique()) == list(sf.SUITE_STEPS)
  whole = metrics[metrics.component.isin(["ov", "mlp", "resid"])]
  assert (whole["head"] == -1).all()
  heads = metrics[metrics.component == "ov_head"]
  assert sorted(heads["head"].unique()) == [0, 1, 2, 3]
  final = metrics[(metrics.step == 8) & metrics.metric.isin(["cka", "cka_debiased"])]
  np.testing.assert_allclose(final.value, 1.0, rtol=1e-4)
  assert {"cka_floor", "cka_debiased_floor"} <= set(metrics.metric)
  pair = pd.read_parquet(os.path.join(out, "pairwise_cka.parquet"))
  against_final = pair[(pair.other_step == 8) & (pair.metric == "cka")]
  merged = against_final.merge(
    metrics[metrics.metric == "cka"], on=["model", "step", "layer", "component", "head"]
  )
  np.testing.assert_allclose(merged.value_x, merged.value_y, rtol=1e-4, atol=1e-6)
  assert len(merged) == len(against_final) > 0
  status = pd.read_parquet(os.path.join(out, "checkpoints.parquet"))
  assert (status.status == "ok").all() and len(status) == 10
  # Every metric written is in the one component x metric table, and the table is whole.
  table = {(c, m) for c, ms in analysis.metric_table().items() for m in ms}
  assert set(zip(metrics.component, metrics.metric)) == table
  # The parameter count (torch's own) orders the models in the figures, smallest first.
  counts = {
    name: sum(p.numel() for p in torch_model(suite_dir, name, 8).parameters())
    for name in sf.SUITE_MODELS
  }
  assert status.groupby("model").parameters.max().to_dict() == counts
  assert report.model_order(metrics, status) == sorted(counts, key=counts.get)
  for stem in (
    "cka_bands",
    "cka_bands_debiased",
    "per_over_training",
    "per_vs_convergence",
    "pairwise_cka",
  ):
    png = Path(out, "figures", stem + ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
    assert Path(out, "figures", stem + ".pdf").read_bytes()[:5] == b"%PDF-"
  assert "PER at the final checkpoint" in Path(out, "report.md").read_text()


def _cli(args, **kwargs):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(
    [sys.executable, "-m", "tools.sweep", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kwargs,
  )


def test_killed_run_resumes_without_redoing_work(swept, suite_dir, tmp_path):
  reference_out = swept[0]
  out = tmp_path / "out"
  args = [f"--models={suite_dir}", f"--out={out}", "--nofigures", *CLI_OPTIONS]
  proc = _cli(args)
  done_dir = out / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = list(done_dir.glob("*/step*.parquet")) if done_dir.exists() else []
    if len(done) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = {p: p.stat().st_mtime_ns for p in done_dir.glob("*/step*.parquet")}
  assert 3 <= len(finished) < 10
  assert not list(out.rglob("metrics.parquet"))
  resumed = _cli(args)
  stdout, stderr = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, stderr
  assert f"{len(finished)} already done" in stdout
  for path, mtime in finished.items():
    assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
  assert not list(out.rglob(".tmp-*"))
  got = pd.read_parquet(out / "metrics.parquet")
  want = pd.read_parquet(Path(reference_out) / "metrics.parquet")
  pd.testing.assert_frame_equal(got, want, rtol=1e-5)


def test_corrupt_checkpoint_is_skipped_and_recorded_or_stops(suite_dir, tmp_path):
  broken = tmp_path / "suite"
  import shutil

  shutil.copytree(suite_dir, broken)
  weights = broken / "small-2l" / "step2" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-100])
  options = sweep.SweepOptions(**{**OPTIONS, "gradients": False, "loss_sequences": 0})
  models = sources.resolve_models([str(broken / "small-2l")])
  source = sources.open_data(str(broken / "data" / "train"), models, None, 8)
  with pytest.raises(SweepError, match=r"small-2l step 2: .*model.safetensors"):
    sweep.Sweep(models, "0,2,8", source, str(tmp_path / "stop"), options).run()
  out = str(tmp_path / "skip")
  sweep.Sweep(models, "0,2,8", source, out, options, on_error="skip").run()
  results.finalize(out)
  status = pd.read_parquet(os.path.join(out, "checkpoints.parquet")).set_index("step")
  assert status.loc[2, "status"] == "failed"
  assert "model.safetensors" in status.loc[2, "message"]
  assert list(status.loc[[0, 8], "status"]) == ["ok", "ok"]
  assert sorted(pd.read_parquet(os.path.join(out, "metrics.parquet")).step.unique()) == [0, 8]


def test_bad_input_errors_name_the_culprit(suite_dir, tmp_path):
  with pytest.raises(SweepError, match="unknown model 'pythia-99m'"):
    sources.resolve_models(["pythia-99m"])
  models = sources.resolve_models([str(suite_dir / "small-2l")])
  source = sources.open_data(str(suite_dir / "data" / "train"), models, None, 8)
  options = sweep.SweepOptions(**OPTIONS)
  with pytest.raises(SweepError, match="step 3 is not a checkpoint"):
    sweep.Sweep(models, "0,3", source, str(tmp_path / "a"), options)
  # Constructing a sweep plans only: nothing is read or written until prepare (or run).
  sweep.Sweep(models, "all", source, str(tmp_path / "lazy"), options)
  assert not (tmp_path / "lazy").exists()
  # A stream too short for the gradient batches the steps need.
  short = tmp_path / "short" / "train"
  items = np.asarray(source.batch(0, 8))
  sf.write_token_stream(short, np.concatenate([items] * 8))  # steps 0..7 only
  short_source = sources.open_data(str(short), models, None, 8)
  with pytest.raises(Exception, match=r"short/train"):
    sweep.Sweep(models, "all", short_source, str(tmp_path / "b"), options).prepare()
  # Rerunning into an --out made with other options is refused, not mixed.
  sweep.Sweep(models, "0", source, str(tmp_path / "c"), options).prepare()
  with pytest.raises(SweepError, match="other options"):
    sweep.Sweep(
      models,
      "0",
      source,
      str(tmp_path / "c"),
      sweep.SweepOptions(**{**OPTIONS, "value_slice": "reference"}),
    ).prepare()


def test_cli_reports_bad_flags_in_one_line(tmp_path):
  proc = _cli(["--models=pythia-99m", f"--out={tmp_path}"])
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert stderr.strip().splitlines()[-1].startswith("sweep: error: --models: unknown model")
  assert "Traceback" not in stderr
