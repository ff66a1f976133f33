"""Parity of the Flax GPT-NeoX with Hugging Face's GPTNeoXForCausalLM (torch, CPU).

Ground truth for every capture site comes from torch forward hooks on the HF modules
(and HF's own rotary function); the per-head layout of the fused qkv is written out here
from docs/pythia.md, independently of the project's converter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig as HFConfig
from transformers import GPTNeoXForCausalLM
from transformers.models.gpt_neox import modeling_gpt_neox as hf_neox

from jax_pythia.models import model as M
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.models.weights import convert_state_dict

TINY = dict(
  vocab_size=97,
  hidden_size=32,
  num_hidden_layers=3,
  num_attention_heads=4,
  intermediate_size=128,
  max_position_embeddings=64,
)
PYTHIA_70M = dict(
  vocab_size=50304,
  hidden_size=512,
  num_hidden_layers=6,
  num_attention_heads=8,
  intermediate_size=2048,
  max_position_embeddings=2048,
)


def make_torch_model(shape, parallel=True, rotary_pct=0.25, std=None, seed=0):
  hf = HFConfig(
    **shape,
    use_parallel_residual=parallel,
    attn_implementation="eager",
    rope_parameters={
      "rope_type": "default",
      "rope_theta": 10000.0,
      "partial_rotary_factor": rotary_pct,
    },
  )
  torch.manual_seed(seed)
  tm = GPTNeoXForCausalLM(hf).eval()
  with torch.no_grad():
    for name, p in tm.named_parameters():
      if std is not None or "layernorm" in name or "bias" in name:
        # Random LayerNorm and bias values too, so a swapped or dropped one shows.
        p.normal_(0.0, std or 0.1).add_(1.0 if name.endswith("layernorm.weight") else 0.0)
  return tm, GPTNeoXConfig.from_hf_dict(hf.to_dict())


def to_flax(tm, config):
  state = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  return jax.tree.map(jnp.asarray, convert_state_dict(state, config))


def per_head(fused, n_heads):
  """[..., 3d] fused qkv output -> q, k, v [..., H, dh] (docs/pythia.md: the weight layout)."""
  x = fused.reshape(*fused.shape[:-1], n_heads, -1)
  return np.split(x, 3, axis=-1)


def torch_captures(tm, config, tokens):
  """Every capture site at every position, from hooks on the HF modules."""
  H = config.n_heads
  out, handles = {}, []

  def hook(name, take_input=False, transform=lambda x: x):
    def fn(module, args, output):
      value = args[0] if take_input else (output[0] if isinstance(output, tuple) else output)
      out[name] = transform(value.detach().numpy())

    return fn

  base = tm.gpt_neox
  handles.append(base.embed_in.register_forward_hook(hook("hook_embed")))
  handles.append(base.final_layer_norm.register_forward_hook(hook("ln_final.hook_normalized")))
  for l, layer in enumerate(base.layers):
    p = f"blocks.{l}."

    def qkv_hook(module, args, output, p=p):
      q, k, v = per_head(output.detach().numpy(), H)
      out[p + "attn.hook_q"], out[p + "attn.hook_k"], out[p + "attn.hook_v"] = q, k, v

    def resid_pre(module, args, kwargs, p=p):
      hs = args[0] if args else kwargs["hidden_states"]
      out[p + "hook_resid_pre"] = hs.detach().numpy()

    handles += [
      layer.register_forward_pre_hook(resid_pre, with_kwargs=True),
      layer.register_forward_hook(hook(p + "hook_resid_post")),
      layer.input_layernorm.register_forward_hook(hook(p + "ln1.hook_normalized")),
      layer.attention.query_key_value.register_forward_hook(qkv_hook),
      layer.attention.dense.register_forward_pre_hook(
        lambda m, a, p=p: out.__setitem__(
          p + "attn.hook_z", a[0].detach().numpy().reshape(*a[0].shape[:2], H, -1)
        )
      ),
      layer.attention.dense.register_forward_hook(hook(p + "hook_attn_out")),
      layer.post_attention_layernorm.register_forward_hook(hook(p + "ln2.hook_normalized")),
      layer.mlp.dense_h_to_4h.register_forward_hook(hook(p + "mlp.hook_pre")),
      layer.mlp.dense_4h_to_h.register_forward_pre_hook(
        lambda m, a, p=p: out.__setitem__(p + "mlp.hook_post", a[0].detach().numpy())
      ),
      layer.mlp.dense_4h_to_h.register_forward_hook(hook(p + "hook_mlp_out")),
    ]
    if not config.use_parallel_residual:
      handles.append(
        layer.post_attention_layernorm.register_forward_pre_hook(
          lambda m, a, p=p: out.__setitem__(p + "hook_resid_mid", a[0].detach().numpy())
        )
      )
  try:
    with torch.no_grad():
      result = tm(torch.tensor(tokens), output_attentions=True)
  finally:
    for h in handles:
      h.remove()
  logits = result.logits.numpy()
  s = tokens.shape[1]
  positions = torch.arange(s)[None]
  cos, sin = base.rotary_emb(torch.zeros(1), positions)
  for l, layer in enumerate(base.layers):
    p = f"blocks.{l}."
    out[p + "attn.hook_pattern"] = result.attentions[l].numpy()
    # HF's own rotary function on [b, H, s, dh]; back to [b, s, H, dh].
    q = torch.tensor(out[p + "attn.hook_q"]).transpose(1, 2)
    k = torch.tensor(out[p + "attn.hook_k"]).transpose(1, 2)
    rq, rk = hf_neox.apply_rotary_pos_emb(q, k, cos, sin)
    out[p + "attn.hook_rot_q"] = rq.transpose(1, 2).numpy()
    out[p + "attn.hook_rot_k"] = rk.transpose(1, 2).numpy()
    w_out = layer.attention.dense.weight.detach().numpy()  # [d, d] (out, in)
    dh = config.d_head
    z = out[p + "attn.hook_z"]
    out[p + "attn.hook_result"] = np.stack(
      [z[:, :, h] @ w_out[:, h * dh : (h + 1) * dh].T for h in range(H)], axis=2
    )
  return logits, out


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def all_sites(config):
  names = list(M.GLOBAL_SITES)
  for l in range(config.n_layers):
    for suffix in M.LAYER_SITES:
      if config.site_refusal(suffix):  # hook_resid_mid under parallel residual; gated MLP's
        continue
      names.append(f"blocks.{l}.{suffix}")
  return names


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_every_site_and_logits_match_hf(parallel, rotary_pct):
  tm, config = make_torch_model(TINY, parallel, rotary_pct, std=0.3)
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (3, 17))
  ref_logits, ref = torch_captures(tm, config, tokens)
  sites = [n for n in all_sites(config) if "attn_scores" not in n]
  logits, got = jax.jit(lambda p, t: M.forward(p, t, config, sites=sites, positions="all"))(
    to_flax(tm, config), tokens
  )
  assert rel_err(logits, ref_logits) < 1e-5
  assert set(got) == set(sites)
  for name in sites:
    assert got[name].shape == ref[name].shape, name
    assert rel_err(got[name], ref[name]) < 1e-5, name


def test_attention_scores_are_the_log_pattern_up_to_a_row_constant():
  tm, config = make_torch_model(TINY, std=0.3)
  tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 9))
  _, ref = torch_captures(tm, config, tokens)
  _, got = M.forward(
    to_flax(tm, config), tokens, config, sites=["blocks.1.attn.hook_attn_scores"], positions="all"
  )
  scores = np.asarray(got["blocks.1.attn.hook_attn_scores"], np.float64)
  causal = np.tril(np.ones((9, 9), bool))
  logz = np.log(np.where(causal, np.exp(scores), 0).sum(-1, keepdims=True))
  log_pattern = np.log(np.where(causal, ref["blocks.1.attn.hook_pattern"], 1.0))
  np.testing.assert_allclose(
    (scores - logz)[..., causal], log_pattern[..., causal], rtol=1e-5, atol=1e-5
  )


def test_pythia_70m_shapes_logits_and_sites_match_hf():
  tm, config = make_torch_model(PYTHIA_70M, std=None)
  tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 24))
  ref_logits, ref = torch_captures(tm, config, tokens)
  sites = [
    "blocks.*.attn.hook_v",
    "blocks.*.attn.hook_result",
    "blocks.*.hook_mlp_out",
    "blocks.5.hook_resid_post",
    "blocks.2.attn.hook_rot_k",
  ]
  logits, got = M.forward(to_flax(tm, config), tokens, config, sites=sites, positions="all")
  assert rel_err(logits, ref_logits) < 1e-5
  for suffix in ("attn.hook_v", "attn.hook_result", "hook_mlp_out"):
    stacked = np.stack([ref[f"blocks.{l}.{suffix}"] for l in range(config.n_layers)])
    assert rel_err(got[f"blocks.*.{suffix}"], stacked) < 1e-5, suffix
  for name in ("blocks.5.hook_resid_post", "blocks.2.attn.hook_rot_k"):
    assert rel_err(got[name], ref[name]) < 1e-5, name


def test_positions_are_selected_inside_the_function():
  tm, config = make_torch_model(TINY, std=0.3)
  params = to_flax(tm, config)
  tokens = np.random.default_rng(4).integers(0, config.vocab_size, (3, 11))
  sites = [
    "blocks.*.hook_resid_post",
    "blocks.0.attn.hook_pattern",
    "hook_embed",
    "blocks.2.attn.hook_result",
  ]
  _, full = M.forward(params, tokens, config, sites=sites, positions="all")
  _, last = M.forward(params, tokens, config, sites=sites, positions="last")
  shared = np.array([0, 4, -1])
  _, some = M.forward(params, tokens, config, sites=sites, positions=shared)
  per_seq = np.array([[1, 2], [3, 10], [0, 5]])
  _, each = M.forward(params, tokens, config, sites=sites, positions=per_seq)
  # (batch axis, token axis) of each site
  axes = {
    "blocks.*.hook_resid_post": (1, 2),
    "blocks.0.attn.hook_pattern": (0, 2),
    "hook_embed": (0, 1),
    "blocks.2.attn.hook_result": (0, 1),
  }
  for name in sites:
    f = np.asarray(full[name])
    batch_axis, token_axis = axes[name]
    np.testing.assert_allclose(last[name], np.take(f, [10], axis=token_axis), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
      some[name], np.take(f, [0, 4, 10], axis=token_axis), rtol=1e-6, atol=1e-6
    )
    shape = [1] * f.ndim
    shape[batch_axis], shape[token_axis] = per_seq.shape
    expected = np.take_along_axis(f, per_seq.reshape(shape), axis=token_axis)
    np.testing.assert_allclose(each[name], expected, rtol=1e-6, atol=1e-6)


def test_logits_can_be_skipped_and_vmap_over_checkpoints():
  tm_a, config = make_torch_model(TINY, std=0.3, seed=0)
  tm_b, _ = make_torch_model(TINY, std=0.3, seed=1)
  pa, pb = to_flax(tm_a, config), to_flax(tm_b, config)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (2, 8)))
  fn = M.make_forward(config, ["blocks.*.attn.hook_v"], return_logits=False)
  logits, _ = fn(pa, tokens, None)
  assert logits is None
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), pa, pb)
  _, both = jax.vmap(fn, in_axes=(0, None, None))(stacked, tokens, None)
  for i, p in enumerate((pa, pb)):
    _, one = fn(p, tokens, None)
    np.testing.assert_allclose(
      both["blocks.*.attn.hook_v"][i], one["blocks.*.attn.hook_v"], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("parallel", [True, False])
def test_gradients_of_chosen_weights_match_torch(parallel):
  tm, config = make_torch_model(TINY, parallel, std=0.2)
  tokens = np.random.default_rng(6).integers(0, config.vocab_size, (2, 13))
  t = torch.tensor(tokens)
  tm.zero_grad()
  logits = tm(t[:, :-1]).logits
  loss = torch.nn.functional.cross_entropy(
    logits.reshape(-1, config.vocab_size), t[:, 1:].reshape(-1)
  )
  loss.backward()
  L, H, dh, d = config.n_layers, config.n_heads, config.d_head, config.d_model
  layers = tm.gpt_neox.layers
  fused = np.stack([l.attention.query_key_value.weight.grad.numpy() for l in layers])
  fused = fused.reshape(L, H, 3, dh, d)
  expected = {
    "attn.query.kernel": fused[:, :, 0].transpose(0, 3, 1, 2),
    "attn.key.kernel": fused[:, :, 1].transpose(0, 3, 1, 2),
    "attn.value.kernel": fused[:, :, 2].transpose(0, 3, 1, 2),
    "attn.out.kernel": np.stack([l.attention.dense.weight.grad.numpy().T for l in layers]).reshape(
      L, H, dh, d
    ),
    "mlp.fc_in.kernel": np.stack([l.mlp.dense_h_to_4h.weight.grad.numpy().T for l in layers]),
    "mlp.fc_out.kernel": np.stack([l.mlp.dense_4h_to_h.weight.grad.numpy().T for l in layers]),
  }
  got_loss, grads = jax.jit(lambda p, t: M.loss_and_grads(p, t, config))(
    to_flax(tm, config), tokens
  )
  assert abs(float(got_loss) - loss.item()) < 1e-5 * loss.item()
  for path, value in expected.items():
    got = grads
    for part in path.split("."):
      got = got[part]
    assert rel_err(got, value) < 1e-4, path
  assert set(grads) == {"attn", "mlp"} and set(grads["attn"]) == {"query", "key", "value", "out"}


def test_gradient_subset_and_bad_requests():
  tm, config = make_torch_model(TINY, std=0.2)
  params = to_flax(tm, config)
  tokens = np.random.default_rng(7).integers(0, config.vocab_size, (2, 6))
  _, grads = M.loss_and_grads(params, tokens, config, wrt=["attn.value.kernel"])
  assert grads == {"attn": {"value": {"kernel": grads["attn"]["value"]["kernel"]}}}
  with pytest.raises(ValueError, match="attn.nope"):
    M.loss_and_grads(params, tokens, config, wrt=["attn.nope.kernel"])
  with pytest.raises(ValueError, match="unknown capture site 'blocks.0.hook_nope'"):
    M.SiteRequest.parse(["blocks.0.hook_nope"], config)
  with pytest.raises(ValueError, match="has 3 layers"):
    M.SiteRequest.parse(["blocks.3.hook_resid_post"], config)
  with pytest.raises(ValueError, match="sequential residual"):
    M.SiteRequest.parse(["blocks.0.hook_resid_mid"], config)
  with pytest.raises(ValueError, match="out of range"):
    M.position_index([0, 40], 11)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    M.forward(params, np.zeros((1, 65), np.int32), config)


def test_bfloat16_compute_stays_close_to_float32():
  tm, config = make_torch_model(TINY, std=0.1)
  params = to_flax(tm, config)
  tokens = np.random.default_rng(8).integers(0, config.vocab_size, (2, 10))
  ref, _ = M.forward(params, tokens, config)
  low, _ = M.forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens, config)
  assert low.dtype == jnp.float32
  assert rel_err(low, ref) < 5e-2
