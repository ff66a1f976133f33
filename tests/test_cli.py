"""tools.capture and tools.convert as a user runs them: outputs against torch, and bad input
reported in one line with a non-zero exit and no traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jax_pythia.checkpoints import converted
from jax_pythia.checkpoints import hub as checkpoints
from jax_pythia.models.weights import read_safetensors, write_safetensors
from tests import hf_fixtures as hf
from tests.tool_runs import run_tool


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  ckpt = hf.make_checkpoint(root / "model", form="hub", seed=3)
  tokens = np.random.default_rng(0).integers(0, 97, (5, 12)).astype(np.int32)
  np.save(root / "tokens.npy", tokens)
  return root, ckpt, tokens


def test_capture_writes_every_site_as_torch_computes_it(tiny):
  root, ckpt, tokens = tiny
  out = root / "acts.npz"
  result = run_tool(
    "capture",
    f"--checkpoint={ckpt.path}",
    f"--tokens={root / 'tokens.npy'}",
    "--sites=blocks.*.attn.hook_v,blocks.1.hook_mlp_out",
    "--positions=last",
    "--logits",
    "--batch_size=2",
    f"--out={out}",
  )
  assert result.returncode == 0, result.stderr
  store = {}
  layers = ckpt.model.gpt_neox.layers
  model = ckpt.model.float()
  hooks = [
    layers[l].attention.query_key_value.register_forward_hook(
      lambda m, a, o, l=l: store.__setitem__(l, o.detach().numpy())
    )
    for l in range(2)
  ]
  hooks.append(
    layers[1].mlp.dense_4h_to_h.register_forward_hook(
      lambda m, a, o: store.__setitem__("mlp", o.detach().numpy())
    )
  )
  with torch.no_grad():
    logits = model(torch.tensor(tokens.astype(np.int64))).logits.numpy()
  for h in hooks:
    h.remove()
  with np.load(out) as f:
    assert set(f.files) == {"blocks.*.attn.hook_v", "blocks.1.hook_mlp_out", "logits"}
    v = np.stack([store[l].reshape(5, 12, 4, 3, 8)[:, -1:, :, 2] for l in range(2)])
    np.testing.assert_allclose(f["blocks.*.attn.hook_v"], v, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
      f["blocks.1.hook_mlp_out"], store["mlp"][:, -1:], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(f["logits"], logits, rtol=1e-4, atol=1e-4)


def test_convert_writes_an_orbax_cache_that_restores_the_same_params(tiny):
  root, ckpt, _ = tiny
  result = run_tool("convert", f"--checkpoint={ckpt.path}", f"--out={root / 'cache'}")
  assert result.returncode == 0, result.stderr
  config, params = converted.restore_converted(root / "cache")
  _, direct = checkpoints.load_checkpoint(ckpt.path)
  assert config.n_layers == 2
  np.testing.assert_array_equal(
    params["layers"]["attn"]["value"]["kernel"], direct["layers"]["attn"]["value"]["kernel"]
  )


def _broken_copies(root, ckpt):
  """Damaged copies of the checkpoint, one defect each."""
  import shutil

  cases = {}
  weights_file = ckpt.path / "model.safetensors"
  for name in ("truncated", "nan", "config", "mismatch"):
    target = root / name
    if not target.exists():
      shutil.copytree(ckpt.path, target)
    cases[name] = target
  blob = weights_file.read_bytes()
  (cases["truncated"] / "model.safetensors").write_bytes(blob[: len(blob) // 2])
  tensors = {k: np.array(v) for k, v in read_safetensors(weights_file).items()}
  bad = dict(tensors)
  name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
  bad[name] = bad[name].copy()
  bad[name][0, 0] = np.nan
  write_safetensors(cases["nan"] / "model.safetensors", bad)
  config = json.loads((ckpt.path / "config.json").read_text())
  (cases["config"] / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_new"}))
  (cases["mismatch"] / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
  return cases


@pytest.mark.parametrize(
  "case, expected",
  [
    ("truncated", "model.safetensors"),
    ("nan", "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"),
    ("config", "hidden_act='gelu_new'"),
    ("mismatch", "dense_h_to_4h"),
    ("missing", "no-such-dir"),
  ],
)
def test_bad_checkpoints_fail_in_one_line(tiny, case, expected):
  root, ckpt, _ = tiny
  cases = _broken_copies(root, ckpt)
  path = cases.get(case, root / "no-such-dir")
  result = run_tool(
    "capture",
    f"--checkpoint={path}",
    f"--tokens={root / 'tokens.npy'}",
    "--sites=blocks.0.hook_resid_post",
    f"--out={root / 'x.npz'}",
  )
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("capture: error:") and expected in lines[-1], result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
  "flags, expected",
  [
    (["--sites=blocks.0.hook_nope"], "unknown capture site 'blocks.0.hook_nope'"),
    (["--sites=blocks.0.hook_resid_post", "--positions=first"], "--positions='first'"),
    (["--sites=blocks.0.hook_resid_post", "--tokens=missing.npy"], "missing.npy"),
    (["--sites=blocks.0.hook_resid_post", "--tokens=BIG"], "vocab"),
  ],
)
def test_bad_flags_fail_in_one_line(tiny, flags, expected):
  root, ckpt, _ = tiny
  np.save(root / "big.npy", np.full((2, 4), 500, np.int32))
  args = [f"--checkpoint={ckpt.path}", f"--tokens={root / 'tokens.npy'}", f"--out={root / 'y.npz'}"]
  args += [f.replace("BIG", str(root / "big.npy")) for f in flags]
  result = run_tool("capture", *args)
  assert result.returncode == 2, result.stderr
  assert expected in result.stderr.strip().splitlines()[-1], result.stderr
  assert "Traceback" not in result.stderr


def test_missing_required_flag_is_reported_by_absl(tiny):
  result = run_tool("capture", "--sites=hook_embed")
  assert result.returncode != 0
  assert "--checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("tool", ["sweep", "plan"])
@pytest.mark.parametrize(
  "flag, expected",
  [
    ("--dtype=fp8", "--dtype='fp8': one of float32, bfloat16, float16"),
    ("--matmul_precision=fast", "--matmul_precision='fast': one of default, high, highest"),
  ],
)
def test_an_unknown_precision_fails_in_one_line_before_any_work(tmp_path, tool, flag, expected):
  """Checked first: the sweep's default would otherwise build the toy suite before noticing."""
  result = run_tool(tool, flag, f"--out={tmp_path / 'out'}" if tool == "sweep" else "--measure")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [f"{tool}: error: {expected}"]
  assert not (tmp_path / "out").exists()
