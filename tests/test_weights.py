"""weights.py against independent ground truth: the torch model's own tensors, the
`safetensors` reference reader, and transformers' `from_pretrained` of what we write."""

from __future__ import annotations

import copy
import json
import math
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from jax_pythia.errors import CheckpointError, ConfigError
from jax_pythia.models import convert, weights
from jax_pythia.models.config import GPTNeoXConfig
from tests import hf_fixtures as hf


@pytest.fixture(scope="module")
def model():
  return hf.tiny_model(seed=0)


@pytest.fixture(scope="module")
def ckpts(model, tmp_path_factory):
  """The same model in every on-disk form."""
  root = tmp_path_factory.mktemp("forms")
  return {form: hf.make_checkpoint(root / form, form, model=model) for form in hf.FORMS}


def _load(directory, dtype="float32"):
  config = GPTNeoXConfig.from_json_file(directory / "config.json")
  return config, weights.convert_state_dict(weights.read_state_dict(directory), config, dtype)


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for k in sorted(tree):
      yield from _leaves(tree[k], f"{prefix}/{k}")
  else:
    yield prefix, tree


def _assert_per_head_formula(params, ref, L, H, dh):
  """Checks every leaf against the torch tensors with the layout written out by hand."""
  p = params
  np.testing.assert_array_equal(p["embed_in"]["embedding"], ref["gpt_neox.embed_in.weight"])
  np.testing.assert_array_equal(p["embed_out"]["embedding"], ref["embed_out.weight"])
  np.testing.assert_array_equal(p["ln_f"]["scale"], ref["gpt_neox.final_layer_norm.weight"])
  np.testing.assert_array_equal(p["ln_f"]["bias"], ref["gpt_neox.final_layer_norm.bias"])
  attn, mlp = p["layers"]["attn"], p["layers"]["mlp"]
  for l in range(L):
    t = f"gpt_neox.layers.{l}."
    W, b = ref[t + "attention.query_key_value.weight"], ref[t + "attention.query_key_value.bias"]
    for j, name in enumerate(("query", "key", "value")):
      for h in range(H):
        for i in range(dh):
          row = h * 3 * dh + j * dh + i
          np.testing.assert_array_equal(attn[name]["kernel"][l, :, h, i], W[row, :])
          assert attn[name]["bias"][l, h, i] == b[row]
    dense = ref[t + "attention.dense.weight"]  # [out d, in (h, i)]
    for h in range(H):
      for i in range(dh):
        np.testing.assert_array_equal(attn["out"]["kernel"][l, h, i, :], dense[:, h * dh + i])
    np.testing.assert_array_equal(attn["out"]["bias"][l], ref[t + "attention.dense.bias"])
    for ln, hf_name in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
      np.testing.assert_array_equal(p["layers"][ln]["scale"][l], ref[t + hf_name + ".weight"])
      np.testing.assert_array_equal(p["layers"][ln]["bias"][l], ref[t + hf_name + ".bias"])
    np.testing.assert_array_equal(mlp["fc_in"]["kernel"][l], ref[t + "mlp.dense_h_to_4h.weight"].T)
    np.testing.assert_array_equal(mlp["fc_in"]["bias"][l], ref[t + "mlp.dense_h_to_4h.bias"])
    np.testing.assert_array_equal(mlp["fc_out"]["kernel"][l], ref[t + "mlp.dense_4h_to_h.weight"].T)
    np.testing.assert_array_equal(mlp["fc_out"]["bias"][l], ref[t + "mlp.dense_4h_to_h.bias"])


def test_conversion_matches_torch_per_head_formula(model, ckpts):
  config, params = _load(ckpts["safetensors"].path)
  assert (config.n_layers, config.n_heads, config.d_head) == (2, 4, 8)
  _assert_per_head_formula(params, hf.torch_state(model), L=2, H=4, dh=8)
  for path, leaf in _leaves(params):
    assert leaf.dtype == np.float32, path


@pytest.mark.parametrize("form", ["sharded", "bin", "bin_sharded"])
def test_every_form_gives_identical_params(ckpts, form):
  _, expected = _load(ckpts["safetensors"].path)
  _, got = _load(ckpts[form].path)
  assert [p for p, _ in _leaves(got)] == [p for p, _ in _leaves(expected)]
  for (path, a), (_, b) in zip(_leaves(got), _leaves(expected)):
    np.testing.assert_array_equal(a, b, err_msg=path)


def test_names_without_prefix_and_lm_head_alias(model, ckpts):
  config, expected = _load(ckpts["safetensors"].path)
  renamed = {k.removeprefix("gpt_neox."): v for k, v in hf.torch_state(model).items()}
  renamed["lm_head.weight"] = renamed.pop("embed_out.weight")
  got = weights.convert_state_dict(renamed, config)
  for (path, a), (_, b) in zip(_leaves(got), _leaves(expected)):
    np.testing.assert_array_equal(a, b, err_msg=path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_hub_fp16_layout_loads_in_the_chosen_dtype(ckpts, dtype):
  hub = ckpts["hub"]
  raw = json.loads((hub.path / "config.json").read_text())
  assert "rope_parameters" not in raw and "dtype" not in raw and raw["torch_dtype"] == "float16"
  config, params = _load(hub.path, dtype)
  assert config.stored_dtype == "float16" and config.rotary_pct == 0.25
  assert config.rotary_base == 10000.0
  ref16 = hf.torch_state(hub.model)  # fp16 values, widened exactly to float32
  want = weights.DTYPES[dtype]
  for _, leaf in _leaves(params):
    assert leaf.dtype == want
  if dtype == "bfloat16":
    ref = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in ref16.items()}
  else:
    ref = ref16  # fp16 -> fp32 and fp16 -> fp16 are exact
  as32 = {p: a.astype(np.float32) for p, a in _leaves(params)}
  np.testing.assert_array_equal(as32["/embed_out/embedding"], ref["embed_out.weight"])
  W = ref["gpt_neox.layers.1.attention.query_key_value.weight"]
  # value of head 2, dim 3 of layer 1: row h*3*dh + 2*dh + i
  np.testing.assert_array_equal(as32["/layers/attn/value/kernel"][1, :, 2, 3], W[2 * 24 + 16 + 3])


def test_model_options_reach_the_config(tmp_path):
  ckpt = hf.make_checkpoint(
    tmp_path / "c", "safetensors", seed=3, rotary_pct=0.5, use_parallel_residual=False
  )
  config, params = _load(ckpt.path)
  assert config.rotary_pct == 0.5 and config.use_parallel_residual is False
  _assert_per_head_formula(params, hf.torch_state(ckpt.model), L=2, H=4, dh=8)


def test_safetensors_reader_is_memory_mapped_and_matches_reference(ckpts):
  path = ckpts["sharded"].path / "model-00001-of-00008.safetensors"
  ours = weights.read_safetensors(path)
  ref = safetensors.numpy.load_file(str(path))
  assert set(ours) == set(ref)
  for name, arr in ours.items():
    np.testing.assert_array_equal(arr, ref[name])
    assert not arr.flags.owndata and not arr.flags.writeable  # a view over the mmap


def test_bfloat16_safetensors(tmp_path):
  import safetensors.torch

  t = torch.randn(5, 7).to(torch.bfloat16)
  safetensors.torch.save_file({"x": t}, str(tmp_path / "b.safetensors"))
  got = weights.read_safetensors(tmp_path / "b.safetensors")["x"]
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


def test_params_to_state_dict_inverts_conversion(model, ckpts):
  config, params = _load(ckpts["safetensors"].path)
  back = weights.params_to_state_dict(params, config)
  ref = hf.torch_state(model)
  assert set(back) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(back[k], ref[k], err_msg=k)


@pytest.mark.parametrize("dtype,shard_bytes", [("float32", None), ("float16", 6000)])
def test_saved_checkpoint_loads_in_transformers(model, ckpts, tmp_path, dtype, shard_bytes):
  config, params = _load(ckpts["safetensors"].path)
  out = tmp_path / "saved"
  weights.save_hf_checkpoint(out, params, config, dtype=dtype, shard_bytes=shard_bytes)
  if shard_bytes:
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
  assert not list(tmp_path.glob(".saved.tmp-*"))  # the temp dir was renamed into place
  loaded = transformers.GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  # The reference: the model's weights rounded to the saved dtype (a copy; the fixture
  # is shared).
  ref = model if dtype == "float32" else copy.deepcopy(model).to(torch.float16).float()
  for k, v in hf.torch_state(ref).items():
    np.testing.assert_array_equal(hf.torch_state(loaded)[k], v, err_msg=k)
  ids = torch.tensor([[1, 5, 9, 33, 96, 0, 4]])
  with torch.no_grad():
    np.testing.assert_allclose(
      loaded(ids).logits.numpy(), ref(ids).logits.numpy(), rtol=1e-5, atol=1e-5
    )


def test_save_replaces_an_existing_checkpoint(ckpts, tmp_path):
  config, params = _load(ckpts["safetensors"].path)
  out = tmp_path / "x"
  weights.save_hf_checkpoint(out, params, config, shard_bytes=5000)
  weights.save_hf_checkpoint(out, params, config)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# ------------------------------------------------------------------------- bad input


def _copy(src, dst):
  import shutil

  shutil.copytree(src, dst)
  return dst


def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError, match="nope.*no such checkpoint directory"):
    weights.read_state_dict(tmp_path / "nope")


def test_no_weight_file(ckpts, tmp_path):
  d = _copy(ckpts["safetensors"].path, tmp_path / "d")
  (d / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match=r"/d: no weights found.*model\.safetensors"):
    weights.read_state_dict(d)


def test_truncated_safetensors_names_file_and_tensor(ckpts, tmp_path):
  d = _copy(ckpts["safetensors"].path, tmp_path / "d")
  path = d / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 100])
  header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
  last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
  with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{last}'.*truncated"):
    weights.read_state_dict(d)
  path.write_bytes(data[:50])  # cut inside the header
  with pytest.raises(CheckpointError, match=r"model\.safetensors: safetensors header length"):
    weights.read_state_dict(d)


def test_index_pointing_to_missing_shard(ckpts, tmp_path):
  d = _copy(ckpts["sharded"].path, tmp_path / "d")
  (d / "model-00003-of-00008.safetensors").unlink()
  with pytest.raises(CheckpointError, match=r"index\.json: shard.*model-00003-of-00008"):
    weights.read_state_dict(d)


def _rewrite(d, edit):
  """Applies `edit` to the state dict of d/model.safetensors, via the reference writer."""
  state = safetensors.numpy.load_file(str(d / "model.safetensors"))
  edit(state)
  safetensors.numpy.save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_shape_mismatch_with_config(ckpts, tmp_path):
  d = _copy(ckpts["safetensors"].path, tmp_path / "d")
  cfg = json.loads((d / "config.json").read_text())
  cfg["intermediate_size"] = 64
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(
    CheckpointError,
    match=r"model\.safetensors: tensor 'gpt_neox\.layers\.0\.mlp\.dense_h_to_4h"
    r"\.weight': expected shape \[64, 32\].*found \[128, 32\]",
  ):
    _load(d)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weight(ckpts, tmp_path, bad):
  d = _copy(ckpts["safetensors"].path, tmp_path / "d")
  name = "gpt_neox.layers.1.attention.query_key_value.bias"

  def poison(state):
    state[name] = state[name].copy()
    state[name][17] = bad

  _rewrite(d, poison)
  kind = "NaN" if math.isnan(bad) else "infinite"
  with pytest.raises(CheckpointError, match=rf"tensor '{name}': holds {kind}"):
    _load(d)


def test_overflow_on_cast_is_reported(ckpts, tmp_path):
  d = _copy(ckpts["safetensors"].path, tmp_path / "d")
  name = "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"

  def big(state):
    state[name] = state[name].copy()
    state[name][0, 0] = 1e6  # finite in float32, inf in float16

  _rewrite(d, big)
  _load(d)  # fine in float32
  with pytest.raises(CheckpointError, match=rf"'{name}': holds infinite values \(in float16\)"):
    _load(d, "float16")


def test_missing_tensor(ckpts, tmp_path):
  d = _copy(ckpts["safetensors"].path, tmp_path / "d")
  _rewrite(d, lambda s: s.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
  with pytest.raises(
    CheckpointError,
    match=r"model\.safetensors: missing tensor.*"
    r"layers\.1\.mlp\.dense_4h_to_h\.bias",
  ):
    _load(d)


def test_unexpected_tensor(ckpts, tmp_path):
  d = _copy(ckpts["safetensors"].path, tmp_path / "d")
  _rewrite(
    d, lambda s: s.update({"gpt_neox.layers.0.attention.extra.weight": np.zeros(3, np.float32)})
  )
  with pytest.raises(
    CheckpointError, match=r"model\.safetensors: unexpected tensor.*attention\.extra\.weight"
  ):
    _load(d)


def test_old_pythia_buffers_are_ignored(ckpts):
  state = weights.read_state_dict(ckpts["bin"].path)
  assert "gpt_neox.layers.0.attention.masked_bias" in state  # the fixture holds them
  assert "gpt_neox.layers.0.attention.rotary_emb.inv_freq" in state


class Payload:
  """A class the weights_only unpickler does not allow."""

  def __reduce__(self):
    return (print, ("this would run at load time",))


def test_pickle_needing_more_than_weights_only_is_refused(ckpts, tmp_path):
  d = _copy(ckpts["bin"].path, tmp_path / "d")
  state = torch.load(d / "pytorch_model.bin", weights_only=True)
  state["evil"] = Payload()
  torch.save(state, d / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused.*weights_only"):
    weights.read_state_dict(d)


def test_bin_without_torch_says_how_to_fix(ckpts, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(CheckpointError, match=r"pip install torch==2\.13\.0.*safetensors"):
    weights.read_state_dict(ckpts["bin"].path)


def test_safetensors_preferred_over_bin(ckpts, tmp_path):
  d = _copy(ckpts["safetensors"].path, tmp_path / "d")
  (d / "pytorch_model.bin").write_bytes(b"not read")
  assert weights.find_weight_files(d) == ("safetensors", ["model.safetensors"])
  assert weights.choose_weight_files(
    [
      "pytorch_model.bin",
      "model.safetensors.index.json",
      "model-00001-of-00002.safetensors",
      "config.json",
      "model-00002-of-00002.safetensors",
    ]
  ) == [
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
  ]
  assert weights.choose_weight_files(["pytorch_model.bin", "config.json"]) == ["pytorch_model.bin"]


def test_unsupported_config(ckpts, tmp_path):
  d = _copy(ckpts["safetensors"].path, tmp_path / "d")
  cfg = json.loads((d / "config.json").read_text())
  cfg["hidden_act"] = "gelu_new"
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match=r"config\.json.*hidden_act='gelu_new'"):
    _load(d)


def test_unsupported_dtype_argument(ckpts):
  with pytest.raises(CheckpointError, match="dtype='int8'"):
    _load(ckpts["safetensors"].path, "int8")


@pytest.mark.parametrize(
  "form,dtype",
  [
    ("safetensors", "float32"),
    ("hub", "float32"),
    ("hub", "bfloat16"),
    ("hub", "float16"),
    ("bin", "float32"),
  ],
)
def test_conversion_is_the_exact_cast_of_the_torch_tensors(ckpts, form, dtype):
  """The conversion (by numpy threads on the host for float32 on CPU, by XLA otherwise)
  equals numpy's cast of the torch tensors, bit for bit."""
  config, params = _load(ckpts[form].path, dtype)
  want = weights.DTYPES[dtype]
  ref = {k: v.astype(want) for k, v in hf.torch_state(ckpts[form].model).items()}
  for path, leaf in _leaves(params):
    assert isinstance(leaf, jax.Array) and leaf.dtype == want, path
  _assert_per_head_formula(jax.device_get(params), ref, L=2, H=4, dh=8)


def test_conversion_names_a_non_finite_tensor_of_a_layer(ckpts, tmp_path):
  d = _copy(ckpts["safetensors"].path, tmp_path / "d")
  name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"

  def poison(state):
    state[name] = state[name].copy()
    state[name][3, 4] = math.nan

  _rewrite(d, poison)
  config = GPTNeoXConfig.from_json_file(d / "config.json")
  with pytest.raises(CheckpointError, match=rf"tensor '{name}': holds NaN"):
    weights.convert_state_dict(weights.read_state_dict(d), config)


@pytest.mark.parametrize("stored", [np.float16, ml_dtypes.bfloat16])
def test_host_cast_to_float32_is_exact_for_every_bit_pattern(stored):
  """The host conversion's bit-level float16/bfloat16 -> float32 cast against numpy's own
  cast, over all 65,536 bit patterns (signed zeros, subnormals, the largest values); any
  infinity or NaN makes it report the tensor as not finite."""
  every = np.arange(1 << 16, dtype=np.uint16).view(stored)
  finite = every[np.isfinite(every.astype(np.float32))]
  out = np.empty(finite.shape, np.float32)
  assert convert._cast_into(finite, out)
  np.testing.assert_array_equal(out.view(np.uint32), finite.astype(np.float32).view(np.uint32))
  for bad in every[~np.isfinite(every.astype(np.float32))][::97]:
    tensor = finite.copy()
    tensor[12345] = bad
    assert not convert._cast_into(tensor, np.empty(tensor.shape, np.float32)), bad


@pytest.mark.parametrize(
  "name,index,bad",
  [
    ("embed_out.weight", (7, 3), math.inf),  # a table, cast on the host
    ("gpt_neox.embed_in.weight", (0, 0), -math.inf),
    ("gpt_neox.layers.1.attention.dense.weight", (2, 5), math.nan),  # a layer, laid out by XLA
  ],
)
def test_a_non_finite_float16_tensor_is_named(ckpts, tmp_path, name, index, bad):
  d = _copy(ckpts["hub"].path, tmp_path / "d")

  def poison(state):
    state[name] = state[name].copy()
    state[name][index] = bad

  _rewrite(d, poison)
  kind = "NaN" if math.isnan(bad) else "infinite"
  with pytest.raises(CheckpointError, match=rf"tensor '{name}': holds {kind} values$"):
    _load(d)


def test_host_converted_tables_are_adopted_without_a_copy(ckpts):
  """The float32 tables the host conversion casts are 64-byte aligned, so the CPU device
  adopts them: the jax array reads the numpy buffer's own memory."""
  config = GPTNeoXConfig.from_json_file(ckpts["hub"].path / "config.json")
  state = weights.read_state_dict(ckpts["hub"].path)
  params, flags = convert._host_convert(state, config, np.dtype(np.float32), None)
  table = params["embed_out"]["embedding"]
  assert all(np.all(f) for f in flags.values())
  assert table.unsafe_buffer_pointer() % 64 == 0
  np.testing.assert_array_equal(table, state["embed_out.weight"].astype(np.float32))
