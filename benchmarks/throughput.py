"""What a device can do and how much of it the study's passes use: the measurements shared by
`bench_sweep` (CPU) and `accelerator` (GPU/TPU).

- `matmul_peak`: FLOP/s of one large square matmul on the first device, the best of a few
  timed runs (the ceiling the other figures are fractions of).
- `fwd_bwd_flops`: the FLOPs of the study's gradient pass (`model.loss_and_grads` over some
  tokens), two ways:
    executed  what the pass must compute: the forward, the input gradients through every
              layer and the unembedding, and the weight gradients of the requested kernels
              only (no embedding or unembedding gradient is formed);
    model     the usual MFU convention, 6 x (layer + unembedding weights) x tokens plus the
              attention matmuls (as `plan.flops_per_checkpoint` counts gradients).
  Both count the masked s x s attention square in full, as the model computes it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.scale import plan


def timed(fn: Callable, *args, repeats: int = 1) -> float:
  """Best wall seconds of `repeats` calls of fn(*args), each waited for."""
  best = math.inf
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak(
  n: int = 2048, dtype: str = "float32", precision: str | None = None, seconds: float = 1.0
) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` at `precision` (None: the default), best run."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  fn = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
  jax.block_until_ready(fn(a, b))
  best, start, runs = math.inf, time.perf_counter(), 0
  while runs < 3 or (time.perf_counter() - start < seconds and runs < 100):
    best = min(best, timed(fn, a, b))
    runs += 1
  return 2.0 * n**3 / best


def shape_of(config: GPTNeoXConfig, seq_len: int) -> plan.Shape:
  return plan.Shape(
    "bench",
    config.n_layers,
    config.d_model,
    config.n_heads,
    config.d_mlp,
    config.vocab_size,
    seq_len,
    (0,),
  )


def fwd_bwd_flops(
  config: GPTNeoXConfig, sequences: int, seq_len: int, wrt: Sequence[str]
) -> dict[str, float]:
  """{'executed', 'model'}: FLOPs of loss_and_grads on `sequences` x `seq_len` tokens."""
  shape = shape_of(config, seq_len)
  tokens = sequences * seq_len
  through = shape.layer_params + config.d_model * config.vocab_size
  attention = plan.attention_flops(shape, sequences)
  # Per layer, the weights of each kernel whose gradient is requested.
  d, f = config.d_model, config.d_mlp
  sizes = {"attn.query.kernel": d * d, "attn.key.kernel": d * d, "attn.value.kernel": d * d}
  sizes |= {"attn.out.kernel": d * d, "mlp.fc_in.kernel": d * f, "mlp.fc_out.kernel": f * d}
  weight_grads = 2 * tokens * config.n_layers * sum(sizes[w] for w in wrt)
  return {
    "executed": 4 * through * tokens + 3 * attention + weight_grads,
    "model": 6 * through * tokens + 3 * attention,
  }
