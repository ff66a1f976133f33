"""The published lm-eval-harness results of the Pythia checkpoints, as one tidy table.

Layout (docs/pythia.md: published evaluations; the Pythia repo's `evals/pythia-v1`):
`<dir>/pythia-<size>[-deduped]/<size>[-deduped]_step<N>.json`, each holding
`{"results": {task: {metric: value, metric + "_stderr": stderr, ...}}, "config": {...},
"versions": {...}}`. `pythia-1b-bf16` holds the standard 1b (the model on the Hub as
`pythia-1b` was trained in bf16).

Oddities of the published files that this reader handles:
- Four files of `pythia-1b-bf16` are named `1b-bf16-5shot_step<N>.json`, but their config
  says `num_fewshot: 0` and their tasks and numbers are zero-shot like the rest; the
  config is trusted over the name (the name's `-<k>shot` tag only counts when a file has
  no config).
- Metrics besides `acc`/`acc_norm`/`ppl`: the crows_pairs tasks report
  `likelihood_difference` and `pct_stereotype`; MMLU subtasks are named
  `hendrycksTest-<subject>` (the harness's old naming).
- In every model, step 1's results are identical to step 0's, metric for metric
  (consistent with a first update at learning rate 0 of the warmup), and lambada_openai
  `acc` is exactly 0 with stderr 0 at the earliest checkpoints; both are kept as published.
- `config.model_args` names the models `EleutherAI/pythia-v1.1-<size>...` with
  `revision=step<N>`; the revision is checked against the file name's step.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from jax_pythia.errors import JaxPythiaError
from jax_pythia.suite import SIZES, parse_model

EVALS_COLUMNS = ("model", "step", "task", "metric", "value", "stderr")

_FILE_RE = re.compile(r"^(?P<stem>.+?)(?:-(?P<shots>\d+)shot)?_step(?P<step>\d+)\.json$")
_REVISION_RE = re.compile(r"(?:^|,)\s*revision=step(\d+)\s*(?:,|$)")
_STDERR_SUFFIX = "_stderr"
# The directory of the standard 1b carries its training dtype in its name.
_DTYPE_DIR_SUFFIX = "-bf16"


class EvalsError(JaxPythiaError, ValueError):
  """A results directory or file that cannot be read as documented; names the path."""


class EvalsNotFoundError(EvalsError, FileNotFoundError):
  """A results directory that is missing or holds no results."""


def suite_model_name(directory_name: str) -> str:
  """`pythia-1b-bf16` -> `pythia-1b`; other directory names are already suite names."""
  return directory_name.removesuffix(_DTYPE_DIR_SUFFIX)


def _model_rank(model: str) -> tuple[int, bool, int]:
  """Suite order: by size, standard before deduped, then seeds."""
  parsed = parse_model(model)
  return list(SIZES).index(parsed.size.name), parsed.deduped, parsed.seed or 0


def _model_directories(evals_dir: Path) -> dict[str, Path]:
  """Suite model name -> its results directory."""
  found: dict[str, Path] = {}
  for entry in sorted(evals_dir.iterdir()):
    if not entry.is_dir():
      continue
    model = suite_model_name(entry.name)
    try:
      parse_model(model)
    except ValueError:
      warnings.warn(f"skipping {entry}: not a Pythia model directory", stacklevel=3)
      continue
    # Should a plain `pythia-1b` directory sit beside `pythia-1b-bf16`, it would hold the
    # abandoned fp16 run; the Hub's pythia-1b is the bf16 one.
    if model in found and not entry.name.endswith(_DTYPE_DIR_SUFFIX):
      continue
    found[model] = entry
  return found


def _as_list(names: str | Iterable[str] | None) -> list[str] | None:
  if names is None:
    return None
  return [names] if isinstance(names, str) else list(names)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_results_file(path: Path) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      content = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
    raise EvalsError(f"evaluation file {path} is not valid JSON: {error}") from None
  if not isinstance(content, dict) or not isinstance(content.get("results"), dict):
    raise EvalsError(f"evaluation file {path} has no 'results' object")
  for task, metrics in content["results"].items():
    if not isinstance(metrics, dict):
      raise EvalsError(f"evaluation file {path}: results[{task!r}] is not an object")
  return content


def _file_step_and_shots(path: Path, content: dict, step_in_name: int, shots_in_name) -> tuple:
  config = content.get("config")
  config = config if isinstance(config, dict) else {}
  model_args = config.get("model_args")
  if isinstance(model_args, str):
    match = _REVISION_RE.search(model_args)
    if match and int(match.group(1)) != step_in_name:
      raise EvalsError(
        f"evaluation file {path} is named for step {step_in_name} but its config evaluated "
        f"revision step{match.group(1)}"
      )
  num_fewshot = config.get("num_fewshot")
  if not _is_number(num_fewshot):
    num_fewshot = int(shots_in_name) if shots_in_name else 0
  return step_in_name, int(num_fewshot)


def _metric_rows(model: str, step: int, results: dict, tasks: set[str] | None) -> list[tuple]:
  rows = []
  for task, metrics in results.items():
    if tasks is not None and task not in tasks:
      continue
    for key, value in metrics.items():
      # Harness >= 0.4 writes "acc,none" / "acc_stderr,none" and string aliases.
      metric, _, result_filter = key.partition(",")
      if metric.endswith(_STDERR_SUFFIX) or not _is_number(value):
        continue
      if result_filter and result_filter != "none":
        metric = f"{metric},{result_filter}"
      stderr_key = f"{metric}{_STDERR_SUFFIX}" + (f",{result_filter}" if result_filter else "")
      stderr = metrics.get(stderr_key)
      rows.append(
        (model, step, task, metric, float(value), float(stderr) if _is_number(stderr) else np.nan)
      )
  return rows


def _selected_directories(evals_dir: Path, wanted: list[str] | None) -> dict[str, Path]:
  """{suite model name: its results directory}, of the `wanted` models when given."""
  if not evals_dir.is_dir():
    raise EvalsNotFoundError(f"evaluations directory {evals_dir} does not exist")
  directories = _model_directories(evals_dir)
  if not directories:
    raise EvalsNotFoundError(
      f"evaluations directory {evals_dir} holds no pythia-<size>[-deduped] model directories"
    )
  if wanted is None:
    return directories
  wanted = [suite_model_name(m.removeprefix("EleutherAI/")) for m in wanted]
  missing = [m for m in wanted if m not in directories]
  if missing:
    raise EvalsError(
      f"evaluations directory {evals_dir} has no results for {', '.join(missing)} "
      f"(it has {', '.join(sorted(directories, key=_model_rank))})"
    )
  return {m: directories[m] for m in wanted}


def _model_results(model: str, directory: Path, num_fewshot: int) -> list[tuple[int, dict]]:
  """(step, file content) of each `num_fewshot`-shot result file of one model."""
  file_of_step: dict[int, Path] = {}
  found = []
  for path in sorted(directory.glob("*.json")):
    match = _FILE_RE.match(path.name)
    if not match:
      raise EvalsError(f"evaluation file {path} is not named <size>[-deduped]_step<N>.json")
    content = _read_results_file(path)
    step, shots = _file_step_and_shots(
      path, content, int(match.group("step")), match.group("shots")
    )
    if shots != num_fewshot:
      continue
    if step in file_of_step:
      raise EvalsError(
        f"two {num_fewshot}-shot evaluation files for {model} step {step}: "
        f"{file_of_step[step]} and {path}"
      )
    file_of_step[step] = path
    found.append((step, content))
  return found


def load_evals(
  evals_dir: str | os.PathLike,
  models: str | Iterable[str] | None = None,
  tasks: str | Iterable[str] | None = None,
  num_fewshot: int = 0,
) -> pd.DataFrame:
  """Reads a published results directory into a tidy frame, one row per value.

  Columns: `model` (suite name, e.g. `pythia-1b`, `pythia-70m-deduped`), `step` (int),
  `task`, `metric` (`acc`, `acc_norm`, `ppl`, ...), `value` (float) and `stderr` (float,
  NaN where the file gives none). Rows are sorted by model (suite order), step, task,
  metric. `models` and `tasks` select (a name or a list; asking for one that is absent is
  an error); only results with `num_fewshot` shots are kept (the published set is all
  zero-shot).
  """
  evals_dir = Path(evals_dir)
  directories = _selected_directories(evals_dir, _as_list(models))
  wanted_tasks = _as_list(tasks)
  task_filter = set(wanted_tasks) if wanted_tasks is not None else None
  rows: list[tuple] = []
  tasks_seen: set[str] = set()
  n_files_read = 0
  for model, directory in directories.items():
    for step, content in _model_results(model, directory, num_fewshot):
      n_files_read += 1
      tasks_seen.update(content["results"])
      rows.extend(_metric_rows(model, step, content["results"], task_filter))
  if not n_files_read:
    raise EvalsNotFoundError(
      f"evaluations directory {evals_dir} holds no {num_fewshot}-shot result files for "
      f"{', '.join(directories)}"
    )
  missing_tasks = sorted((task_filter or set()) - tasks_seen)
  if missing_tasks:
    raise EvalsError(
      f"evaluations in {evals_dir} have no task {', '.join(missing_tasks)} "
      f"(tasks include {', '.join(sorted(tasks_seen)[:12])}, ...)"
    )

  frame = pd.DataFrame.from_records(rows, columns=list(EVALS_COLUMNS))
  frame = frame.astype({"step": np.int64, "value": np.float64, "stderr": np.float64})
  frame["rank"] = frame["model"].map({m: _model_rank(m) for m in directories})
  frame = frame.sort_values(["rank", "step", "task", "metric"], kind="stable")
  return frame.drop(columns="rank").reset_index(drop=True)
