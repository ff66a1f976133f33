"""jax-pythia: Pythia's training dynamics, layer by layer, in JAX."""

import os

from jax_pythia.scale import xla_cpu

# XLA's CPU "concurrency optimized" scheduler runs independent LAPACK calls (the batched
# QR and SVD of the spectra) at the same time; each parallelises over its batch on the
# same intra-op pool, and on a 2-core machine both can wait forever for threads the
# other holds (seen with jaxlib 0.10). Scheduling them one after another avoids it. Only
# effective when set before JAX creates its CPU backend, hence at package import.
_XLA_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_CPU_FLAG}".strip()

# Several CPU devices in one process share that pool, and each device's program can hold
# two threads waiting (a collective, a LAPACK call): with the default pool (the cores) a
# CPU mesh hangs forever. A pool of 2 threads per device + 1 always keeps one free.
xla_cpu.size_pool(os.environ)
# XLA:CPU calls LAPACK from that pool; OpenBLAS's own threads would only spin beside it.
xla_cpu.single_thread_blas(os.environ)
