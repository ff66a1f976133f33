"""What a sweep will cost before it runs: bytes, FLOPs, memory per device, time.

Shapes come from `jax_pythia.suite` (Pythia names) or from a local directory's
config.json (the toy suite, test suites). FLOP counts use the standard estimates:
2 * params * tokens for a forward pass and 6 * params * tokens for forward + backward,
with params the matmul weights a token passes through, plus the attention matmuls
(QK^T and AV: 2 * 2 * s * d per token and layer forward; the model computes the full
masked s x s square), plus the SVDs of the spectra (about 4 m n^2 each). Memory per
device is params + the chosen weights' gradients + activations kept for the backward
pass, under the mesh's model and data split (jax_pythia.scale.sharding). One checkpoint per
call streams its gradient batches (jax_pythia.sweep): the gradient call holds one batch's
gradients, beside the previous batch's kept for the spectra, and the spectra call two
batches' and one batch's SVD workspace, whatever G; C > 1 stacked checkpoints hold all G
batches at once. These are estimates, meant to size a pod, not to replace a measured run.

Memory decides how the gradients are computed: `choose_layout` picks the largest
gradient microbatch, and the cheapest rematerialisation (`model.REMAT_POLICIES`), whose
planned peak stays under `HEADROOM` of the device's memory (`--device_memory`, by default
what the device reports). The per-token coefficients of the activation model count the
residuals the backward pass keeps and were checked against XLA's own buffer assignment
(`compiled.memory_analysis()`, tests/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from jax_pythia import suite
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.scale.memory import (  # noqa: F401  (the plan's public names, in one place)
  FULL_MICROBATCH_TOKENS,
  Layout,
  checkpoints_per_call,
  choose_layout,
  choose_mesh,
  forward_call_bytes,
  gradient_call_bytes,
  gradient_layouts,
  memory_per_device,
  require_fit,
  spectra_call_bytes,
  stacked_peaks,
  sweep_layouts,
  sweep_work,
)
from jax_pythia.scale.shapes import (  # noqa: F401
  DTYPE_BYTES,
  HEADROOM,
  LOSS_CHUNK_TOKENS,
  PILE_BYTES,
  REMAT,
  PlanError,
  Shape,
  Work,
  attention_flops,
  available_ram,
  device_memory,
  flops_per_checkpoint,
  format_bytes,
  from_directory,
  from_suite,
  kept_positions,
  layer_gradient_values,
  mesh_of,
  of_source,
  parse_bytes,
  resolve,
  selected_work,
  si,
  spectra_layers,
  split_problem,
  svd_flops,
)


def measure_flops_per_device(seconds: float = 2.0, checkpoints_per_call: int = 1) -> float:  # noqa: F811
  """FLOP/s one local device reaches on a small model's forward (all its overheads in),
  run on `checkpoints_per_call` stacked copies of the model in one call, as the sweep
  does (what stacking gains shows here)."""
  import jax

  from jax_pythia.models import model as model

  config = GPTNeoXConfig(
    vocab_size=4096, d_model=512, n_layers=4, n_heads=8, d_mlp=2048, max_seq_len=256
  )
  c = checkpoints_per_call
  params = model.init_params(config, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: np.broadcast_to(x, (c, *x.shape)), params)
  tokens = np.zeros((8, 256), np.int32)
  forward = model.make_forward(config, return_logits=True)
  fn = jax.jit(jax.vmap(forward, in_axes=(0, None)))
  jax.block_until_ready(fn(params, tokens))
  shape = Shape("measure", 4, 512, 8, 2048, 4096, 256, (0,))
  flops = c * (2 * (shape.layer_params + 512 * 4096) * 8 * 256 + attention_flops(shape, 8))
  runs, start = 0, time.perf_counter()
  while runs < 3 or time.perf_counter() - start < seconds:
    jax.block_until_ready(fn(params, tokens))
    runs += 1
  return flops * runs / (time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class ModelPlan:
  shape: Shape
  steps: tuple[int, ...]
  flops: dict[str, float]
  memory: dict[str, float]
  compute_s: float  # per checkpoint, on all devices
  fetch_s: float  # per checkpoint, one host
  layout: Layout | None = None  # chosen from the device's memory, when it is known
  checkpoints_per_call: int = 1  # memory holds this many at once; FLOPs per checkpoint are
  # unchanged (stacking changes the rate reached, which --measure measures at C)
  mesh: dict | None = None  # {'data': D, 'model': M} planned under
  refine_bytes: float = 0.0  # of the spectra call's peak, the float64 refinement's part

  @property
  def fetch_bytes(self) -> int:
    return self.shape.bytes_per_checkpoint * len(self.steps)

  def total_s(self, hosts: int = 1) -> float:
    # Fetching overlaps computing (the sweep prefetches), so the slower one sets the pace;
    # with split=checkpoints each host fetches its own share.
    per = max(self.compute_s, self.fetch_s / hosts)
    return per * len(self.steps)


def make_plan(
  shape: Shape,
  steps: str,
  work: Work,
  mesh: dict[str, int],
  flops_per_second: float,
  bandwidth: float,
  device_bytes: float | None = None,
) -> ModelPlan:
  """`flops_per_second`: what all devices together sustain (peak x utilisation).
  `device_bytes`: one device's memory; the plan then runs each call in the microbatches
  (and rematerialisation) that `choose_layout` picks, and reports memory under them."""
  try:
    chosen = suite.parse_steps(steps, shape.steps)
  except ValueError as e:
    raise PlanError(f"--steps for {shape.name}: {e}") from None
  if shape.steps[-1] not in chosen:
    chosen = chosen + (shape.steps[-1],)  # the sweep always adds the final checkpoint
  problem = split_problem(shape.n_heads, shape.n_kv_heads, shape.d_mlp, mesh.get("model", 1))
  if problem:
    raise PlanError(f"--mesh for {shape.name}: {problem}")
  flops = flops_per_checkpoint(shape, work)
  layout = None
  if device_bytes:
    layout = choose_layout(shape, work, mesh, device_bytes)
    work = dataclasses.replace(work, gradient_microbatch=layout.gradient_microbatch)
    g_seqs = work.gradient_batches * work.gradient_sequences
    # What rematerialisation recomputes: the attention core, or the whole layer's forward.
    extra = {
      "none": 0.0,
      "attention": attention_flops(shape, g_seqs),
      "layer": 2 * shape.layer_params * g_seqs * shape.seq_len + attention_flops(shape, g_seqs),
    }[layout.remat]
    flops = {**flops, "gradients": flops["gradients"] + extra, "total": flops["total"] + extra}
  memory = memory_per_device(
    shape,
    work,
    mesh,
    layout.remat if layout else "none",
    layout.carry if layout else "device",
    layout.capture_microbatch if layout else 0,
  )
  if layout:
    c = work.checkpoints_per_call
    peak = layout.peak if c == 1 else max(stacked_peaks(shape, work, mesh, layout, c).values())
    memory = {**memory, "total": peak}
  return ModelPlan(
    shape,
    chosen,
    flops,
    memory,
    flops["total"] / flops_per_second,
    shape.bytes_per_checkpoint / bandwidth,
    layout,
    work.checkpoints_per_call,
    dict(mesh),
    spectra_call_bytes(shape, work, mesh=mesh)["refine"] if work.gradients else 0.0,
  )


def _duration(s: float) -> str:
  if s < 120:
    return f"{s:.3g} s"
  if s < 7200:
    return f"{s / 60:.3g} min"
  return f"{s / 3600:.3g} h"


def format_plan(
  plans: Sequence[ModelPlan],
  devices: int,
  hosts: int,
  flops_per_second: float,
  source: str,
  data_bytes: int | None = None,
  data_batches: int = 0,
  memory_source: str = "",
  stream: tuple[str, int | None] = ("Pythia's training stream", PILE_BYTES),
) -> str:
  """The plan as text; `data_bytes` of training data in `data_batches` batches (what
  tools.fetch_data stages, from jax_pythia.sweep.run.batches_needed) go beside the
  checkpoints, and `stream`, (name, bytes or None when unknown), is what they come from."""
  lines = [
    f"plan for {devices} device(s) on {hosts} host(s); throughput "
    f"{si(flops_per_second, 'FLOP/s')} in all ({source})",
  ]
  if memory_source:
    lines.append(f"memory: {memory_source}; peaks held under {HEADROOM:.0%} of it")
  lines += ["", *_plan_table(plans, hosts)]
  total = sum(p.total_s(hosts) for p in plans)
  lines += [
    "",
    f"all models: {si(sum(p.fetch_bytes for p in plans), 'B')} of checkpoints to fetch, "
    f"about {_duration(total)}",
  ]
  lines += _misfits(plans)
  if data_bytes is not None:
    lines.append(
      f"training data: {si(data_bytes, 'B')} to fetch ({data_batches} batches read by byte "
      f"range; tools.fetch_data stages them), {_stream_words(*stream)}"
    )
  return "\n".join(lines)


def _plan_table(plans: Sequence[ModelPlan], hosts: int) -> list[str]:
  """One aligned row per model: checkpoints, FLOPs, layout, memory per device, time."""
  header = (
    "model",
    "ckpts",
    "C",
    "params",
    "fetch",
    "FLOPs/ckpt",
    "(capture/grad)",
    "microbatch",
    "mem/device",
    "(params/grads/acts)",
    "s/ckpt",
    "total",
  )
  rows = [header]
  for p in plans:
    f, m = p.flops, p.memory
    rows.append(
      (
        p.shape.name,
        str(len(p.steps)),
        str(p.checkpoints_per_call),
        si(p.shape.params, ""),
        si(p.fetch_bytes, "B"),
        si(f["total"], ""),
        f"{si(f['capture'], '')}/{si(f['gradients'], '')}",
        _layout_cell(p.layout) + _mesh_cell(p.mesh),
        si(m["total"], "B"),
        f"{si(m['params'], 'B')}/{si(m['grads'], 'B')}/{si(m['activations'], 'B')}",
        f"{max(p.compute_s, p.fetch_s / hosts):.3g}",
        _duration(p.total_s(hosts)),
      )
    )
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _misfits(plans: Sequence[ModelPlan]) -> list[str]:
  """One line per model that does not fit, naming the call that needs the most."""
  lines = []
  for p in plans:
    if p.layout and not p.layout.fits:
      call = max(p.layout.peaks, key=p.layout.peaks.get)
      lines.append(
        f"* {p.shape.name} does not fit: its {call} call needs "
        f"{si(p.layout.peaks[call], 'B')} per device"
        + (" even at the smallest microbatch with remat" if call != "spectra" else "")
        + f", over {si(p.layout.limit, 'B')}"
        + (_refine_words(p.refine_bytes) if call == "spectra" and p.refine_bytes else "")
      )
  return lines


def _refine_words(refine_bytes: float) -> str:
  return (
    f"; {si(refine_bytes, 'B')} of it is the float64 refinement of gradient condition "
    "numbers: leave grad_condition_number out of --metrics, or plan for a TPU "
    "(--platform=tpu: no float64, so no refinement)"
  )


def _stream_words(name: str, size: int | None) -> str:
  """'not the whole 1.2 MB of x' (or 'from x' where its size is not known here)."""
  return f"not the whole {si(size, 'B')} of {name}" if size else f"from {name}"


def _mesh_cell(mesh: dict | None) -> str:
  """' model:4' when the plan splits the weights over a model axis (pass --mesh so)."""
  return f" model:{mesh['model']}" if mesh and mesh.get("model", 1) > 1 else ""


def _layout_cell(layout: Layout | None) -> str:
  """'16' or '4 remat:attention' (the gradient microbatch), '*' marking a misfit."""
  if layout is None:
    return "given"
  cell = str(layout.gradient_microbatch or layout.capture_microbatch)
  if layout.remat != "none":
    cell += f" remat:{layout.remat}"
  if layout.carry == "host":
    cell += " carry:host"
  return cell if layout.fits else cell + " *"
