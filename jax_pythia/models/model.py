"""The model interface the study and the tools call, the same for every family
(`models.family`): load a config, run the forward with capture sites, take the loss and
the gradients of the layer weights.

  config = family.load_config("ckpt/config.json")      # GPTNeoXConfig, LlamaConfig, ...
  logits, caps = model.forward(params, tokens, config, ["blocks.*.attn.hook_z"], "last")
  loss, grads = model.loss_and_grads(params, tokens, config, ["attn.value.kernel"])
"""

from jax_pythia.models.apply import forward, init_params, make_forward, params_dtype, unembedding
from jax_pythia.models.common import REMAT_POLICIES
from jax_pythia.models.family import (
  FAMILIES,
  config_from_hf,
  family_of,
  load_config,
  study_factors,
)
from jax_pythia.models.loss import (
  LOSS_CHUNK_TOKENS,
  get_path,
  lm_loss,
  loss_and_grads,
  nest,
  token_cross_entropy,
)
from jax_pythia.models.sites import (
  GLOBAL_SITES,
  LAYER_SITES,
  SiteRequest,
  parse_positions,
  position_index,
)

__all__ = [
  "FAMILIES",
  "GLOBAL_SITES",
  "LAYER_SITES",
  "LOSS_CHUNK_TOKENS",
  "REMAT_POLICIES",
  "SiteRequest",
  "config_from_hf",
  "family_of",
  "forward",
  "get_path",
  "init_params",
  "lm_loss",
  "load_config",
  "loss_and_grads",
  "make_forward",
  "nest",
  "params_dtype",
  "parse_positions",
  "position_index",
  "study_factors",
  "token_cross_entropy",
  "unembedding",
]
