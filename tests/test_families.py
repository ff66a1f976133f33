"""Every Llama-family variant against its transformers class in torch (LlamaForCausalLM,
OlmoForCausalLM, Olmo2ForCausalLM) on tiny random checkpoints written by save_pretrained:
logits, every capture site and the layer weights' gradients within 1e-4 relative in
float32, from float32, float16 and bfloat16 weights; GQA and tied embeddings covered.
The torch side's sites are read with forward hooks on transformers' own modules."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_pythia.errors import ConfigError
from jax_pythia.models import family, model, weights
from tests.llama_fixtures import rounded, tiny_llama, torch_numpy

CASES = {
  # name: (family, overrides, stored dtype)
  "llama-gqa": ("llama", {}, "float32"),
  "llama-tied-fp16": ("llama", {"tie_word_embeddings": True}, "float16"),
  "llama-mha-bf16": ("llama", {"num_key_value_heads": 4}, "bfloat16"),
  "olmo-clip-gqa": ("olmo", {"clip_qkv": 0.6}, "float32"),
  "olmo-bf16": ("olmo", {"num_key_value_heads": 1}, "bfloat16"),
  "olmo2-gqa": ("olmo2", {}, "float32"),
  "olmo2-tied-fp16": ("olmo2", {"tie_word_embeddings": True}, "float16"),
}
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 12))


def close(got, want, what):
  """Within 1e-4 of the reference's scale (relative, elementwise up to that floor)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
  scale = max(np.abs(want).max(), 1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


def torch_sites(hf, tokens) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(logits, {site name: array at every position}) of the torch model, by hooks."""
  import torch

  cfg, base = hf.config, hf.model
  H, Hkv, dh = (
    cfg.num_attention_heads,
    cfg.num_key_value_heads,
    cfg.hidden_size // cfg.num_attention_heads,
  )
  olmo2 = cfg.model_type == "olmo2"
  got, hooks = {}, []

  def out(name, fn=lambda x: x):
    return lambda module, args, output: got.__setitem__(name, fn(output))

  def inp(name, fn=lambda x: x):
    return lambda module, args: got.__setitem__(name, fn(args[0]))

  heads = lambda n: lambda x: x.reshape(*x.shape[:2], n, dh)  # noqa: E731
  hooks.append(base.embed_tokens.register_forward_hook(out("hook_embed")))
  hooks.append(base.norm.register_forward_hook(out("ln_final.hook_normalized")))
  for l, layer in enumerate(base.layers):
    p, a = f"blocks.{l}.", layer.self_attn

    def resid_pre(module, args, kwargs, p=p):
      got[p + "hook_resid_pre"] = kwargs.get("hidden_states", args[0] if args else None)

    hooks.append(layer.register_forward_pre_hook(resid_pre, with_kwargs=True))
    hooks.append(
      layer.register_forward_hook(
        out(p + "hook_resid_post", lambda o: o[0] if isinstance(o, tuple) else o)
      )
    )
    q_src, k_src = (a.q_norm, a.k_norm) if olmo2 else (a.q_proj, a.k_proj)
    hooks.append(q_src.register_forward_hook(out(p + "attn.hook_q", heads(H))))
    hooks.append(k_src.register_forward_hook(out(p + "attn.hook_k", heads(Hkv))))
    hooks.append(a.v_proj.register_forward_hook(out(p + "attn.hook_v", heads(Hkv))))
    hooks.append(a.o_proj.register_forward_pre_hook(inp(p + "attn.hook_z", heads(H))))
    hooks.append(a.register_forward_hook(out(p + "attn.hook_pattern", lambda o: o[1])))
    hooks.append(layer.mlp.gate_proj.register_forward_hook(out(p + "mlp.hook_pre")))
    hooks.append(layer.mlp.up_proj.register_forward_hook(out(p + "mlp.hook_pre_linear")))
    hooks.append(layer.mlp.down_proj.register_forward_pre_hook(inp(p + "mlp.hook_post")))
    if olmo2:
      hooks.append(layer.post_attention_layernorm.register_forward_hook(out(p + "hook_attn_out")))
      hooks.append(layer.post_feedforward_layernorm.register_forward_hook(out(p + "hook_mlp_out")))
    else:
      hooks.append(a.register_forward_hook(out(p + "hook_attn_out", lambda o: o[0])))
      hooks.append(layer.mlp.register_forward_hook(out(p + "hook_mlp_out")))
      hooks.append(layer.input_layernorm.register_forward_hook(out(p + "ln1.hook_normalized")))
      hooks.append(
        layer.post_attention_layernorm.register_forward_hook(out(p + "ln2.hook_normalized"))
      )
  with torch.no_grad():
    logits = hf(input_ids=torch.as_tensor(tokens), output_attentions=True).logits
  for h in hooks:
    h.remove()
  _derive_sites(hf, got, tokens.shape[1])
  return torch_numpy(logits), {k: torch_numpy(v) for k, v in got.items()}


def _derive_sites(hf, got, s):
  """The sites torch has no module for, from its own tensors and its own rotary."""
  import torch
  from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

  cfg, base = hf.config, hf.model
  H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
  dh = cfg.hidden_size // H
  positions = torch.arange(s)[None]
  for l in range(cfg.num_hidden_layers):
    p = f"blocks.{l}."
    got[p + "hook_resid_mid"] = got[p + "hook_resid_pre"] + got[p + "hook_attn_out"]
    cos, sin = base.rotary_emb(got[p + "hook_resid_pre"], positions)
    q, k = got[p + "attn.hook_q"].transpose(1, 2), got[p + "attn.hook_k"].transpose(1, 2)
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
    got[p + "attn.hook_rot_q"], got[p + "attn.hook_rot_k"] = rq.transpose(1, 2), rk.transpose(1, 2)
    rk = rk.repeat_interleave(H // Hkv, dim=1)
    got[p + "attn.hook_attn_scores"] = (rq @ rk.transpose(-1, -2)) / dh**0.5
    w_o = base.layers[l].self_attn.o_proj.weight.reshape(cfg.hidden_size, H, dh)
    got[p + "attn.hook_result"] = torch.einsum("bshi,dhi->bshd", got[p + "attn.hook_z"], w_o)


def load(hf, tmp_path, dtype):
  import copy

  import torch

  directory = tmp_path / "ckpt"
  copy.deepcopy(hf).to(getattr(torch, dtype)).save_pretrained(directory)
  stored = {a.dtype for a in weights.read_state_dict(directory).values()}
  assert stored == {np.dtype(weights.DTYPES[dtype])}, stored
  config = family.load_config(directory / "config.json")
  params = weights.convert_state_dict(weights.read_state_dict(directory), config, "float32")
  return config, params, directory


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_every_site_match_torch(case, tmp_path):
  fam, overrides, dtype = CASES[case]
  hf = tiny_llama(fam, seed=len(case), **overrides)
  config, params, _ = load(hf, tmp_path, dtype)
  assert config.family == fam and config.n_kv_heads == hf.config.num_key_value_heads
  assert ("embed_out" in params) != hf.config.tie_word_embeddings
  want_logits, want = torch_sites(rounded(hf, dtype), TOKENS)
  names = [n for n in want if n.startswith("blocks.") or n in model.GLOBAL_SITES]
  logits, caps = model.forward(params, jnp.asarray(TOKENS), config, names, positions="all")
  close(logits, want_logits, f"{case} logits")
  causal = np.tril(np.ones((TOKENS.shape[1],) * 2, bool))
  for name in names:
    got = np.asarray(caps[name])
    if name.endswith("hook_attn_scores"):  # masked entries: the float32 minimum vs -inf
      assert (got[..., ~causal] < -1e30).all(), name
      got, want[name] = got[..., causal], want[name][..., causal]
    close(got, want[name], f"{case} {name}")
  assert len(names) == 2 + config.n_layers * (19 if fam != "olmo2" else 17)


@pytest.mark.parametrize("case", ["llama-gqa", "olmo-clip-gqa", "olmo2-tied-fp16"])
def test_layer_gradients_match_torch(case, tmp_path):
  import torch

  fam, overrides, dtype = CASES[case]
  hf = rounded(tiny_llama(fam, seed=7, **overrides), dtype)
  config, params, _ = load(hf, tmp_path, dtype)
  tokens = np.random.default_rng(1).integers(0, 97, (2, 13))
  t = torch.as_tensor(tokens)
  logits = hf(input_ids=t[:, :-1]).logits
  torch_loss = torch.nn.functional.cross_entropy(
    logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1)
  )
  torch_loss.backward()
  loss, grads = model.loss_and_grads(params, jnp.asarray(tokens), config)
  close(loss, torch_numpy(torch_loss), f"{case} loss")
  torch_names = {
    ("attn", "query"): "self_attn.q_proj", ("attn", "key"): "self_attn.k_proj",
    ("attn", "value"): "self_attn.v_proj", ("attn", "out"): "self_attn.o_proj",
    ("mlp", "gate"): "mlp.gate_proj", ("mlp", "up"): "mlp.up_proj",
    ("mlp", "fc_out"): "mlp.down_proj",
  }  # fmt: skip
  for (group, leaf), name in torch_names.items():
    g = np.asarray(grads[group][leaf]["kernel"])  # [L, in..., out...] kernels (in, out)
    for l, layer in enumerate(hf.model.layers):
      want = torch_numpy(layer.get_submodule(name).weight.grad)  # [out, in]
      got = (
        g[l].reshape(want.shape[0], -1).T if leaf == "out" else g[l].reshape(want.shape[1], -1).T
      )
      close(got, want, f"{case} layer {l} {name} gradient")


@pytest.mark.parametrize("fam", ["llama", "olmo", "olmo2"])
def test_save_hf_checkpoint_loads_in_transformers(fam, tmp_path):
  """Flax -> HF through the table (params_to_state_dict, to_hf_dict): transformers' own
  from_pretrained reads it back and computes the same logits."""
  import torch
  import transformers

  hf = tiny_llama(fam, seed=3, tie_word_embeddings=fam == "olmo2")
  config, params, _ = load(hf, tmp_path, "float32")
  out = weights.save_hf_checkpoint(tmp_path / "saved", params, config)
  again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(TOKENS)).logits
    got = again(input_ids=torch.as_tensor(TOKENS)).logits
  close(torch_numpy(got), torch_numpy(want), f"{fam} round trip")


def test_pico_decoder_maps_onto_llama(tmp_path):
  """A pico-decoder checkpoint (pico-train's tensor names and config keys, its RoPE on
  interleaved pairs) written here from a Llama model: q_proj and k_proj rows of each head
  re-ordered from Llama's halves (i, i + dh/2) to pico's pairs (2i, 2i+1). Loading it must
  give the Llama model's logits (docs/families.md: the mapping)."""
  import torch

  from jax_pythia.models import formats

  hf = tiny_llama("llama", seed=5)
  cfg, dh = hf.config, hf.config.hidden_size // hf.config.num_attention_heads
  pair_order = np.empty(dh, int)  # pico row 2i <- llama row i, 2i+1 <- i + dh/2
  pair_order[0::2], pair_order[1::2] = np.arange(dh // 2), np.arange(dh // 2) + dh // 2

  def interleave(w, heads):
    return w.reshape(heads, dh, -1)[:, pair_order].reshape(heads * dh, -1)

  state = {}
  sd = {k: torch_numpy(v) for k, v in hf.state_dict().items()}
  rename = {"input_layernorm": "attention_norm", "post_attention_layernorm": "swiglu_norm",
            "self_attn.v_proj": "attention.v_proj", "self_attn.o_proj": "attention.o_proj",
            "mlp.gate_proj": "swiglu.w_0", "mlp.up_proj": "swiglu.w_1",
            "mlp.down_proj": "swiglu.w_2"}  # fmt: skip
  for l in range(cfg.num_hidden_layers):
    src, dst = f"model.layers.{l}.", f"pico_decoder.layers.{l}."
    state[dst + "attention.q_proj.weight"] = interleave(sd[src + "self_attn.q_proj.weight"], 4)
    state[dst + "attention.k_proj.weight"] = interleave(sd[src + "self_attn.k_proj.weight"], 2)
    for old, new in rename.items():
      state[dst + new + ".weight"] = sd[src + old + ".weight"]
  state["pico_decoder.embedding_proj.weight"] = sd["model.embed_tokens.weight"]
  state["pico_decoder.output_norm.weight"] = sd["model.norm.weight"]
  state["pico_decoder.de_embedding_proj.weight"] = sd["lm_head.weight"]
  directory = tmp_path / "pico"
  directory.mkdir()
  formats.write_safetensors(directory / "model.safetensors", state)
  pico_config = {
    "model_type": "pico_decoder", "architectures": ["PicoDecoderHF"], "d_model": 32,
    "n_layers": 2, "vocab_size": 97, "batch_size": 1024, "max_seq_len": 64,
    "attention_n_heads": 4, "attention_n_kv_heads": 2, "activation_hidden_dim": 48,
    "norm_eps": cfg.rms_norm_eps, "position_emb_theta": 10000.0,
    "auto_map": {"AutoModelForCausalLM": "pico_decoder.PicoDecoderHF"}, "torch_dtype": "float32",
  }  # fmt: skip
  (directory / "config.json").write_text(json.dumps(pico_config))
  config = family.load_config(directory / "config.json")
  assert config.family == "pico_decoder"
  params = weights.convert_state_dict(weights.read_state_dict(directory), config)
  logits, _ = model.forward(params, jnp.asarray(TOKENS), config, positions="all")
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(TOKENS)).logits
  close(logits, torch_numpy(want), "pico logits")
  # And back: the writer restores pico's names and interleaved rows exactly.
  back = weights.params_to_state_dict(jax.device_get(params), config)
  assert set(back) == set(state)
  for name, arr in state.items():
    np.testing.assert_array_equal(back[name], arr, err_msg=name)


@pytest.mark.parametrize(
  "change, message",
  [
    (
      {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
      "rope_type='linear'",
    ),
    ({"sliding_window": 4096}, "sliding_window=4096"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"pretraining_tp": 2}, "pretraining_tp=2"),
    ({"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"architectures": ["GPTNeoXForCausalLM"]}, "architectures"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
  ],
)
def test_unsupported_llama_settings_are_refused_by_name(change, message, tmp_path):
  hf = tiny_llama("llama").config.to_dict()
  hf.update(change)
  path = tmp_path / "config.json"
  path.write_text(json.dumps(hf))
  with pytest.raises(ConfigError, match=rf"config\.json: .*{message}") as info:
    family.load_config(path)
  assert "\n" not in str(info.value)


def test_sites_a_family_lacks_are_refused_by_name():
  config = family.config_from_hf(tiny_llama("olmo2").config.to_dict())
  with pytest.raises(ValueError, match=r"'blocks.0.ln1.hook_normalized' does not exist in OLMo-2"):
    model.SiteRequest.parse(["blocks.0.ln1.hook_normalized"], config)
  neox = family.config_from_hf({"model_type": "gpt_neox", "vocab_size": 97, "hidden_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 4,
                                "intermediate_size": 64})  # fmt: skip
  with pytest.raises(ValueError, match=r"'blocks.0.mlp.hook_pre_linear' exists only in gated"):
    model.SiteRequest.parse(["blocks.0.mlp.hook_pre_linear"], neox)


def test_plan_counts_gqa_swiglu_and_tied_embeddings(tmp_path):
  """tools.plan's shape of a Llama-family checkpoint: parameters exactly as the layout
  table has them, and the layer matmuls with H_kv key/value heads and three MLP matrices."""
  import dataclasses

  from jax_pythia.scale import memory, plan

  hf = tiny_llama("llama", seed=2, tie_word_embeddings=True)
  hf.save_pretrained(tmp_path / "m" / "step0")
  (shape,) = plan.from_directory(str(tmp_path / "m"))
  assert (shape.n_kv_heads, shape.gated_mlp, shape.tied_embeddings) == (2, True, True)
  assert shape.params == sum(p.numel() for p in hf.parameters())  # torch: tied counted once
  d, f, L, kv = 32, 48, 2, 16  # kv = H_kv * dh
  assert shape.layer_params == L * (2 * d * d + 2 * d * kv + 3 * d * f)
  untied = dataclasses.replace(shape, tied_embeddings=False)
  work = plan.Work(dtype="float32")
  extra = memory._param_bytes(untied, work, {}) - memory._param_bytes(shape, work, {})
  assert extra == 4 * 97 * d  # a tied model holds one V x d table
