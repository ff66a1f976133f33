"""Imported by pytest before any test module: the package sets XLA's CPU flags before
JAX starts its backend (see jax_pythia/__init__.py)."""

import jax_pythia  # noqa: F401
