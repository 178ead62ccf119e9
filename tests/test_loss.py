"""Chunked cross-entropy equals the plain full-logits computation (values and gradients).

The reference differentiates the full [B, L, V] logits with ordinary autodiff, so these tests
also check models/lm_head.py's hand-written custom_vjp (forward-formed p @ E and p^T @ (w x) products).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3_train.models import lm_head as loss_lib


def _full(x_BLD, table_VD, targets_BL, weights_BL, z_loss):
  """Unchunked reference: full [B, L, V] logits."""
  logits = jnp.einsum('BLD,VD->BLV', x_BLD, table_VD)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BL[..., None], axis=-1)[..., 0]
  lse = jax.nn.logsumexp(logits, axis=-1)
  w = weights_BL.astype(jnp.float32)
  return {'loss_sum': jnp.sum(w * nll),
          'z_loss_sum': jnp.sum(w * lse ** 2) if z_loss else jnp.zeros((), jnp.float32),
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


@pytest.mark.parametrize('chunk_size,z_loss', [(3, 0.0), (4, 0.05), (10, 0.05)])
def test_vjp_any_cotangents(chunk_size, z_loss):
  """The custom vjp is exact for arbitrary cotangents of every sum, not only the trainer's."""
  x, table, targets, weights = _inputs(seed=3)
  cot = {'loss_sum': jnp.float32(0.7), 'z_loss_sum': jnp.float32(-1.9),
         'weight_sum': jnp.float32(0.3), 'correct_sum': jnp.float32(2.0)}
  got, vjp_got = jax.vjp(lambda x, t: loss_lib.chunked_cross_entropy(
      x, t, targets, weights, chunk_size=chunk_size, z_loss=z_loss), x, table)
  want, vjp_want = jax.vjp(lambda x, t: _full(x, t, targets, weights, z_loss), x, table)
  for k in want:  # the differentiated forward returns the same sums as the plain one
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
  for a, b in zip(vjp_got(cot), vjp_want(cot)):
    # Entries near zero are differences of O(max) float32 terms: absolute error ~ eps * max.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_bf16_gradients():
  """bf16 hidden states: gradients match the f32 reference on the rounded inputs to bf16
  precision (p is a bf16 matmul operand), keep x's dtype, and do not depend on chunking."""
  x, table, targets, weights = _inputs(seed=4)
  x16 = x.astype(jnp.bfloat16)
  z = 1e-2

  def objective(x, t, chunk_size):
    s = loss_lib.chunked_cross_entropy(x, t, targets, weights, chunk_size=chunk_size, z_loss=z)
    return s['loss_sum'] + z * s['z_loss_sum']

  def ref(x, t):
    s = _full(x, t, targets, weights, z)
    return s['loss_sum'] + z * s['z_loss_sum']
  rounded = (x16.astype(jnp.float32), table.astype(jnp.bfloat16).astype(jnp.float32))
  want = jax.grad(ref, argnums=(0, 1))(*rounded)
  by_chunk = [jax.grad(objective, argnums=(0, 1))(x16, table, c) for c in (3, 10)]
  for dx, dt in by_chunk:
    assert dx.dtype == jnp.bfloat16 and dt.dtype == jnp.float32
    for a, b in zip((dx, dt), want):
      np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=1e-2 * np.abs(b).max())
  for a, b in zip(*by_chunk):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=1e-2 * np.abs(np.asarray(b, np.float32)).max())


def test_ties_count_as_correct():
  """correct_sum is target_logit >= max_logit: a target tied with a lower index is correct."""
  x, table, _, _ = _inputs(B=1, L=4, V=6, seed=5)
  table = table.at[2].set(table[2] + 10 * x[0, 0])  # row 2 wins at position 0 ...
  table = table.at[5].set(table[2])  # ... tied with row 5, the target (argmax would say 2)
  targets = jnp.asarray([[5, 0, 0, 0]], jnp.int32)
  s = loss_lib.chunked_cross_entropy(x, table, targets, jnp.asarray([[1.0, 0, 0, 0]]),
                                     chunk_size=2)
  assert float(s['correct_sum']) == 1.0


def test_full_logits_never_materialized():
  """The jitted gradient holds no [B, L, V] array (the largest logits buffer is one chunk),
  runs the LM head as exactly three matmuls, and scatters nothing logits-shaped."""
  B, L, D, V, C = 2, 64, 8, 1000, 8
  x, table, targets, weights = _inputs(B, L, D, V)

  def f(x, t):
    return loss_lib.chunked_cross_entropy(x, t, targets, weights, chunk_size=C)['loss_sum']
  hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, table).compile().as_text()
  assert f'f32[{B},{L},{V}]' not in hlo and f'f32[{B},{C},{V}]' in hlo
  lines = hlo.splitlines()
  assert sum(' dot(' in line for line in lines) == 3, 'LM head: x E^T, p E, p^T x'
  scatters = [line for line in lines if ' scatter(' in line]
  assert all(f'[{V},{D}]' in line.split('=')[1].split(' ')[1] for line in scatters), scatters


def test_bad_chunk_size():
  x, table, targets, weights = _inputs()
  with pytest.raises(ValueError, match='loss_chunk_size'):
    loss_lib.chunked_cross_entropy(x, table, targets, weights, chunk_size=0)


@pytest.mark.parametrize('z_loss', [0.0, 1e-2])
def test_vocab_parallel_equals_row_parallel_on_a_mesh(z_loss):
  """train.loss_vocab_parallel under a data x fsdp x tensor mesh of 8 CPU devices: the same sums
  and gradients as the row-parallel loss, and the gradient pass no longer gathers the whole
  table onto every device (its all-gathers move rows, not [V, D])."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 1, 2), sharding.MESH_AXES)
  B, L, D, V = 8, 12, 16, 64
  x, table, targets, weights = _inputs(B=B, L=L, D=D, V=V, seed=5)
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  x, targets, weights = (jax.device_put(a, rows) for a in (x, targets, weights))
  table = jax.device_put(table, NamedSharding(mesh, P('tensor', 'fsdp')))

  def run(vocab_parallel):
    def objective(x, t):
      s = loss_lib.chunked_cross_entropy(x, t, targets, weights, chunk_size=5, z_loss=z_loss,
                                         vocab_parallel=vocab_parallel)
      return s['loss_sum'] + z_loss * s['z_loss_sum'], s
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
      step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))
      hlo = step.lower(x, table).compile().as_text()
    (_, sums), grads = step(x, table)
    return sums, grads, hlo

  sums_r, grads_r, _ = run(False)
  sums_v, grads_v, hlo_v = run(True)
  for k in sums_r:
    np.testing.assert_allclose(sums_v[k], sums_r[k], rtol=1e-6, err_msg=k)
  for a, b in zip(grads_v, grads_r):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
  want = _full(*(np.asarray(a) for a in (x, table, targets, weights)), z_loss)
  np.testing.assert_allclose(sums_v['loss_sum'], want['loss_sum'], rtol=1e-5)
  gathered = [line for line in hlo_v.splitlines() if 'all-gather(' in line]
  # The row-parallel loss gathers the table's [V / tensor, D] over fsdp; this one only rows.
  assert gathered and not any(f'[{V // 2},{D}]' in line.split('all-gather(')[0] or
                              f'[{V},{D}]' in line.split('all-gather(')[0] for line in gathered)


# --- per-token log-probabilities ---------------------------------------------------------


def _full_logprobs(x_BLD, table_VD, targets_BL):
  logp = jax.nn.log_softmax(jnp.einsum('BLD,VD->BLV', x_BLD, table_VD), axis=-1)
  return jnp.take_along_axis(logp, targets_BL[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize('chunk_size', [1, 3, 10, 64])
def test_token_logprobs_equal_full_log_softmax_values_and_grads(chunk_size):
  """[B, L] log p(target) from the chunked head equals log_softmax of the full logits (a ragged
  last chunk included), and so do its gradients for arbitrary per-token cotangents."""
  x, table, targets, _ = _inputs()
  got = loss_lib.token_logprobs(x, table, targets, chunk_size=chunk_size)
  np.testing.assert_allclose(got, _full_logprobs(x, table, targets), rtol=1e-5, atol=1e-6)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=targets.shape), jnp.float32)
  f = lambda fn: lambda x, t: jnp.sum(cot * fn(x, t))
  ours = jax.grad(f(lambda x, t: loss_lib.token_logprobs(x, t, targets,
                                                          chunk_size=chunk_size)), (0, 1))(x, table)
  want = jax.grad(f(lambda x, t: _full_logprobs(x, t, targets)), (0, 1))(x, table)
  for a, b in zip(ours, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_token_logprobs_sum_to_the_cross_entropy():
  """Summed with the loss weights, they are minus chunked_cross_entropy's loss_sum."""
  x, table, targets, weights = _inputs(seed=3)
  logp = loss_lib.token_logprobs(x, table, targets, chunk_size=4)
  sums = loss_lib.chunked_cross_entropy(x, table, targets, weights, chunk_size=4)
  np.testing.assert_allclose(-jnp.sum(weights * logp), sums['loss_sum'], rtol=1e-6)


def test_token_logprobs_never_form_the_full_logits():
  """The compiled gradient holds no [B, L, V] array: with L = 8 chunks of 16 and V = 4096, every
  buffer stays below the full logits' size (the scan keeps one chunk's [B, C, V] at a time)."""
  B, L, D, V, C = 2, 128, 16, 4096, 16
  x = jnp.zeros((B, L, D), jnp.float32)
  table = jnp.zeros((V, D), jnp.float32)
  targets = jnp.zeros((B, L), jnp.int32)
  grad = jax.jit(jax.grad(lambda x, t: jnp.sum(loss_lib.token_logprobs(x, t, targets,
                                                                      chunk_size=C)), (0, 1)))
  memory = grad.lower(x, table).compile().memory_analysis()
  full_logits_bytes = B * L * V * 4
  assert memory.temp_size_in_bytes < full_logits_bytes / 2, memory.temp_size_in_bytes
