"""The model shapes the benchmarks run, built from the suite table (`jax_pythia.suite.SIZES`),
so a Pythia size is declared once."""

from __future__ import annotations

from jax_pythia import suite
from jax_pythia.models.config import GPTNeoXConfig


def config(size: str, vocab_size: int | None = None, max_seq_len: int = 2048) -> GPTNeoXConfig:
  """The config of Pythia `size` ("70m"), optionally with a smaller vocabulary or context."""
  s = suite.SIZES[size]
  return GPTNeoXConfig(
    vocab_size=vocab_size or s.vocab_size,
    d_model=s.d_model,
    n_layers=s.n_layers,
    n_heads=s.n_heads,
    d_mlp=s.d_mlp,
    max_seq_len=max_seq_len,
  )


def hf_kwargs(size: str) -> dict[str, int]:
  """transformers.GPTNeoXConfig keyword arguments of Pythia `size`."""
  s = suite.SIZES[size]
  return dict(
    vocab_size=s.vocab_size,
    hidden_size=s.d_model,
    num_hidden_layers=s.n_layers,
    num_attention_heads=s.n_heads,
    intermediate_size=s.d_mlp,
    max_position_embeddings=suite.SEQUENCE_LENGTH,
  )


def spectra_shape(size: str) -> dict[str, int]:
  """The layer count and widths the spectra benchmarks draw random weights of."""
  s = suite.SIZES[size]
  return dict(layers=s.n_layers, d=s.d_model, heads=s.n_heads, head_dim=s.d_head)


#: Sweep-like work per shape: the config, tokens per sequence, fixed-input and gradient
#: sequences. "toy" is the size of the test suites; "14m" is 14m's layers with a 2,048-token
#: vocabulary; "70m" is Pythia-70m as bench_sweep runs it.
STUDY_SHAPES = {
  "toy": dict(
    config=GPTNeoXConfig(
      vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_mlp=256, max_seq_len=64
    ),
    seq=64,
    n_sequences=32,
    gradient_sequences=8,
  ),
  "14m": dict(
    config=config("14m", vocab_size=2048, max_seq_len=128),
    seq=128,
    n_sequences=64,
    gradient_sequences=8,
  ),
  "70m": dict(config=config("70m"), seq=128, n_sequences=128, gradient_sequences=16),
}
#: What bench_batched and bench_stream run unless --shapes says otherwise.
DEFAULT_STUDY_SHAPES = ("toy", "14m")
