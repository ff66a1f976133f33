"""The defects of a fault-injection run (issue 12), one test each: bad inputs are refused in
one line naming the culprit, nothing a user owns is deleted, nothing wrong is silently kept."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jax_pythia import files, sweep
from jax_pythia.checkpoints import converted, sources
from jax_pythia.checkpoints import hub as checkpoints
from jax_pythia.errors import CheckpointError, ConfigError, JaxPythiaError
from jax_pythia.models import weights
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.sweep import outdir, results
from tests import hf_fixtures as hf
from tests import suite_fixtures as sf
from tests.tool_runs import REPO, run_tool


def one_line_error(result, tool, *expected):
  """The tool failed with exit 2 and one `<tool>: error:` line holding every `expected`."""
  assert result.returncode == 2, (result.returncode, result.stderr)
  assert "Traceback" not in result.stderr, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{tool}: error:"), result.stderr
  for text in expected:
    assert text in last, (text, last)
  return last


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A small suite-like tree: root/model/step0 (a Hub-layout checkpoint) and tokens."""
  root = tmp_path_factory.mktemp("faults")
  ckpt = hf.make_checkpoint(root / "suite" / "model" / "step0", form="hub", seed=5)
  (root / "suite" / "suite.json").write_text(json.dumps({"models": [{"name": "model"}]}))
  tokens = np.random.default_rng(0).integers(0, 97, (3, 10)).astype(np.int32)
  np.save(root / "tokens.npy", tokens)
  return root, ckpt


def snapshot(path: Path) -> dict[str, int]:
  """Every file under `path` (or `path` itself) with its size: what must survive."""
  if path.is_file():
    return {str(path): path.stat().st_size}
  return {str(p): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. convert deletes --out


def test_convert_refuses_to_replace_the_suite_and_deletes_nothing(tiny):
  root, ckpt = tiny
  before = snapshot(root / "suite")
  result = run_tool("convert", f"--checkpoint={ckpt.path}", f"--out={root / 'suite'}")
  one_line_error(result, "convert", str(root / "suite"), "not a converted cache")
  assert snapshot(root / "suite") == before


@pytest.mark.parametrize("target", ["checkpoint", "parent", "file"])
def test_save_converted_refuses_anything_it_did_not_write(tiny, target):
  root, ckpt = tiny
  config, params = checkpoints.load_checkpoint(ckpt.path)
  regular = root / "notes.txt"
  regular.write_text("mine")
  path = {"checkpoint": ckpt.path, "parent": ckpt.path.parent, "file": regular}[target]
  before = snapshot(path)
  with pytest.raises(CheckpointError, match="refusing to replace"):
    converted.save_converted(path, config, params)
  assert snapshot(path) == before


def test_convert_replaces_its_own_cache_and_cleans_what_a_kill_left(tiny, tmp_path):
  _, ckpt = tiny
  config, params = checkpoints.load_checkpoint(ckpt.path)
  cache = tmp_path / "cache"
  converted.save_converted(cache, config, params)
  # What a kill -9 inside an earlier save leaves beside the cache.
  (tmp_path / ".cache.tmp-abc123" / "params").mkdir(parents=True)
  (tmp_path / ".cache.old-def456" / "x").mkdir(parents=True)
  (tmp_path / ".other.tmp-keep").mkdir()  # another cache's: not ours to remove
  doubled = {k: v for k, v in params.items()}
  doubled["embed_in"] = {"embedding": 2 * params["embed_in"]["embedding"]}
  converted.save_converted(cache, config, doubled)
  _, restored = converted.restore_converted(cache)
  np.testing.assert_array_equal(
    restored["embed_in"]["embedding"], 2 * np.asarray(params["embed_in"]["embedding"])
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "cache"]


# ------------------------------------------------------------------ 3. config value types


@pytest.mark.parametrize(
  "key, value, shown",
  [
    ("use_parallel_residual", "false", 'use_parallel_residual="false"'),
    ("use_parallel_residual", 0, "use_parallel_residual=0"),
    ("layer_norm_eps", "1e-5", 'layer_norm_eps="1e-5"'),
    ("layer_norm_eps", None, "layer_norm_eps=null"),
    ("layer_norm_eps", float("nan"), "layer_norm_eps=nan"),
    ("rotary_pct", None, "rotary_pct=null"),
    ("rotary_emb_base", "10000", 'rotary_emb_base="10000"'),
    ("hidden_size", 32.0, "hidden_size=32.0"),
    ("num_attention_heads", True, "num_attention_heads=true"),
    ("tie_word_embeddings", 0, "tie_word_embeddings=0"),
  ],
)
def test_config_values_of_the_wrong_type_are_refused_naming_file_key_value(
  tmp_path, key, value, shown
):
  model = hf.tiny_model(0)
  config = {**hf.hub_config_dict(model), key: value}
  path = tmp_path / "config.json"
  path.write_text(json.dumps(config))
  with pytest.raises(ConfigError) as caught:
    GPTNeoXConfig.from_json_file(path)
  message = str(caught.value)
  assert str(path) in message and "\n" not in message
  assert shown in message


@pytest.mark.parametrize("key", ["partial_rotary_factor", "rope_theta"])
def test_rope_parameters_of_the_wrong_type_are_refused(tmp_path, key):
  config = hf.tiny_model(0).config.to_dict()
  config["rope_parameters"] = {**config["rope_parameters"], key: None}
  path = tmp_path / "config.json"
  path.write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=rf"config\.json: rope_parameters\.{key}=null"):
    GPTNeoXConfig.from_json_file(path)


def test_the_valid_configs_still_load(tmp_path):
  model = hf.tiny_model(0, use_parallel_residual=False)
  for name, config in (("hub", hf.hub_config_dict(model)), ("v5", model.config.to_dict())):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    loaded = GPTNeoXConfig.from_json_file(tmp_path / name / "config.json")
    assert loaded.use_parallel_residual is False and loaded.layer_norm_eps == 1e-5


def test_a_config_that_is_not_utf8_is_refused_naming_the_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_bytes(b'{"model_type": "gpt_neox", "name": "\xff\xfe"}')
  with pytest.raises(ConfigError, match=rf"{path}: not UTF-8"):
    GPTNeoXConfig.from_json_file(path)


# ------------------------------------------------------------------ unclear errors of the tools


@pytest.mark.parametrize(
  "shape, expected",
  [((4, 0), "(4, 0)"), ((0, 16), "(0, 16)"), ((2, 65), "at most 64 (max_position_embeddings)")],
)
def test_capture_refuses_empty_or_too_long_tokens_in_one_line(tiny, shape, expected):
  root, ckpt = tiny
  tokens = root / f"tokens_{shape[0]}x{shape[1]}.npy"
  np.save(tokens, np.zeros(shape, np.int32))
  out = root / "empty.npz"
  result = run_tool(
    "capture",
    f"--checkpoint={ckpt.path}",
    f"--tokens={tokens}",
    "--sites=blocks.0.hook_resid_post",
    f"--out={out}",
  )
  line = one_line_error(result, "capture", str(tokens), expected)
  if shape[1] > 64:
    assert str(ckpt.path) in line  # names the model whose limit it is
  assert not out.exists()


@pytest.mark.parametrize(
  "flag, expected",
  [
    ("--devices=0", "--devices=0: must be a finite number > 0"),
    ("--utilisation=-0.4", "--utilisation=-0.4: must be in (0, 1]"),
    ("--utilisation=1.5", "--utilisation=1.5: must be in (0, 1]"),
    ("--models=", "--models is empty"),
  ],
)
def test_plan_refuses_impossible_numbers(flag, expected):
  result = run_tool("plan", "--devices=8", "--flops_per_device=1e12", flag)
  one_line_error(result, "plan", expected)


def test_sweep_refuses_an_empty_model_list(tmp_path):
  result = run_tool("sweep", "--models=", f"--out={tmp_path / 'out'}")
  one_line_error(result, "sweep", "--models is empty")
  assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ smaller things


def test_result_files_follow_the_umask(tiny, tmp_path):
  old = os.umask(0o022)
  try:
    files.save_npz(tmp_path / "a.npz", {"x": np.zeros(3)})
    directory = files.make_temp_dir(str(tmp_path), ".d.tmp-")
    config, params = checkpoints.load_checkpoint(tiny[1].path)
    converted.save_converted(tmp_path / "cache", config, params)
    weights.save_hf_checkpoint(tmp_path / "hf", params, config)
  finally:
    os.umask(old)
  assert stat.S_IMODE((tmp_path / "a.npz").stat().st_mode) == 0o644
  for made in (directory, tmp_path / "cache", tmp_path / "hf"):
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o755, made
  assert stat.S_IMODE((tmp_path / "hf" / "config.json").stat().st_mode) == 0o644


def test_a_cpu_run_prints_only_the_tools_own_lines(tiny, tmp_path):
  """No `Unable to initialize backend 'tpu'` (jax looks for every platform when
  JAX_PLATFORMS is unset), unless --verbosity asks for library logs."""
  root, ckpt = tiny
  args = [
    f"--checkpoint={ckpt.path}",
    f"--tokens={root / 'tokens.npy'}",
    "--sites=blocks.0.hook_resid_post",
    f"--out={tmp_path / 'a.npz'}",
  ]
  env = {"JAX_PLATFORMS": None, "MPLCONFIGDIR": str(tmp_path / "mpl")}
  result = run_tool("capture", *args, env=env)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  assert result.stdout.startswith(f"wrote {tmp_path / 'a.npz'}")
  chatty = run_tool("capture", *args, "--verbosity=0", env=env)
  assert "Unable to initialize backend" in chatty.stderr


def test_a_full_disk_names_the_file_being_written_and_leaves_nothing(tmp_path):
  def fill_the_disk(tmp):
    with open(tmp, "wb") as f:
      f.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  target = tmp_path / "out" / "metrics.parquet"
  with pytest.raises(OSError) as caught:
    files.atomic_write(target, fill_the_disk, ".parquet")
  assert str(caught.value).startswith(f"{target}: cannot write it: No space left on device")
  assert "[Errno" not in str(caught.value)
  assert list((tmp_path / "out").iterdir()) == []


def test_a_file_in_the_way_of_an_output_directory_is_named(tmp_path):
  (tmp_path / "out").write_text("not a directory")
  with pytest.raises(OSError, match=rf"{tmp_path / 'out'} is in the way"):
    files.save_npz(tmp_path / "out" / "a.npz", {"x": np.zeros(1)})


# ------------------------------------------------------------------ the sweep

SWEEP_FLAGS = ["--steps=4,8", "--nogradients", "--nofigures", "--n_sequences=6"]


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
  return sf.write_suite(tmp_path_factory.mktemp("suite"))


def copy_model(suite_dir, name, destination):
  """A copy of one model of the suite (with its data and manifest) to damage."""
  shutil.copytree(suite_dir / "data", destination / "data")
  shutil.copy(suite_dir / "suite.json", destination / "suite.json")
  shutil.copytree(suite_dir / name, destination / name)
  return destination / name


def test_a_sweep_error_starts_on_a_line_of_its_own(suite_dir, tmp_path):
  """The final checkpoint fails within tqdm's delay, which then leaves its bar unended."""
  model = copy_model(suite_dir, "small-2l", tmp_path / "suite")
  weights = model / "step8" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000])
  result = run_tool("sweep", f"--models={model}", f"--out={tmp_path / 'out'}", *SWEEP_FLAGS)
  one_line_error(result, "sweep", "small-2l step 8", str(weights))


# ------------------------------------------------------------------ 2, 8. what --out records

OPTIONS = dict(n_sequences=6, gradients=False)


def prepared(models, steps, source, out, **options):
  """A sweep checked and claimed (--out recorded), nothing computed."""
  runner = sweep.Sweep(
    models, steps, source, str(out), sweep.SweepOptions(**{**OPTIONS, **options})
  )
  runner.prepare()
  return runner


def test_a_rerun_with_other_inputs_is_refused_naming_the_flag_and_both_values(suite_dir, tmp_path):
  out = tmp_path / "out"
  models = sources.resolve_models([str(suite_dir / "small-2l")])
  train = suite_dir / "data" / "train"
  prepared(models, "8", sources.open_data(str(train), models, None, 8), out)

  other = tmp_path / "other" / "train"  # another token stream of the same shape
  rng = np.random.default_rng(7)
  sf.write_token_stream(other, rng.integers(0, sf.VOCAB, (88, sf.SEQ_LEN + 1)))
  with pytest.raises(JaxPythiaError) as caught:
    prepared(models, "8", sources.open_data(str(other), models, None, 8), out)
  message = str(caught.value)
  assert "--data: old " in message and f"{train}.idx" in message and f"{other}.idx" in message

  with pytest.raises(JaxPythiaError, match="--sequences_per_step: old 8, new 4"):
    prepared(models, "8", sources.open_data(str(train), models, None, 4), out, n_sequences=4)

  moved = tmp_path / "moved" / "small-2l"
  shutil.copytree(suite_dir / "small-2l", moved)
  elsewhere = sources.resolve_models([str(moved)])
  with pytest.raises(JaxPythiaError, match=r"--models \(small-2l's checkpoints\): old .*, new "):
    prepared(elsewhere, "8", sources.open_data(str(train), elsewhere, None, 8), out)

  with pytest.raises(JaxPythiaError, match=r'--value_slice: old "per_head", new "reference"'):
    prepared(
      models, "8", sources.open_data(str(train), models, None, 8), out, value_slice="reference"
    )

  # The same inputs, and another model beside, are welcome.
  both = sources.resolve_models([str(suite_dir)])
  prepared(both, "8", sources.open_data(str(train), both, None, 8), out)
  record = json.loads((out / "sweep.json").read_text())
  assert sorted(record["models"]) == ["large-3l", "small-2l"]


def test_a_run_refused_for_its_inputs_does_not_claim_out(suite_dir, tmp_path):
  out = tmp_path / "out"
  models = sources.resolve_models([str(suite_dir / "small-2l")])
  source = sources.open_data(str(suite_dir / "data" / "train"), models, None, 8)
  with pytest.raises(JaxPythiaError, match=r"^--n_sequences=100: "):
    prepared(models, "8", source, out, n_sequences=100)
  assert not (out / "sweep.json").exists()
  with pytest.raises(JaxPythiaError, match=r"^--n_sequences=3: .* 3 samples"):
    prepared(models, "8", source, out, n_sequences=3)  # before compiling anything
  prepared(models, "8", source, out, n_sequences=6)  # the corrected flags are welcome


@pytest.mark.parametrize(
  "damage, expected",
  [
    ("sweep.json", "sweep.json: the record of the options"),
    ("status", "step8.json: a status record is damaged"),
  ],
)
def test_damaged_json_in_out_is_named(suite_dir, tmp_path, damage, expected):
  out = tmp_path / "out"
  models = sources.resolve_models([str(suite_dir / "small-2l")])
  source = sources.open_data(str(suite_dir / "data" / "train"), models, None, 8)
  prepared(models, "8", source, out)
  if damage == "sweep.json":
    (out / "sweep.json").write_text('{"options": {"n_seq')
    with pytest.raises(JaxPythiaError, match=expected):
      prepared(models, "8", source, out)
  else:
    status = out / "status" / "small-2l" / "step8.json"
    status.parent.mkdir(parents=True)
    status.write_bytes(b"\x00\x00\x00")
    with pytest.raises(JaxPythiaError, match=expected):
      results.collect(str(out))
  acts = out / "activations" / "small-2l" / "step8.npz"
  acts.parent.mkdir(parents=True)
  acts.write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(JaxPythiaError, match=f"{acts}: damaged"):
    results.load_activations(str(acts))


def test_out_that_is_a_file_is_named(suite_dir, tmp_path):
  out = tmp_path / "results"
  out.write_text("a file")
  result = run_tool("sweep", f"--models={suite_dir / 'small-2l'}", f"--out={out}", *SWEEP_FLAGS)
  one_line_error(result, "sweep", f"--out={out} is a file")


# ------------------------------------------------------------------ 4-7. runs into one --out


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """One persistent XLA cache for this module's sweep processes: each compiles once."""
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache"))}


def start_sweep(model, out, *flags, env):
  full = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", **env}
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "tools.sweep",
      f"--models={model}",
      f"--out={out}",
      *SWEEP_FLAGS,
      *flags,
    ],
    cwd=REPO,
    env=full,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def finish(proc, timeout=400):
  stdout, stderr = proc.communicate(timeout=timeout)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def lock_waiters(path: Path) -> int:
  """Processes blocked on the flock of `path` (the `->` lines of /proc/locks)."""
  inode = f":{path.stat().st_ino} "
  lines = Path("/proc/locks").read_text().splitlines()
  return sum(1 for line in lines if "->" in line and inode in line + " ")


@pytest.fixture(scope="module")
def race(suite_dir, tmp_path_factory, compile_cache):
  """Two sweeps with different --seed started into one --out while it is locked, so both
  reach the claim before either can finish it; then the lock is released."""
  if not Path("/proc/locks").exists():
    pytest.skip("needs Linux /proc/locks to see processes waiting on the lock")
  out = tmp_path_factory.mktemp("race") / "out"
  out.mkdir()
  lock = out / outdir.LOCK_FILE
  fd = os.open(lock, os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX)
  model = suite_dir / "small-2l"
  procs = {seed: start_sweep(model, out, f"--seed={seed}", env=compile_cache) for seed in (0, 1)}
  try:
    deadline = time.time() + 240
    while lock_waiters(lock) < 2 and time.time() < deadline:
      assert all(p.poll() is None for p in procs.values()), "a sweep ran without the lock"
      time.sleep(0.2)
    waiting = lock_waiters(lock)
  finally:
    os.close(fd)
  results = {seed: finish(p) for seed, p in procs.items()}
  assert waiting == 2, {s: r.stderr[-2000:] for s, r in results.items()}
  return out, results


def test_two_sweeps_with_different_options_cannot_both_claim_one_out(race):
  out, results = race
  codes = sorted(r.returncode for r in results.values())
  assert codes == [0, 2], {s: r.stderr[-2000:] for s, r in results.items()}
  loser = next(r for r in results.values() if r.returncode == 2)
  one_line_error(loser, "sweep", "--seed: old ")
  winner = next(s for s, r in results.items() if r.returncode == 0)
  assert json.loads((out / "sweep.json").read_text())["options"]["seed"] == winner


def test_two_identical_sweeps_at_once_write_one_correct_table(
  race, suite_dir, tmp_path, compile_cache
):
  out, results = race
  seed = next(s for s, r in results.items() if r.returncode == 0)
  together = tmp_path / "together"
  procs = [
    start_sweep(suite_dir / "small-2l", together, f"--seed={seed}", env=compile_cache)
    for _ in range(2)
  ]
  for result in map(finish, procs):
    assert result.returncode == 0, result.stderr[-2000:]
  for table in ("metrics", "pairwise_cka"):
    pd.testing.assert_frame_equal(
      pd.read_parquet(together / f"{table}.parquet"), pd.read_parquet(out / f"{table}.parquet")
    )
  status = pd.read_parquet(together / "checkpoints.parquet")
  assert list(status.step) == [4, 8] and set(status.status) == {"ok"}


@pytest.fixture(scope="module")
def two_models(race, suite_dir, tmp_path_factory, compile_cache):
  """The race's --out (small-2l), then a second run with large-3l only into it."""
  out, results = race
  seed = next(s for s, r in results.items() if r.returncode == 0)
  both = tmp_path_factory.mktemp("two") / "out"
  shutil.copytree(out, both)
  second = finish(start_sweep(suite_dir / "large-3l", both, f"--seed={seed}", env=compile_cache))
  assert second.returncode == 0, second.stderr[-2000:]
  return both, seed


def test_pairwise_cka_keeps_the_models_of_earlier_runs(two_models):
  out, _ = two_models
  pairs = pd.read_parquet(out / "pairwise_cka.parquet")
  counts = pairs.groupby("model").size()
  assert sorted(counts.index) == ["large-3l", "small-2l"]
  # Every ordered pair of the 2 steps, per layer, head and estimator of each component.
  metrics = pd.read_parquet(out / "metrics.parquet")
  assert set(metrics.model) == {"large-3l", "small-2l"}
  assert counts["small-2l"] > 0 and counts["large-3l"] > counts["small-2l"]


def test_a_rerun_recomputes_damaged_steps_and_restores_lost_statuses(
  two_models, suite_dir, tmp_path, compile_cache
):
  clean, seed = two_models
  out = tmp_path / "out"
  shutil.copytree(clean, out)
  (out / "status" / "small-2l" / "step4.json").unlink()  # died between rows and status
  rows = out / "checkpoints" / "large-3l" / "step4.parquet"
  rows.write_bytes(rows.read_bytes()[:-200])  # truncated
  acts = out / "activations" / "small-2l" / "step8.npz"
  acts.write_bytes(acts.read_bytes()[: len(acts.read_bytes()) // 2])
  untouched = out / "checkpoints" / "small-2l" / "step4.parquet"
  mtime = untouched.stat().st_mtime_ns
  for name in ("metrics", "pairwise_cka", "checkpoints"):
    (out / f"{name}.parquet").unlink()
  result = finish(start_sweep(suite_dir, out, f"--seed={seed}", env=compile_cache))
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stderr.splitlines()
  assert any(
    l.startswith("large-3l step 4: ") and str(rows) in l and "computing it again" in l
    for l in lines
  ), result.stderr
  assert any(l.startswith("small-2l step 8: ") and str(acts) in l for l in lines), result.stderr
  assert "4 checkpoints, 2 already done" in result.stdout
  assert untouched.stat().st_mtime_ns == mtime  # a whole step is not recomputed
  status = pd.read_parquet(out / "checkpoints.parquet")
  assert len(status) == 4 and set(status.status) == {"ok"}
  for table in ("metrics", "pairwise_cka"):
    pd.testing.assert_frame_equal(
      pd.read_parquet(out / f"{table}.parquet"), pd.read_parquet(clean / f"{table}.parquet")
    )


# ------------------------------------------------------------------ skipping a bad checkpoint


@pytest.mark.parametrize("fault", ["string_eps", "other_architecture"])
def test_a_config_fault_mid_sweep_is_skipped_under_on_error_skip(suite_dir, tmp_path, fault):
  model = copy_model(suite_dir, "small-2l", tmp_path / "suite")
  config_path = model / "step4" / "config.json"
  if fault == "string_eps":
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "layer_norm_eps": "1e-5"}))
    expected = 'layer_norm_eps="1e-5"'
  else:  # a valid checkpoint, but not of the model the final step is
    shutil.rmtree(model / "step4")
    shutil.copytree(suite_dir / "large-3l" / "step4", model / "step4")
    expected = "a different architecture"
  models = sources.resolve_models([str(model)])
  source = sources.open_data(None, models, None, None)
  options = sweep.SweepOptions(**OPTIONS)
  out = tmp_path / "out"
  runner = sweep.Sweep(models, "2,4,8", source, str(out), options, on_error="skip")
  runner.run()
  results.finalize(str(out))
  status = pd.read_parquet(out / "checkpoints.parquet").set_index("step")
  assert list(status.status) == ["ok", "failed", "ok"]
  assert expected in status.loc[4, "message"]
  with pytest.raises(JaxPythiaError, match=f"small-2l step 4: .*{expected}"):
    sweep.Sweep(models, "4,8", source, str(tmp_path / "stop"), options).run()
