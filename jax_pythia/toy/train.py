"""Training the toy suite's models: sizes, Pythia's learning-rate law, the options of a
build, the schedule and optimizer, and the resumable training loop of one model.

- **Recipe**: the project's Flax GPT-NeoX, optax AdamW (0.9, 0.95, eps 1e-8), weight
  decay 0.1 on kernels and embeddings (GPT-NeoX exempts biases and LayerNorms), gradient
  clipping at global norm 1.0, linear warmup over 1% of the steps, cosine decay to 10% of
  the peak. Peak learning rates follow Pythia's own law: a least-squares power law of lr
  against non-embedding parameter count `12 L d^2` fitted on the real suite table
  (`suite.SIZES`), so smaller models get larger rates in Pythia's proportions.
- **Checkpoints**: step 0 (init), 1, 2, 4, ... (powers of two up to `log_checkpoints_until`)
  and every `checkpoint_every` steps to `n_steps`, as `<out>/<model>/step<N>/{config.json,
  model.safetensors}` in float32. Checkpoint step N holds the parameters after N updates;
  update s used the batch of step s.
- **Resume**: a model's resume state (`train_state.npz`) is written only after its
  checkpoint, so a build killed at any moment resumes from its last saved state and ends
  with the same bits as an uninterrupted one (the compiled float32 step is deterministic on
  XLA CPU).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_pythia import suite
from jax_pythia.errors import ToySuiteError
from jax_pythia.files import atomic_write
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.toy.corpus import VOCAB_SIZE

TRAIN_LOSS_FILE = "train_loss.csv"
TRAIN_STATE_FILE = "train_state.npz"
#: Pythia's rotary fraction needs an even rotary dimension: d_head a multiple of 8.
DEFAULT_D_HEAD = 16


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
  """Writes `payload` onto `path` atomically and durably (jax_pythia.files)."""
  atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


# --------------------------------------------------------------------------- sizes and lr


@dataclasses.dataclass(frozen=True)
class ToySize:
  """One model shape of the toy suite; the MLP is 4 d wide as in every Pythia size."""

  n_layers: int
  d_model: int
  n_heads: int

  def __post_init__(self):
    for field in ("n_layers", "d_model", "n_heads"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ToySuiteError(f"toy size {self.spec}: {field} must be a positive integer")
    if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 8:
      raise ToySuiteError(
        f"toy size {self.spec}: d_head = d_model / n_heads must be a multiple of 8 (the "
        "rotary quarter of a head must be even)"
      )

  @property
  def name(self) -> str:
    return f"toy-{self.n_layers}l-{self.d_model}d"

  @property
  def spec(self) -> str:
    return f"{self.n_layers}x{self.d_model}x{self.n_heads}"

  @property
  def d_head(self) -> int:
    return self.d_model // self.n_heads

  @property
  def non_embedding_params(self) -> int:
    """12 L d^2: the count Pythia's lr law is fitted on (biases and norms left out)."""
    return 12 * self.n_layers * self.d_model**2

  def config(self, seq_len: int) -> GPTNeoXConfig:
    return GPTNeoXConfig(
      vocab_size=VOCAB_SIZE,
      d_model=self.d_model,
      n_layers=self.n_layers,
      n_heads=self.n_heads,
      d_mlp=4 * self.d_model,
      max_seq_len=seq_len,
      stored_dtype="float32",
    )


def parse_sizes(spec: str | Sequence[ToySize | str]) -> tuple[ToySize, ...]:
  """`"2x32,4x64x8"` (LAYERSxD_MODEL[xHEADS], heads default to d_model/16) -> ToySizes."""
  parts = spec.split(",") if isinstance(spec, str) else list(spec)
  sizes = []
  for part in parts:
    if isinstance(part, ToySize):
      sizes.append(part)
      continue
    bits = part.strip().lower().split("x")
    if len(bits) not in (2, 3) or not all(b.isdigit() for b in bits):
      raise ToySuiteError(f"toy size {part!r}: expected LAYERSxD_MODEL[xHEADS], e.g. 4x64")
    n_layers, d_model = int(bits[0]), int(bits[1])
    n_heads = int(bits[2]) if len(bits) == 3 else max(1, d_model // DEFAULT_D_HEAD)
    sizes.append(ToySize(n_layers, d_model, n_heads))
  if not sizes:
    raise ToySuiteError("no toy sizes given")
  names = [s.name for s in sizes]
  if len(set(names)) != len(names):
    raise ToySuiteError(f"toy sizes repeat a model name: {names}")
  return tuple(sizes)


@functools.cache
def pythia_lr_law() -> tuple[float, float]:
  """(exponent b, log-prefactor a) of lr = exp(a) * N^b fitted on Pythia's table.

  N is the non-embedding parameter count 12 L d^2 of each real size, lr its published
  learning rate; ordinary least squares in log-log space (b is about -0.27).
  """
  n = np.array([12 * s.n_layers * s.d_model**2 for s in suite.SIZES.values()], np.float64)
  lr = np.array([s.learning_rate for s in suite.SIZES.values()], np.float64)
  design = np.stack([np.log(n), np.ones_like(n)], axis=1)
  (b, a), *_ = np.linalg.lstsq(design, np.log(lr), rcond=None)
  return float(b), float(a)


def pythia_learning_rate(size: ToySize, scale: float = 1.0) -> float:
  """Pythia's lr law extrapolated to `size`, times `scale`, to 3 significant digits.

  Rounded so the manifest shows plain numbers; the rounding is part of the recipe, so
  every machine trains with the same rate.
  """
  b, a = pythia_lr_law()
  lr = scale * math.exp(a) * size.non_embedding_params**b
  return float(f"{lr:.3g}")


# --------------------------------------------------------------------------- options


DEFAULT_SIZES = parse_sizes("2x32,3x48,4x64,4x96")


@dataclasses.dataclass(frozen=True)
class ToySuiteOptions:
  """Everything that determines the suite's bits. Two builds with equal options are equal."""

  sizes: tuple[ToySize, ...] = DEFAULT_SIZES
  seq_len: int = 64
  # 128: the study takes the first 128 sequences of a step's batch (docs/method.md), so a
  # batch must hold them; at 2 CPU cores that leaves ~200 steps for ~5 minutes.
  sequences_per_step: int = 128
  n_steps: int = 200
  # 19 checkpoints: the sweep computes gradients on 11 batches around each one, so more
  # checkpoints would cost the sweep more than the training itself.
  checkpoint_every: int = 20
  log_checkpoints_until: int = 128
  seed: int = 0
  lr_scale: float = 1.0
  warmup_fraction: float = 0.01
  min_lr_fraction: float = 0.1
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8

  def __post_init__(self):
    object.__setattr__(self, "sizes", parse_sizes(self.sizes))
    for field in (
      "seq_len",
      "sequences_per_step",
      "n_steps",
      "checkpoint_every",
      "log_checkpoints_until",
    ):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ToySuiteError(f"{field}={value!r}: must be a positive integer")
    if not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_fraction <= 1:
      raise ToySuiteError("warmup_fraction must be in [0, 1) and min_lr_fraction in [0, 1]")
    if self.lr_scale <= 0:
      raise ToySuiteError(f"lr_scale={self.lr_scale}: must be positive")

  @property
  def n_items(self) -> int:
    return self.n_steps * self.sequences_per_step

  @property
  def warmup_steps(self) -> int:
    return max(1, round(self.warmup_fraction * self.n_steps))

  def checkpoint_steps(self) -> tuple[int, ...]:
    """0, powers of two up to `log_checkpoints_until`, every `checkpoint_every`, and the end."""
    log_spaced = {2**i for i in range(64) if 2**i <= min(self.log_checkpoints_until, self.n_steps)}
    regular = set(range(0, self.n_steps + 1, self.checkpoint_every))
    return tuple(sorted({0, self.n_steps} | log_spaced | regular))

  def learning_rate(self, size: ToySize) -> float:
    return pythia_learning_rate(size, self.lr_scale)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["sizes"] = [s.spec for s in self.sizes]
    return out

  @classmethod
  def from_overrides(cls, **overrides) -> ToySuiteOptions:
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ToySuiteError(f"unknown toy-suite option(s) {unknown}")
    return cls(**overrides)


DEFAULT_OPTIONS = ToySuiteOptions()
#: Seconds to build on 2 CPU cores; what the tests use.
TINY_OPTIONS = ToySuiteOptions(
  sizes=parse_sizes("1x16x2,2x32x2"),
  seq_len=32,
  sequences_per_step=4,
  n_steps=40,
  checkpoint_every=10,
  log_checkpoints_until=8,
)


# --------------------------------------------------------------------------- training


def learning_rate_schedule(
  peak: float, n_steps: int, warmup_steps: int, min_lr_fraction: float
) -> Callable[[Any], Any]:
  """lr of update s (0-based): linear warmup to `peak` at update warmup-1, then cosine to
  min_lr_fraction * peak at the last update. Update 0 already moves (lr = peak/warmup)."""
  import jax.numpy as jnp

  floor = min_lr_fraction * peak
  decay_steps = max(1, n_steps - 1 - (warmup_steps - 1))

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    warm = peak * (s + 1.0) / warmup_steps
    progress = jnp.clip((s - (warmup_steps - 1)) / decay_steps, 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(s < warmup_steps - 1, warm, cosine)

  return schedule


def weight_decay_mask(params: Mapping[str, Any]) -> Any:
  """True for kernels and embeddings: GPT-NeoX exempts biases and LayerNorm parameters."""
  import jax

  def decays(path, _):
    return getattr(path[-1], "key", None) in ("kernel", "embedding")

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(options: ToySuiteOptions, peak_lr: float):
  import optax

  schedule = learning_rate_schedule(
    peak_lr, options.n_steps, options.warmup_steps, options.min_lr_fraction
  )
  return optax.chain(
    optax.clip_by_global_norm(options.grad_clip_norm),
    optax.adamw(
      schedule,
      b1=options.adam_b1,
      b2=options.adam_b2,
      eps=options.adam_eps,
      weight_decay=options.weight_decay,
      mask=weight_decay_mask,
    ),
  ), schedule


def make_train_step(config: GPTNeoXConfig, optimizer):
  """A jitted `(params, opt_state, tokens [B, s+1]) -> (params, opt_state, loss)`."""
  import jax
  import optax

  from jax_pythia.models import gpt_neox as model

  @jax.jit
  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(model.lm_loss)(params, tokens, config)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


@functools.lru_cache(maxsize=16)
def compiled_programs(size: ToySize, options: ToySuiteOptions):
  """(init_params, init_opt_state, train_step, lrs of every update) of one size, compiled.

  Cached per (size, options): XLA CPU needs seconds to compile a train step, and a second
  build in the same process (a resume, a test) runs the very same programs.
  """
  import jax

  from jax_pythia.models import gpt_neox as model

  config = size.config(options.seq_len)
  optimizer, schedule = make_optimizer(options, options.learning_rate(size))
  # Jitted whole: run eagerly, flax's init would compile every small op on its own.
  init_params = jax.jit(lambda key: model.init_params(config, key))
  init_opt_state = jax.jit(optimizer.init)
  lrs = np.asarray(jax.jit(jax.vmap(schedule))(np.arange(options.n_steps)))
  return init_params, init_opt_state, make_train_step(config, optimizer), lrs


def init_model(size: ToySize, options: ToySuiteOptions):
  """Step-0 params: every size draws from the suite seed, as Pythia's sizes share seed 1234."""
  import jax

  init_params, _, _, _ = compiled_programs(size, options)
  return init_params(jax.random.PRNGKey(options.seed))


def _save_train_state(path: str, step: int, params, opt_state, losses: list[float]) -> None:
  import jax

  arrays = {f"params_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
  arrays.update({f"opt_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))})
  arrays["step"] = np.asarray(step, np.int64)
  arrays["losses"] = np.asarray(losses, np.float32)
  atomic_write_bytes(path, _npz_bytes(arrays))


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
  """An .npz (np.load reads it) with fixed zip timestamps: np.savez stamps the current
  time into the archive, and a resumed build must end with the same bytes."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
    for name, array in arrays.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      with archive.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
  return buffer.getvalue()


def _load_train_state(path: str, params_like, opt_state_like):
  """(step, params, opt_state, losses) from `path`, or None when absent or unreadable."""
  import jax

  try:
    with np.load(path) as f:
      stored = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError):
    return None

  def restore(prefix, like):
    leaves, treedef = jax.tree.flatten(like)
    restored = []
    for i, leaf in enumerate(leaves):
      arr = stored.get(f"{prefix}_{i}")
      if arr is None or arr.shape != np.shape(leaf) or arr.dtype != np.asarray(leaf).dtype:
        return None
      restored.append(arr)
    if f"{prefix}_{len(leaves)}" in stored:
      return None
    return jax.tree.unflatten(treedef, restored)

  params, opt_state = restore("params", params_like), restore("opt", opt_state_like)
  if params is None or opt_state is None or "step" not in stored:
    return None
  step = int(stored["step"])
  losses = [float(x) for x in stored["losses"]]
  if len(losses) != step:
    return None
  return step, params, opt_state, losses


def _remove_stale_temporaries(directory: str) -> None:
  """Drops what a killed build left half-written (`.<name>.tmp-*`, `.<name>.old-*`)."""
  import shutil

  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if name.startswith(".") and (".tmp-" in name or ".old-" in name):
      path = os.path.join(directory, name)
      if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.unlink(path)


def _saved_step(path: str) -> int | None:
  """The step of a resume state, reading only that field; None if absent or unreadable."""
  try:
    with np.load(path) as f:
      return int(f["step"])
  except (OSError, ValueError, EOFError, KeyError):
    return None


def _checkpoint_complete(directory: str) -> bool:
  from jax_pythia.models import weights

  return os.path.isfile(os.path.join(directory, weights.CONFIG_FILE)) and os.path.isfile(
    os.path.join(directory, weights.SAFETENSORS_SINGLE)
  )


def _loss_csv(losses: Sequence[float], lrs: np.ndarray) -> bytes:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["step", "loss", "lr"])
  for step, (loss, lr) in enumerate(zip(losses, lrs)):
    writer.writerow([step, f"{loss:.9g}", f"{float(lr):.9g}"])
  return out.getvalue().encode()


#: progress(model_name, steps_done, n_steps, latest_loss or None)
ProgressFn = Callable[[str, int, int, float | None], None]


class TqdmProgress:
  """A ProgressFn drawing one tqdm bar per model (rate, ETA, latest loss) on stderr."""

  def __init__(self):
    self.bars = {}

  def __call__(self, name: str, done: int, total: int, loss: float | None) -> None:
    from tqdm import tqdm

    bar = self.bars.get(name)
    if bar is None:
      bar = self.bars[name] = tqdm(
        total=total, initial=done, desc=name, unit="step", dynamic_ncols=True
      )
    bar.update(done - bar.n)
    if loss is not None and (done % 10 == 0 or done == total):
      bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    if done == total:
      bar.close()


@dataclasses.dataclass
class RunBudget:
  """Steps this run may still take (None: unlimited); simulates an interruption."""

  remaining: int | None

  def take(self) -> bool:
    if self.remaining is None:
      return True
    if self.remaining <= 0:
      return False
    self.remaining -= 1
    return True


def train_model(
  out_dir: str | os.PathLike,
  size: ToySize,
  options: ToySuiteOptions,
  dataset,
  *,
  budget: RunBudget | None = None,
  progress: ProgressFn | None = None,
  log: Callable[[str], None] | None = None,
) -> bool:
  """Trains (or resumes) one size; returns True once the model is complete on disk."""
  import jax

  from jax_pythia import data
  from jax_pythia.models import weights

  budget = budget or RunBudget(None)
  log = log or (lambda message: None)
  model_dir = os.path.join(os.fspath(out_dir), size.name)
  _remove_stale_temporaries(model_dir)
  state_path = os.path.join(model_dir, TRAIN_STATE_FILE)
  loss_path = os.path.join(model_dir, TRAIN_LOSS_FILE)
  steps = options.checkpoint_steps()
  checkpoint_steps = set(steps)
  if (
    os.path.isfile(loss_path)
    and _saved_step(state_path) == options.n_steps
    and all(_checkpoint_complete(os.path.join(model_dir, f"step{s}")) for s in steps)
  ):
    if progress:  # finished by an earlier run: nothing to compile
      progress(size.name, options.n_steps, options.n_steps, None)
    return True
  config = size.config(options.seq_len)
  _, init_opt_state, train_step, lrs = compiled_programs(size, options)

  params = init_model(size, options)
  opt_state = init_opt_state(params)
  step, losses, resumed = 0, [], False
  saved = _load_train_state(state_path, params, opt_state) if os.path.exists(state_path) else None
  if (
    saved is not None
    and saved[0] in checkpoint_steps
    and all(
      _checkpoint_complete(os.path.join(model_dir, f"step{s}")) for s in steps if s <= saved[0]
    )
  ):
    step, params, opt_state, losses = saved
    params, opt_state = jax.device_put(params), jax.device_put(opt_state)
    resumed = True
    if step < options.n_steps:
      log(f"{size.name}: resuming from step {step}")

  def save_checkpoint(at_step):
    host_params = jax.device_get(params)
    weights.save_hf_checkpoint(
      os.path.join(model_dir, f"step{at_step}"), host_params, config, dtype="float32"
    )
    # After the checkpoint, so a saved state never points past a missing checkpoint.
    _save_train_state(state_path, at_step, host_params, jax.device_get(opt_state), losses)

  if not resumed:
    save_checkpoint(0)
  if progress:
    progress(size.name, step, options.n_steps, losses[-1] if losses else None)
  while step < options.n_steps:
    if not budget.take():
      return False
    tokens = data.batch_of_step(
      dataset, step, options.sequences_per_step, options.sequences_per_step
    )
    params, opt_state, loss = train_step(params, opt_state, tokens)
    losses.append(float(loss))
    step += 1
    if step in checkpoint_steps:
      save_checkpoint(step)
    if progress:
      progress(size.name, step, options.n_steps, losses[-1])
  atomic_write_bytes(loss_path, _loss_csv(losses, lrs))
  return True
