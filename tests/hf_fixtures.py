"""Tiny Hugging Face GPT-NeoX checkpoints on disk, for tests that need ground truth.

Every builder takes a torch `GPTNeoXForCausalLM` (make one with `tiny_model`) and writes
it in one of the forms real checkpoints come in; the torch model stays the reference the
tests compare against (`torch_state` gives its weights as numpy).

  model = tiny_model(seed=0)
  write_safetensors(model, tmp_path / "st")            # transformers-5 save_pretrained
  write_sharded(model, tmp_path / "sharded")           # model-0000x-of-0000y + index
  write_bin(model, tmp_path / "bin")                   # legacy pytorch_model.bin
  hub = write_hub_layout(model, tmp_path / "hub")      # the Hub's 4.x config + fp16
  write_hub_cache(model, cache, "EleutherAI/pythia-70m", "step1000")  # HF cache layout

or in one call: `make_checkpoint(tmp_path / "x", form="hub", seed=0)`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

#: The tiny shape every test model has unless overridden (fast on two CPU cores).
TINY_CONFIG = dict(
  vocab_size=97,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=128,
  max_position_embeddings=64,
)

FORMS = ("safetensors", "sharded", "bin", "bin_sharded", "hub", "hub_bin_12b")


@dataclasses.dataclass
class TinyCheckpoint:
  path: Path  # the checkpoint directory (config.json + weights)
  model: object  # the torch GPTNeoXForCausalLM holding exactly the stored weights


def tiny_model(
  seed: int = 0, *, use_parallel_residual: bool = True, rotary_pct: float = 0.25, **overrides
):
  """A seeded random `GPTNeoXForCausalLM` in eval mode, float32.

  Every parameter, biases and LayerNorms included, is drawn from N(0, 0.5^2): the
  default init leaves biases at 0 and LayerNorm scales at 1, which would hide a wrong
  bias or LayerNorm mapping.
  """
  import torch
  import transformers

  kwargs = dict(TINY_CONFIG)
  kwargs.update(overrides)
  config = transformers.GPTNeoXConfig(
    use_parallel_residual=use_parallel_residual,
    rotary_pct=rotary_pct,
    hidden_act="gelu",
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    **kwargs,
  )
  torch.manual_seed(seed)
  model = transformers.GPTNeoXForCausalLM(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, param in sorted(model.named_parameters()):
      param.copy_(0.5 * torch.randn(param.shape, generator=generator))
  return model


def torch_state(model) -> dict[str, np.ndarray]:
  """The model's weights as float32 numpy, by the names save_pretrained writes
  (`gpt_neox.` prefix, `embed_out.weight` for the unembedding)."""
  out = {}
  for name, param in model.named_parameters():
    if name == "lm_head.weight":  # transformers 5 calls embed_out lm_head in memory
      name = "embed_out.weight"
    out[name] = param.detach().float().numpy().copy()
  return out


def write_safetensors(model, directory) -> Path:
  """`save_pretrained`: one model.safetensors and the transformers-5 config.json."""
  directory = Path(directory)
  model.save_pretrained(directory)
  return directory


def write_sharded(model, directory, max_shard_size: str = "20KB") -> Path:
  """`save_pretrained` with small shards: model-0000x-of-0000y.safetensors + index."""
  directory = Path(directory)
  model.save_pretrained(directory, max_shard_size=max_shard_size)
  assert (directory / "model.safetensors.index.json").exists(), "expected a sharded save"
  return directory


def _pythia_buffers(model) -> dict:
  """The non-parameter buffers old Pythia .bin files carry (transformers 4.x)."""
  import torch

  cfg = model.config
  n = cfg.max_position_embeddings
  d_head = cfg.hidden_size // cfg.num_attention_heads
  rope = cfg.rope_parameters
  rot = int(d_head * rope["partial_rotary_factor"])
  inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot))
  mask = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
  extra = {}
  for l in range(cfg.num_hidden_layers):
    p = f"gpt_neox.layers.{l}.attention."
    extra[p + "bias"] = mask
    extra[p + "masked_bias"] = torch.tensor(-1e9)
    extra[p + "rotary_emb.inv_freq"] = inv_freq
  return extra


def write_bin(
  model, directory, *, sharded: bool = False, pythia_buffers: bool = True, n_shards: int = 2
) -> Path:
  """A legacy pytorch_model.bin (or two shards + pytorch_model.bin.index.json).

  transformers 5 no longer writes .bin files, so this uses torch.save as transformers 4
  did, with the mask/rotary buffers old Pythia files hold when `pythia_buffers`.
  """
  import torch

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  model.config.save_pretrained(directory)
  state = {k: torch.from_numpy(v) for k, v in torch_state(model).items()}
  state = {k: v.to(model.dtype) for k, v in state.items()}
  if pythia_buffers:
    state.update(_pythia_buffers(model))
  if not sharded:
    torch.save(state, directory / "pytorch_model.bin")
    return directory
  names = sorted(state)
  cuts = [len(names) * i // n_shards for i in range(n_shards + 1)]
  halves = [names[a:b] for a, b in zip(cuts, cuts[1:])]
  weight_map = {}
  for i, part in enumerate(halves):
    fname = f"pytorch_model-{i + 1:05d}-of-{len(halves):05d}.bin"
    torch.save({k: state[k] for k in part}, directory / fname)
    weight_map.update(dict.fromkeys(part, fname))
  (directory / "pytorch_model.bin.index.json").write_text(
    json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
  )
  return directory


def hub_config_dict(model, torch_dtype: str = "float16") -> dict:
  """config.json as the Hub's Pythia repos have it (transformers 4.x keys; no
  rope_parameters, no dtype, no attention_bias)."""
  cfg = model.config
  return {
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": cfg.hidden_size,
    "initializer_range": 0.02,
    "intermediate_size": cfg.intermediate_size,
    "layer_norm_eps": cfg.layer_norm_eps,
    "max_position_embeddings": cfg.max_position_embeddings,
    "model_type": "gpt_neox",
    "num_attention_heads": cfg.num_attention_heads,
    "num_hidden_layers": cfg.num_hidden_layers,
    "rotary_emb_base": cfg.rope_parameters["rope_theta"],
    "rotary_pct": cfg.rope_parameters["partial_rotary_factor"],
    "tie_word_embeddings": False,
    "torch_dtype": torch_dtype,
    "transformers_version": "4.24.0",
    "use_cache": True,
    "use_parallel_residual": cfg.use_parallel_residual,
    "vocab_size": cfg.vocab_size,
  }


def write_hub_layout(model, directory, dtype: str = "float16"):
  """The Hub's exact layout: float16 (or bfloat16) model.safetensors + 4.x config.json.

  Returns a TinyCheckpoint whose model is a copy cast to `dtype` (the stored weights);
  `model` itself is not changed.
  """
  import torch

  directory = Path(directory)
  stored = copy.deepcopy(model).to(getattr(torch, dtype))
  stored.save_pretrained(directory)
  (directory / "config.json").write_text(json.dumps(hub_config_dict(model, dtype), indent=2))
  for extra in ("generation_config.json",):
    if (directory / extra).exists():
      (directory / extra).unlink()
  return TinyCheckpoint(directory, stored)


def repo_cache_folder(cache_dir, repo_id: str) -> Path:
  return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def write_hub_cache(
  model,
  cache_dir,
  repo_id: str,
  revision: str,
  *,
  form: str = "hub",
  commit: str | None = None,
  blobs: bool = True,
) -> Path:
  """Lays a checkpoint out as huggingface_hub's cache holds a downloaded revision.

  `<cache>/models--Org--name/refs/<revision>` holds the commit hash and
  `snapshots/<commit>/` the files; with `blobs`, as the real cache does, the files live
  in `blobs/<sha256>` and the snapshot holds relative symlinks to them. Returns the
  snapshot folder. `form` is one of FORMS (default: the Hub's fp16 layout).
  """
  repo = repo_cache_folder(cache_dir, repo_id)
  if commit is None:
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
  staging = repo / f".staging-{commit}"
  if staging.exists():
    shutil.rmtree(staging)
  make_checkpoint(staging, form=form, model=model)
  snapshot = repo / "snapshots" / commit
  snapshot.mkdir(parents=True, exist_ok=True)
  for src in sorted(staging.iterdir()):
    dest = snapshot / src.name
    if blobs:
      digest = hashlib.sha256(src.read_bytes()).hexdigest()
      blob = repo / "blobs" / digest
      blob.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(src, blob)
      if dest.exists() or dest.is_symlink():
        dest.unlink()
      os.symlink(os.path.relpath(blob, snapshot), dest)
    else:
      shutil.move(src, dest)
  shutil.rmtree(staging)
  (repo / "refs").mkdir(parents=True, exist_ok=True)
  (repo / "refs" / revision).write_text(commit)  # no newline, as huggingface_hub writes
  return snapshot


def make_checkpoint(
  directory, form: str = "safetensors", seed: int = 0, *, model=None, **model_kwargs
) -> TinyCheckpoint:
  """A tiny checkpoint in `form` (one of FORMS); a new `tiny_model(seed, **model_kwargs)`
  unless `model` is given."""
  if model is None:
    model = tiny_model(seed, **model_kwargs)
  if form == "safetensors":
    return TinyCheckpoint(write_safetensors(model, directory), model)
  if form == "sharded":
    return TinyCheckpoint(write_sharded(model, directory), model)
  if form == "bin":
    return TinyCheckpoint(write_bin(model, directory), model)
  if form == "bin_sharded":
    return TinyCheckpoint(write_bin(model, directory, sharded=True), model)
  if form == "hub":
    return write_hub_layout(model, directory)
  if form == "hub_bin_12b":
    # As the 12b step branches hold it: fp16 pytorch_model-0000X-of-00003.bin + index,
    # the Hub's 4.x config.json.
    import torch

    stored = copy.deepcopy(model).to(torch.float16)
    write_bin(stored, directory, sharded=True, n_shards=3)
    (Path(directory) / "config.json").write_text(json.dumps(hub_config_dict(model), indent=2))
    return TinyCheckpoint(Path(directory), stored)
  raise ValueError(f"unknown form {form!r}; one of {FORMS}")
