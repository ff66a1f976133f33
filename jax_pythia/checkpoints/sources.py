"""Where a sweep's checkpoints and tokens come from: model sources and suite manifests.

A model is a Pythia name (`pythia-160m-deduped`), a Hub id (`org/name`), a directory of
`step<N>/` checkpoints, or a suite directory holding several such models. A suite
directory may carry a manifest, `suite.json` (`MANIFEST_FILE`; the toy suite writes one):
its `models` (in order, smallest first), `data_prefix` and `tokenizer` (relative to the
suite directory) and `sequences_per_step`. `read_manifest` is the one reader of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

from jax_pythia import data, suite
from jax_pythia.checkpoints import revisions as hub_revisions
from jax_pythia.data import olmo, staged
from jax_pythia.errors import SweepError

MANIFEST_FILE = "suite.json"
LOCAL = "local"


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where one model's checkpoints live: a local directory of step<N>/ or a Hub repo."""

  name: str
  location: str  # directory holding step<N>/ subfolders, or a Hub repo id
  steps: tuple[int, ...]  # every checkpoint available
  is_hub: bool = False
  suite_dir: str | None = None  # the suite directory (with suite.json) it belongs to
  #: The checkpoint suite it belongs to (`suites.SUITES`' names, `custom` for --revisions,
  #: a local suite's manifest `suite` or directory name, `local` for a lone directory).
  suite: str = LOCAL
  #: A Hub model's revision of each of `steps` (None: `step<N>`, Pythia's and the folders').
  revisions: tuple[str, ...] | None = None

  @property
  def final_step(self) -> int:
    return self.steps[-1]

  def revision(self, step: int) -> str:
    if self.revisions is None:
      return suite.revision(step)
    return self.revisions[self.steps.index(step)]

  def spec(self, step: int) -> str:
    return f"{self.location}@{self.revision(step)}"


def resolve_models(names: Sequence[str], revisions: str | None = None) -> list[ModelSource]:
  """Models from suite names (`pythia-160m-deduped`), Hub ids (`org/name`, or
  `org/name@SERIES` for a series of a suite that has several), directories holding
  `step<N>/` checkpoints, or suite directories holding several such models.

  A Hub model's checkpoints come from its suite's revision scheme, or from `revisions`
  (--revisions: a `REVISION[=STEP],...` list or a regular expression over its branches)."""
  models: list[ModelSource] = []
  for name in names:
    path = os.path.expanduser(name)
    if os.path.isdir(path):
      models += _local_models(os.path.abspath(path))
    else:
      models.append(_hub_model(name, revisions))
  if revisions is not None and not any(m.is_hub for m in models):
    raise SweepError(
      f"--revisions={revisions!r} names revisions of Hub models; --models are local "
      "directories, whose checkpoints are their step<N>/ folders (choose them with --steps)"
    )
  seen = set()
  for m in models:
    if m.name in seen:
      raise SweepError(f"--models: model name {m.name!r} appears twice")
    seen.add(m.name)
  return models


def _local_models(path: str) -> list[ModelSource]:
  steps = suite.local_steps(path)
  if steps:
    parent = os.path.dirname(path)
    suite_dir = parent if os.path.isfile(os.path.join(parent, MANIFEST_FILE)) else None
    label = _suite_label(suite_dir)
    return [ModelSource(os.path.basename(path), path, steps, suite_dir=suite_dir, suite=label)]
  members = sorted(
    n
    for n in os.listdir(path)
    if os.path.isdir(os.path.join(path, n)) and suite.local_steps(os.path.join(path, n))
  )
  if not members:
    raise SweepError(f"--models: {path} holds no step<N>/ checkpoints (nor models that do)")
  suite_dir = path if os.path.isfile(os.path.join(path, MANIFEST_FILE)) else None
  label = _suite_label(suite_dir or path)
  return [
    ModelSource(
      m,
      os.path.join(path, m),
      suite.local_steps(os.path.join(path, m)),
      suite_dir=suite_dir,
      suite=label,
    )
    for m in _manifest_order(path, members)
  ]


def _suite_label(suite_dir: str | None) -> str:
  """A local suite's label: its manifest's `suite`, else its directory's name."""
  if suite_dir is None:
    return LOCAL
  return str((read_manifest(suite_dir) or {}).get("suite") or os.path.basename(suite_dir))


def _hub_model(name: str, revisions: str | None) -> ModelSource:
  base, _, series = name.partition("@")
  try:
    repo_id = suite.parse_model(base).repo_id
  except ValueError as e:
    if not re.match(r"^[\w.-]+/[\w.-]+$", base) or base.startswith("."):
      raise SweepError(f"--models: unknown model {name!r}: not a directory and {e}") from None
    repo_id = base
  found = hub_revisions.resolve(repo_id, revisions, series or None)
  label = repo_id.split("/")[-1] + (f"@{series}" if series else "")
  return ModelSource(
    label,
    repo_id,
    found.steps,
    is_hub=True,
    suite=found.suite,
    revisions=tuple(c.revision for c in found.checkpoints),
  )


def _manifest_order(suite_dir: str, members: list[str]) -> list[str]:
  """Models in the manifest's order (smallest first), else alphabetical."""
  manifest = read_manifest(suite_dir) or {}
  order = [m["name"] for m in manifest.get("models", [])]
  known = [m for m in order if m in members]
  return known + [m for m in members if m not in known]


def read_manifest(suite_dir: str | os.PathLike | None) -> dict | None:
  """The suite's `suite.json` as a dict; None when there is none (or no suite_dir)."""
  if not suite_dir:
    return None
  path = os.path.join(os.fspath(suite_dir), MANIFEST_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise SweepError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None


def data_location(path: str | None, models: Sequence[ModelSource]) -> tuple[str, dict]:
  """(what the sweep reads, the suite manifest it came from or {}): --data, else the Hub
  stream Pythia models trained on, else the data of the suite the models come from."""
  if path is not None:
    return path, {}
  if models and all(m.is_hub and m.suite == "pythia" for m in models):
    from jax_pythia.data import streams

    # Pythia on the Hub trained on the Hub's stream: read it by byte range.
    return streams.pile_for_models([m.name for m in models]), {}
  suite_dirs = {m.suite_dir for m in models}
  if len(suite_dirs) != 1 or None in suite_dirs:
    raise SweepError(
      "--data is required: give Pythia's pre-tokenized Pile (.bin/.idx "
      "prefix), OLMo's order (olmo:CONFIG.yaml[,GLOBAL_INDICES]), a .npy token array or "
      "a .txt file with --tokenizer (docs/suites.md)"
    )
  suite_dir = suite_dirs.pop()
  manifest = read_manifest(suite_dir) or {}
  if not isinstance(manifest.get("data_prefix"), str):
    raise SweepError(
      f"{os.path.join(suite_dir, MANIFEST_FILE)}: no 'data_prefix' string naming the suite's "
      f"token data; give --data"
    )
  return os.path.join(suite_dir, manifest["data_prefix"]), manifest


def open_data(
  path: str | None,
  models: Sequence[ModelSource],
  tokenizer: str | None,
  sequences_per_step: int | None,
  timeout_s: float | None = None,
) -> data.TokenSource:
  """The token source: --data, else the Hub stream Pythia models trained on, else the
  data of the suite the models come from. `olmo:CONFIG.yaml[,GLOBAL_INDICES]` is OLMo's
  training order (jax_pythia.data.olmo). `timeout_s`: a remote stream's wait for its
  server, per attempt (--data_timeout)."""
  if path is not None and olmo.is_olmo_location(path):
    return olmo.open_olmo(path)
  path, manifest = data_location(path, models)
  if manifest:
    suite_dir = {m.suite_dir for m in models}.pop()
    tokenizer = tokenizer or (
      os.path.join(suite_dir, manifest["tokenizer"]) if manifest.get("tokenizer") else None
    )
  if sequences_per_step is None and path and "://" not in path and staged.is_staged(path):
    # A staged folder records its stream's batch size (OLMo's is its config's, not Pythia's).
    sequences_per_step = staged.StagedStream(path).sequences_per_step
  if sequences_per_step is None:
    sequences_per_step = manifest.get("sequences_per_step", suite.SEQUENCES_PER_STEP)
  return data.open_token_source(
    path, tokenizer=tokenizer, sequences_per_step=sequences_per_step, timeout_s=timeout_s
  )
