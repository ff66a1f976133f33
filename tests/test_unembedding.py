"""The chunked unembedding and cross-entropy (model.token_cross_entropy, lm_loss).

Ground truth: the softmax cross-entropy and its gradients written out in numpy, and
torch autograd through Hugging Face's GPTNeoXForCausalLM for the full model. The
compiled gradient programs are inspected (jaxpr) for what they must never form.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch

from jax_pythia.models import model as M
from tests.test_model import TINY, make_torch_model, rel_err, to_flax


def numpy_cross_entropy(h, unembed, targets):
  """(mean loss, d/dh, d/dunembed) of softmax cross-entropy, float64."""
  h, unembed = h.astype(np.float64), unembed.astype(np.float64)
  logits = h @ unembed.T
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  n = len(targets)
  loss = -logp[np.arange(n), targets].mean()
  d_logits = np.exp(logp)
  d_logits[np.arange(n), targets] -= 1.0
  d_logits /= n
  return loss, d_logits @ unembed, d_logits.T @ h


@pytest.mark.parametrize("chunk", [1, 5, 23, 100])
def test_chunked_cross_entropy_and_gradients_match_numpy(chunk):
  rng = np.random.default_rng(0)
  h = rng.normal(size=(23, 8)).astype(np.float32)
  unembed = rng.normal(size=(11, 8)).astype(np.float32)
  targets = rng.integers(0, 11, 23)
  want, want_dh, want_de = numpy_cross_entropy(h, unembed, targets)
  f = jax.jit(lambda h, e: M.token_cross_entropy(h, e, targets, chunk))
  assert float(f(h, unembed)) == pytest.approx(want, rel=1e-5)
  loss, (dh, de) = jax.value_and_grad(f, argnums=(0, 1))(h, unembed)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  np.testing.assert_allclose(dh, want_dh, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(de, want_de, rtol=1e-4, atol=1e-6)
  only_h = jax.grad(f)(h, unembed)  # the unembedding not differentiated (the study's case)
  np.testing.assert_allclose(only_h, want_dh, rtol=1e-4, atol=1e-6)


def test_gradients_of_every_weight_match_torch_when_training():
  """The toy suite trains every weight through lm_loss: the embedding and unembedding
  gradients must be there, and right, when they are asked for."""
  tm, config = make_torch_model(TINY, std=0.2)
  tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 13))
  t = torch.tensor(tokens)
  tm.zero_grad()
  logits = tm(t[:, :-1]).logits
  loss = torch.nn.functional.cross_entropy(
    logits.reshape(-1, config.vocab_size), t[:, 1:].reshape(-1)
  )
  loss.backward()
  params = to_flax(tm, config)
  got_loss, grads = jax.jit(jax.value_and_grad(lambda p: M.lm_loss(p, tokens, config, 5)))(params)
  assert abs(float(got_loss) - loss.item()) < 1e-5 * loss.item()
  assert rel_err(grads["embed_in"]["embedding"], tm.gpt_neox.embed_in.weight.grad.numpy()) < 1e-4
  out_grad = tm.get_output_embeddings().weight.grad.numpy()  # [V, d]
  assert rel_err(M.unembedding(grads), out_grad) < 1e-4
  final_ln = tm.gpt_neox.final_layer_norm.weight.grad.numpy()
  assert rel_err(grads["ln_f"]["scale"], final_ln) < 1e-4


def all_vars(jaxpr):
  """Every variable a jaxpr (and the jaxprs inside its scans, calls, ...) binds."""
  for eqn in jaxpr.eqns:
    yield from ((eqn.primitive.name, v) for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from all_vars(inner)


def test_study_gradients_form_no_embedding_gradient_and_no_full_logits():
  tm, config = make_torch_model(TINY, std=0.2)
  V, d = config.vocab_size, config.d_model
  batch, seq, chunk = 2, 25, 8
  n = batch * seq
  assert n > d and V not in (d, config.d_mlp, n, chunk)
  params = to_flax(tm, config)
  tokens = np.random.default_rng(4).integers(0, V, (batch, seq + 1))

  def study(p, t):
    return M.loss_and_grads(p, t, config, chunk_tokens=chunk)

  closed = jax.make_jaxpr(study)(params, tokens)
  embedding_grads, full_logits = [], []
  for primitive, var in all_vars(closed.jaxpr):
    shape = tuple(getattr(var.aval, "shape", ()))
    if primitive in ("dot_general", "scatter-add", "scatter_add") and sorted(shape) == sorted(
      (V, d)
    ):
      embedding_grads.append((primitive, shape))
    if V in shape and math.prod(shape) >= n * V:
      full_logits.append((primitive, shape))
  assert not embedding_grads, embedding_grads
  assert not full_logits, full_logits
  # The check can fail: the whole batch as one chunk holds [n, V] logits.
  one_chunk = jax.make_jaxpr(lambda p, t: M.loss_and_grads(p, t, config, chunk_tokens=n))(
    params, tokens
  )
  assert any(V in v.aval.shape and v.aval.size >= n * V for _, v in all_vars(one_chunk.jaxpr))
