"""Checkpoint suites: revision schemes resolved from a stubbed Hub listing, the on-disk cache
an offline rerun resolves from, and the step selections every suite takes.

Only the network layer is stubbed (huggingface_hub.HfApi.list_repo_refs / list_repo_commits
return listings built here); the expected steps and revisions are written out by hand.
"""

from __future__ import annotations

import datetime
import types

import huggingface_hub
import pytest
from huggingface_hub.hf_api import GitCommitInfo, GitRefInfo, GitRefs

from jax_pythia import suite
from jax_pythia.checkpoints import revisions, sources, suites
from jax_pythia.errors import CheckpointError


def _refs(*names: str) -> GitRefs:
  return GitRefs(
    branches=[
      GitRefInfo(name=n, ref=f"refs/heads/{n}", target_commit=f"{i:040x}")
      for i, n in enumerate(names)
    ],
    converts=[],
    tags=[],
  )


def _commit(commit_id: str, title: str) -> GitCommitInfo:
  when = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
  return GitCommitInfo(
    commit_id=commit_id,
    authors=["pico"],
    created_at=when,
    title=title,
    message="",
    formatted_title=None,
    formatted_message=None,
  )


class FakeHub:
  """The Hub's listings of a few repos; counts the calls (the cache must spare them)."""

  def __init__(self):
    self.branches: dict[str, GitRefs] = {}
    self.commits: dict[str, list[GitCommitInfo]] = {}
    self.calls = 0

  def install(self, monkeypatch):
    hub = self

    def list_repo_refs(self, repo_id, **kwargs):
      hub.calls += 1
      if repo_id not in hub.branches:
        response = types.SimpleNamespace(headers={}, status_code=404, request=None)
        raise huggingface_hub.errors.RepositoryNotFoundError(f"404 {repo_id}", response=response)
      return hub.branches[repo_id]

    def list_repo_commits(self, repo_id, revision=None, **kwargs):
      hub.calls += 1
      assert revision == "main"
      return hub.commits[repo_id]

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_refs", list_repo_refs)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_commits", list_repo_commits)


def _online(monkeypatch):
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _offline(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hub(monkeypatch, tmp_path):
  monkeypatch.setenv(revisions.CACHE_ENV, str(tmp_path / "revisions"))
  _online(monkeypatch)
  fake = FakeHub()
  fake.branches["allenai/OLMo-1B-hf"] = _refs(
    "main", "step20000-tokens84B", "step0-tokens0B", "step1000-tokens4B"
  )
  fake.branches["allenai/OLMo-2-0425-1B"] = _refs(
    "main",
    "stage1-step0-tokens0B",
    "step1000-tokens3B",  # one of the few without `stage1-`
    "stage1-step2000-tokens5B",
    "stage2-ingredient1-step0-tokens0B",
    "stage2-ingredient1-step500-tokens2B",
    "stage2-ingredient2-step500-tokens2B",
  )
  fake.branches["LLM360/Amber"] = _refs("main", "ckpt_000", "ckpt_001", "ckpt_359")
  fake.branches["org/custom"] = _refs("main", "run-ckpt-2k", "run-ckpt-10k", "notes")
  fake.commits["pico-lm/pico-decoder-tiny"] = [  # newest first, as the Hub lists them
    _commit("c" * 40, "Saving Fabric Checkpoint -- Step 100"),
    _commit("b" * 40, "Saving HF Model -- Step 100"),
    _commit("9" * 40, "Saving Training Config -- Step 0"),
    _commit("8" * 40, "Saving Tokenizer -- Step 0"),
    _commit("a" * 40, "Saving HF Model -- Step 0"),
    _commit("0" * 40, "initial commit"),
  ]
  fake.install(monkeypatch)
  return fake


def _pairs(resolved):
  return [(c.step, c.revision) for c in resolved.checkpoints]


def test_olmo_branches(hub):
  r = revisions.resolve("allenai/OLMo-1B-hf")
  assert r.suite == "olmo"
  assert _pairs(r) == [
    (0, "step0-tokens0B"),
    (1000, "step1000-tokens4B"),
    (20000, "step20000-tokens84B"),
  ]
  assert [c.tokens_b for c in r.checkpoints] == [0, 4, 84]


def test_olmo2_stage1_and_stage2_series_never_mix(hub):
  r = revisions.resolve("allenai/OLMo-2-0425-1B")
  assert (r.suite, r.series) == ("olmo2", "stage1")
  assert _pairs(r) == [
    (0, "stage1-step0-tokens0B"),
    (1000, "step1000-tokens3B"),
    (2000, "stage1-step2000-tokens5B"),
  ]
  two = revisions.resolve("allenai/OLMo-2-0425-1B", series="stage2-ingredient1")
  assert _pairs(two) == [
    (0, "stage2-ingredient1-step0-tokens0B"),
    (500, "stage2-ingredient1-step500-tokens2B"),
  ]
  with pytest.raises(
    CheckpointError, match="stage2-ingredient9.*stage1, stage2-ingredient1, stage2-ingredient2"
  ):
    revisions.resolve("allenai/OLMo-2-0425-1B", series="stage2-ingredient9")


def test_amber_and_pico(hub):
  assert _pairs(revisions.resolve("LLM360/Amber")) == [
    (0, "ckpt_000"),
    (1, "ckpt_001"),
    (359, "ckpt_359"),
  ]
  pico = revisions.resolve("pico-lm/pico-decoder-tiny")
  assert pico.suite == "pico"
  assert _pairs(pico) == [(0, "a" * 40), (100, "b" * 40)]


def test_pythia_needs_no_listing(hub):
  r = revisions.resolve("EleutherAI/pythia-70m-deduped")
  assert r.steps == suite.ALL_STEPS and r.revision(143000) == "step143000" and hub.calls == 0
  # Its scheme still parses a listing of step<N> branches.
  scheme = suites.BY_NAME["pythia"]
  listing = [("main", "main"), ("step0", "step0"), ("step512", "step512")]
  assert [c.step for c in suites.parse_listing(scheme, listing, "x/y")] == [0, 512]


def test_custom_revisions(hub):
  r = revisions.resolve("org/custom", r"run-ckpt-(\d+)k")
  assert (r.suite, _pairs(r)) == ("custom", [(2, "run-ckpt-2k"), (10, "run-ckpt-10k")])
  named = revisions.resolve("org/custom", r"run-ckpt-(?P<step>\d+)k")
  assert named.steps == (2, 10)
  given = revisions.resolve("org/custom", f"run-ckpt-2k=2000, {'e' * 40}=7000, step9")
  assert _pairs(given) == [(9, "step9"), (2000, "run-ckpt-2k"), (7000, "e" * 40)]


@pytest.mark.parametrize(
  "repo, names, revisions_flag, message",
  [
    (
      "allenai/OLMo-1B-hf",
      ["step0-tokens0B", "step12x-tokens4B"],
      None,
      "'step12x-tokens4B' looks like",
    ),
    ("LLM360/Amber", ["ckpt_001", "ckpt-2"], None, "'ckpt-2' looks like a checkpoint"),
    (
      "allenai/OLMo-2-0425-1B",
      ["stage1-step1000-tokens5B", "step1000-tokens5B"],
      None,
      "step 1000 is named twice \\('stage1-step1000-tokens5B' and 'step1000-tokens5B'\\)",
    ),
    ("LLM360/Amber", ["main", "dev"], None, "no branch names a checkpoint of the amber form ckpt_"),
    ("allenai/OLMo-1B-hf", ["main"], "nothing-(\\d+)", "no branch matches --revisions"),
    ("org/custom", ["main"], "a=1,b=x", "'b=x' is not REVISION=STEP"),
    ("org/custom", ["main"], "f" * 40, "names no step; give it as"),
    ("org/custom", ["main"], "a=1,b1", "step 1 is named twice"),
    ("org/custom", ["ckpt-a"], "ckpt-(?P<step>\\w+)", "names no step"),
    ("org/none", ["main"], None, "of no known checkpoint suite"),
  ],
)
def test_refused_in_one_line(hub, repo, names, revisions_flag, message):
  hub.branches[repo] = _refs(*names)
  with pytest.raises(CheckpointError, match=message) as e:
    revisions.resolve(repo, revisions_flag)
  assert "\n" not in str(e.value)


def test_malformed_pico_commit(hub):
  hub.commits["pico-lm/pico-decoder-tiny"].insert(
    0, _commit("d" * 40, "Saving HF Model -- Step ten")
  )
  with pytest.raises(CheckpointError, match="commit message 'Saving HF Model -- Step ten'"):
    revisions.resolve("pico-lm/pico-decoder-tiny")


def test_missing_repo(hub):
  with pytest.raises(CheckpointError, match="allenai/OLMo-7B-hf: no such Hub repo"):
    revisions.resolve("allenai/OLMo-7B-hf")


def test_cache_serves_an_offline_rerun(hub, monkeypatch, tmp_path):
  online = revisions.resolve("allenai/OLMo-2-0425-1B")
  pico = revisions.resolve("pico-lm/pico-decoder-tiny")
  calls = hub.calls
  assert calls == 2
  _offline(monkeypatch)
  hub.branches.clear()  # a rerun must not reach the Hub: the stub would fail it
  assert revisions.resolve("allenai/OLMo-2-0425-1B") == online
  assert revisions.resolve("pico-lm/pico-decoder-tiny") == pico
  assert hub.calls == calls
  with pytest.raises(CheckpointError) as e:
    revisions.resolve("LLM360/Amber")
  text = str(e.value)
  assert "offline (HF_HUB_OFFLINE=1)" in text and "LLM360--Amber.branches.json" in text
  assert "\n" not in text
  # A damaged cache is named, not trusted.
  (tmp_path / "revisions" / "allenai--OLMo-2-0425-1B.branches.json").write_text("{")
  with pytest.raises(CheckpointError, match="cached listing of allenai/OLMo-2-0425-1B is damaged"):
    revisions.resolve("allenai/OLMo-2-0425-1B")


def test_models_resolve_to_revisions(hub):
  olmo, two, pythia = sources.resolve_models(
    ["allenai/OLMo-1B-hf", "allenai/OLMo-2-0425-1B@stage2-ingredient2", "pythia-14m"]
  )
  assert (olmo.name, olmo.suite, olmo.steps) == ("OLMo-1B-hf", "olmo", (0, 1000, 20000))
  assert olmo.spec(1000) == "allenai/OLMo-1B-hf@step1000-tokens4B"
  assert (two.name, two.steps) == ("OLMo-2-0425-1B@stage2-ingredient2", (500,))
  assert two.spec(500) == "allenai/OLMo-2-0425-1B@stage2-ingredient2-step500-tokens2B"
  assert (pythia.suite, pythia.spec(512)) == ("pythia", "EleutherAI/pythia-14m@step512")
  custom = sources.resolve_models(["org/custom"], revisions="run-ckpt-(\\d+)k")[0]
  assert (custom.suite, custom.spec(10)) == ("custom", "org/custom@run-ckpt-10k")


def test_step_selections():
  steps = suite.ALL_STEPS
  assert suite.parse_steps("final", steps) == (143000,)
  # log(1 + s) of 0 and 143000 is 0 and 11.8706; its midpoint 5.9353 is nearest 512
  # (log 513 = 6.2403) rather than 256 (log 257 = 5.5491).
  assert suite.parse_steps("log:3", steps) == (0, 512, 143000)
  olmo = (0, 1000, 20000, 400000, 739000)
  # Midpoint of log 1 .. log 739001: 6.7529 (e^6.75 = 856); 1000 (6.9088) is nearest.
  assert suite.parse_steps("log:3,final", olmo) == (0, 1000, 739000)
  assert suite.parse_steps("log:5", olmo) == olmo
  for bad in ("log:0", "log:6", "log:x"):
    with pytest.raises(ValueError, match="log:K with K in 1..5"):
      suite.parse_steps(bad, olmo)


def test_a_sweep_fetches_a_suites_revisions_offline(hub, monkeypatch, tmp_path):
  """End to end: an OLMo-named Hub repo's branches, listed once (the stub), then an offline
  sweep resolves them from the listing cache and loads each from the Hugging Face cache by
  its branch; `log:2` picks the first and last checkpoint."""
  import numpy as np
  import pandas as pd

  from jax_pythia.sweep import results
  from jax_pythia.sweep import run as sweep
  from tests import hf_fixtures as hf

  cache = tmp_path / "hf"
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  shape = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
  for seed, branch in enumerate(["step0-tokens0B", "step1000-tokens4B", "step20000-tokens84B"]):
    model = hf.tiny_model(seed=seed, vocab_size=97, max_position_embeddings=64, **shape)
    hf.write_hub_cache(model, cache, "allenai/OLMo-1B-hf", branch)
  revisions.resolve("allenai/OLMo-1B-hf")  # online once: the listing is cached
  _offline(monkeypatch)
  hub.branches.clear()
  models = sources.resolve_models(["allenai/OLMo-1B-hf"])
  tokens = tmp_path / "tokens.npy"
  np.save(tokens, np.random.default_rng(0).integers(0, 97, (8, 16)))
  source = sources.open_data(str(tokens), models, None, None)
  out = str(tmp_path / "out")
  options = sweep.SweepOptions(n_sequences=8, gradients=False)
  sweep.Sweep(models, "log:2", source, out, options).run()
  results.finalize(out)
  status = pd.read_parquet(f"{out}/checkpoints.parquet")
  assert list(status.step) == [0, 20000] and (status.status == "ok").all()
  assert set(status.suite) == {"olmo"} and set(status.family) == {"gpt_neox"}
  # Different weights at each branch: CKA of step 0 to the final is below 1, the final's 1.
  metrics = pd.read_parquet(f"{out}/metrics.parquet")
  cka = metrics[(metrics.metric == "cka") & (metrics.component == "mlp")]
  assert np.allclose(cka[cka.step == 20000].value, 1.0, atol=1e-5)
  assert (cka[cka.step == 0].value < 0.999).all()
