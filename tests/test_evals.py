"""Published evaluations: a hand-written directory in the documented layout, and the real
files in ../shared checked against the facts docs/pythia.md states."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jax_pythia.suite import PAPER_STEPS
from jax_pythia.sweep.evals import EVALS_COLUMNS, EvalsError, EvalsNotFoundError, load_evals

SHARED_EVALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "pythia-evals"


def write_result(path: Path, results: dict, config: dict | None = None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  content = {"results": results, "versions": {task: 0 for task in results}}
  if config is not None:
    content["config"] = config
  path.write_text(json.dumps(content))


def config_of(model: str, step: int, num_fewshot: int = 0) -> dict:
  return {
    "model": "hf-causal",
    "model_args": f"pretrained=EleutherAI/pythia-v1.1-{model},revision=step{step}",
    "num_fewshot": num_fewshot,
  }


@pytest.fixture
def tiny_evals(tmp_path) -> Path:
  root = tmp_path / "evals"
  write_result(
    root / "pythia-70m-deduped" / "70m-deduped_step143000.json",
    {
      "lambada_openai": {"ppl": 138.5, "ppl_stderr": 5.9, "acc": 0.19, "acc_stderr": 0.005},
      "piqa": {"acc": 0.59, "acc_stderr": 0.011, "acc_norm": 0.58, "acc_norm_stderr": 0.012},
    },
    config_of("70m-deduped", 143000),
  )
  write_result(
    root / "pythia-70m-deduped" / "70m-deduped_step43000.json",
    {"lambada_openai": {"acc": 0.26, "acc_stderr": 0.006}},
  )
  # The standard 1b lives in pythia-1b-bf16; like the published files, one is named
  # "5shot" although its config says zero-shot, and one really is five-shot.
  write_result(
    root / "pythia-1b-bf16" / "1b-bf16-5shot_step128.json",
    {"lambada_openai": {"acc": 0.0, "acc_stderr": 0.0}},
    config_of("1b-bf16", 128),
  )
  write_result(
    root / "pythia-1b-bf16" / "1b-bf16_step1000.json",
    {"lambada_openai": {"acc": 0.09, "acc_stderr": 0.004}},
    config_of("1b-bf16", 1000),
  )
  write_result(
    root / "pythia-1b-bf16" / "1b-bf16-5shot_step3000.json",
    {"lambada_openai": {"acc": 0.99, "acc_stderr": 0.1}},
    config_of("1b-bf16", 3000, num_fewshot=5),
  )
  (root / "README.md").write_text("not a model directory")
  return root


def test_tiny_directory_becomes_tidy_rows(tiny_evals):
  frame = load_evals(tiny_evals)
  assert tuple(frame.columns) == EVALS_COLUMNS
  rows = [tuple(r) for r in frame.itertuples(index=False)]
  # Suite order (70m before 1b), then step, task, metric; piqa has no ppl.
  assert rows == [
    ("pythia-70m-deduped", 43000, "lambada_openai", "acc", 0.26, 0.006),
    ("pythia-70m-deduped", 143000, "lambada_openai", "acc", 0.19, 0.005),
    ("pythia-70m-deduped", 143000, "lambada_openai", "ppl", 138.5, 5.9),
    ("pythia-70m-deduped", 143000, "piqa", "acc", 0.59, 0.011),
    ("pythia-70m-deduped", 143000, "piqa", "acc_norm", 0.58, 0.012),
    ("pythia-1b", 128, "lambada_openai", "acc", 0.0, 0.0),
    ("pythia-1b", 1000, "lambada_openai", "acc", 0.09, 0.004),
  ]
  assert str(frame["step"].dtype) == "int64"
  assert str(frame["value"].dtype) == "float64" and str(frame["stderr"].dtype) == "float64"


def test_five_shot_results_are_selectable(tiny_evals):
  frame = load_evals(tiny_evals, models="pythia-1b", num_fewshot=5)
  assert [tuple(r) for r in frame.itertuples(index=False)] == [
    ("pythia-1b", 3000, "lambada_openai", "acc", 0.99, 0.1)
  ]


def test_filters(tiny_evals):
  frame = load_evals(tiny_evals, models=["pythia-70m-deduped"], tasks=["piqa"])
  assert sorted(frame["metric"]) == ["acc", "acc_norm"]
  assert set(frame["model"]) == {"pythia-70m-deduped"}
  # The directory name of the standard 1b is accepted too.
  assert len(load_evals(tiny_evals, models="pythia-1b-bf16")) == 2
  with pytest.raises(EvalsError, match=r"has no results for pythia-410m \(it has pythia-70m-"):
    load_evals(tiny_evals, models=["pythia-410m"])
  with pytest.raises(EvalsError, match="have no task hellaswag"):
    load_evals(tiny_evals, tasks=["hellaswag"])


def test_missing_stderr_is_nan(tmp_path):
  write_result(tmp_path / "pythia-160m" / "160m_step0.json", {"sciq": {"acc": 0.2}})
  frame = load_evals(tmp_path)
  assert frame["value"].tolist() == [0.2] and math.isnan(frame["stderr"].iloc[0])


def test_malformed_file_is_named(tiny_evals):
  bad = tiny_evals / "pythia-70m-deduped" / "70m-deduped_step0.json"
  bad.write_text('{"results": {"piqa": {"acc": 0.5,')
  with pytest.raises(EvalsError, match=rf"evaluation file {bad} is not valid JSON"):
    load_evals(tiny_evals)
  bad.write_text('{"config": {}}')
  with pytest.raises(EvalsError, match=rf"{bad} has no 'results' object"):
    load_evals(tiny_evals)


def test_step_mismatch_and_bad_names(tmp_path):
  write_result(
    tmp_path / "pythia-70m" / "70m_step1000.json",
    {"piqa": {"acc": 0.5}},
    config_of("70m", 2000),
  )
  with pytest.raises(EvalsError, match=r"70m_step1000\.json is named for step 1000 .*step2000"):
    load_evals(tmp_path)
  (tmp_path / "pythia-70m" / "70m_step1000.json").unlink()
  write_result(tmp_path / "pythia-70m" / "summary.json", {"piqa": {"acc": 0.5}})
  with pytest.raises(EvalsError, match=r"summary\.json is not named"):
    load_evals(tmp_path)


def test_missing_or_empty_directory(tmp_path):
  with pytest.raises(EvalsNotFoundError, match=rf"{tmp_path}/absent does not exist"):
    load_evals(tmp_path / "absent")
  with pytest.raises(EvalsNotFoundError, match=rf"{tmp_path} holds no pythia"):
    load_evals(tmp_path)
  (tmp_path / "pythia-70m").mkdir()
  with pytest.raises(EvalsNotFoundError, match=rf"{tmp_path} holds no 0-shot result files"):
    load_evals(tmp_path)


@pytest.fixture(scope="module")
def published():
  if not SHARED_EVALS.is_dir():
    pytest.skip(f"{SHARED_EVALS} is absent (needs ../shared beside the checkout)")
  return load_evals(SHARED_EVALS)


def lambada_acc(frame, model: str, step: int) -> float:
  selected = frame[
    (frame.model == model)
    & (frame.step == step)
    & (frame.task == "lambada_openai")
    & (frame.metric == "acc")
  ]
  assert len(selected) == 1
  return float(selected.value.iloc[0])


def test_published_late_training_degradation(published):
  # docs/pythia.md: 70m-deduped falls from 0.26 to 0.19, 2.8b-deduped rises from 0.60 to 0.65.
  assert lambada_acc(published, "pythia-70m-deduped", 43000) == pytest.approx(0.26, abs=0.005)
  assert lambada_acc(published, "pythia-70m-deduped", 143000) == pytest.approx(0.19, abs=0.005)
  assert lambada_acc(published, "pythia-2.8b-deduped", 43000) == pytest.approx(0.60, abs=0.005)
  assert lambada_acc(published, "pythia-2.8b-deduped", 143000) == pytest.approx(0.65, abs=0.005)


def test_published_checkpoints_are_the_papers(published):
  steps_of_model = published.groupby("model")["step"].unique()
  assert len(steps_of_model) == 16  # 8 sizes x {standard, deduped}; 1b from pythia-1b-bf16
  assert "pythia-1b" in steps_of_model.index
  for model, steps in steps_of_model.items():
    assert sorted(steps) == list(PAPER_STEPS), model
  assert {
    "lambada_openai",
    "arc_easy",
    "arc_challenge",
    "piqa",
    "sciq",
    "winogrande",
    "wsc",
    "logiqa",
  } <= set(published.task)
  # Every model-step-task-metric appears once.
  assert not published.duplicated(["model", "step", "task", "metric"]).any()
