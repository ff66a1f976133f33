"""Where a checkpoint comes from, and loading it as (config, Flax params).

A checkpoint spec is one of:

* a local Hugging Face-format directory (`config.json` + weights);
* a local directory of `step<N>` subfolders plus a step: `runs/pythia-70m@step3000`,
  or `resolve_checkpoint("runs/pythia-70m", step=3000)` (the sweep's `<dir>/<model>/step<N>`);
* a Hub repo id and revision: `EleutherAI/pythia-160m-deduped@step3000` (revision
  defaults to `main`), or a Pythia short name `pythia-70m@step1000`.

Hub files go through `huggingface_hub` and its cache (HF_HOME / HF_HUB_CACHE or
`cache_dir`): a revision already complete in the cache is used without any network call
(Pythia's step revisions never change), so sweeps run offline (`HF_HUB_OFFLINE=1`) once
fetched. Otherwise the revision's files are listed and only `config.json` and the weights
of one format are downloaded, with retries on network errors.

Converted parameters can be cached with orbax (`save_converted` / `restore_converted`)
so repeated sweeps skip the read and the conversion.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

from jax_pythia import remote, suite
from jax_pythia.checkpoints import converted
from jax_pythia.errors import CheckpointError
from jax_pythia.models import family, weights
from jax_pythia.models.config import GPTNeoXConfig

DEFAULT_REVISION = "main"
#: Attempts (with exponential backoff) at each Hub operation before giving up. Kept low:
#: huggingface_hub already retries single HTTP requests; these retry a whole listing or
#: download that failed midway (a dropped connection during a multi-GB shard).
HUB_ATTEMPTS = 2
HUB_BACKOFF_S = 2.0

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """A parsed checkpoint spec: a local `path`, or a Hub `repo_id` at `revision`."""

  path: str | None = None
  repo_id: str | None = None
  revision: str | None = None

  @property
  def is_local(self) -> bool:
    return self.path is not None

  def __str__(self) -> str:
    if self.is_local:
      return self.path
    return f"{self.repo_id}@{self.revision}"


def _looks_like_path(text: str) -> bool:
  return text.startswith((os.sep, ".", "~")) or (os.altsep is not None and os.altsep in text)


def parse_spec(spec: str | os.PathLike, step: int | None = None) -> CheckpointSpec:
  """Parses a checkpoint spec (see the module doc); `step` is the same as `@step<N>`.

  A local directory wins over a Hub repo id of the same spelling; a local directory
  with a revision resolves to its `step<N>` (or `main`) subfolder, which must exist.
  """
  text = os.fspath(spec).strip()
  if not text:
    raise CheckpointError("empty checkpoint spec")
  base, revision = text, None
  # '@' splits a revision off, unless the whole spec is an existing path holding '@'.
  if "@" in text and not os.path.exists(os.path.expanduser(text)):
    base, revision = text.rsplit("@", 1)
    if not revision or not base:
      raise CheckpointError(f"checkpoint spec {text!r}: expected <dir or repo>@<revision>")
  if step is not None:
    step_rev = suite.revision(step)
    if (
      revision is not None
      and revision != step_rev
      and not (revision == "main" and int(step) == suite.FINAL_STEP)
    ):
      raise CheckpointError(f"checkpoint spec {text!r} contradicts step={step}")
    revision = step_rev

  local = os.path.expanduser(base)
  if os.path.isdir(local):
    local = os.path.abspath(local)
    if revision is None:
      return CheckpointSpec(path=local)
    candidates = [revision]
    if revision == "main":
      candidates.append(suite.revision(suite.FINAL_STEP))
    elif revision == suite.revision(suite.FINAL_STEP):
      candidates.append("main")
    for name in candidates:
      if os.path.isdir(os.path.join(local, name)):
        return CheckpointSpec(path=os.path.join(local, name))
    steps = sorted(n for n in os.listdir(local) if suite.STEP_DIR_RE.match(n))
    raise CheckpointError(
      f"{local}: no {revision} subfolder (it holds "
      f"{converted.few_names(steps) if steps else 'no step<N> subfolders'})"
    )
  if _looks_like_path(base) or os.path.exists(local):
    raise CheckpointError(f"{local}: no such checkpoint directory")
  if "/" not in base:
    try:
      repo_id = suite.parse_model(base).repo_id
    except ValueError as e:
      raise CheckpointError(
        f"checkpoint spec {text!r}: not a local directory, and not a Pythia model name ({e})"
      ) from None
  elif _REPO_ID_RE.match(base):
    repo_id = base
  else:
    raise CheckpointError(
      f"checkpoint spec {text!r}: not a local directory and not a Hub repo id (org/name)"
    )
  return CheckpointSpec(repo_id=repo_id, revision=revision or DEFAULT_REVISION)


# --------------------------------------------------------------------------- the Hub


def _env_cache_dir() -> str | None:
  """The Hub cache named by HF_HUB_CACHE / HF_HOME now (huggingface_hub reads them only
  at import); None leaves the choice to huggingface_hub."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.path.expanduser(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
  return None


def _missing_files(folder: str | None) -> list[str]:
  """What a (cached) checkpoint folder still lacks; [] when it is complete."""
  if folder is None or not os.path.isdir(folder):
    return [
      weights.CONFIG_FILE,
      f"weights ({weights.SAFETENSORS_SINGLE} or {weights.BIN_SINGLE} or a sharded index)",
    ]
  missing = (
    [] if os.path.isfile(os.path.join(folder, weights.CONFIG_FILE)) else [weights.CONFIG_FILE]
  )
  try:
    _, files = weights.find_weight_files(folder)
  except CheckpointError:
    return missing + [
      f"weights ({weights.SAFETENSORS_SINGLE} or {weights.BIN_SINGLE} or a sharded index)"
    ]
  return missing + [f for f in files if not os.path.isfile(os.path.join(folder, f))]


def _is_transient(error: BaseException) -> bool:
  """Network trouble worth retrying (not: offline mode, missing repo/revision, auth)."""
  from huggingface_hub import errors as hf_errors

  if isinstance(error, hf_errors.OfflineModeIsEnabled):
    return False
  if isinstance(
    error,
    (
      hf_errors.RepositoryNotFoundError,
      hf_errors.RevisionNotFoundError,
      hf_errors.EntryNotFoundError,
    ),
  ):
    return False
  if isinstance(error, hf_errors.HfHubHTTPError):
    status = getattr(getattr(error, "response", None), "status_code", None)
    return status is None or status == 429 or status >= 500
  if isinstance(error, (ConnectionError, TimeoutError)):
    return True
  return remote.is_transport_error(error)


def _with_retries(call: Callable[[], Any], attempts: int = HUB_ATTEMPTS) -> Any:
  for attempt in range(attempts):
    try:
      return call()
    except Exception as e:  # noqa: BLE001 - classified just below
      if not _is_transient(e) or attempt == attempts - 1:
        raise
      time.sleep(HUB_BACKOFF_S * 2**attempt)
  raise AssertionError("unreachable")


def _cached_snapshot(repo_id: str, revision: str, cache_dir: str | None) -> str | None:
  from huggingface_hub import errors as hf_errors
  from huggingface_hub import snapshot_download

  try:
    return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
  except (hf_errors.LocalEntryNotFoundError, FileNotFoundError):
    return None


def fetch_from_hub(
  repo_id: str,
  revision: str = DEFAULT_REVISION,
  *,
  cache_dir: str | os.PathLike | None = None,
  local_files_only: bool | None = None,
) -> str:
  """The local snapshot folder of `repo_id@revision` holding config.json and weights.

  Uses the cache when the revision is complete there; else (unless offline) lists the
  revision's files and downloads only config.json and one weight format.
  """
  cache_dir = os.fspath(cache_dir) if cache_dir is not None else _env_cache_dir()
  offline = remote.hub_offline() if local_files_only is None else local_files_only
  label = f"{repo_id}@{revision}"
  folder = _cached_snapshot(repo_id, revision, cache_dir)
  missing = _missing_files(folder)
  if not missing:
    return folder
  where = f" in the cache {cache_dir}" if cache_dir else " in the Hugging Face cache"
  if offline:
    raise CheckpointError(
      f"{label}: offline (HF_HUB_OFFLINE=1 or local_files_only) and not cached{where}; "
      f"missing: {', '.join(missing)}. Fetch it once with network access "
      f"(or point the spec at a local directory)"
    )
  files = _list_revision_files(
    repo_id, revision, label, f"not cached{where}; missing: {', '.join(missing)}"
  )
  chosen = weights.choose_weight_files(files)
  if weights.CONFIG_FILE not in files or not chosen:
    raise CheckpointError(
      f"{label}: the revision holds no {'config.json' if chosen else 'weights'} "
      f"(files: {', '.join(sorted(files)[:20])})"
    )
  folder = _download(repo_id, revision, cache_dir, label, [weights.CONFIG_FILE, *chosen])
  missing = _missing_files(folder)
  if missing:
    raise CheckpointError(f"{label}: downloaded snapshot {folder} still lacks {missing}")
  return folder


def fetch_config(repo_id: str, revision: str = DEFAULT_REVISION) -> str | None:
  """The path of `repo_id@revision`'s config.json: from the cache, else (unless offline)
  downloaded alone; None where it cannot be had now (offline and not cached, or the Hub
  unreachable), for the load to name later."""
  cache_dir = _env_cache_dir()
  folder = _cached_snapshot(repo_id, revision, cache_dir)
  if folder is None or not os.path.isfile(os.path.join(folder, weights.CONFIG_FILE)):
    if remote.hub_offline():
      return None
    try:
      folder = _download(repo_id, revision, cache_dir, repo_id, [weights.CONFIG_FILE])
    except Exception:  # the checkpoint's own fetch names what is wrong
      return None
  path = os.path.join(folder, weights.CONFIG_FILE)
  return path if os.path.isfile(path) else None


def _list_revision_files(repo_id: str, revision: str, label: str, why_needed: str) -> list[str]:
  """The revision's file names, with the Hub's refusals and outages as one-line errors."""
  from huggingface_hub import HfApi
  from huggingface_hub import errors as hf_errors

  try:
    return _with_retries(lambda: HfApi().list_repo_files(repo_id, revision=revision))
  except hf_errors.RevisionNotFoundError:
    raise CheckpointError(f"{label}: the repo has no revision {revision!r}") from None
  except hf_errors.RepositoryNotFoundError:
    raise CheckpointError(f"{label}: no such Hub repo (or it is private/gated)") from None
  except Exception as e:
    if _is_transient(e) or isinstance(e, hf_errors.OfflineModeIsEnabled):
      raise CheckpointError(
        f"{label}: the Hub could not be reached after {HUB_ATTEMPTS} attempts "
        f"({type(e).__name__}: {e}) and it is {why_needed}"
      ) from None
    raise


def _download(repo_id: str, revision: str, cache_dir, label: str, patterns: list[str]) -> str:
  """Download only `patterns` of the revision into the cache; its snapshot folder."""
  from huggingface_hub import snapshot_download

  try:
    return _with_retries(
      lambda: snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns
      )
    )
  except Exception as e:
    if _is_transient(e):
      raise CheckpointError(
        f"{label}: downloading {', '.join(patterns[1:])} failed after {HUB_ATTEMPTS} attempts "
        f"({type(e).__name__}: {e})"
      ) from None
    raise


# --------------------------------------------------------------------------- loading


def resolve_checkpoint(
  spec: str | os.PathLike | CheckpointSpec,
  step: int | None = None,
  *,
  cache_dir: str | os.PathLike | None = None,
  local_files_only: bool | None = None,
) -> str:
  """The local directory (config.json + weights) that a checkpoint spec names.

  The one function that maps specs to files: a local directory, `<dir>@step<N>` /
  `step=N` for a directory of step subfolders, or a Hub repo/short name and revision
  (fetched through the cache).
  """
  parsed = spec if isinstance(spec, CheckpointSpec) else parse_spec(spec, step)
  if parsed.is_local:
    directory = parsed.path
    if not os.path.isfile(os.path.join(directory, weights.CONFIG_FILE)):
      steps = sorted(n for n in os.listdir(directory) if suite.STEP_DIR_RE.match(n))
      hint = (
        (
          f"; it holds step subfolders ({converted.few_names(steps)}): give a step, "
          f"e.g. {directory}@{steps[-1]}"
        )
        if steps
        else ""
      )
      raise CheckpointError(f"{directory}: no {weights.CONFIG_FILE}{hint}")
    weights.find_weight_files(directory)  # a clear error now if there are no weights
    return directory
  return fetch_from_hub(
    parsed.repo_id, parsed.revision, cache_dir=cache_dir, local_files_only=local_files_only
  )


def evict_snapshot(directory: str) -> None:
  """Deletes a fetched Hub snapshot (its files and the cache blobs they link to)."""
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if os.path.islink(path):
      target = os.path.realpath(path)
      if os.path.isfile(target):
        os.unlink(target)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
      os.unlink(path)
  shutil.rmtree(directory, ignore_errors=True)


def load_checkpoint(
  spec: str | os.PathLike | CheckpointSpec,
  dtype: Any = "float32",
  *,
  step: int | None = None,
  sharding: Any = None,
  cache_dir: str | os.PathLike | None = None,
  local_files_only: bool | None = None,
) -> tuple[GPTNeoXConfig, Any]:
  """(config, params): the checkpoint converted to Flax params of `dtype`, as jax arrays
  on `sharding` (a Sharding for every leaf, a pytree of them, or None: the first device).
  """
  import jax

  directory = resolve_checkpoint(spec, step, cache_dir=cache_dir, local_files_only=local_files_only)
  config = family.load_config(os.path.join(directory, weights.CONFIG_FILE))
  state = weights.read_state_dict(directory)
  if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
    converted.shardings_like(weights.param_shapes(config), sharding)  # a clear error on a mismatch
  params = weights.convert_state_dict(state, config, dtype, sharding)
  del state  # drop the mmaps once the converted copy exists
  return config, params
