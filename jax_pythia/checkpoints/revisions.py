"""A Hub model's checkpoints: its repo's listing (branches, or the commits of one branch),
read from the Hub and cached on disk, parsed by its suite's scheme (`suites`).

Every listing read from the Hub is written (atomically) to the cache, one JSON file per
repo and listing, under `$JAX_PYTHIA_REVISIONS_CACHE` (default
`~/.cache/jax_pythia/revisions`). Offline (`HF_HUB_OFFLINE=1`) the cached listing is used,
so a rerun resolves the same checkpoints; offline with no cache is one line naming the
missing file. Online, the Hub is listed again (a suite may have published checkpoints
since) and the cache refreshed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re

from jax_pythia import remote, suite
from jax_pythia.checkpoints import suites
from jax_pythia.errors import CheckpointError
from jax_pythia.files import atomic_write

CACHE_ENV = "JAX_PYTHIA_REVISIONS_CACHE"
_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A Hub model's checkpoints: its suite, series and checkpoints sorted by step."""

  repo_id: str
  suite: str
  series: str
  checkpoints: tuple[suites.Checkpoint, ...]

  @property
  def steps(self) -> tuple[int, ...]:
    return tuple(c.step for c in self.checkpoints)

  def revision(self, step: int) -> str:
    for c in self.checkpoints:
      if c.step == step:
        return c.revision
    raise CheckpointError(f"{self.repo_id}: no checkpoint of step {step}")


def cache_dir() -> str:
  return os.path.expanduser(
    os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "jax_pythia", "revisions")
  )


def cache_path(repo_id: str, kind: str, branch: str = "main") -> str:
  name = repo_id.replace("/", "--") + (
    f".{kind}" if kind == suites.BRANCHES else f".{kind}@{branch}"
  )
  return os.path.join(cache_dir(), re.sub(r"[^\w.@-]", "_", name) + ".json")


def listing(repo_id: str, kind: str, branch: str = "main") -> list[tuple[str, str]]:
  """[(label, revision)] of a repo's branches (kind BRANCHES) or of the commits of `branch`
  (kind COMMITS, labelled by their message's first line), newest listing of the Hub, or
  the cached one offline."""
  path = cache_path(repo_id, kind, branch)
  what = "branches" if kind == suites.BRANCHES else f"commits of {branch}"
  if remote.hub_offline():
    if not os.path.isfile(path):
      raise CheckpointError(
        f"{repo_id}: offline (HF_HUB_OFFLINE=1) and its {what} were never listed: no {path}; "
        "list them once with network access, or give --revisions=REVISION=STEP,..."
      )
    return _read_cache(path, repo_id, kind, branch)
  entries = _list_hub(repo_id, kind, branch, what)
  record = {
    "format": _FORMAT,
    "repo_id": repo_id,
    "kind": kind,
    "branch": branch,
    "listed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "entries": [list(e) for e in entries],
  }
  atomic_write(path, lambda tmp: _dump(tmp, record), ".json")
  return entries


def _dump(path: str, record: dict) -> None:
  with open(path, "w") as f:
    json.dump(record, f, indent=1)


def _read_cache(path: str, repo_id: str, kind: str, branch: str) -> list[tuple[str, str]]:
  """The entries of a cached listing, checked field by field: a damaged or edited file is
  named, never read as some other listing."""

  def damaged(why: str) -> CheckpointError:
    return CheckpointError(
      f"{path}: the cached listing of {repo_id} is damaged ({why}); remove it and list again "
      "with network access"
    )

  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError, RecursionError) as e:
    raise damaged(f"{type(e).__name__}: {e}") from None
  if not isinstance(record, dict):
    raise damaged("not a JSON object")
  expected = {"format": _FORMAT, "repo_id": repo_id, "kind": kind}
  if kind == suites.COMMITS:
    expected["branch"] = branch
  for key, value in expected.items():
    if record.get(key) != value:
      raise damaged(f"{key} {record.get(key)!r}, expected {value!r}")
  entries = record.get("entries")
  if not isinstance(entries, list):
    raise damaged("'entries' is not a list")
  for i, entry in enumerate(entries):
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
      raise damaged(f"entries[{i}] is {json.dumps(entry)[:80]}, not [label, revision]")
    if not entry[1]:
      raise damaged(f"entries[{i}] has an empty revision")
  return [(label, revision) for label, revision in entries]


def _list_hub(repo_id: str, kind: str, branch: str, what: str) -> list[tuple[str, str]]:
  from huggingface_hub import HfApi
  from huggingface_hub import errors as hf_errors

  from jax_pythia.checkpoints import hub

  api = HfApi()
  try:
    if kind == suites.BRANCHES:
      refs = hub._with_retries(lambda: api.list_repo_refs(repo_id))
      return [(b.name, b.name) for b in refs.branches]
    commits = hub._with_retries(lambda: api.list_repo_commits(repo_id, revision=branch))
    return [((c.title or c.message or "").split("\n", 1)[0].strip(), c.commit_id) for c in commits]
  except hf_errors.RepositoryNotFoundError:
    raise CheckpointError(f"{repo_id}: no such Hub repo (or it is private/gated)") from None
  except hf_errors.RevisionNotFoundError:
    raise CheckpointError(f"{repo_id}: the repo has no branch {branch!r}") from None
  except Exception as e:
    if hub._is_transient(e) or isinstance(e, hf_errors.OfflineModeIsEnabled):
      raise CheckpointError(
        f"{repo_id}: listing its {what} on the Hub failed ({type(e).__name__}: {e}); retry, "
        "or set HF_HUB_OFFLINE=1 to use the listing cached by an earlier run"
      ) from None
    raise


def resolve(repo_id: str, revisions: str | None = None, series: str | None = None) -> Resolved:
  """The checkpoints of a Hub model: by `revisions` (a --revisions list or regular
  expression) when given, else by its suite's scheme; `series` picks a series of a suite
  that has several (OLMo-2's stage-2 ingredients)."""
  scheme = suites.scheme_of(repo_id)
  if revisions is not None:  # given empty (`--revisions=`) is refused, not ignored
    if series:
      raise CheckpointError(
        f"{repo_id}@{series}: a series is a suite's; --revisions names revisions"
      )
    if suites.is_pattern(revisions):
      suites.revisions_pattern(revisions)  # a typo is named before the listing is read
      found = suites.matched_revisions(revisions, listing(repo_id, suites.BRANCHES), repo_id)
    else:
      found = suites.given_revisions(revisions, repo_id)
    return Resolved(repo_id, scheme.name if scheme else suites.CUSTOM, "", found)
  if scheme is None:
    known = ", ".join(f"{s.name} ({s.repos.pattern})" for s in suites.SUITES)
    raise CheckpointError(
      f"{repo_id}: of no known checkpoint suite ({known}); give its checkpoints with "
      "--revisions=REVISION=STEP,... or a regular expression over its branches"
    )
  if scheme.published_steps is not None and not series:
    # Pythia's schedule is published (jax_pythia.suite): no listing needed, even offline.
    found = tuple(suites.Checkpoint(s, suite.revision(s)) for s in scheme.published_steps)
    return Resolved(repo_id, scheme.name, scheme.series, found)
  entries = listing(repo_id, scheme.listing, scheme.commits_of)
  found = suites.parse_listing(scheme, entries, repo_id, series)
  return Resolved(repo_id, scheme.name, scheme.series if series is None else series, found)
