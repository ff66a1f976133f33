"""The checkpoint suites this tool knows: which Hub repos belong to each, and how each names
its checkpoints (docs/suites.md). `SUITES` is the one table of these facts; Pythia's sizes
and schedule stay in `jax_pythia.suite`, which this table reads.

A suite's checkpoints are found in a listing of its Hub repo (`jax_pythia.checkpoints
.revisions` fetches and caches it): its branches, or the commits of one branch. Each entry
of a listing is `(label, revision)`: a branch's label and revision are its name; a commit's
label is its message's first line, its revision the commit id. `parse_listing` turns a
listing into checkpoints; names it does not recognise (`main`, other branches) are skipped,
but one that looks like a checkpoint and does not parse is refused, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from jax_pythia import suite
from jax_pythia.errors import CheckpointError

BRANCHES = "branches"
COMMITS = "commits"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One checkpoint of a model: its training step and the Hub revision that holds it."""

  step: int
  revision: str  # a branch name or a commit id
  tokens_b: int | None = None  # billions of training tokens, where the name states them


@dataclasses.dataclass(frozen=True)
class Scheme:
  """How one suite names its checkpoints.

  `pattern` matches a listing label of a checkpoint, with groups `step` and optionally
  `tokens` and `series`; `looks_like` matches labels meant as checkpoints, so that a
  malformed one is an error instead of a missing checkpoint. Labels matching neither are
  not checkpoints. `series` names the default series (a series never mixes with another).
  """

  name: str
  repos: re.Pattern
  listing: str  # BRANCHES, or COMMITS of `commits_of`
  pattern: re.Pattern
  looks_like: re.Pattern
  form: str  # the naming, for docs and messages
  series: str = ""
  commits_of: str = "main"
  #: Steps known without listing (Pythia's published schedule), or None.
  published_steps: tuple[int, ...] | None = None


# Table order matters: a repo id belongs to the first suite whose `repos` matches.
SUITES: tuple[Scheme, ...] = (
  Scheme(
    "pythia",
    re.compile(r"^EleutherAI/pythia-[\w.-]+$"),
    BRANCHES,
    re.compile(suite.STEP_DIR_RE.pattern.replace(r"(\d+)", r"(?P<step>\d+)")),
    re.compile(r"^step"),
    "step{N}",
    published_steps=suite.ALL_STEPS,
  ),
  Scheme(
    "olmo2",
    re.compile(r"^allenai/OLMo-2-[\w.-]+$"),
    BRANCHES,
    # Stage 1 is `stage1-step{N}-tokens{T}B` (a few branches lack `stage1-`); each stage-2
    # ingredient is its own series, `stage2-ingredient{K}-step{N}-tokens{T}B`.
    re.compile(
      r"^(?:(?P<series>stage1|stage2-ingredient\d+)-)?step(?P<step>\d+)-tokens(?P<tokens>\d+)B$"
    ),
    re.compile(r"^(stage\d|step\d)"),
    "[stage1-]step{N}-tokens{T}B; stage2-ingredient{K}-step{N}-tokens{T}B",
    series="stage1",
  ),
  Scheme(
    "olmo",
    re.compile(r"^allenai/OLMo-[\w.-]+-hf$"),
    BRANCHES,
    re.compile(r"^step(?P<step>\d+)-tokens(?P<tokens>\d+)B$"),
    re.compile(r"^step\d"),
    "step{N}-tokens{T}B",
  ),
  Scheme(
    "amber",
    re.compile(r"^LLM360/Amber$"),
    BRANCHES,
    # Amber numbers its 360 checkpoints, not its optimizer steps: N is the checkpoint's index.
    re.compile(r"^ckpt_(?P<step>\d+)$"),
    re.compile(r"^ckpt"),
    "ckpt_{NNN}",
  ),
  Scheme(
    "pico",
    re.compile(r"^pico-lm/pico-decoder(-[\w.-]+)?$"),
    COMMITS,
    # pico-train's save_checkpoint pushes the model with this commit message (its tokenizer,
    # config, Fabric state and logs follow in commits of their own, which are skipped).
    re.compile(r"^Saving HF Model -- Step (?P<step>\d+)$"),
    re.compile(r"^Saving HF Model"),
    "commits on main: 'Saving HF Model -- Step {N}'",
  ),
)

BY_NAME = {s.name: s for s in SUITES}
#: The suite of a model given by --revisions (or any local directory): no scheme of its own.
CUSTOM = "custom"


def scheme_of(repo_id: str) -> Scheme | None:
  """The suite a Hub repo id belongs to, or None."""
  return next((s for s in SUITES if s.repos.match(repo_id)), None)


def series_names(scheme: Scheme, listing: Sequence[tuple[str, str]]) -> list[str]:
  """The series a listing holds (the default one first)."""
  found = {_series(scheme, m) for label, _ in listing if (m := scheme.pattern.match(label))}
  return sorted(found, key=lambda s: (s != scheme.series, s))


def _series(scheme: Scheme, match: re.Match) -> str:
  return (match.groupdict().get("series") or scheme.series) if match else scheme.series


def parse_listing(
  scheme: Scheme, listing: Sequence[tuple[str, str]], repo_id: str, series: str | None = None
) -> tuple[Checkpoint, ...]:
  """The checkpoints of one series (default: the suite's) in a listing, sorted by step.

  Raises CheckpointError (one line) for a label that looks like a checkpoint but does not
  parse, two revisions of one step, or a series without checkpoints.
  """
  series = scheme.series if series is None else series
  by_step: dict[int, Checkpoint] = {}
  for label, revision in listing:
    m = scheme.pattern.match(label)
    if not m:
      if scheme.looks_like.match(label):
        raise CheckpointError(
          f"{repo_id}: {_what(scheme)} {label!r} looks like a checkpoint but is not of the "
          f"{scheme.name} form {scheme.form}"
        )
      continue
    if _series(scheme, m) != series:
      continue
    tokens = m.groupdict().get("tokens")
    _add(by_step, Checkpoint(int(m["step"]), revision, int(tokens) if tokens else None), repo_id)
  if not by_step:
    others = [s for s in series_names(scheme, listing) if s != series]
    hint = f" (it has the series {', '.join(others)})" if others else ""
    where = f"series {series!r} of " if series else ""
    raise CheckpointError(
      f"{where}{repo_id}: no {_what(scheme)} names a checkpoint of the {scheme.name} form "
      f"{scheme.form}{hint}"
    )
  return tuple(by_step[s] for s in sorted(by_step))


def _what(scheme: Scheme) -> str:
  return "branch" if scheme.listing == BRANCHES else "commit message"


def _add(by_step: dict[int, Checkpoint], checkpoint: Checkpoint, repo_id: str) -> None:
  earlier = by_step.get(checkpoint.step)
  if earlier is not None:
    raise CheckpointError(
      f"{repo_id}: step {checkpoint.step} is named twice ({earlier.revision!r} and "
      f"{checkpoint.revision!r}); give the one to use with --revisions"
    )
  # One revision is one set of weights: two steps of it would be one checkpoint counted twice.
  same = next((c for c in by_step.values() if c.revision == checkpoint.revision), None)
  if same is not None:
    raise CheckpointError(
      f"{repo_id}: revision {checkpoint.revision!r} is given for steps {same.step} and "
      f"{checkpoint.step}; one revision is one checkpoint"
    )
  by_step[checkpoint.step] = checkpoint


# ------------------------------------------------------------------- --revisions

_REGEX_CHARS = set("()[]*+?\\^$|{}")
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
_LAST_INT = re.compile(r"([0-9]+)(?!.*[0-9])")


def is_pattern(spec: str) -> bool:
  """Whether a --revisions value is a regular expression (else a comma list)."""
  return bool(_REGEX_CHARS & set(spec))


def given_revisions(spec: str, repo_id: str) -> tuple[Checkpoint, ...]:
  """Checkpoints from a --revisions list: `REVISION[=STEP],...`; without `=STEP` the step is
  the last number in the revision's name (a commit id needs `=STEP`)."""
  by_step: dict[int, Checkpoint] = {}
  for item in (i.strip() for i in spec.split(",")):
    if not item:
      continue
    revision, eq, step_text = item.partition("=")
    revision = revision.strip()
    if eq:
      if not suite.is_decimal(step_text.strip()) or not revision:
        raise CheckpointError(f"--revisions: {item!r} is not REVISION=STEP with an integer STEP")
      step = int(step_text)
    else:
      m = _LAST_INT.search(revision)
      if _COMMIT_ID.match(revision) or not m:
        raise CheckpointError(
          f"--revisions: {revision!r} names no step; give it as {revision}=STEP"
        )
      step = int(m.group(1))
    _add(by_step, Checkpoint(step, revision), repo_id)
  if not by_step:
    raise CheckpointError("--revisions is empty: give REVISION[=STEP],... or a regular expression")
  return tuple(by_step[s] for s in sorted(by_step))


def revisions_pattern(pattern: str) -> re.Pattern:
  """A --revisions regular expression, compiled (checked before any listing is read)."""
  try:
    return re.compile(pattern)
  except re.error as e:
    raise CheckpointError(f"--revisions={pattern!r}: not a regular expression ({e})") from None


def matched_revisions(
  pattern: str, branches: Sequence[tuple[str, str]], repo_id: str
) -> tuple[Checkpoint, ...]:
  """Checkpoints from a --revisions regular expression matched against every branch name;
  the step is its group `step`, else its first group, else the name's last number."""
  regex = revisions_pattern(pattern)
  by_step: dict[int, Checkpoint] = {}
  for label, revision in branches:
    m = regex.fullmatch(label)
    if not m:
      continue
    groups = m.groupdict()
    text = groups.get("step") if "step" in groups else (m.group(1) if regex.groups else None)
    if text is None:
      last = _LAST_INT.search(label)
      text = last.group(1) if last else None
    if text is None or not suite.is_decimal(text):
      raise CheckpointError(
        f"{repo_id}: branch {label!r} matches --revisions={pattern!r} but names no step "
        "(use a group (?P<step>\\d+))"
      )
    _add(by_step, Checkpoint(int(text), revision), repo_id)
  if not by_step:
    raise CheckpointError(f"{repo_id}: no branch matches --revisions={pattern!r}")
  return tuple(by_step[s] for s in sorted(by_step))
