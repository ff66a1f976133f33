"""What every entry point shares: one-line errors for bad input."""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

from jax_pythia.errors import JaxPythiaError

FLAGS = flags.FLAGS

flags.DEFINE_bool("traceback", False, "On error, print the full traceback instead of one line.")

# Errors caused by input (files, flags, configs). Anything else is a bug and keeps its
# traceback.
_USER_ERRORS = (JaxPythiaError, ValueError, OSError)


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run, reporting input errors as `<tool>: error: <message>` and exit 2."""

  def guarded(argv):
    quiet_libraries()
    try:
      main(argv)
    except _USER_ERRORS as e:
      _end_progress_line()
      if flags.FLAGS.traceback:
        traceback.print_exc()
      tool = os.path.basename(sys.argv[0]).removesuffix(".py")
      print(f"{tool}: error: {e}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      _end_progress_line()
      print("interrupted", file=sys.stderr)
      sys.exit(130)

  app.run(guarded)


class _LineTracker:
  """A text stream that remembers whether its cursor is at the start of a line."""

  def __init__(self, stream):
    self._stream = stream
    self.at_line_start = True

  def write(self, text: str) -> int:
    if text:
      self.at_line_start = text.endswith("\n")
    return self._stream.write(text)

  def __getattr__(self, name):
    return getattr(self._stream, name)


_progress_stream: _LineTracker | None = None


def progress_bar(**kwargs):
  """A tqdm bar on stderr; an error reported while it is drawn starts on a line of its own
  (a bar that fails before tqdm's `delay` passed is left without a newline by tqdm)."""
  global _progress_stream
  from tqdm import tqdm

  _progress_stream = _LineTracker(sys.stderr)
  return tqdm(file=_progress_stream, **kwargs)


def _end_progress_line() -> None:
  if _progress_stream is not None and not _progress_stream.at_line_start:
    _progress_stream.write("\n")
    _progress_stream.flush()


def quiet_libraries() -> None:
  """Only the tool's own lines, unless --verbosity asks for more.

  absl logs INFO by default, so every CPU run would show jax's "Unable to initialize
  backend 'tpu'" and matplotlib's font-cache lines; warnings and errors still show.
  """
  if flags.FLAGS["verbosity"].present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Font lookups warn about fonts a figure falls back from: noise, not a result.
  logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)


def define_compilation_cache_flag() -> None:
  flags.DEFINE_string(
    "compilation_cache",
    None,
    "Directory of JAX's persistent compilation cache, so a rerun, a resumed sweep, a "
    "second model of the same shapes and every host of a pod reuse compiled calls; "
    "none turns it off. Default: $JAX_PYTHIA_COMPILATION_CACHE, else "
    "$XDG_CACHE_HOME/jax_pythia/xla (~/.cache/jax_pythia/xla).",
  )


def enable_compilation_cache() -> None:
  """Turns on the cache --compilation_cache names (jax_pythia.compile_cache), before any
  compile."""
  from jax_pythia import compile_cache

  compile_cache.enable(flags.FLAGS.compilation_cache)


def reject_extra_args(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}: every option is a --flag (see --help)")


def define_work_flags() -> None:
  """The flags that set what a sweep computes per checkpoint, defined once: tools.sweep
  runs that work, tools.plan prices it, with the same names, defaults and help."""
  _define_checkpoint_flags()
  flags.DEFINE_integer(
    "n_sequences", 128, "Sequences of the fixed batch activations are taken on (the paper: 128)."
  )
  flags.DEFINE_string(
    "positions",
    "last",
    "Token positions per sequence: last (the paper), all, random:K or a comma list of indices.",
  )
  flags.DEFINE_bool("gradients", True, "Compute gradient metrics (needs a .bin/.idx stream).")
  flags.DEFINE_integer(
    "gradient_window",
    5,
    "Gradients on the batches of steps s-W..s+W, computed and reduced one batch at a time "
    "(a device holds two batches' gradients, whatever W, unless checkpoints are stacked).",
  )
  flags.DEFINE_integer("gradient_sequences", 128, "Sequences of each gradient batch.")
  define_selection_flags()
  flags.DEFINE_integer(
    "gradient_microbatch",
    0,
    "Split gradient batches into microbatches of this many sequences to bound memory "
    "(0: the largest that fits --device_memory, with rematerialisation if that is what "
    "makes a larger one fit). An explicit value that cannot fit is refused up front.",
  )
  flags.DEFINE_integer(
    "loss_sequences",
    0,
    "Also record the loss on this many sequences of "
    "the final step's batch, which no checkpoint trained on (0: off).",
  )
  flags.DEFINE_string(  # a string, checked by require_precision: a bad value is one line
    "dtype",
    "float32",
    "float32 | bfloat16 | float16: compute dtype of the forward/backward (weights are cast to "
    "it). Metric inputs "
    "(activations, weights, gradients, Gram matrices) are always float32 at HIGHEST precision.",
  )
  flags.DEFINE_string(  # a string, checked by require_precision: a bad value is one line
    "matmul_precision",
    "default",
    "default | high | highest: matmul precision of the forward/backward "
    "(jax.default_matmul_precision). 'default' is the backend's: full float32 on CPU, one "
    "bfloat16 pass on TPU, TF32 on recent GPUs.",
  )
  _define_memory_flags()


def _define_checkpoint_flags() -> None:
  """--steps and --revisions: which checkpoints of each model (docs/suites.md)."""
  flags.DEFINE_string(
    "steps",
    "all",
    "Checkpoints: all, final, paper (the study's 27), log:K (K log-spaced), a comma "
    "list (0,512,143000) or START:STOP[:EVERY], for every suite (docs/suites.md). The final "
    "one is always included: it is every CKA's reference.",
  )
  flags.DEFINE_string(
    "revisions",
    None,
    "The checkpoints of Hub models outside the known suites (docs/suites.md): a comma list "
    "REVISION[=STEP] (STEP defaults to the last number in the name; a commit id needs it) or "
    "a regular expression over the repo's branches (the step: group (?P<step>...), else "
    "group 1, else the name's last number). Overrides a known suite's scheme.",
  )


def _define_memory_flags() -> None:
  """--checkpoints_per_call and --device_memory: how the work is fitted to a device."""
  flags.DEFINE_string(
    "checkpoints_per_call",
    "auto",
    "Checkpoints of one model stacked in one compiled call (activations, spectra and "
    "gradients vmapped over them; the same results). Stacked checkpoints hold all their "
    "gradient batches at once; one alone streams them. auto (or 0): as many as fit in the "
    "device's memory by jax_pythia.scale.plan's estimate, at most 16 on an accelerator and 1 on "
    "CPU, where stacking does not reliably pay (benchmarks/bench_batched.py).",
  )
  flags.DEFINE_string(
    "device_memory",
    None,
    "Memory of one device, e.g. 16GB or 80GiB (default: what the first local device "
    "reports: memory_stats() on GPU/TPU, available RAM on CPU). Microbatches and "
    "rematerialisation are chosen so each compiled call's planned peak stays under 90% of it.",
  )


def define_data_timeout() -> None:
  """--data_timeout, for the tools that read a remote stream (tools.sweep, tools.fetch_data)."""
  from jax_pythia.data import transports

  flags.DEFINE_string(
    "data_timeout",
    f"{transports.DEFAULT_TIMEOUT_S:g}s",
    "How long one read of an http(s):// --data (a request and its whole answer, however "
    "slowly it trickles in) may take: seconds or a duration (90s, 2m). A read that times "
    f"out is tried {transports.DEFAULT_ATTEMPTS} times in all, with "
    f"{transports.DEFAULT_BACKOFF_S:g}, {2 * transports.DEFAULT_BACKOFF_S:g}, ... s between, so "
    f"a server that stalls holds the run about {transports.DEFAULT_ATTEMPTS} x this long before "
    "the error line naming it.",
  )


def data_timeout() -> float:
  """--data_timeout in seconds (> 0)."""
  from jax_pythia.sweep import watchdog

  seconds = watchdog.parse_duration(flags.FLAGS.data_timeout, "--data_timeout")
  if not seconds > 0:
    raise ValueError(f"--data_timeout={flags.FLAGS.data_timeout}: must be > 0")
  return seconds


def require_precision() -> None:
  """--dtype and --matmul_precision name a compute dtype and a matmul precision, checked
  before any work (the toy suite's build, a download) so a typo costs nothing."""
  from jax_pythia import sweep
  from jax_pythia.models import weights

  if flags.FLAGS.dtype not in weights.DTYPES:
    raise ValueError(f"--dtype={flags.FLAGS.dtype!r}: one of {', '.join(weights.DTYPES)}")
  if flags.FLAGS.matmul_precision not in sweep.MATMUL_PRECISIONS:
    raise ValueError(
      f"--matmul_precision={flags.FLAGS.matmul_precision!r}: one of "
      f"{', '.join(sweep.MATMUL_PRECISIONS)}"
    )


def require_items(flag: str, values: list[str]) -> None:
  """A list flag given empty (`--models=`) means nothing to do: say so, rather than run."""
  if not [v for v in values if v.strip()]:
    raise ValueError(f"--{flag} is empty: give at least one (see --help)")


def require_positive(flag: str, value: float | None, at_most: float | None = None) -> None:
  """A count, rate or fraction that must be > 0 (and <= at_most when given)."""
  if value is None:
    return
  if not 0 < value < math.inf or (at_most is not None and value > at_most):
    bound = f"in (0, {at_most:g}]" if at_most is not None else "a finite number > 0"
    raise ValueError(f"--{flag}={value:g}: must be {bound}")


def checkpoints_per_call() -> int:
  """--checkpoints_per_call as a number (0: automatic)."""
  value = flags.FLAGS.checkpoints_per_call.strip().lower()
  if value == "auto":
    return 0
  try:
    c = int(value)
  except ValueError:
    c = -1
  if c < 0:
    raise ValueError(
      f"--checkpoints_per_call={flags.FLAGS.checkpoints_per_call}: a number of checkpoints "
      ">= 1, or auto (0)"
    )
  return c


def define_selection_flags() -> None:
  """--metrics, --components, --analysis, --metrics_module: what a sweep computes (and
  tools.plan prices). The help lists the registry (analysis.registry)."""
  from analysis import registry

  names = ", ".join(registry.table_names())
  flags.DEFINE_list(
    "metrics",
    ["default"],
    "Metrics to compute: 'default' (the paper's protocol), 'all', or metric names as in "
    f"metrics.parquet: {names}. Work no selected metric needs is skipped (no gradient "
    "pass without a grad_ metric or train_loss). docs/metrics.md.",
  )
  flags.DEFINE_list(
    "components",
    None,
    f"Components to compute them on (default all): {', '.join(registry.ACTIVATION_COMPONENTS)}.",
  )
  flags.DEFINE_string(
    "analysis",
    None,
    'A JSON analysis file choosing per metric: [{"metric": "per", "data": '
    '["weights"], "components": ["ov"], "layers": [0, 1]}, "cka", ...] '
    "(replaces --metrics; docs/metrics.md).",
  )
  flags.DEFINE_string(
    "metrics_module",
    None,
    "A Python file registering metrics of your own (analysis.register_metric), run like the "
    "built-in ones; select them by name with --metrics (docs/metrics.md).",
  )


def selection():
  """The analysis.selection.Selection the flags ask for; bad values are one line naming the
  flag (and a user metric that fails, its name and why)."""
  import json

  from analysis import selection as selection_lib
  from jax_pythia.errors import ConfigError

  if FLAGS.metrics_module:
    load_metrics_module(FLAGS.metrics_module)
  entries = None
  if FLAGS.analysis:
    try:
      with open(FLAGS.analysis, encoding="utf-8") as f:
        entries = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f"--analysis={FLAGS.analysis}: {e}") from None
    entries = entries.get("metrics") if isinstance(entries, dict) else entries
    if not isinstance(entries, list):
      raise ConfigError(
        f"--analysis={FLAGS.analysis}: a JSON list of entries, or {{'metrics': [...]}}"
      )
  try:
    if FLAGS.components is not None:
      selection_lib.select(["all"], FLAGS.components)  # checks the components alone
  except ValueError as e:
    raise ConfigError(f"--components={','.join(FLAGS.components)}: {e}") from None
  try:
    return selection_lib.select(FLAGS.metrics, FLAGS.components, entries)
  except ValueError as e:
    flag = (
      f"--analysis={FLAGS.analysis}"
      if entries is not None
      else f"--metrics={','.join(FLAGS.metrics)}"
    )
    raise ConfigError(f"{flag}: {e}") from None


def load_metrics_module(path: str) -> list[str]:
  """Imports a --metrics_module file, which registers metrics (analysis.register_metric),
  and probes each new one (analysis.registry.probe); their names. One line if the file
  cannot be imported or a metric raises, returns the wrong shape or is not jit-able."""
  import importlib.util

  from analysis import registry
  from jax_pythia.errors import ConfigError

  before = set(registry.METRICS)
  spec = importlib.util.spec_from_file_location("user_metrics", path)
  if spec is None or not os.path.isfile(path):
    raise ConfigError(f"--metrics_module={path}: no such Python file")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - the user's module may raise anything
    raise ConfigError(
      f"--metrics_module={path}: importing it raised {type(e).__name__}: {e}"
    ) from None
  added = [n for n in registry.METRICS if n not in before]
  registry.mark_user(added)
  for name in added:
    problem = registry.probe(registry.METRICS[name])
    if problem:
      raise ConfigError(f"--metrics_module={path}: {problem}")
  return added
