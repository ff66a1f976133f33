"""The study over checkpoints: resumable, prefetching, writing tidy results.

For each model the final checkpoint is processed first (it is every CKA's reference),
then the other selected steps. While one checkpoint computes, the next is fetched and
converted in a background thread. Each finished checkpoint is written at once,
atomically, under `<out>/checkpoints/<model>/step<N>.parquet` (its metric rows) and
`<out>/activations/<model>/step<N>.npz` (the sampled activations pairwise CKA needs);
rerunning the same command skips what exists, so a kill loses at most the checkpoint in
flight. `finalize` gathers everything into `metrics.parquet`, `pairwise_cka.parquet`
and `checkpoints.parquet` (one status row per checkpoint).

metrics.parquet columns (`METRIC_COLUMNS`): model, step, layer, component, head, metric,
value; head is -1 for whole-layer values, layer -1 for whole-model values (loss).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd

from jax_pythia import checkpoints, data, sharding, study, suite, weights
from jax_pythia.config import GPTNeoXConfig
from jax_pythia.errors import JaxPythiaError
from jax_pythia.files import atomic_write, save_npz

METRIC_COLUMNS = ("model", "step", "layer", "component", "head", "metric", "value")
PAIRWISE_COLUMNS = ("model", "step", "other_step", "layer", "component", "head", "metric", "value")
STATUS_COLUMNS = ("model", "step", "status", "message", "load_s", "compute_s")
SUITE_MANIFEST = "suite.json"
_STEP_DIR_RE = re.compile(r"^step(\d+)$")


class SweepError(JaxPythiaError, ValueError):
  """A sweep that cannot run as asked (models, steps, data, output directory)."""


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where one model's checkpoints live: a local directory of step<N>/ or a Hub repo."""

  name: str
  location: str  # directory holding step<N>/ subfolders, or a Hub repo id
  steps: tuple[int, ...]  # every checkpoint available
  is_hub: bool = False
  suite_dir: str | None = None  # the suite directory (with suite.json) it belongs to

  @property
  def final_step(self) -> int:
    return self.steps[-1]

  def spec(self, step: int) -> str:
    return f"{self.location}@{suite.revision(step)}"


def _local_steps(directory: str) -> tuple[int, ...]:
  return tuple(
    sorted(
      int(m.group(1))
      for n in os.listdir(directory)
      if (m := _STEP_DIR_RE.match(n)) and os.path.isdir(os.path.join(directory, n))
    )
  )


def resolve_models(names: Sequence[str]) -> list[ModelSource]:
  """Models from suite names (`pythia-160m-deduped`), Hub ids (`org/name`), directories
  holding `step<N>/` checkpoints, or suite directories holding several such models."""
  models: list[ModelSource] = []
  for name in names:
    path = os.path.expanduser(name)
    if os.path.isdir(path):
      path = os.path.abspath(path)
      steps = _local_steps(path)
      if steps:
        parent = os.path.dirname(path)
        suite_dir = parent if os.path.isfile(os.path.join(parent, SUITE_MANIFEST)) else None
        models.append(ModelSource(os.path.basename(path), path, steps, suite_dir=suite_dir))
        continue
      members = sorted(
        n
        for n in os.listdir(path)
        if os.path.isdir(os.path.join(path, n)) and _local_steps(os.path.join(path, n))
      )
      if not members:
        raise SweepError(f"--models: {path} holds no step<N>/ checkpoints (nor models that do)")
      suite_dir = path if os.path.isfile(os.path.join(path, SUITE_MANIFEST)) else None
      for member in _manifest_order(path, members):
        sub = os.path.join(path, member)
        models.append(ModelSource(member, sub, _local_steps(sub), suite_dir=suite_dir))
      continue
    try:
      repo_id = suite.parse_model(name).repo_id
    except ValueError as e:
      if re.match(r"^[\w.-]+/[\w.-]+$", name) and not name.startswith("."):
        repo_id = name
      else:
        raise SweepError(f"--models: unknown model {name!r}: not a directory and {e}") from None
    models.append(ModelSource(repo_id.split("/")[-1], repo_id, suite.ALL_STEPS, is_hub=True))
  seen = set()
  for m in models:
    if m.name in seen:
      raise SweepError(f"--models: model name {m.name!r} appears twice")
    seen.add(m.name)
  return models


def _manifest_order(suite_dir: str, members: list[str]) -> list[str]:
  """Models in the manifest's order (smallest first), else alphabetical."""
  manifest = read_manifest(suite_dir)
  order = [m["name"] for m in manifest.get("models", [])] if manifest else []
  known = [m for m in order if m in members]
  return known + [m for m in members if m not in known]


def read_manifest(suite_dir: str | None) -> dict:
  if not suite_dir:
    return {}
  path = os.path.join(suite_dir, SUITE_MANIFEST)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}
  except json.JSONDecodeError as e:
    raise SweepError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class SweepOptions:
  """Everything that changes the numbers. A rerun into the same --out must match."""

  n_sequences: int = data.DEFAULT_N_SEQUENCES
  positions: str = "last"  # last | all | random:K
  data_step: int | None = None  # None: the step before the final checkpoint
  gradients: bool = True
  gradient_window: int = 5  # batches of steps s-w .. s+w
  gradient_sequences: int = data.DEFAULT_N_SEQUENCES
  gradient_microbatch: int = 0  # 0: whole batch at once
  value_slice: str = "per_head"
  loss_sequences: int = 0  # held-out loss on this many sequences (0: off)
  dtype: str = "float32"
  seed: int = 0

  def __post_init__(self):
    if self.n_sequences < 2:
      raise SweepError(
        f"--n_sequences={self.n_sequences}: CKA needs at least 2 (4 for the debiased estimator)"
      )
    if self.value_slice not in ("per_head", "reference"):
      raise SweepError(f"--value_slice={self.value_slice!r}: per_head or reference")
    if self.gradient_window < 0 or self.gradient_sequences < 1:
      raise SweepError("--gradient_window must be >= 0 and --gradient_sequences >= 1")
    mb = self.gradient_microbatch
    if mb < 0 or (mb and self.gradient_sequences % mb):
      raise SweepError(
        f"--gradient_microbatch={mb} must divide --gradient_sequences={self.gradient_sequences}"
      )
    parse_positions(self.positions)

  def fingerprint(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def parse_positions(spec: str) -> tuple[str, int]:
  """`last`, `all` or `random:K` -> (kind, K)."""
  if spec in ("last", "all"):
    return spec, 0
  m = re.match(r"^random:(\d+)$", spec)
  if not m or int(m.group(1)) < 1:
    raise SweepError(f"--positions={spec!r}: expected last, all or random:K (K >= 1)")
  return "random", int(m.group(1))


def position_index(spec: str, n: int, seq_len: int, seed: int) -> np.ndarray | None:
  """[n, k] token positions per sequence (None for all)."""
  kind, k = parse_positions(spec)
  if kind == "all":
    return None
  if kind == "last":
    return np.full((n, 1), seq_len - 1, np.int32)
  if k > seq_len:
    raise SweepError(f"--positions={spec}: only {seq_len} positions per sequence")
  rng = np.random.default_rng(seed)
  return np.sort(
    np.stack([rng.choice(seq_len, k, replace=False) for _ in range(n)]), axis=1
  ).astype(np.int32)


# ------------------------------------------------------------------------------ data


def gradient_steps(step: int, window: int, last_batch_step: int) -> list[int]:
  """The training steps whose batches give a checkpoint's gradients: s-w .. s+w, shifted
  to lie within the batches that exist (0 .. the step before the final checkpoint).

  Always 2w+1 batches (fewer only if the stream is shorter): the gradient statistics of
  every checkpoint average the same number of batches, and compile once.
  """
  count = min(2 * window + 1, last_batch_step + 1)
  start = min(max(step - window, 0), last_batch_step + 1 - count)
  return list(range(start, start + count))


def open_data(
  path: str | None,
  models: Sequence[ModelSource],
  tokenizer: str | None,
  sequences_per_step: int | None,
) -> data.TokenSource:
  """The token source: --data, else the data of the suite the models come from."""
  manifest = {}
  if path is None:
    suite_dirs = {m.suite_dir for m in models}
    if len(suite_dirs) != 1 or None in suite_dirs:
      raise SweepError(
        "--data is required: give Pythia's pre-tokenized Pile (.bin/.idx "
        "prefix), a .npy token array or a .txt file with --tokenizer"
      )
    suite_dir = suite_dirs.pop()
    manifest = read_manifest(suite_dir)
    path = os.path.join(suite_dir, manifest["data_prefix"])
    tokenizer = tokenizer or (
      os.path.join(suite_dir, manifest["tokenizer"]) if manifest.get("tokenizer") else None
    )
  if sequences_per_step is None:
    sequences_per_step = manifest.get("sequences_per_step", suite.SEQUENCES_PER_STEP)
  return data.open_token_source(path, tokenizer=tokenizer, sequences_per_step=sequences_per_step)


# ------------------------------------------------------------------------------- rows


def metric_rows(model: str, step: int, component: str, metric: str, values: Any) -> pd.DataFrame:
  """Tidy rows from values [] (whole model), [L] (per layer) or [L, H] (per head)."""
  v = np.asarray(values, dtype=np.float64)
  if v.ndim == 0:
    layer, head, flat = np.array([-1]), np.array([-1]), v.reshape(1)
  elif v.ndim == 1:
    layer, head, flat = np.arange(v.shape[0]), np.full(v.shape[0], -1), v
  elif v.ndim == 2:
    layer, head = np.meshgrid(np.arange(v.shape[0]), np.arange(v.shape[1]), indexing="ij")
    layer, head, flat = layer.ravel(), head.ravel(), v.ravel()
  else:
    raise ValueError(f"metric {metric!r} of {component!r}: unexpected shape {v.shape}")
  return pd.DataFrame(
    {
      "model": model,
      "step": np.int64(step),
      "layer": layer.astype(np.int64),
      "component": component,
      "head": head.astype(np.int64),
      "metric": metric,
      "value": flat,
    }
  )


def write_parquet(frame: pd.DataFrame, path: str) -> None:
  atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False), ".parquet")


def load_activations(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------ sweep


@dataclasses.dataclass
class Loaded:
  step: int
  config: GPTNeoXConfig | None = None
  params: Any = None
  directory: str | None = None
  error: str | None = None
  seconds: float = 0.0


class Sweep:
  """Runs the study for some models and steps into `out_dir` (see the module doc)."""

  def __init__(
    self,
    models: Sequence[ModelSource],
    steps: str,
    source: data.TokenSource,
    out_dir: str,
    options: SweepOptions = SweepOptions(),
    *,
    on_error: str = "stop",
    keep_checkpoints: bool = True,
    progress: Callable[[str, int], Any] | None = None,
    placement: sharding.Placement | None = None,
  ):
    if on_error not in ("stop", "skip"):
      raise SweepError(f"--on_error={on_error!r}: stop or skip")
    self.models, self.source, self.out_dir = list(models), source, out_dir
    self.options, self.on_error, self.keep = options, on_error, keep_checkpoints
    self.progress = progress
    # Mesh and process split (jax_pythia.sharding); the default is one device.
    self.placement = placement or sharding.Placement()
    self._references: dict[str, dict[str, np.ndarray]] = {}
    self._inputs: dict[str, np.ndarray] = {}
    self.plan = {m.name: self._selected_steps(m, steps) for m in self.models}
    self._check_output_dir()
    self._check_data()

  # -- planning

  def _selected_steps(self, m: ModelSource, spec: str) -> list[int]:
    try:
      steps = suite.parse_steps(spec, m.steps)
    except ValueError as e:
      raise SweepError(f"--steps for {m.name}: {e}") from None
    # The final checkpoint is the reference of every CKA, so it is always swept, first.
    return [m.final_step] + [s for s in steps if s != m.final_step]

  def _check_output_dir(self):
    path = os.path.join(self.out_dir, "sweep.json")
    record = {"options": self.options.fingerprint()}
    if os.path.exists(path):
      with open(path) as f:
        previous = json.load(f)
      if previous.get("options") != record["options"]:
        diff = {
          k: (previous.get("options", {}).get(k), v)
          for k, v in record["options"].items()
          if previous.get("options", {}).get(k) != v
        }
        raise SweepError(
          f"--out={self.out_dir} holds results computed with other options "
          f"(old, new: {diff}); use another --out or remove it"
        )
    else:
      atomic_write(path, lambda tmp: _write_json(tmp, record), ".json")

  def _check_data(self):
    o = self.options
    if o.data_step is not None and o.data_step < 0:
      raise SweepError(f"--data_step={o.data_step}: must be >= 0")
    tokens = (
      self.source.batch(self.data_step(self.models[0]), o.n_sequences)[:, :-1]
      if self.source.has_training_steps
      else self.source.fixed_inputs(o.n_sequences)
    )
    self.seq_len = tokens.shape[1]
    if o.gradients:
      if not self.source.has_training_steps:
        raise SweepError(
          f"gradients need the training batch of each step, which "
          f"{self.source.name} does not have; pass --nogradients or "
          "give --data a .bin/.idx training stream"
        )
      for m in self.models:
        last = max(
          max(gradient_steps(s, o.gradient_window, m.final_step - 1), default=0)
          for s in self.plan[m.name]
        )
        self.source.batch(last, o.gradient_sequences)  # raises naming file and step
    if o.loss_sequences:
      if not self.source.has_training_steps:
        raise SweepError(
          f"--loss_sequences needs a .bin/.idx training stream; {self.source.name} is not one"
        )
      for m in self.models:
        self.source.batch(m.final_step, o.loss_sequences)

  def data_step(self, m: ModelSource) -> int:
    return (
      self.options.data_step if self.options.data_step is not None else max(m.final_step - 1, 0)
    )

  def inputs(self, m: ModelSource) -> np.ndarray:
    """The fixed inputs every checkpoint of `m` is run on (read once per model)."""
    if m.name not in self._inputs:
      o = self.options
      if self.source.has_training_steps:
        tokens = self.source.batch(self.data_step(m), o.n_sequences)[:, :-1]
      else:
        tokens = self.source.fixed_inputs(o.n_sequences)
      self._inputs[m.name] = tokens
    return self._inputs[m.name]

  def paths(self, model: str, step: int) -> tuple[str, str, str]:
    base = os.path.join(self.out_dir, "{}", model, f"step{step}")
    return (
      base.format("checkpoints") + ".parquet",
      base.format("activations") + ".npz",
      base.format("status") + ".json",
    )

  def pending(self) -> dict[str, list[int]]:
    return {
      name: [s for s in steps if not os.path.exists(self.paths(name, s)[0])]
      for name, steps in self.plan.items()
    }

  # -- running

  def run(self) -> None:
    pending = self.pending()
    everything = [(m, s) for m in self.models for s in pending[m.name]]
    for queue in self.placement.schedule(everything):  # this process's share, in phases
      self._run_queue(queue)

  def _run_queue(self, queue: list[tuple[ModelSource, int]]) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      future = pool.submit(self._load, *queue[0]) if queue else None
      for i, (m, step) in enumerate(queue):
        loaded = future.result()
        future = pool.submit(self._load, *queue[i + 1]) if i + 1 < len(queue) else None
        self._process(m, loaded)
        if self.progress:
          self.progress(m.name, step)

  def _load(self, m: ModelSource, step: int) -> Loaded:
    start = time.perf_counter()
    try:
      local = None if m.is_hub else os.path.join(m.location, suite.revision(step))
      if local and checkpoints.is_converted(local):
        # An orbax cache: restored in compute, straight onto the mesh's shardings.
        return Loaded(
          step,
          sharding.converted_config(local),
          sharding.Converted(local),
          local,
          seconds=time.perf_counter() - start,
        )
      directory = checkpoints.resolve_checkpoint(m.spec(step))
      config = GPTNeoXConfig.from_json_file(os.path.join(directory, weights.CONFIG_FILE))
      params = weights.convert_state_dict(
        weights.read_state_dict(directory), config, self.options.dtype
      )
      return Loaded(step, config, params, directory, seconds=time.perf_counter() - start)
    except JaxPythiaError as e:
      return Loaded(step, error=str(e), seconds=time.perf_counter() - start)

  def _reference(self, m: ModelSource) -> dict[str, np.ndarray]:
    if m.name in self._references:  # computed here (split=shard: only process 0 writes)
      return self._references[m.name]
    return load_activations(self.paths(m.name, m.final_step)[1])

  def _process(self, m: ModelSource, loaded: Loaded) -> None:
    metrics_path, acts_path, status_path = self.paths(m.name, loaded.step)
    status = {"model": m.name, "step": loaded.step, "load_s": loaded.seconds}
    if loaded.error is not None:
      if loaded.step == m.final_step or self.on_error == "stop":
        why = " (the final checkpoint is the CKA reference)" if loaded.step == m.final_step else ""
        raise SweepError(f"{m.name} step {loaded.step}: {loaded.error}{why}")
      atomic_write(
        status_path,
        lambda tmp: _write_json(tmp, {**status, "status": "failed", "message": loaded.error}),
        ".json",
      )
      return
    start = time.perf_counter()
    rows, acts = self.compute(m, loaded)
    if not self.placement.is_writer:
      return
    save_npz(acts_path, acts)
    write_parquet(rows, metrics_path)  # last: its existence marks the step done
    status.update(status="ok", message="", compute_s=time.perf_counter() - start)
    atomic_write(status_path, lambda tmp: _write_json(tmp, status), ".json")
    if not self.keep and m.is_hub and loaded.directory:
      checkpoints.evict_snapshot(loaded.directory)

  def compute(self, m: ModelSource, loaded: Loaded) -> tuple[pd.DataFrame, dict]:
    """All metrics of one checkpoint: (tidy rows, activations to store)."""
    o, config, step = self.options, loaded.config, loaded.step
    place = self.placement
    params = place.params(loaded.params, config)
    tokens = self.inputs(m)
    data.check_token_ids(tokens, config.vocab_size, self.source.name)
    idx = position_index(o.positions, len(tokens), tokens.shape[1], o.seed)
    acts = study.activation_fn(config, o.value_slice)(
      params, place.batch(tokens, 0, "--n_sequences"), place.replicate(idx)
    )
    acts = {k: place.host(v) for k, v in acts.items()}
    if step == m.final_step:
      self._references[m.name] = acts
    reference = acts if step == m.final_step else self._reference(m)
    frames = []
    add = lambda c, metric, v: frames.append(  # noqa: E731
      metric_rows(m.name, step, c, metric, place.host(v))
    )

    for (component, estimator), value in study.cka_against(acts, reference).items():
      add(component, estimator, value)
    if step == m.final_step:
      key = jax.random.PRNGKey(o.seed)
      for (component, estimator), value in study.cka_noise_floor(acts, key).items():
        add(component, estimator + "_floor", value)
    # Spectra run on one device: LAPACK SVDs do not split over a mesh (every device would
    # repeat them), and they are small next to the forward and backward passes.
    layers = place.single_device(params["layers"])
    for component, metrics in study.weight_metrics(layers, o.value_slice).items():
      for metric, value in metrics.items():
        add(component, metric, value)
    if o.gradients:
      batches = np.stack(
        [
          self.source.batch(s, o.gradient_sequences)
          for s in gradient_steps(step, o.gradient_window, m.final_step - 1)
        ]
      )
      mb = o.gradient_microbatch or o.gradient_sequences
      batches = batches.reshape(batches.shape[0], -1, mb, batches.shape[-1])
      data.check_token_ids(batches, config.vocab_size, self.source.name)
      losses, grads = study.gradient_fn(config, o.value_slice)(
        params, place.batch(batches, 2, "--gradient_microbatch (or _sequences)")
      )
      grad_metrics = study.gradient_metrics(place.single_device(grads), layers, o.value_slice)
      for component, metrics in grad_metrics.items():
        for metric, value in metrics.items():
          name = metric if metric.startswith("grad_") else "grad_" + metric
          add(component, name, value)
      add("model", "train_loss", np.mean(place.host(losses)))
    if o.loss_sequences:
      heldout = self.heldout_tokens(m)
      add(
        "model",
        "heldout_loss",
        study.loss_fn(config)(params, place.batch(heldout, 0, "--loss_sequences")),
      )
    return pd.concat(frames, ignore_index=True), acts

  def heldout_tokens(self, m: ModelSource) -> np.ndarray:
    """The batch of the final step: in the stream, but no checkpoint trained on it."""
    return self.source.batch(m.final_step, self.options.loss_sequences)


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)


# --------------------------------------------------------------------------- finalize


def collect(out_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
  """(metrics, status) gathered from the per-checkpoint files under out_dir."""
  frames = []
  root = os.path.join(out_dir, "checkpoints")
  for dirpath, _, files in sorted(os.walk(root)):
    frames += [
      pd.read_parquet(os.path.join(dirpath, f))
      for f in sorted(files)
      if f.endswith(".parquet") and not f.startswith(".tmp-")
    ]
  metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=METRIC_COLUMNS)
  metrics = metrics.sort_values(
    ["model", "step", "component", "metric", "layer", "head"], kind="stable", ignore_index=True
  )
  statuses = []
  for dirpath, _, files in sorted(os.walk(os.path.join(out_dir, "status"))):
    for f in sorted(files):
      if f.endswith(".json") and not f.startswith(".tmp-"):
        with open(os.path.join(dirpath, f)) as fh:
          statuses.append(json.load(fh))
  status = pd.DataFrame(statuses, columns=STATUS_COLUMNS)
  return metrics, status.sort_values(["model", "step"], ignore_index=True)


def pairwise(out_dir: str, model: str, steps: Sequence[int]) -> pd.DataFrame:
  """CKA between every pair of swept checkpoints of one model, per layer and component."""
  paths = [os.path.join(out_dir, "activations", model, f"step{s}.npz") for s in steps]
  present = [(s, p) for s, p in zip(steps, paths) if os.path.exists(p)]
  if len(present) < 2:
    return pd.DataFrame(columns=PAIRWISE_COLUMNS)
  steps = [s for s, _ in present]
  loaded = [load_activations(p) for _, p in present]
  frames = []
  for component in loaded[0]:
    stacked = np.stack([a[component] for a in loaded])  # [C, L, (H,) n, e]
    for metric, debiased in study.CKA_ESTIMATORS.items():
      matrix = np.asarray(study.pairwise_matrix(stacked, debiased))  # [L, (H,) C, C]
      lead = matrix.shape[:-2]
      for index in np.ndindex(*lead):
        layer = index[0]
        head = index[1] if len(index) > 1 else -1
        m = matrix[index]
        a, b = np.meshgrid(np.arange(len(steps)), np.arange(len(steps)), indexing="ij")
        frames.append(
          pd.DataFrame(
            {
              "model": model,
              "step": np.asarray(steps)[a.ravel()],
              "other_step": np.asarray(steps)[b.ravel()],
              "layer": layer,
              "component": component,
              "head": head,
              "metric": metric,
              "value": m.ravel().astype(np.float64),
            }
          )
        )
  return pd.concat(frames, ignore_index=True)


def finalize(out_dir: str, models: Sequence[str] | None = None) -> dict[str, str]:
  """Writes metrics.parquet, checkpoints.parquet and pairwise_cka.parquet; their paths."""
  metrics, status = collect(out_dir)
  if metrics.empty:
    raise SweepError(f"{out_dir}: no finished checkpoints to gather")
  paths = {
    name: os.path.join(out_dir, name + ".parquet")
    for name in ("metrics", "checkpoints", "pairwise_cka")
  }
  write_parquet(metrics, paths["metrics"])
  write_parquet(status, paths["checkpoints"])
  models = models or sorted(metrics["model"].unique())
  pair = [
    pairwise(out_dir, name, sorted(metrics.loc[metrics.model == name, "step"].unique()))
    for name in models
  ]
  write_parquet(pd.concat(pair, ignore_index=True), paths["pairwise_cka"])
  return paths
