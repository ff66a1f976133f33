"""The fault pass over what round 4 added (issue 18, "Also"): model families, revision
listings and suites, sharded spectra on a mesh, the compilation cache. One test per
defect found; each fault is one line naming the culprit, and nothing is lost (--out is
not claimed by a run that its inputs doom)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jax_pythia import compile_cache, suite
from jax_pythia.checkpoints import converted, revisions, sources, suites
from jax_pythia.errors import CheckpointError, ConfigError, JaxPythiaError, SweepError
from jax_pythia.models import family, weights
from jax_pythia.scale import memory
from jax_pythia.scale.shapes import Shape, Work
from tests import suite_fixtures as sf
from tests.test_compile_cache import _run as compile_in_a_process
from tests.test_faults import one_line_error
from tests.test_faults_round3 import prepared, suite_dir  # noqa: F401  (its fixture)
from tests.test_suites import hub  # noqa: F401  (its fixture: a stubbed Hub, listings cached)
from tests.tool_runs import run_tool

LLAMA = "llama-gqa-2l"  # 4 heads, 2 key/value heads of 8, d_mlp 48 (sf.FAMILY_SUITE_MODELS)


@pytest.fixture(scope="module")
def llama_suite(tmp_path_factory):
  models = {LLAMA: sf.FAMILY_SUITE_MODELS[LLAMA]}
  return sf.write_suite(tmp_path_factory.mktemp("llama"), models=models, steps=(0, 4, 8))


def llama_config(**changes) -> dict:
  """A Llama config.json as transformers writes it (sf.FAMILY_SUITE_MODELS' shape)."""
  config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97,
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
  }  # fmt: skip
  return {**config, **changes}


PICO = {
  "model_type": "pico_decoder", "architectures": ["PicoDecoderHF"], "vocab_size": 97,
  "d_model": 32, "n_layers": 2, "attention_n_heads": 4, "attention_n_kv_heads": 2,
  "activation_hidden_dim": 48, "max_seq_len": 64, "norm_eps": 1e-6,
  "position_emb_theta": 10000.0,
}  # fmt: skip


def load(tmp_path: Path, config: dict):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(config))
  return family.load_config(path)


# ------------------------------------------------------------------ model families


@pytest.mark.parametrize("architectures", [["LlamaForCausalLM", ["x"]], "LlamaForCausalLM", 5])
def test_architectures_of_the_wrong_type_are_named(tmp_path, architectures):
  """A nested list was a TypeError traceback; a bare string was said to disagree."""
  with pytest.raises(ConfigError, match=r"config\.json: architectures=.*: expected a list") as e:
    load(tmp_path, llama_config(architectures=architectures))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "config, expected",
  [  # 0 heads or head dim read as "not given" (n_heads, d_model // n_heads) and ran
    (llama_config(num_key_value_heads=0), "num_key_value_heads=0: must be a positive integer"),
    (llama_config(head_dim=0), "head_dim=0: must be a positive integer"),
    # errors named the dataclass field (d_model, n_kv_heads), not the file's key
    (llama_config(hidden_size=-32), "hidden_size=-32: must be a positive integer"),
    (llama_config(rms_norm_eps=0), "rms_norm_eps=0: must be a positive number"),
    (
      {**PICO, "attention_n_kv_heads": 3},
      "attention_n_kv_heads=3 does not divide attention_n_heads=4",
    ),
  ],
  ids=["kv 0", "head_dim 0", "hidden_size", "rms_norm_eps", "pico kv"],
)
def test_config_values_are_refused_by_the_files_own_key(tmp_path, config, expected):
  with pytest.raises(ConfigError) as caught:
    load(tmp_path, config)
  assert str(caught.value) == f"{tmp_path / 'config.json'}: {expected}"


def test_a_llama_config_without_model_type_is_named_so(tmp_path):
  """It went to GPT-NeoX's reader, which blamed hidden_act='silu'."""
  config = {k: v for k, v in llama_config().items() if k != "model_type"}
  with pytest.raises(ConfigError) as caught:
    load(tmp_path, config)
  expected = 'no model_type; architectures=["LlamaForCausalLM"] is Llama\'s'
  expected += ' (add "model_type": "llama")'
  assert str(caught.value) == f"{tmp_path / 'config.json'}: {expected}"


def test_a_shape_error_names_the_config_sizes_behind_it(llama_suite, tmp_path):
  """A head_dim or num_key_value_heads at odds with the weights was reported with d_model,
  n_heads, d_mlp and vocab_size only, none of which is wrong."""
  good = family.load_config(llama_suite / LLAMA / "step0" / "config.json")
  state = {n: np.zeros(s, np.float32) for n, s in weights.hf_shapes(good).items()}
  wide = load(tmp_path, llama_config(head_dim=16))
  with pytest.raises(CheckpointError, match=r"q_proj.weight': expected shape \[64, 32\] = "
                     r"\[D, d\] .*D = H x dh = 4 heads x 16 head dim"):  # fmt: skip
    weights.convert_state_dict(state, wide)
  # Through the tool: a config.json claiming 4 key/value heads beside 2 heads' weights.
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  os.link(llama_suite / LLAMA / "step0" / "model.safetensors", ckpt / "model.safetensors")
  (ckpt / "config.json").write_text(json.dumps(llama_config(num_key_value_heads=4)))
  np.save(tmp_path / "tokens.npy", np.zeros((2, 8), np.int32))
  result = run_tool(
    "capture", f"--checkpoint={ckpt}", f"--tokens={tmp_path / 'tokens.npy'}",
    "--sites=blocks.0.hook_resid_post", f"--out={tmp_path / 'acts.npz'}",
  )  # fmt: skip
  one_line_error(result, "capture", "k_proj.weight", "Dkv = Hkv x dh = 4 key/value heads x 8")
  assert not (tmp_path / "acts.npz").exists()


def test_value_slice_reference_on_a_llama_is_refused_before_out_is_claimed(llama_suite, tmp_path):
  """It was refused at the first checkpoint, after --out was claimed for 'reference': the
  corrected rerun (per_head) was then refused too, as options other than the record's."""
  out = tmp_path / "out"
  with pytest.raises(SweepError, match=f"{LLAMA}: --value_slice=reference: .* Llama"):
    prepared(llama_suite, out, model=LLAMA, value_slice="reference")
  assert not out.exists()
  prepared(llama_suite, out, model=LLAMA, value_slice="per_head")  # the rerun is welcome
  assert (out / "sweep.json").exists()


def test_value_slice_reference_on_a_hub_llama_is_refused_before_any_work(tmp_path, monkeypatch):
  """A Hub model's family comes from its config.json (here in the Hub cache, offline):
  --value_slice=reference on a Llama is refused before --out is claimed, like a local one."""
  from jax_pythia.sweep import checks
  from tests import hf_fixtures as hf
  from tests.llama_fixtures import tiny_llama

  cache = tmp_path / "hub"
  for repo, model in (("acme/tiny-llama", tiny_llama()), ("acme/tiny-neox", hf.tiny_model())):
    # As the Hub cache holds a revision of which only config.json was fetched.
    folder = hf.repo_cache_folder(cache, repo)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "step4").write_text("a" * 40)
    model.config.save_pretrained(folder / "snapshots" / ("a" * 40))
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")

  def hub_model(repo):
    return sources.ModelSource(repo, repo, (4,), is_hub=True, suite="custom", revisions=("step4",))

  from jax_pythia import sweep

  options = sweep.SweepOptions(value_slice="reference")
  checks.check_value_slice([hub_model("acme/tiny-neox")], options)  # GPT-NeoX: welcome
  with pytest.raises(SweepError, match="acme/tiny-llama: --value_slice=reference: .* Llama"):
    checks.check_value_slice([hub_model("acme/tiny-neox"), hub_model("acme/tiny-llama")], options)
  # Not cached and offline: nothing to read yet; the checkpoint's own fetch names that.
  checks.check_value_slice([hub_model("acme/absent")], options)


@pytest.mark.parametrize(
  "content, why",
  [
    ('{"format_version": 1, "dtype": "float32"}', "TypeError: expected an object with a 'config'"),
    ("[1]", "TypeError: expected an object"),
    ('{"format_version": 1, "dtype": "float32", "config": 5}', "TypeError: expected an object"),
    ("[" * 100_000 + "]" * 100_000, "RecursionError"),
    ('{"config":', "JSONDecodeError"),
  ],
  ids=["no config", "a list", "config not an object", "nested", "truncated"],
)
def test_a_damaged_converted_checkpoints_metadata_is_named(tmp_path, content, why):
  """tools.plan and the sweep read a converted (orbax) checkpoint's config through its
  metadata file: a KeyError, TypeError, AttributeError or RecursionError traceback, or a
  JSON error naming no file."""
  step = tmp_path / "model" / "step0"
  (step / "params").mkdir(parents=True)
  meta = step / "jax_pythia.json"
  meta.write_text(content)
  with pytest.raises(CheckpointError, match=f"{meta}: unreadable \\({why}"):
    converted.converted_config(str(step))
  if why == "RecursionError":  # and through a tool
    result = run_tool(
      "plan", f"--models={tmp_path / 'model'}", "--steps=0", "--devices=1",
      "--flops_per_device=1e12", "--device_memory=16GB",
    )  # fmt: skip
    one_line_error(result, "plan", f"{meta}: unreadable (RecursionError")


# ------------------------------------------------------------------ sharded spectra, mesh


def test_a_mesh_that_cannot_split_the_key_value_heads_is_refused_before_out(llama_suite, tmp_path):
  """A model axis dividing the heads and d_mlp but not the 2 key/value heads: JAX's own
  sharding error at the first load, after --out was claimed; tools.plan priced it."""
  out = tmp_path / "out"
  result = run_tool(
    "sweep", f"--models={llama_suite / LLAMA}", f"--out={out}", "--steps=0", "--mesh=model:4",
    "--n_sequences=6", "--sequences_per_step=8", "--gradient_sequences=4", "--gradient_window=0",
    "--nofigures",
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
  )  # fmt: skip
  one_line_error(result, "sweep", f"--mesh for {LLAMA}: a model axis of 4", "2 key/value heads")
  assert not out.exists()
  result = run_tool(
    "plan", f"--models={llama_suite / LLAMA}", "--steps=0", "--devices=4", "--mesh=model:4",
    "--flops_per_device=1e12", "--device_memory=16GB",
  )  # fmt: skip
  one_line_error(result, "plan", "a model axis of 4 does not divide its 2 key/value heads")
  # Without --mesh, the largest model axis is chosen when nothing fits: 2, not 4.
  shape = Shape(LLAMA, 2, 32, 4, 48, 97, 16, (0, 8), n_kv_heads=2, gated_mlp=True)
  work = Work(n_sequences=6, gradient_window=0, gradient_sequences=4)
  assert memory.choose_mesh(shape, work, 4, device_bytes=1.0) == {"data": 2, "model": 2}


@pytest.mark.parametrize(
  "flags, expected",
  [
    (("--n_sequences=6",), "--n_sequences=6: 6 sequences cannot be split over the data axis"),
    (("--gradient_microbatch=2",), "--gradient_microbatch=2: 2 sequences cannot be split"),
  ],
)
def test_batches_that_the_data_axis_cannot_split_are_refused_before_out(
  suite_dir,  # noqa: F811  (the fixture)
  tmp_path,
  flags,
  expected,
):
  """Refused at the final checkpoint's first call, after --out was claimed for these
  options: the corrected rerun was then refused as "other options"."""
  out = tmp_path / "out"
  result = run_tool(
    "sweep", f"--models={suite_dir / 'small-2l'}", f"--out={out}", "--steps=0", "--mesh=data:4",
    "--sequences_per_step=8", "--n_sequences=8", "--gradient_sequences=8", "--gradient_window=0",
    "--nofigures", *flags, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
  )  # fmt: skip
  one_line_error(result, "sweep", expected, "of 4 devices (--mesh); choose a multiple of 4")
  assert not out.exists()


# ------------------------------------------------------------------ revisions and suites


def rewrite_listing(path: Path, how: str) -> None:
  record = json.loads(path.read_text())
  entries = record["entries"]
  if how == "nested":
    path.write_text("[" * 100_000 + "]" * 100_000)
    return
  if how == "revision an object":
    entries[1][1] = {"sha": "x"}
  elif how == "label null":
    entries[1][0] = None
  elif how == "empty revision":
    entries[1][1] = ""
  elif how == "kind":
    record["kind"] = suites.COMMITS
  path.write_text(json.dumps(record))


@pytest.mark.parametrize(
  "how, why",
  [
    ("nested", "RecursionError"),  # a traceback
    ("revision an object", r"entries\[1\] is \[.*\{\"sha\": \"x\"\}\], not \[label, revision\]"),
    ("label null", r"entries\[1\] is \[null, "),
    ("empty revision", r"entries\[1\] has an empty revision"),
    ("kind", "kind 'commits', expected 'branches'"),
  ],
)  # all but the first were read as a listing (str() of an object as a revision)
def test_a_damaged_cached_listing_is_named(hub, monkeypatch, how, why):  # noqa: F811
  repo = "allenai/OLMo-1B-hf"
  listed = revisions.resolve(repo)  # online (the stub): listed and cached
  path = Path(revisions.cache_path(repo, suites.BRANCHES))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert revisions.resolve(repo) == listed  # offline, from the cache
  rewrite_listing(path, how)
  with pytest.raises(CheckpointError, match=f"{path}: the cached listing of {repo} is damaged "
                     f"\\(.*{why}") as caught:  # fmt: skip
    revisions.resolve(repo)
  assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
  "call, expected",
  [
    (lambda: suite.parse_steps("log:²", (0, 4, 8)), "bad step selection 'log:²'"),
    (lambda: suite.parse_steps("0:²", (0, 4, 8)), "bad step range '0:²'"),
    (lambda: suites.given_revisions("ckpt=²", "org/m"), "'ckpt=²' is not REVISION=STEP"),
    (
      lambda: suites.matched_revisions(r"ckpt-(?P<step>.)", [("ckpt-²", "ckpt-²")], "org/m"),
      "branch 'ckpt-²' matches",
    ),
  ],
)
def test_step_numbers_are_ascii_digits(call, expected):
  """str.isdigit() takes '²', then int() raised 'invalid literal for int()' naming no flag
  (--revisions: a bare ValueError)."""
  with pytest.raises((JaxPythiaError, ValueError)) as caught:
    call()
  assert expected in str(caught.value), str(caught.value)
  assert "invalid literal" not in str(caught.value)


def test_one_revision_is_one_checkpoint(tmp_path):
  """`--revisions=ckpt=1,ckpt=2` swept the same weights as two steps."""
  with pytest.raises(CheckpointError, match="revision 'ckpt' is given for steps 1 and 2"):
    suites.given_revisions("ckpt=1,ckpt=2", "org/m")
  out = tmp_path / "out"
  result = run_tool("sweep", "--models=org/m", "--revisions=ckpt=1,ckpt=2", f"--out={out}")
  one_line_error(result, "sweep", "org/m: revision 'ckpt' is given for steps 1 and 2")
  assert not out.exists()


def test_a_revisions_pattern_is_checked_before_the_listing(tmp_path, monkeypatch):
  """Offline with no cached listing, `--revisions='ckpt-('` was blamed on the listing."""
  monkeypatch.setenv(revisions.CACHE_ENV, str(tmp_path))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(CheckpointError, match=r"--revisions='ckpt-\(': not a regular expression"):
    revisions.resolve("org/m", "ckpt-(")


def test_revisions_are_never_silently_ignored(llama_suite):
  """`--revisions` beside local models only, or given empty, ran as if not given."""
  with pytest.raises(SweepError, match="--revisions='step0=0' names revisions of Hub models"):
    sources.resolve_models([str(llama_suite / LLAMA)], "step0=0")
  with pytest.raises(CheckpointError, match="--revisions is empty"):
    sources.resolve_models(["pythia-70m"], "")


# ------------------------------------------------------------------ the compilation cache


def test_a_damaged_compilation_cache_entry_is_named_and_replaced(tmp_path):
  """JAX warned (two lines, naming the call, not the file) and compiled again, but never
  replaced the entry: every later run warned and compiled that call again."""
  cache = str(tmp_path / "xla")
  first = compile_in_a_process(cache)
  assert first.returncode == 0, first.stderr[-2000:]
  entry = next(n for n in compile_cache.entries(cache) if n.startswith("jit_fn-"))
  with open(os.path.join(cache, entry), "r+b") as f:
    f.truncate(100)  # a write cut short
  second = compile_in_a_process(cache)
  assert second.returncode == 0 and second.stdout == first.stdout, second.stderr[-2000:]
  lines = [x for x in second.stderr.splitlines() if "compil" in x.lower()]
  assert len(lines) == 1 and lines[0].startswith(f"compilation cache: {cache}/{entry} "), lines
  assert os.path.getsize(os.path.join(cache, entry)) > 100  # written anew
  third = compile_in_a_process(cache)
  assert third.returncode == 0 and third.stdout == first.stdout
  assert "compil" not in third.stderr.lower(), third.stderr[-2000:]


def test_a_cache_directory_from_the_environment_is_named_so(tmp_path, monkeypatch):
  """The error named --compilation_cache, a flag the user never gave."""
  blocker = tmp_path / "file"
  blocker.write_text("")
  monkeypatch.setenv(compile_cache.ENV, str(blocker))
  with pytest.raises(compile_cache.CompileCacheError, match=f"^{compile_cache.ENV}='{blocker}'"):
    compile_cache.enable(None)


def test_a_tilde_that_names_no_home_is_refused(tmp_path, monkeypatch):
  """`~nosuchuser/x` stayed unexpanded: a folder named '~nosuchuser' in the working directory."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(compile_cache.CompileCacheError, match="~nosuchuser names no home"):
    compile_cache.enable("~nosuchuser/x")
  assert list(tmp_path.iterdir()) == []
