"""Capture-pass throughput: the jitted Flax model against HF torch with forward hooks.

  python -m benchmarks.bench_capture [--batch 8 --seq 512 --repeats 5]

Same random pythia-70m-shaped weights, same tokens, same sites (per-head values and MLP
output of every layer, at the last token), side by side in one process. Prints tokens/s
for each and the ratio. torch runs (a) the full GPTNeoXForCausalLM as the reference
code does (logits computed) and (b) its base model without the unembedding, the fairest
torch counterpart of a capture-only pass.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
from transformers import GPTNeoXConfig as HFConfig
from transformers import GPTNeoXForCausalLM

from benchmarks import shapes
from jax_pythia.models import model as model
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.models.weights import convert_state_dict


def best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  torch.manual_seed(0)
  hf_config = HFConfig(**shapes.hf_kwargs("70m"))
  tm = GPTNeoXForCausalLM(hf_config).eval()
  config = GPTNeoXConfig.from_hf_dict(hf_config.to_dict())
  params = jax.device_put(
    convert_state_dict({k: v.numpy() for k, v in tm.state_dict().items()}, config)
  )
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
  n_tokens = tokens.size
  heads = config.n_heads

  captured = {}

  def hook_qkv(l):
    def fn(module, inputs, output):
      v = output[:, -1].reshape(args.batch, heads, 3, -1)[:, :, 2]
      captured[("v", l)] = v.numpy()

    return fn

  def hook_mlp(l):
    def fn(module, inputs, output):
      captured[("mlp", l)] = output[:, -1].numpy()

    return fn

  for l, layer in enumerate(tm.gpt_neox.layers):
    layer.attention.query_key_value.register_forward_hook(hook_qkv(l))
    layer.mlp.dense_4h_to_h.register_forward_hook(hook_mlp(l))
  t_tokens = torch.tensor(tokens)

  def torch_full():
    with torch.no_grad():
      tm(t_tokens)

  def torch_base():
    with torch.no_grad():
      tm.gpt_neox(t_tokens)

  fn = model.make_forward(
    config, ["blocks.*.attn.hook_v", "blocks.*.hook_mlp_out"], return_logits=False
  )
  idx = model.position_index("last", args.seq)

  def jax_capture():
    _, caps = fn(params, tokens, idx)
    jax.block_until_ready(caps)
    return {k: np.asarray(v) for k, v in caps.items()}

  start = time.perf_counter()
  caps = jax_capture()
  compile_s = time.perf_counter() - start
  torch_full()
  torch_base()
  for l in range(config.n_layers):  # the two agree before anything is timed
    np.testing.assert_allclose(
      caps["blocks.*.attn.hook_v"][l][:, 0], captured[("v", l)], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
      caps["blocks.*.hook_mlp_out"][l][:, 0], captured[("mlp", l)], rtol=1e-4, atol=1e-4
    )
  t_full = best_of(torch_full, args.repeats)
  t_base = best_of(torch_base, args.repeats)
  t_jax = best_of(jax_capture, args.repeats)
  print(
    f"pythia-70m shapes, {args.batch} x {args.seq} tokens, sites: per-head v + MLP out, "
    f"last token; torch threads {torch.get_num_threads()}"
  )
  print(f"  torch GPTNeoXForCausalLM + hooks : {n_tokens / t_full:10.0f} tokens/s")
  print(f"  torch base model (no unembed) + hooks: {n_tokens / t_base:6.0f} tokens/s")
  print(
    f"  jax_pythia capture (logits skipped) : {n_tokens / t_jax:8.0f} tokens/s "
    f"(compile {compile_s:.1f} s, once)"
  )
  print(f"  ratio vs torch full: {t_full / t_jax:.2f}x   vs torch base: {t_base / t_jax:.2f}x")


if __name__ == "__main__":
  main()
