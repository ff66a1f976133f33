"""The toy suite's two families: the default options hold GPT-NeoX and Llama toys (no
training), and a toy Llama trained by the same trainer loads in transformers'
LlamaForCausalLM with our logits and every capture site (test_families' torch hooks).
The tiny builds of test_toy_suite stay GPT-NeoX only; the Llama build here is its own,
one small model for a few steps."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_pythia import data
from jax_pythia.checkpoints import hub as checkpoints
from jax_pythia.errors import ToySuiteError
from jax_pythia.models import model
from jax_pythia.toy import build as toy_suite
from jax_pythia.toy import options as toy_options
from tests.test_families import close, torch_sites

LLAMA_OPTIONS = toy_options.ToySuiteOptions(
  sizes=toy_options.parse_sizes("llama:2x32x4x2:tied"),
  seq_len=32,
  sequences_per_step=4,
  n_steps=20,
  checkpoint_every=10,
  log_checkpoints_until=2,
)


def torch_layer_weights(size: toy_options.ToySize) -> int:
  """The layers' matrix weights of transformers' LlamaForCausalLM of the size's config."""
  import torch
  import transformers

  hf = size.config(64).to_hf_dict()
  config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "dtype"})
  with torch.device("meta"):
    tm = transformers.LlamaForCausalLM(config)
  return sum(
    p.numel() for n, p in tm.named_parameters() if n.startswith("model.layers.") and p.ndim == 2
  )


def test_default_toy_suite_compares_two_families():
  sizes = toy_suite.DEFAULT_OPTIONS.sizes
  assert {s.family for s in sizes} == {"gpt_neox", "llama"}
  llamas = [s for s in sizes if s.family == "llama"]
  assert len(llamas) >= 2 and {s.tied for s in llamas} == {True, False}
  for s in llamas:
    config = s.config(toy_suite.DEFAULT_OPTIONS.seq_len)
    assert config.family == "llama" and config.tie_embeddings == s.tied
    assert config.n_kv_heads < config.n_heads  # grouped-query attention
    # SwiGLU about as wide in weights as GPT-NeoX's 4d MLP: 3 f ~ 8 d, f a multiple of 8.
    assert config.d_mlp % 8 == 0 and 0 <= 3 * config.d_mlp - 8 * s.d_model < 24
    assert s.non_embedding_params == torch_layer_weights(s)
  for s in sizes:
    if s.family == "gpt_neox":
      assert s.non_embedding_params == 12 * s.n_layers * s.d_model**2
  # Smallest first, so the manifest and the sweep list them as the report orders them.
  counts = [s.non_embedding_params for s in sizes]
  assert counts == sorted(counts)
  # Specs round-trip (they are what the manifest records).
  assert toy_options.parse_sizes([s.spec for s in sizes]) == sizes
  # The test presets stay one family: their builds (and their time) are unchanged.
  assert {s.family for s in toy_suite.TINY_OPTIONS.sizes} == {"gpt_neox"}


@pytest.mark.parametrize(
  "spec, message",
  [
    ("llama:2x32x2x3", "n_kv_heads must divide"),
    ("llama:2x30x4", "must be even"),
    ("llama:2x32:tie", "expected LAYERSxD_MODEL"),
    ("gpt_neox:2x32:tied", "GPT-NeoX has no GQA"),
    ("2x32x2x1", "expected LAYERSxD_MODEL"),
    ("mamba:2x32", "expected LAYERSxD_MODEL"),
  ],
)
def test_bad_toy_sizes_are_refused_in_one_line(spec, message):
  with pytest.raises(ToySuiteError, match=message) as e:
    toy_options.parse_sizes(spec)
  assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def built_llama(tmp_path_factory):
  root = tmp_path_factory.mktemp("llama_suite")
  result = toy_suite.build_toy_suite(root, LLAMA_OPTIONS)
  assert result.complete
  return root, result.manifest


def test_toy_llama_trains_and_its_manifest_says_so(built_llama):
  root, manifest = built_llama
  (record,) = manifest["models"]
  assert record["name"] == "toy-llama-2l-32d" and record["family"] == "llama"
  assert (record["n_heads"], record["n_kv_heads"], record["tie_embeddings"]) == (4, 2, True)
  config = json.loads((root / record["name"] / "step20" / "config.json").read_text())
  assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
  assert (config["num_key_value_heads"], config["tie_word_embeddings"]) == (2, True)
  losses = np.loadtxt(root / record["train_loss"], delimiter=",", skiprows=1, usecols=1)
  assert losses[0] == pytest.approx(math.log(264), abs=0.3)  # near uniform at init
  assert losses[-5:].mean() < losses[:5].mean() - 0.5


def test_toy_llama_loads_in_transformers_with_our_logits_and_sites(built_llama):
  import transformers

  root, manifest = built_llama
  dataset = data.MMapIndexedDataset(root / manifest["data_prefix"])
  tokens = data.batch_of_step(dataset, 19, 4, 4)[:, :-1]
  worst = {}
  for step in (0, 20):
    directory = root / "toy-llama-2l-32d" / f"step{step}"
    tm = transformers.LlamaForCausalLM.from_pretrained(directory, attn_implementation="eager")
    want_logits, want = torch_sites(tm.eval(), tokens.astype(np.int64))
    config, params = checkpoints.load_checkpoint(str(directory))
    assert "embed_out" not in params  # tied: one table
    names = [n for n in want if n.startswith("blocks.") or n in model.GLOBAL_SITES]
    logits, caps = model.forward(params, jnp.asarray(tokens), config, names, positions="all")
    close(logits, want_logits, f"step {step} logits")
    causal = np.tril(np.ones((tokens.shape[1],) * 2, bool))
    for name in names:
      got = np.asarray(caps[name])
      if name.endswith("hook_attn_scores"):  # masked entries: the float32 minimum vs -inf
        got, want[name] = got[..., causal], want[name][..., causal]
      close(got, want[name], f"step {step} {name}")
    scale = np.abs(want_logits).max()
    worst[step] = float(np.abs(np.asarray(logits) - want_logits).max() / scale)
  assert len(jax.tree.leaves(params)) == 11  # embed, ln_f, ln_1, ln_2, q k v o, gate up down
  print(f"toy Llama vs LlamaForCausalLM, max |logit diff| / max |logit|: {worst}")
