"""Tiny random Llama-family models in torch (transformers' own classes) for ground truth.

  model = tiny_llama("llama", seed=0, num_key_value_heads=2, tie_word_embeddings=True)
  model.save_pretrained(tmp_path / "ckpt")     # what the Hub's repos hold

Every parameter is drawn at random, norm scales around 1 and projections N(0, 0.3^2),
so a wrong norm, a swapped projection or a wrong key/value head grouping shows.
"""

from __future__ import annotations

import numpy as np

#: family -> transformers (config class, model class) names.
CLASSES = {
  "llama": ("LlamaConfig", "LlamaForCausalLM"),
  "olmo": ("OlmoConfig", "OlmoForCausalLM"),
  "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
}
TINY = dict(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
)


def tiny_llama(family: str = "llama", seed: int = 0, **overrides):
  """A seeded random transformers model of `family` in eval mode, float32, eager attention
  (so its attention probabilities can be read)."""
  import torch
  import transformers

  config_name, model_name = CLASSES[family]
  kwargs = {**TINY, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, **overrides}
  config = getattr(transformers, config_name)(**kwargs)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = getattr(transformers, model_name)(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in sorted(model.named_parameters()):
      noise = torch.randn(param.shape, generator=generator)
      param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise)
  return model


def rounded(model, dtype: str):
  """The model with its weights rounded to `dtype` and back to float32 (what loading an
  fp16 or bf16 checkpoint into float32 computes with)."""
  import copy

  import torch

  out = copy.deepcopy(model)
  with torch.no_grad():
    for param in out.parameters():
      param.copy_(param.to(getattr(torch, dtype)).float())
  return out


def torch_numpy(t) -> np.ndarray:
  return t.detach().float().numpy()
