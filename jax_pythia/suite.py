"""The Pythia suite: sizes, shapes, Hub repo ids and the checkpoint schedule.

This module is the single source of truth for these facts (docs/pythia.md); everything else
imports them from here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

HUB_ORG = "EleutherAI"
STEPS_PER_CHECKPOINT = 1000
FINAL_STEP = 143_000
SEQUENCES_PER_STEP = 1024
SEQUENCE_LENGTH = 2048
VOCAB_SIZE = 50_304


@dataclasses.dataclass(frozen=True)
class Size:
  """Shapes and training facts of one Pythia size."""

  name: str  # "70m"
  n_layers: int
  d_model: int
  n_heads: int
  d_head: int
  learning_rate: float
  has_deduped: bool = True
  has_seeds: bool = False
  train_dtype: str = "float16"
  vocab_size: int = VOCAB_SIZE  # the tokenizer's 50,277 entries padded for the model

  @property
  def d_mlp(self) -> int:
    return 4 * self.d_model


SIZES: dict[str, Size] = {
  s.name: s
  for s in [
    Size("14m", 6, 128, 4, 32, 1.0e-3, has_deduped=False, has_seeds=True),
    Size("31m", 6, 256, 8, 32, 1.0e-3, has_deduped=False, has_seeds=True),
    Size("70m", 6, 512, 8, 64, 1.0e-3, has_seeds=True),
    Size("160m", 12, 768, 12, 64, 6.0e-4, has_seeds=True),
    Size("410m", 24, 1024, 16, 64, 3.0e-4, has_seeds=True),
    Size("1b", 16, 2048, 8, 256, 3.0e-4, train_dtype="bfloat16"),
    Size("1.4b", 24, 2048, 16, 128, 2.0e-4),
    Size("2.8b", 32, 2560, 32, 80, 1.6e-4),
    Size("6.9b", 32, 4096, 32, 128, 1.2e-4, vocab_size=50_432),
    Size("12b", 36, 5120, 40, 128, 1.2e-4, vocab_size=50_688),
  ]
}

SEEDS = tuple(range(1, 10))

#: The 154 checkpoints of every Pythia model: init, log-spaced, then every 1000 steps.
ALL_STEPS: tuple[int, ...] = (
  (0,)
  + tuple(2**i for i in range(10))
  + tuple(range(STEPS_PER_CHECKPOINT, FINAL_STEP + 1, STEPS_PER_CHECKPOINT))
)
#: The 27 checkpoints of the reference study (Diehl Martinez et al. 2024).
PAPER_STEPS: tuple[int, ...] = (
  (0,) + tuple(2**i for i in range(10)) + (1000,) + tuple(range(3000, FINAL_STEP + 1, 10_000))
)

assert len(ALL_STEPS) == 154 and len(PAPER_STEPS) == 27


@dataclasses.dataclass(frozen=True)
class Model:
  """One Pythia model: a size, a data variant and optionally a seed."""

  size: Size
  deduped: bool = False
  seed: int | None = None

  @property
  def name(self) -> str:
    suffix = "-deduped" if self.deduped else ""
    if self.seed is not None:
      suffix += f"-seed{self.seed}"
    return f"pythia-{self.size.name}{suffix}"

  @property
  def repo_id(self) -> str:
    return f"{HUB_ORG}/{self.name}"


_MODEL_RE = re.compile(r"^(?:EleutherAI/)?pythia-([0-9.]+[mb])(-deduped)?(?:-seed(\d+))?$")


def parse_model(name: str) -> Model:
  """Parses `pythia-160m-deduped`, `EleutherAI/pythia-70m-seed3`, ... into a Model."""
  m = _MODEL_RE.match(name)
  if not m:
    raise ValueError(
      f"unknown Pythia model {name!r}: expected pythia-<size>[-deduped][-seed<N>] with size "
      f"in {', '.join(SIZES)}"
    )
  size_name, deduped, seed = m.group(1), bool(m.group(2)), m.group(3)
  if size_name not in SIZES:
    raise ValueError(f"unknown Pythia size {size_name!r} in {name!r}; sizes: {', '.join(SIZES)}")
  size = SIZES[size_name]
  if deduped and not size.has_deduped:
    raise ValueError(f"{name!r}: pythia-{size_name} has no deduped variant")
  if seed is not None:
    seed = int(seed)
    if deduped or not size.has_seeds or seed not in SEEDS:
      raise ValueError(
        f"{name!r}: seed variants exist only for the standard "
        f"{', '.join(s.name for s in SIZES.values() if s.has_seeds)} models, seeds 1-9"
      )
  return Model(size, deduped, seed)


def revision(step: int) -> str:
  """The Hub git revision holding checkpoint `step` (`main` equals `step143000`)."""
  return f"step{int(step)}"


#: A checkpoint's revision and folder name, `step<N>` (the one place this pattern lives).
STEP_DIR_RE = re.compile(r"^step(\d+)$")


def local_steps(directory: str) -> tuple[int, ...]:
  """The checkpoints of a local model directory: the N of its `step<N>/` subfolders, sorted."""
  return tuple(
    sorted(
      int(m.group(1))
      for n in os.listdir(directory)
      if (m := STEP_DIR_RE.match(n)) and os.path.isdir(os.path.join(directory, n))
    )
  )


def is_decimal(text: str) -> bool:
  """ASCII digits only: str.isdigit() also takes '²', which int() refuses."""
  return text.isascii() and text.isdigit()


def parse_steps(spec: str, available: tuple[int, ...] = ALL_STEPS) -> tuple[int, ...]:
  """Parses a step selection into sorted steps drawn from `available`.

  `all` (every available step), `final` (the last), `paper` (the study's 27), `log:K` (K
  log-spaced checkpoints: `log_spaced`), a comma list (`0,512,143000`), a range
  `START:STOP[:EVERY]` (inclusive, keeping available steps in it, every EVERY-th), or a mix
  separated by commas.
  """
  spec = spec.strip()
  if not spec:
    raise ValueError("empty step selection")
  chosen: set[int] = set()
  for part in spec.split(","):
    part = part.strip()
    if part == "all":
      chosen.update(available)
    elif part == "final":
      chosen.add(max(available))
    elif part.startswith("log:"):
      chosen.update(log_spaced(available, part))
    elif part == "paper":
      missing = sorted(set(PAPER_STEPS) - set(available))
      if missing:
        raise ValueError(f"'paper' steps {missing} are not available here")
      chosen.update(PAPER_STEPS)
    elif ":" in part:
      bits = part.split(":")
      if len(bits) not in (2, 3) or not all(is_decimal(b.strip()) for b in bits):
        raise ValueError(f"bad step range {part!r}: expected START:STOP[:EVERY]")
      start, stop = int(bits[0]), int(bits[1])
      every = int(bits[2]) if len(bits) == 3 else 1
      if every < 1:
        raise ValueError(f"bad step range {part!r}: EVERY must be >= 1")
      in_range = [s for s in available if start <= s <= stop]
      if not in_range:
        raise ValueError(f"step range {part!r} holds no available checkpoint")
      chosen.update(in_range[::every])
    else:
      try:
        step = int(part.removeprefix("step"))
      except ValueError:
        raise ValueError(
          f"bad step {part!r}: expected an integer, all, final, paper, log:K or a range"
        ) from None
      if step not in available:
        raise ValueError(f"step {step} is not a checkpoint (available: {_summarize(available)})")
      chosen.add(step)
  return tuple(sorted(chosen))


def _summarize(steps: tuple[int, ...]) -> str:
  if len(steps) <= 12:
    return ", ".join(map(str, steps))
  return ", ".join(map(str, steps[:6])) + ", ..., " + ", ".join(map(str, steps[-3:]))


def log_spaced(available: tuple[int, ...], part: str) -> tuple[int, ...]:
  """`log:K`: the K available steps nearest (in log(1 + step)) to K points evenly spaced in
  log(1 + step) from the first available step to the last, each taken once (the paper's
  style: dense early, sparse late)."""
  k_text = part.removeprefix("log:").strip()
  steps = sorted(set(available))
  if not is_decimal(k_text) or not 1 <= int(k_text) <= len(steps):
    raise ValueError(f"bad step selection {part!r}: log:K with K in 1..{len(steps)}")
  k = int(k_text)
  lo, hi = math.log1p(steps[0]), math.log1p(steps[-1])
  targets = [lo + (hi - lo) * i / (k - 1) for i in range(k)] if k > 1 else [hi]
  chosen: list[int] = []
  for t in targets:
    free = [s for s in steps if s not in chosen]
    chosen.append(min(free, key=lambda s: (abs(math.log1p(s) - t), s)))
  return tuple(sorted(chosen))
