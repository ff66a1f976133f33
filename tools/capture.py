"""Runs one checkpoint on token ids and saves the requested capture sites to an .npz.

  python -m tools.capture --checkpoint=EleutherAI/pythia-70m-deduped@step3000 \
      --tokens=tokens.npy --sites=blocks.*.attn.hook_v,blocks.5.hook_resid_post \
      --positions=last --out=acts.npz

Each site becomes one array keyed by its name; positions keep a token axis (k=1 for
`last`). `blocks.*.<site>` stacks all layers on a leading axis; `blocks.<l>.<site>` is
one layer. The sites (shapes use k for the kept positions) are listed under --sites.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from jax_pythia.models.sites import GLOBAL_SITES, LAYER_SITES
from tools import _cli

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "checkpoint",
  None,
  "Local Hugging Face-format directory, or "
  "<repo>@<revision> (e.g. EleutherAI/pythia-160m-deduped@step3000).",
)
flags.DEFINE_string("tokens", None, ".npy integer array of token ids [batch, seq].")
flags.DEFINE_list(
  "sites",
  [],
  "Comma list of capture sites: "
  + ", ".join([*GLOBAL_SITES, *(f"blocks.<l|*>.{s}" for s in LAYER_SITES)]),
)
flags.DEFINE_string(
  "positions", "last", "Token positions to keep: last, all, or a comma list of indices."
)
flags.DEFINE_string("out", None, "Output .npz file (one array per site, plus `logits`).")
flags.DEFINE_bool("logits", False, "Also save the logits [batch, seq, vocab] (float32).")
flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16", "float16"],
  "Compute dtype; fp16/bf16 checkpoints are cast to it.",
)
flags.DEFINE_integer("batch_size", 32, "Sequences per compiled call (bounds memory).")
_cli.define_compilation_cache_flag()
flags.mark_flags_as_required(["checkpoint", "tokens", "out"])


def main(argv):
  _cli.reject_extra_args(argv)
  _cli.enable_compilation_cache()
  from jax_pythia import files
  from jax_pythia.checkpoints import hub as checkpoints
  from jax_pythia.data import ArrayTokenSource, check_sequence_length, check_token_ids
  from jax_pythia.models import model as model

  if not FLAGS.out.endswith(".npz"):
    raise ValueError(f"--out={FLAGS.out!r}: expected a .npz path")
  if FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size={FLAGS.batch_size}: must be >= 1")
  if not FLAGS.sites and not FLAGS.logits:
    raise ValueError("nothing to capture: give --sites and/or --logits")
  tokens = ArrayTokenSource(FLAGS.tokens).tokens
  config, params = checkpoints.load_checkpoint(FLAGS.checkpoint, dtype=FLAGS.dtype)
  check_token_ids(tokens, config.vocab_size, FLAGS.tokens)
  check_sequence_length(tokens, config.max_seq_len, FLAGS.checkpoint, FLAGS.tokens)
  sites = model.SiteRequest.parse(FLAGS.sites, config)
  idx = model.position_index(
    FLAGS.positions, tokens.shape[1], n=len(tokens), seed=0, what="--positions"
  )
  fn = model.make_forward(config, sites, return_logits=FLAGS.logits)
  chunks: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(tokens), FLAGS.batch_size):
    batch = tokens[start : start + FLAGS.batch_size]
    batch_idx = idx if idx is None or idx.ndim == 1 else idx[start : start + len(batch)]
    logits, captures = fn(params, batch, batch_idx)
    if logits is not None:
      captures = {**captures, "logits": logits}
    for name, value in captures.items():
      # Stacked sites ([L, b, ...]) are split on their batch axis, the second one.
      chunks.setdefault(name, []).append(np.asarray(value))
  arrays = {
    name: np.concatenate(parts, axis=1 if name.startswith("blocks.*.") else 0)
    for name, parts in chunks.items()
  }
  files.save_npz(FLAGS.out, arrays)
  shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
  print(f"wrote {FLAGS.out}: {shapes}")


if __name__ == "__main__":
  _cli.run(main)
