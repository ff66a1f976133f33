"""Memory per device of a sweep's compiled calls (the gradient call, the forward capture,
the spectra), the layouts (microbatch, rematerialisation, mesh) that fit a device, the
checkpoints stacked per call, and the device's memory itself. The model is checked
against XLA's memory_analysis in tests/test_memory.py."""

from __future__ import annotations

import dataclasses

from jax_pythia.scale.shapes import (
  DTYPE_BYTES,
  HEADROOM,
  LOSS_CHUNK_TOKENS,
  REMAT,
  PlanError,
  Shape,
  Work,
  device_memory,
  kept_positions,
  layer_gradient_values,
  of_source,
  selected_work,
  si,
  spectra_layers,
  split_problem,
)

_ACTIVATION_VALUES = {
  "none": ((10, 4, 2), (0, 3, 2), 3),
  "attention": ((8, 0.5, 0), (0, 5, 1), 2.5),
  "layer": ((1, 0, 0), (12, 4.5, 1), 2),
}


def _dims(shape, model_axis: int) -> tuple:
  """(d, f, L, V, H, s, vocab_split): the shape's sizes, and how many ways the
  vocabulary splits over a model axis of `model_axis` devices (1 if it does not divide)."""
  V = shape.vocab
  return (
    shape.d_model,
    shape.d_mlp,
    shape.n_layers,
    V,
    shape.n_heads,
    shape.seq_len,
    model_axis if V % model_axis == 0 else 1,
  )


def gradient_call_bytes(
  shape: Shape,
  work: Work,
  mesh: dict[str, int],
  microbatch: int | None = None,
  remat: str = "none",
  checkpoints_per_call: int = 1,
  carry: str = "device",
) -> dict[str, float]:
  """{part: bytes} on one device of the compiled gradient call under `mesh`: params,
  outputs (the gradients), accumulators (the microbatch scan's running sum and one
  microbatch's gradient), activations (what the backward pass keeps for one microbatch,
  `remat` deciding how much), tokens; beside the call: carry, spectra_weights; total.

  One checkpoint per call (C = 1) is the sweep's streamed call (study.batch_gradient_fn):
  one batch's gradients, in the weights' dtype, and tokens. Beside it, split by layer over
  all devices (`spectra_layers` per device): the carry, the previous batch's gradients in
  the weights' dtype (none when G = 1 or `carry` is 'host'), and on several devices the
  copy of the weights the spectra read. C > 1 checkpoints are the stacked call
  (study.batched_gradient_fn): every part for all G batches, float32 gradients, times C (a
  call vmapped over a checkpoint axis holds each one's weights, outputs and activations);
  nothing beside.
  """
  if remat not in _ACTIVATION_VALUES:
    raise PlanError(f"remat={remat!r}: one of {', '.join(REMAT)}")
  D, M = mesh.get("data", 1), mesh.get("model", 1)
  b = DTYPE_BYTES[work.dtype]
  d, f, L, V, H, s, vocab_split = _dims(shape, M)
  grad_values = L * layer_gradient_values(shape) / M  # value, out and fc_out kernels
  streamed = checkpoints_per_call == 1
  G = work.gradient_batches
  batches = 1 if streamed else G  # gradient batches the call computes
  mb = microbatch or work.gradient_microbatch or work.gradient_sequences
  (ld, lf, ls), (wd, wf, ws), lv = _ACTIVATION_VALUES[remat]
  per_token = (
    L * (b * (ld * d + lf * f / M) + 4 * ls * (H / M) * s)
    + b * (wd * d + wf * f / M)
    + 4 * ws * (H / M) * s
  )
  tokens = mb / D * s
  # The loss holds float32 logits of one chunk of tokens at a time (model.lm_loss).
  logits = 4 * lv * V / vocab_split * min(tokens, LOSS_CHUNK_TOKENS)
  parts = {
    "params": _param_bytes(shape, work, mesh),
    "outputs": (b if streamed else 4) * batches * grad_values + 4 * batches,
    # The running sum and one microbatch's gradient of the attention kernels: XLA adds the
    # MLP's fc_out gradient into the sum in place (the dot's output fused with the add;
    # XLA:CPU's buffer assignment, float32).
    "accumulators": b * (grad_values + L * (d * shape.kv_width + d * d) / M),
    "activations": tokens * per_token + logits,
    "tokens": 4 * batches * work.gradient_sequences / D * (s + 1),
  }
  parts = {k: v * checkpoints_per_call for k, v in parts.items()}
  beside = spectra_layers(shape, mesh) * layer_gradient_values(shape) * b if streamed else 0.0
  parts["carry"] = beside if G > 1 and carry == "device" else 0.0
  parts["spectra_weights"] = beside if D * M > 1 else 0.0  # one device: the params themselves
  parts["total"] = sum(parts.values())
  return parts


def _param_bytes(shape: Shape, work: Work, mesh: dict[str, int]) -> float:
  M = mesh.get("model", 1)
  d, L, V = shape.d_model, shape.n_layers, shape.vocab
  vocab_split = M if V % M == 0 else 1
  embeddings = (1 if shape.tied_embeddings else 2) * V * d / vocab_split
  layers = (shape.layer_params + _split_biases(shape)) / M  # kernels and split biases
  # GPT-NeoX: LayerNorms, out/fc_out biases; Llama: the norms' scales. Replicated.
  small = L * 6 * d + 2 * d if not shape.gated_mlp else L * 2 * d + d
  return DTYPE_BYTES[work.dtype] * (embeddings + layers + small)


def _split_biases(shape: Shape) -> int:
  """GPT-NeoX's qkv and fc_in biases (split with their kernels); the Llama family has none."""
  return 0 if shape.gated_mlp else shape.n_layers * (3 * shape.d_model + shape.d_mlp)


def forward_call_bytes(
  shape: Shape,
  work: Work,
  mesh: dict[str, int],
  sequences: int,
  microbatch: int,
  logits: bool = False,
  checkpoints_per_call: int = 1,
) -> dict[str, float]:
  """{part: bytes} on one device of a forward call on `sequences` sequences, run
  `microbatch` at a time: the capture call (study.activation_fn: captured outputs) or,
  with `logits`, the loss call (study.loss_fn). A forward keeps one layer's intermediates
  at a time: the larger of the attention phase (input, normalised, q, k, v, rotated q and
  k, and the float32 scores and pattern) and the MLP phase (input, normalised,
  pre/post-activation, output)."""
  D, M = mesh.get("data", 1), mesh.get("model", 1)
  b = DTYPE_BYTES[work.dtype]
  d, f, L, V, H, s, vocab_split = _dims(shape, M)
  mlp_values = 3 if shape.gated_mlp else 2  # SwiGLU's gate, linear branch and product
  per_token = max(b * 6 * d + 4 * 2 * (H / M) * s, b * (3 * d + mlp_values * f / M))
  if logits:
    per_token += 3 * 4 * V / vocab_split
  # ov_head, ov, mlp and resid of every kept token, float32, twice (result and stacking).
  captured = 0.0 if logits else 2 * 4 * L * 4 * d * sequences / D * work.kept_positions
  parts = {
    "params": _param_bytes(shape, work, mesh),
    "outputs": captured,
    "activations": microbatch / D * s * per_token,
    "tokens": 4 * sequences / D * (s + 1),
  }
  parts = {k: v * checkpoints_per_call for k, v in parts.items()}
  parts["total"] = sum(parts.values())
  return parts


#: Bytes per value of one layer's gradient matrices that the float64 refinement of their
#: condition numbers holds (analysis.spectra.refine_singular_values: the matrices cast to
#: float64 and their float64 SVD's workspace), fit to XLA:CPU's figures (tests/test_memory.py).
REFINE_BYTES_PER_VALUE = 20


def spectra_call_bytes(
  shape: Shape, work: Work, checkpoints_per_call: int = 1, mesh: dict[str, int] | None = None
) -> dict[str, float]:
  """{part: bytes} on one device of the gradient spectra call.

  One checkpoint per call (C = 1) is the sweep's per-batch call (streamed.gradient_terms, on a
  mesh streamed.spread_gradient_terms), split by layer over all devices (`spectra_layers` per
  device): the current and the previous batch's gradients and the weights the spectra
  read, in the weights' dtype, and one layer's float32 copies and SVD workspace
  (`workspace`), whatever L and G; beside it the rest of the params' shard. With
  `work.refine`, the float64 refinement's workspace (`refine`): one layer's, or every
  layer's at C > 1.
  C > 1 is the stacked call (study.batched_gradient_metrics) on one device: G batches'
  float32 gradients and workspace, the layer weights in float32, times C. Held within 25%
  of XLA's figure on CPU for float32 (tests/test_memory.py; XLA:CPU computes bfloat16 in
  float32 and holds more).
  """
  d, f, L = shape.d_model, shape.d_mlp, shape.n_layers
  if checkpoints_per_call == 1:
    mesh = mesh or {}
    devices = mesh.get("data", 1) * mesh.get("model", 1)
    b = DTYPE_BYTES[work.dtype]
    held = spectra_layers(shape, mesh) * layer_gradient_values(shape) * b
    parts = {
      "gradients": 2 * held,  # G = 1: the first carry's zeros
      "weights": held,
      "workspace": 4 * 4 * layer_gradient_values(shape),
      "refine": work.refine * REFINE_BYTES_PER_VALUE * layer_gradient_values(shape),
      # The rest of the params' shard waits beside the call (on one device the weights
      # the spectra read are the params themselves).
      "params": _param_bytes(shape, work, mesh) - (held if devices == 1 else 0),
    }
    parts["total"] = sum(parts.values())
    return parts
  G = work.gradient_batches
  parts = {
    "gradients": 4 * G * L * layer_gradient_values(shape),
    "weights": 4 * (shape.layer_params + _split_biases(shape)),
    "workspace": 4 * G * L * f * d,
    "refine": work.refine * REFINE_BYTES_PER_VALUE * L * layer_gradient_values(shape),
  }
  parts = {k: v * checkpoints_per_call for k, v in parts.items()}
  parts["total"] = sum(parts.values())
  return parts


def memory_per_device(
  shape: Shape,
  work: Work,
  mesh: dict[str, int],
  remat: str = "none",
  carry: str = "device",
  capture_microbatch: int = 0,
) -> dict[str, float]:
  """{params, grads, activations, total}: bytes on one device under `mesh` ({'data': D,
  'model': M}) of the gradient call (work.gradient_microbatch, `remat`) or, without
  gradients, of the capture forward (`capture_microbatch` sequences at a time; 0: all)."""
  if work.gradients:
    g = gradient_call_bytes(
      shape, work, mesh, remat=remat, checkpoints_per_call=work.checkpoints_per_call, carry=carry
    )
    grads = g["outputs"] + g["accumulators"] + g["carry"] + g["spectra_weights"]
    out = {"params": g["params"], "grads": grads}
  else:
    g = forward_call_bytes(
      shape,
      work,
      mesh,
      work.n_sequences,
      capture_microbatch or work.n_sequences,
      checkpoints_per_call=work.checkpoints_per_call,
    )
    out = {"params": g["params"], "grads": 0.0}
  out["activations"] = g["total"] - sum(out.values())
  out["total"] = g["total"]
  return out


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one checkpoint's calls run on a device: microbatches and rematerialisation, with
  each call's planned peak (bytes per device) and the limit they were held under."""

  gradient_microbatch: int
  remat: str
  capture_microbatch: int
  loss_microbatch: int
  peaks: dict[str, float]  # {call: bytes}: weights, capture, gradients, spectra, loss
  limit: float
  carry: str = "device"  # where the previous batch's gradients wait: device or host

  @property
  def peak(self) -> float:
    return max(self.peaks.values())

  @property
  def fits(self) -> bool:
    return self.peak <= self.limit

  def describe(self) -> str:
    grad = f"gradient microbatch {self.gradient_microbatch} (remat {self.remat}"
    grad += ", carry in host memory), " if self.carry == "host" else "), "
    return (
      (grad if "gradients" in self.peaks else "")
      + (f"capture microbatch {self.capture_microbatch}: " if "capture" in self.peaks else "")
      + f"peak {si(self.peak, 'B')} of "
      f"{si(self.limit, 'B')} per device"
    )


def _microbatches(sequences: int, data: int) -> list[int]:
  """Sizes that divide `sequences` and split over the data axis, largest first."""
  return [m for m in range(sequences, 0, -1) if sequences % m == 0 and m % data == 0] or [sequences]


#: Tokens per device that already fill an accelerator's matmuls (8 sequences of 2048): a
#: larger gradient microbatch saves little, so beyond it less recomputation comes first.
FULL_MICROBATCH_TOKENS = 16384


def gradient_layouts(shape: Shape, work: Work, mesh: dict[str, int]) -> list[tuple[int, str]]:
  """(microbatch, remat) the gradient call may use, best first: larger microbatches first
  (fewer, fuller steps) up to FULL_MICROBATCH_TOKENS per device, then the least
  recomputation, then larger still. So remat is used when it makes a larger microbatch
  fit, unless the one that fits without it already fills the device. An explicit
  work.gradient_microbatch is the only size. (Checkpoints per call, once a call holds
  several, join this order.)"""
  D = mesh.get("data", 1)
  sizes = (
    [work.gradient_microbatch]
    if work.gradient_microbatch
    else _microbatches(work.gradient_sequences, D)
  )

  def merit(layout):
    mb, remat = layout
    return (min(mb / D * shape.seq_len, FULL_MICROBATCH_TOKENS), -REMAT.index(remat), mb)

  return sorted(((m, r) for m in sizes for r in REMAT), key=merit, reverse=True)


def _first_fit(candidates, cost, limit):
  """(candidate, bytes) of the first candidate whose cost fits `limit`, else the last."""
  for c in candidates:
    peak = cost(c)
    if peak <= limit:
      break
  return c, peak


def choose_layout(shape: Shape, work: Work, mesh: dict[str, int], device_bytes: float) -> Layout:
  """For each call of one checkpoint (the gradient batches streamed) the first of its
  candidates whose planned peak stays under HEADROOM x device_bytes (the gradient call:
  `gradient_layouts`; the forward calls: the largest microbatch). Where nothing fits, the
  most frugal candidate, and `fits` is False. Stacked checkpoints run under the same
  microbatches (`stacked_peaks`)."""
  limit = HEADROOM * device_bytes
  D = mesh.get("data", 1)
  # The weights alone: the whole peak when no forward or gradient call is selected.
  peaks, capture = {"weights": _param_bytes(shape, work, mesh)}, 0
  if work.captures:  # no forward capture without a selected activation metric
    capture, peaks["capture"] = _first_fit(
      _microbatches(work.n_sequences, D),
      lambda m: forward_call_bytes(shape, work, mesh, work.n_sequences, m)["total"],
      limit,
    )
  loss = 0
  if work.loss_sequences:
    loss, peaks["loss"] = _first_fit(
      _microbatches(work.loss_sequences, D),
      lambda m: forward_call_bytes(shape, work, mesh, work.loss_sequences, m, True)["total"],
      limit,
    )
  microbatch, remat, carry = 0, "none", "device"
  if work.gradients:
    # The previous batch's gradients wait on the devices unless only host memory lets the
    # gradient call fit (two transfers of a batch's gradients per batch).
    layouts = gradient_layouts(shape, work, mesh)
    (microbatch, remat, carry), peaks["gradients"] = _first_fit(
      [(*c, where) for where in ("device", "host") for c in layouts],
      lambda c: gradient_call_bytes(shape, work, mesh, c[0], c[1], carry=c[2])["total"],
      limit,
    )
    peaks["spectra"] = spectra_call_bytes(shape, work, mesh=mesh)["total"]
  return Layout(microbatch, remat, capture, loss, peaks, limit, carry)


def choose_mesh(shape: Shape, work: Work, devices: int, device_bytes: float | None) -> dict:
  """{'data': D, 'model': M} for `devices` when no mesh is given: the smallest model axis
  (a power of two dividing the devices, the heads and d_mlp) under which `choose_layout`
  fits, the rest on the data axis; the largest such axis when none fits; all on the data
  axis when the memory is unknown."""
  sizes = [m for m in (2**i for i in range(devices.bit_length())) if devices % m == 0]
  sizes = [m for m in sizes if not split_problem(shape.n_heads, shape.n_kv_heads, shape.d_mlp, m)]
  meshes = [{"data": devices // m, "model": m} for m in sizes]
  if not device_bytes:
    return meshes[0]
  for mesh in meshes:
    if choose_layout(shape, work, mesh, device_bytes).fits:
      return mesh
  return meshes[-1]


def require_fit(name: str, layout: Layout, work: Work) -> Layout:
  """`layout` if it fits, else a PlanError naming the call, the value, the estimate and
  the limit."""
  if layout.fits:
    return layout
  call = max(layout.peaks, key=layout.peaks.get)
  if call == "gradients" and work.gradient_microbatch:
    what = f"--gradient_microbatch={layout.gradient_microbatch} (remat={layout.remat})"
    hint = "choose a smaller one, or 0 to let the sweep choose"
  else:
    size = {
      "gradients": f"gradient microbatch {layout.gradient_microbatch} (remat={layout.remat})",
      "capture": f"capture microbatch {layout.capture_microbatch}",
      "loss": f"loss microbatch {layout.loss_microbatch}",
      "spectra": "the gradient spectra (two batches' gradients, split by layer)",
      "weights": "the weights alone",
    }[call]
    what, hint = f"even {size}", "use more devices (--mesh=model:N) or --dtype=bfloat16"
    if call == "spectra":
      what, hint = size, "use a device with more memory or --nogradients"
      if work.refine:
        hint += " (or leave grad_condition_number, refined in float64, out of --metrics)"
  raise PlanError(
    f"{name}: {what} needs an estimated {si(layout.peaks[call], 'B')} per device, over the "
    f"limit of {si(layout.limit, 'B')} ({HEADROOM:.0%} of --device_memory); {hint}"
  )


# The automatic C stacks at most this many per platform. On CPU one checkpoint already
# keeps the cores busy and stacking measured no reliable gain (benchmarks/bench_batched.py).
AUTO_MAX_CHECKPOINTS = {"cpu": 1, "gpu": 16, "tpu": 16}


def checkpoints_per_call(
  shape: Shape,
  work: Work,
  mesh: dict[str, int],
  device_bytes: float | None,
  requested: int = 0,
  platform: str = "cpu",
  flag: str = "--checkpoints_per_call",
) -> int:
  """C, the checkpoints of `shape` stacked per compiled call: `requested` (> 0) checked
  against HEADROOM x `device_bytes`, or (0: automatic) as many as fit under it, at most
  AUTO_MAX_CHECKPOINTS[platform], or 1 when not even 2 fit; 1 when the memory is unknown.
  C checkpoints run under the microbatches `choose_layout` picks for one, their peaks
  `stacked_peaks` (C x one checkpoint with all G gradient batches at once: stacking gives
  up streaming, so C = 1 may fit where C = 2 needs more than twice as much)."""
  if requested < 0:
    raise PlanError(f"{flag}={requested}: a number of checkpoints >= 1, or 0 (auto)")
  if not device_bytes:
    return requested or 1
  one = choose_layout(shape, dataclasses.replace(work, checkpoints_per_call=1), mesh, device_bytes)
  limit = HEADROOM * device_bytes

  def need(c: int) -> float:
    return max(stacked_peaks(shape, work, mesh, one, c).values())

  if requested:
    if requested > 1 and need(requested) > limit:
      raise PlanError(
        f"{flag}={requested}: {requested} checkpoints of {shape.name} need about "
        f"{si(need(requested), 'B')} per device, over the limit of {si(limit, 'B')}; "
        "use fewer (0: auto)"
      )
    return requested
  most = AUTO_MAX_CHECKPOINTS.get(platform, 1)
  return max((c for c in range(2, most + 1) if need(c) <= limit), default=1)


def stacked_peaks(
  shape: Shape, work: Work, mesh: dict[str, int], layout: Layout, checkpoints: int
) -> dict[str, float]:
  """{call: bytes} per device of `checkpoints` (> 1) checkpoints stacked in each call
  (sweep.Sweep.compute_batch) under `layout`'s microbatches: every call's peak times C,
  and the gradient and spectra calls hold all G batches at once (not streamed)."""
  if checkpoints < 2:
    raise PlanError(f"stacked_peaks of {checkpoints} checkpoint(s): one runs streamed")
  c = checkpoints
  peaks = {"weights": c * _param_bytes(shape, work, mesh)}
  if work.captures:
    peaks["capture"] = forward_call_bytes(
      shape, work, mesh, work.n_sequences, layout.capture_microbatch, checkpoints_per_call=c
    )["total"]
  if work.loss_sequences:
    peaks["loss"] = forward_call_bytes(
      shape, work, mesh, work.loss_sequences, layout.loss_microbatch, True, c
    )["total"]
  if work.gradients:
    peaks["gradients"] = gradient_call_bytes(
      shape, work, mesh, layout.gradient_microbatch, layout.remat, c, layout.carry
    )["total"]
    peaks["spectra"] = spectra_call_bytes(shape, work, c)["total"]
  return peaks


def sweep_work(options, seq_len: int) -> Work:
  """The Work of sweep.SweepOptions on sequences of seq_len tokens."""
  return Work(
    options.n_sequences,
    options.computes_gradients,  # no gradient pass without a selected gradient metric
    options.gradient_window,
    options.gradient_sequences,
    options.gradient_microbatch,
    options.loss_sequences,
    options.dtype,
    kept_positions(options.positions, seq_len),
    **selected_work(options.chosen),
  )


def sweep_layouts(
  models, options, seq_len: int, mesh: dict[str, int], device_bytes: float | None = None
) -> dict[str, Layout]:
  """{model name: Layout} for a sweep's models (sources.ModelSource) on devices of
  `device_bytes` (default: what the first local device reports). Raises PlanError, before
  anything is loaded, for a model that cannot fit; a Hub model of unknown shape gets no
  layout (its gradient batches run as --gradient_microbatch says)."""
  if device_bytes is None:
    device_bytes, _ = device_memory()
  work = sweep_work(options, seq_len)
  layouts = {}
  for m in models:
    shape = of_source(m, seq_len)
    if shape is None:
      continue
    # Before --out is claimed: a mesh that cannot split the weights fails at the first load.
    if problem := split_problem(shape.n_heads, shape.n_kv_heads, shape.d_mlp, mesh.get("model", 1)):
      raise PlanError(f"--mesh for {m.name}: {problem}")
    layouts[m.name] = require_fit(m.name, choose_layout(shape, work, mesh, device_bytes), work)
  return layouts
