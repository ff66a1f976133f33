"""Checkpoint integrity (jax_pythia.checkpoints.integrity): hashes, duplicates, dtypes; 12b-style
sharded .bin checkpoints through the Hub cache (stubbed, as tests/test_checkpoints.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from jax_pythia.checkpoints import hub as ck
from jax_pythia.checkpoints import integrity
from jax_pythia.errors import CheckpointError
from jax_pythia.models import weights
from tests import hf_fixtures as hf


@pytest.fixture(scope="module")
def model():
  return hf.tiny_model(seed=3)


def expected_hash(tensors: dict[str, np.ndarray]) -> str:
  """The documented digest, spelled out: SHA-256 over the tensor digests (each: SHA-256 of
  `name|dtype|shape` newline, then the raw bytes), in name order."""
  whole = hashlib.sha256()
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    one = hashlib.sha256(f"{name}|{arr.dtype.str}|{arr.shape}\n".encode() + arr.tobytes())
    whole.update(one.hexdigest().encode())
  return whole.hexdigest()


def test_hash_is_the_documented_digest_and_ignores_the_file_format(model, tmp_path):
  truth = expected_hash(hf.torch_state(model))
  for form in ("safetensors", "sharded", "bin", "bin_sharded"):
    directory = hf.make_checkpoint(tmp_path / form, form=form, model=model).path
    state = weights.read_state_dict(directory)
    assert integrity.content_hash(state).digest == truth, form
  sharded = integrity.content_hash(weights.read_state_dict(tmp_path / "sharded"))
  assert len(sharded.shards) > 1 and len(set(sharded.shards)) == len(sharded.shards)
  # One changed value changes it; fp16 weights are other weights.
  state = dict(hf.torch_state(model))
  state["embed_out.weight"] = state["embed_out.weight"].copy()
  state["embed_out.weight"][3, 1] += 1e-3
  assert integrity.content_hash(state).digest != truth
  fp16 = hf.write_hub_layout(model, tmp_path / "fp16").path
  assert integrity.content_hash(weights.read_state_dict(fp16)).digest != truth


def test_mixed_dtypes_name_file_and_tensor(model, tmp_path):
  directory = hf.make_checkpoint(tmp_path / "c", form="bin", model=model).path
  state = weights.read_state_dict(directory)
  integrity.check_tensors(state, str(directory))  # one dtype: fine
  state["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"] = state[
    "gpt_neox.layers.1.mlp.dense_4h_to_h.bias"
  ].astype(np.float16)
  with pytest.raises(
    CheckpointError,
    match=r"pytorch_model\.bin: tensor 'gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias' is "
    r"float16, but the checkpoint's other \d+ weights are float32",
  ):
    integrity.check_tensors(state, str(directory))


def test_flag_duplicates():
  a, b, c, d = "a" * 64, "b" * 64, "c" * 64, "d" * 64
  status = pd.DataFrame(
    {
      "model": ["m"] * 6 + ["n"] * 3,
      "step": [0, 1, 2, 5000, 6000, 143000, 0, 1, 143000],
      "weights_hash": [a, a, b, c, c, c, a, None, d],
      "shard_hashes": ["1,2", "1,2", "3,4", "5,6", "5,6", "5,6", "", "", ""],
    }
  )
  flagged = integrity.flag_duplicates(status)
  assert flagged.same_as_step.tolist() == [-1, 0, -1, 143000, 143000, -1, -1, -1, -1]
  assert flagged.flag.tolist()[:6] == [
    "",
    "same weights as step 0",
    "",
    "same weights as the final step 143000",
    "same weights as the final step 143000",
    "",
  ]
  # Another model's equal hash is not a duplicate; a row without a hash is never flagged.
  assert flagged.flag.tolist()[6:] == ["", "", ""]
  # A sharded step holding one of the final's shards (the 12b defect).
  mixed = pd.DataFrame(
    {
      "model": ["m"] * 3,
      "step": [1000, 2000, 143000],
      "weights_hash": [a, b, c],
      "shard_hashes": ["x,y,z", "p,q,w", "x,u,v"],
    }
  )
  assert integrity.flag_duplicates(mixed).flag.tolist() == [
    "weight file(s) 1 of 3 hold the final step 143000's weights",
    "",
    "",
  ]


def test_12b_style_sharded_bin_through_the_hub_cache(model, tmp_path, monkeypatch):
  """The 12b step branches hold only fp16 pytorch_model-0000X-of-00003.bin + index: the
  stubbed Hub lists them, the sweep's fetch picks exactly those, and they load as torch."""
  import huggingface_hub

  real_snapshot_download = huggingface_hub.snapshot_download
  listing = [
    ".gitattributes",
    "config.json",
    "pytorch_model.bin.index.json",
    *[f"pytorch_model-{i:05d}-of-00003.bin" for i in (1, 2, 3)],
  ]
  downloads = []

  def list_repo_files(self, repo_id, revision=None, **kwargs):
    return listing

  def snapshot_download(
    repo_id, *, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None, **kw
  ):
    if local_files_only:
      return real_snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True
      )
    downloads.append(sorted(allow_patterns))
    return str(hf.write_hub_cache(model, cache_dir, repo_id, revision, form="hub_bin_12b"))

  monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  cache = tmp_path / "cache"
  spec = "EleutherAI/pythia-12b-deduped@step3000"
  directory = ck.resolve_checkpoint(spec, cache_dir=cache, local_files_only=False)
  assert downloads == [sorted(listing[1:])]
  fmt, files = weights.find_weight_files(directory)
  assert fmt == "bin" and files[1:] == listing[3:]
  state = weights.read_state_dict(directory)
  integrity.check_tensors(state, directory)
  stored = hf.make_checkpoint(tmp_path / "stored", form="hub_bin_12b", model=model).model
  truth = {k: v.astype(np.float16) for k, v in hf.torch_state(stored).items()}
  digest = integrity.content_hash(state)
  assert digest.digest == expected_hash(truth) and len(digest.shards) == 3
  # Offline, the cached revision is read again without the Hub.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert ck.resolve_checkpoint(spec, cache_dir=cache) == directory


# ------------------------------------------------------------------------ in a sweep


@pytest.fixture(scope="module")
def mixed_suite(tmp_path_factory):
  """fp16 model (the Hub's layout) with step1 = step0, and an fp32 model whose step0 holds
  the final's weights, beside each other in one suite; a tiny uint16 token stream."""
  import shutil

  from tests import suite_fixtures as sf

  root = tmp_path_factory.mktemp("mixed")
  for step, seed in ((0, 10), (2, 12)):
    hf.write_hub_layout(hf.tiny_model(seed), root / "fp16-m" / f"step{step}", dtype="float16")
  shutil.copytree(root / "fp16-m" / "step0", root / "fp16-m" / "step1")
  for step, seed in ((1, 21), (2, 22)):
    hf.write_safetensors(hf.tiny_model(seed), root / "fp32-m" / f"step{step}")
  shutil.copytree(root / "fp32-m" / "step2", root / "fp32-m" / "step0")
  rng = np.random.default_rng(0)
  sf.write_token_stream(root / "data" / "train", rng.integers(0, 97, (4 * 4, 17)))
  return root


def run_sweep(root, out, on_duplicate, figures=True):
  from jax_pythia import data, sweep
  from jax_pythia.checkpoints import sources
  from jax_pythia.sweep import report, results

  models = sources.resolve_models([str(root / "fp16-m"), str(root / "fp32-m")])
  source = data.MMapTokenSource(root / "data" / "train", sequences_per_step=4)
  options = sweep.SweepOptions(n_sequences=4, gradients=False)
  sweep.Sweep(models, "all", source, str(out), options, on_duplicate=on_duplicate).run()
  results.finalize(str(out))
  if figures:
    report.write_report(str(out))
  return pd.read_parquet(out / "checkpoints.parquet"), pd.read_parquet(out / "metrics.parquet")


def test_fp16_and_fp32_models_in_one_sweep_with_duplicates_flagged(mixed_suite, tmp_path):
  out = tmp_path / "keep"
  status, metrics = run_sweep(mixed_suite, out, "keep")
  status = status.set_index(["model", "step"])
  assert (status.status == "ok").all() and len(status) == 6
  # The hashes are those of each file's own dtype (fp16 header vs fp32), spelled out here.
  for model, step in (("fp16-m", 0), ("fp32-m", 1)):
    stored = weights.read_safetensors(mixed_suite / model / f"step{step}" / "model.safetensors")
    assert {a.dtype for a in stored.values()} == {
      np.dtype(np.float16 if model == "fp16-m" else np.float32)
    }
    assert status.loc[(model, step), "weights_hash"] == expected_hash(stored)
  assert status.loc[("fp16-m", 1), "flag"] == "same weights as step 0"
  assert status.loc[("fp32-m", 0), "flag"] == "same weights as the final step 2"
  assert status.loc[("fp32-m", 0), "same_as_step"] == 2
  assert (status.drop([("fp16-m", 1), ("fp32-m", 0)]).flag == "").all()
  # Both models computed from their own weights: the fp16 one's MLP weight norm is that of
  # its fp16 file; the fp32 step0 is the final, so its CKA to the final is 1.
  w = weights.read_safetensors(mixed_suite / "fp16-m" / "step2" / "model.safetensors")
  w_mlp = w["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"].astype(np.float64)
  row = metrics[
    (metrics.model == "fp16-m")
    & (metrics.step == 2)
    & (metrics.component == "mlp")
    & (metrics.metric == "frobenius_norm")
    & (metrics.layer == 1)
  ]
  assert row.value.item() == pytest.approx(np.linalg.norm(w_mlp), rel=1e-5)
  cka = metrics[(metrics.model == "fp32-m") & (metrics.step == 0) & (metrics.metric == "cka")].value
  np.testing.assert_allclose(cka, 1.0, atol=1e-5)
  text = (out / "report.md").read_text()
  assert "| fp16-m | 1 | ok | same weights as step 0 |" in text
  assert "| fp32-m | 0 | ok | same weights as the final step 2 |" in text


def test_on_duplicate_skip_records_instead_of_computing(mixed_suite, tmp_path):
  status, metrics = run_sweep(mixed_suite, tmp_path / "skip", "skip", figures=False)
  status = status.set_index(["model", "step"])
  assert status.loc[("fp16-m", 1), "status"] == "duplicate"
  assert "same weights as step 0" in status.loc[("fp16-m", 1), "message"]
  assert status.loc[("fp32-m", 0), "status"] == "duplicate"
  computed = set(zip(metrics.model, metrics.step))
  assert computed == {("fp16-m", 0), ("fp16-m", 2), ("fp32-m", 1), ("fp32-m", 2)}
