"""Chunked cross-entropy equals the plain full-logits computation (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3_train import loss as loss_lib


def _full(x_BLD, table_VD, targets_BL, weights_BL, z_loss):
  """Unchunked reference: full [B, L, V] logits."""
  logits = jnp.einsum('BLD,VD->BLV', x_BLD, table_VD)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BL[..., None], axis=-1)[..., 0]
  lse = jax.nn.logsumexp(logits, axis=-1)
  w = weights_BL.astype(jnp.float32)
  return {'loss_sum': jnp.sum(w * nll), 'z_loss_sum': jnp.sum(w * lse ** 2) if z_loss else 0.0,
          'weight_sum': jnp.sum(w),
          'correct_sum': jnp.sum(w * (jnp.argmax(logits, -1) == targets_BL))}


def _inputs(B=3, L=10, D=8, V=50, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
  # Half the targets are the argmax so that correct_sum is exercised.
  best = np.argmax(np.einsum('BLD,VD->BLV', np.asarray(x), np.asarray(table)), axis=-1)
  targets = np.where(np.arange(L)[None, :] % 2 == 0, best, rng.integers(0, V, (B, L)))
  weights = (rng.uniform(size=(B, L)) > 0.3).astype(np.float32)
  return x, table, jnp.asarray(targets, jnp.int32), jnp.asarray(weights)


@pytest.mark.parametrize('chunk_size,z_loss', [(1, 0.0), (3, 1e-2), (10, 0.0), (64, 1e-2)])
def test_chunked_equals_full(chunk_size, z_loss):
  x, table, targets, weights = _inputs()
  got = loss_lib.chunked_cross_entropy(x, table, targets, weights, chunk_size=chunk_size,
                                       z_loss=z_loss)
  want = _full(x, table, targets, weights, z_loss)
  for k in want:
    assert got[k].dtype == jnp.float32 and got[k].shape == ()
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
  assert float(got['correct_sum']) > 0  # the check above is not vacuous


@pytest.mark.parametrize('chunk_size', [3, 10])
def test_gradients_equal_full(chunk_size):
  x, table, targets, weights = _inputs(seed=1)
  z = 1e-3

  def objective(fn, x, table):
    s = fn(x, table)
    return (s['loss_sum'] + z * s['z_loss_sum']) / s['weight_sum']

  chunked = lambda x, t: loss_lib.chunked_cross_entropy(x, t, targets, weights,
                                                       chunk_size=chunk_size, z_loss=z)
  full = lambda x, t: _full(x, t, targets, weights, z)
  g_got = jax.grad(lambda x, t: objective(chunked, x, t), argnums=(0, 1))(x, table)
  g_want = jax.grad(lambda x, t: objective(full, x, t), argnums=(0, 1))(x, table)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_hidden_states_accumulate_in_f32():
  x, table, targets, weights = _inputs(seed=2)
  got = loss_lib.chunked_cross_entropy(x.astype(jnp.bfloat16), table, targets, weights,
                                       chunk_size=4)
  want = _full(x.astype(jnp.bfloat16).astype(jnp.float32),
               table.astype(jnp.bfloat16).astype(jnp.float32), targets, weights, 0.0)
  assert got['loss_sum'].dtype == jnp.float32
  np.testing.assert_allclose(got['loss_sum'], want['loss_sum'], rtol=1e-5)


def test_full_logits_never_materialized():
  """The jitted backward holds no [B, L, V] array: the largest logits buffer is one chunk."""
  B, L, D, V, C = 2, 64, 8, 1000, 8
  x, table, targets, weights = _inputs(B, L, D, V)

  def f(x, t):
    return loss_lib.chunked_cross_entropy(x, t, targets, weights, chunk_size=C)['loss_sum']
  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, table).compile().as_text()
  assert f'f32[{B},{L},{V}]' not in hlo and f'f32[{B},{C},{V}]' in hlo


def test_bad_chunk_size():
  x, table, targets, weights = _inputs()
  with pytest.raises(ValueError, match='loss_chunk_size'):
    loss_lib.chunked_cross_entropy(x, table, targets, weights, chunk_size=0)
