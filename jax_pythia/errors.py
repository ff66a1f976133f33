"""Errors a user can act on: each message names the file, tensor, flag or value at fault.

The command-line tools print these as one line and exit non-zero, without a traceback.
"""


class JaxPythiaError(Exception):
  """Base class of errors caused by input (files, flags, configs), not by bugs."""


class ConfigError(JaxPythiaError, ValueError):
  """A config.json the model cannot implement faithfully."""


class CheckpointError(JaxPythiaError, ValueError):
  """A checkpoint that is missing, truncated, mismatched, non-finite or not fetchable."""


class ToySuiteError(JaxPythiaError, ValueError):
  """A toy-suite request that cannot be honoured (bad sizes, an out dir of another suite)."""


class SweepError(JaxPythiaError, ValueError):
  """A sweep that cannot run as asked (models, steps, data, output directory)."""
