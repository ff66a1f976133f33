"""checkpoints.py: spec parsing, local step folders, the Hub cache read offline, the
download path (huggingface_hub calls stubbed: no network here), and the orbax cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_pythia.checkpoints import converted
from jax_pythia.checkpoints import hub as ck
from jax_pythia.errors import CheckpointError
from jax_pythia.models import weights
from tests import hf_fixtures as hf


@pytest.fixture(scope="module")
def model():
  return hf.tiny_model(seed=1)


@pytest.fixture(scope="module")
def local(model, tmp_path_factory):
  return hf.make_checkpoint(tmp_path_factory.mktemp("local") / "ckpt", "safetensors", model=model)


@pytest.fixture
def offline(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _assert_matches_torch(params, model):
  """A few leaves against the torch weights (the full layout is test_weights' job)."""
  ref = hf.torch_state(model)
  np.testing.assert_array_equal(
    np.asarray(params["embed_out"]["embedding"], np.float32), ref["embed_out.weight"]
  )
  W = ref["gpt_neox.layers.0.attention.query_key_value.weight"]  # rows [H, 3, dh]
  np.testing.assert_array_equal(
    np.asarray(params["layers"]["attn"]["key"]["kernel"], np.float32)[0, :, 3, :],
    W[3 * 24 + 8 : 3 * 24 + 16].T,
  )


# ------------------------------------------------------------------------- spec parsing


def test_parse_hub_specs():
  s = ck.parse_spec("EleutherAI/pythia-160m-deduped@step3000")
  assert (s.repo_id, s.revision, s.path) == ("EleutherAI/pythia-160m-deduped", "step3000", None)
  assert ck.parse_spec("EleutherAI/pythia-160m-deduped").revision == "main"
  s = ck.parse_spec("pythia-70m@step1000")
  assert (s.repo_id, s.revision) == ("EleutherAI/pythia-70m", "step1000")
  assert ck.parse_spec("pythia-410m-seed3", step=512).revision == "step512"
  assert ck.parse_spec("someone/other-model@v1").repo_id == "someone/other-model"


def test_parse_bad_specs(tmp_path):
  with pytest.raises(CheckpointError, match="not a Pythia model name"):
    ck.parse_spec("pythia-99m@step1000")
  with pytest.raises(CheckpointError, match="contradicts step=2000"):
    ck.parse_spec("pythia-70m@step1000", step=2000)
  with pytest.raises(CheckpointError, match="nope: no such checkpoint directory"):
    ck.parse_spec(str(tmp_path / "nope"))
  with pytest.raises(CheckpointError, match="nope: no such checkpoint directory"):
    ck.load_checkpoint(tmp_path / "nope")
  with pytest.raises(CheckpointError, match="empty"):
    ck.parse_spec(" ")


def test_local_directory_and_step_subfolders(model, tmp_path):
  root = tmp_path / "runs" / "pythia-70m"
  for step in (0, 1000):
    hf.make_checkpoint(root / f"step{step}", "safetensors", model=model)
  assert ck.resolve_checkpoint(root / "step0") == str(root / "step0")
  assert ck.resolve_checkpoint(f"{root}@step1000") == str(root / "step1000")
  assert ck.resolve_checkpoint(root, step=1000) == str(root / "step1000")
  with pytest.raises(CheckpointError, match=r"no step2000 subfolder.*step0, step1000"):
    ck.resolve_checkpoint(root, step=2000)
  with pytest.raises(CheckpointError, match=r"no config\.json.*give a step.*@step1000"):
    ck.resolve_checkpoint(root)


def test_directory_without_weights(model, tmp_path):
  model.config.save_pretrained(tmp_path / "c")
  with pytest.raises(CheckpointError, match="no weights found"):
    ck.resolve_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_checkpoint_puts_params_on_device(model, local, dtype):
  config, params = ck.load_checkpoint(local.path, dtype=dtype)
  assert config.d_model == 32
  leaves = jax.tree.leaves(params)
  assert len(leaves) == 20
  for leaf in leaves:
    assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.dtype(dtype)
    assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if dtype == "float32":
    _assert_matches_torch(params, model)


# ------------------------------------------------------------------------- the Hub cache


@pytest.mark.parametrize("blobs", [True, False])
def test_hub_cache_read_offline_by_repo_and_revision(model, tmp_path, offline, blobs):
  cache = tmp_path / "cache"
  snap = hf.write_hub_cache(model, cache, "EleutherAI/pythia-160m-deduped", "step3000", blobs=blobs)
  assert ck.resolve_checkpoint("EleutherAI/pythia-160m-deduped@step3000", cache_dir=cache) == str(
    snap
  )
  config, params = ck.load_checkpoint("EleutherAI/pythia-160m-deduped@step3000", cache_dir=cache)
  assert config.stored_dtype == "float16"
  fp16 = hf.write_hub_layout(model, tmp_path / "fp16").model  # the stored (rounded) weights
  _assert_matches_torch(params, fp16)


def test_hub_cache_found_through_hf_home_and_short_name(model, tmp_path, offline, monkeypatch):
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  hf.write_hub_cache(
    model, tmp_path / "hf_home" / "hub", "EleutherAI/pythia-70m", "step1000", form="sharded"
  )
  config, params = ck.load_checkpoint("pythia-70m", step=1000)
  _assert_matches_torch(params, model)
  with pytest.raises(CheckpointError, match="pythia-70m@step2000: offline"):
    ck.load_checkpoint("pythia-70m@step2000")


def test_offline_and_not_cached_is_a_clear_error(tmp_path, offline):
  with pytest.raises(
    CheckpointError,
    match=r"EleutherAI/pythia-410m@step143000: offline .*not cached.*"
    r"missing: config\.json",
  ):
    ck.load_checkpoint("EleutherAI/pythia-410m@step143000", cache_dir=tmp_path / "empty")


def test_offline_with_partial_cache_names_the_missing_files(model, tmp_path, offline):
  cache = tmp_path / "cache"
  snap = hf.write_hub_cache(
    model, cache, "EleutherAI/pythia-70m", "step0", form="sharded", blobs=False
  )
  (snap / "model-00002-of-00008.safetensors").unlink()  # an interrupted download
  with pytest.raises(
    CheckpointError, match=r"pythia-70m@step0: offline.*missing: model-00002-of-00008"
  ):
    ck.load_checkpoint("pythia-70m@step0", cache_dir=cache)


def test_download_fetches_one_format_with_retries(model, tmp_path, monkeypatch):
  """The online path, with huggingface_hub's network calls replaced by stubs."""
  import huggingface_hub

  real_snapshot_download = huggingface_hub.snapshot_download
  cache = tmp_path / "cache"
  calls = {"list": 0, "download": []}

  def list_repo_files(self, repo_id, revision=None, **kwargs):
    calls["list"] += 1
    if calls["list"] == 1:
      raise ConnectionError("connection reset")  # transient: retried
    assert (repo_id, revision) == ("EleutherAI/pythia-70m-deduped", "step512")
    return [
      ".gitattributes",
      "config.json",
      "model.safetensors",
      "pytorch_model.bin",
      "tokenizer.json",
    ]

  def snapshot_download(
    repo_id, *, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None, **kwargs
  ):
    if local_files_only:
      return real_snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True
      )
    calls["download"].append(sorted(allow_patterns))
    return str(hf.write_hub_cache(model, cache_dir, repo_id, revision))

  monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  monkeypatch.setattr(ck, "HUB_BACKOFF_S", 0.0)
  spec = "pythia-70m-deduped@step512"
  _, params = ck.load_checkpoint(spec, cache_dir=cache, local_files_only=False)
  assert calls["list"] == 2
  assert calls["download"] == [["config.json", "model.safetensors"]]  # not the .bin
  fp16 = hf.write_hub_layout(model, tmp_path / "fp16").model
  _assert_matches_torch(params, fp16)
  # Now cached: no listing or download at all.
  ck.load_checkpoint(spec, cache_dir=cache, local_files_only=False)
  assert calls["list"] == 2 and len(calls["download"]) == 1


def test_download_gives_up_with_a_clear_error(tmp_path, monkeypatch):
  import huggingface_hub

  def list_repo_files(self, repo_id, revision=None, **kwargs):
    raise TimeoutError("read timed out")

  monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
  monkeypatch.setattr(ck, "HUB_BACKOFF_S", 0.0)
  with pytest.raises(
    CheckpointError, match=r"pythia-70m@step1: the Hub could not be reached after 2 attempts"
  ):
    ck.resolve_checkpoint("pythia-70m@step1", cache_dir=tmp_path, local_files_only=False)


# ------------------------------------------------------------------------- orbax cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_is_exact(local, tmp_path, dtype):
  config, params = ck.load_checkpoint(local.path, dtype=dtype)
  converted.save_converted(tmp_path / "conv", config, params)
  assert converted.is_converted(tmp_path / "conv")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  config2, restored = converted.restore_converted(tmp_path / "conv", sharding=device)
  assert config2 == config
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    assert isinstance(a, jax.Array) and a.sharding == device and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_restore_with_a_sharding_pytree_and_overwrite(local, tmp_path):
  config, params = ck.load_checkpoint(local.path)
  converted.save_converted(tmp_path / "conv", config, params)
  converted.save_converted(tmp_path / "conv", config, params)  # replaces the first one
  assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, restored = converted.restore_converted(
    tmp_path / "conv", sharding=jax.tree.map(lambda _: device, params)
  )
  np.testing.assert_array_equal(
    np.asarray(restored["embed_in"]["embedding"]), np.asarray(params["embed_in"]["embedding"])
  )


def test_interrupted_save_leaves_nothing_that_looks_complete(local, tmp_path, monkeypatch):
  config, params = ck.load_checkpoint(local.path)

  def crash(tmp, directory):
    raise KeyboardInterrupt

  monkeypatch.setattr(weights, "replace_directory", crash)
  with pytest.raises(KeyboardInterrupt):
    converted.save_converted(tmp_path / "conv", config, params)
  assert not converted.is_converted(tmp_path / "conv")
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(CheckpointError, match="conv: not a converted checkpoint"):
    converted.restore_converted(tmp_path / "conv")
