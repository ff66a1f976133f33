"""Training the toy suite's models: sizes, Pythia's learning-rate law, the options of a
build, the schedule and optimizer, and the resumable training loop of one model.

- **Recipe**: the project's Flax models of either family, trained through the family seam
  (`models.model`'s init_params and lm_loss; nothing here is family-specific), optax AdamW
  (0.9, 0.95, eps 1e-8), weight decay 0.1 on kernels and embeddings (GPT-NeoX exempts
  biases and LayerNorms; Llama's RMSNorm scales are exempt alike), gradient clipping at
  global norm 1.0, linear warmup over 1% of the steps, cosine decay to 10% of the peak.
  Peak learning rates follow Pythia's own law: a least-squares power law of lr against the
  layers' matrix weights (`12 L d^2` for GPT-NeoX, `ToySize.non_embedding_params`) fitted on
  the real suite table (`suite.SIZES`), so smaller models get larger rates in Pythia's
  proportions, whatever their family.
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
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_pythia.files import atomic_write
from jax_pythia.toy.options import ToySize, ToySuiteOptions

TRAIN_LOSS_FILE = "train_loss.csv"
TRAIN_STATE_FILE = "train_state.npz"


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
  """Writes `payload` onto `path` atomically and durably (jax_pythia.files)."""
  atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


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
  """True for kernels and embeddings: GPT-NeoX exempts biases and LayerNorm parameters,
  and Llama's RMSNorm scales are exempt alike (their leaves are `bias` and `scale`)."""
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


def make_train_step(config: Any, optimizer):
  """A jitted `(params, opt_state, tokens [B, s+1]) -> (params, opt_state, loss)`."""
  import jax
  import optax

  from jax_pythia.models import model as model

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

  from jax_pythia.models import model as model

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


def _all_checkpoints_complete(model_dir: str, steps, until: int | None = None) -> bool:
  return all(
    _checkpoint_complete(os.path.join(model_dir, f"step{s}"))
    for s in steps
    if until is None or s <= until
  )


def _resume(state_path: str, model_dir: str, options: ToySuiteOptions, params, opt_state):
  """(step, params, opt_state, losses) of a saved state whose checkpoints are all on disk,
  else None (training restarts from step 0)."""
  import jax

  if not os.path.exists(state_path):
    return None
  saved = _load_train_state(state_path, params, opt_state)
  steps = options.checkpoint_steps()
  if saved is None or saved[0] not in steps:
    return None
  if not _all_checkpoints_complete(model_dir, steps, until=saved[0]):
    return None
  step, params, opt_state, losses = saved
  return step, jax.device_put(params), jax.device_put(opt_state), losses


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

  budget, progress = budget or RunBudget(None), progress or (lambda *args: None)
  model_dir = os.path.join(os.fspath(out_dir), size.name)
  _remove_stale_temporaries(model_dir)
  state_path, loss_path = (os.path.join(model_dir, f) for f in (TRAIN_STATE_FILE, TRAIN_LOSS_FILE))
  checkpoint_steps = set(options.checkpoint_steps())
  if (
    os.path.isfile(loss_path)
    and _saved_step(state_path) == options.n_steps
    and _all_checkpoints_complete(model_dir, checkpoint_steps)
  ):  # finished by an earlier run: nothing to compile
    progress(size.name, options.n_steps, options.n_steps, None)
    return True
  config = size.config(options.seq_len)
  _, init_opt_state, train_step, lrs = compiled_programs(size, options)
  params = init_model(size, options)
  opt_state = init_opt_state(params)
  resumed = _resume(state_path, model_dir, options, params, opt_state)
  step, params, opt_state, losses = resumed or (0, params, opt_state, [])
  if resumed and step < options.n_steps and log:
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
  progress(size.name, step, options.n_steps, losses[-1] if losses else None)
  while step < options.n_steps:
    if not budget.take():
      return False
    B = options.sequences_per_step
    params, opt_state, loss = train_step(params, opt_state, data.batch_of_step(dataset, step, B, B))
    losses.append(float(loss))
    step += 1
    if step in checkpoint_steps:
      save_checkpoint(step)
    progress(size.name, step, options.n_steps, losses[-1])
  atomic_write_bytes(loss_path, _loss_csv(losses, lrs))
  return True
