"""The streamed gradient study (one batch at a time, as jax_pythia.sweep drives it, each
batch reduced layer by layer) against analysis.gradient_spectra of all G batches' float32
gradients stacked (the whole-gradient computation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import analysis
from jax_pythia.models import model as model
from jax_pythia.models.config import GPTNeoXConfig
from jax_pythia.study import checkpoint as study
from jax_pythia.study import streamed

CONFIG = GPTNeoXConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_mlp=128, max_seq_len=12)


@pytest.fixture(scope="module")
def params():
  return model.init_params(CONFIG, jax.random.PRNGKey(7))


@pytest.mark.parametrize("remat", ["none", "layer"])
@pytest.mark.parametrize("value_slice", ["per_head", "reference"])
@pytest.mark.parametrize("num_batches", [1, 3])
def test_streamed_study_equals_gradient_spectra_of_the_stacked_batches(
  params, num_batches, value_slice, remat
):
  # G batches of 2 microbatches of 2 sequences of 13 tokens.
  tokens = jax.random.randint(jax.random.PRNGKey(num_batches), (num_batches, 2, 2, 13), 0, 97)
  one_batch = study.batch_gradient_fn(CONFIG, value_slice, remat)
  losses, stacked = study.gradient_fn(CONFIG, value_slice)(params, tokens)
  layers32 = jax.tree.map(lambda x: x.astype(jnp.float32), params["layers"])
  expected = jax.jit(analysis.gradient_spectra, static_argnums=2)(stacked, layers32, value_slice)

  streamed_losses = []

  def batches():  # as Sweep.compute: one gradient call per batch, each reduced before the next
    for batch in tokens:
      loss, grads = one_batch(params, batch)
      streamed_losses.append(loss)
      yield grads

  got = streamed.streamed_gradient_metrics(batches(), params["layers"], value_slice)
  # One batch's call gives the batched call's gradients and loss.
  np.testing.assert_allclose(np.array(streamed_losses), losses, rtol=1e-6)
  assert set(got) == set(expected)
  for component, metrics in expected.items():
    assert set(got[component]) == set(metrics)
    for metric, value in metrics.items():
      a, b = np.asarray(got[component][metric]), np.asarray(value)
      assert a.shape == b.shape, (component, metric)
      if metric == "grad_cosine" and num_batches == 1:
        assert np.isnan(a).all() and np.isnan(b).all()
        continue
      # A cosine lies in [-1, 1]: near 0 (cancellation in the dot product) its error is
      # measured against that scale, not its own size.
      atol = 1e-6 if metric == "grad_cosine" else 0
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=f"{component} {metric}")


def test_the_carry_is_the_donated_batch_not_a_copy(params):
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 2, 13), 0, 97)
  _, grads = study.batch_gradient_fn(CONFIG, "per_head")(params, tokens)
  expected = jax.tree.map(np.array, grads)
  pointers = jax.tree.map(lambda x: x.unsafe_buffer_pointer(), grads)
  carry = streamed.first_gradient_carry(grads, "per_head")
  *_, carry = streamed.gradient_terms(grads, carry, params["layers"], "per_head")
  assert all(x.is_deleted() for x in jax.tree.leaves(grads))
  assert jax.tree.map(lambda x: x.unsafe_buffer_pointer(), carry["grads"]) == pointers
  for a, b in zip(jax.tree.leaves(carry["grads"]), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_no_batches_is_an_error(params):
  with pytest.raises(ValueError, match="at least one gradient batch"):
    streamed.streamed_gradient_metrics(iter(()), params["layers"], "per_head")


def test_a_carry_in_host_memory_gives_the_same_metrics(params):
  tokens = jax.random.randint(jax.random.PRNGKey(5), (3, 2, 2, 13), 0, 97)
  one_batch = study.batch_gradient_fn(CONFIG, "per_head")

  def metrics(carry_on_host):
    batches = (one_batch(params, batch)[1] for batch in tokens)
    out = streamed.streamed_gradient_metrics(
      batches, params["layers"], "per_head", carry_on_host=carry_on_host
    )
    return jax.tree.map(np.asarray, out)

  on_device, on_host = metrics(False), metrics(True)
  jax.tree.map(np.testing.assert_array_equal, on_host, on_device)
