"""The splash kernel under context parallelism (models/context_splash.py): its static masks
with the segment ids built for them equal the reference's masks shard by shard, the kernel
(interpreted on CPU) equals whole-row attention with gradients, and it compiles for a v5e."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests.test_context import _mesh, _rows
from gemma3_train import sharding
from gemma3_train.models import attention
from gemma3_train.models import context
from gemma3_train.models import context_splash


@pytest.mark.parametrize('c,layout,window,block', [
    (2, 'contiguous', 5, 8), (4, 'balanced', 5, 8), (4, 'balanced', 20, 8),
    (2, 'balanced', 16, 16), (4, 'balanced', 1, 8)])
def test_local_masks_equal_the_reference_per_chunk(c, layout, window, block):
  """Per shard and chunk: LocalMask (offset pad + W - 1) & segment ids (-1 on the pad and
  before the sequence) == cross_mask on positions & the key exists, on real queries."""
  L = 64
  pos, seg = _rows(2, L, np.random.default_rng(window))
  ids_SM = context.chunk_ids(c, layout)
  C, before = L // ids_SM.size, window - 1
  pad = -before % block
  dense = context_splash.dense(context_splash.local_mask(C, pad, before, window))
  for g in ids_SM.reshape(-1):
    q = np.arange(g * C, (g + 1) * C)
    k = np.arange(g * C - before, (g + 1) * C)
    valid = np.broadcast_to(k >= 0, (2, k.size))
    kc = np.clip(k, 0, None)
    want = np.asarray(attention.cross_mask(pos[:, q], seg[:, q], pos[:, kc], seg[:, kc],
                                           window)) & valid[:, None, :]
    kseg = np.asarray(context_splash.local_kv_segments(seg[:, kc], valid, pad))
    got = dense[None] & (seg[:, q][:, :, None] == kseg[:, None, :])
    real = seg[:, q] > 0
    np.testing.assert_array_equal(got[:, :, pad:][real], want[real])
    assert not got[:, :, :pad].any()


@pytest.mark.parametrize('c,layout', [(2, 'contiguous'), (2, 'balanced'), (4, 'balanced')])
def test_global_mask_equals_the_reference_per_shard(c, layout):
  """Rows of shard s of the [L, L] layout mask (keys in sequence order) & segment ids ==
  cross_mask of the shard's queries against all keys."""
  L = 64
  pos, seg = _rows(2, L, np.random.default_rng(c))
  ids_SM = context.chunk_ids(c, layout)
  C, T = L // ids_SM.size, L // c
  dense = context_splash.dense(context_splash.global_mask(ids_SM, C))
  rows = context_splash.layout_positions(ids_SM, C)
  for s in range(c):
    q = rows[s * T:(s + 1) * T]
    want = np.asarray(attention.cross_mask(pos[:, q], seg[:, q], pos, seg, None))
    got = dense[s * T:(s + 1) * T][None] & (seg[:, q][:, :, None] == seg[:, None, :])
    real = seg[:, q] > 0
    np.testing.assert_array_equal(got[real], want[real])


def _attend(mesh, layout, window, impl, q, k, v, pos, seg):
  def f(q, k, v):
    args = (q, k, v, pos, seg)
    if layout == 'balanced':
      args = context.to_balanced(*args)
    out = context.attend(*args, None, window=window, lookahead=0, layout=layout, impl=impl,
                         block_size=128)
    return context.from_balanced(out)[0] if layout == 'balanced' else out
  with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
    return jax.jit(f)(q, k, v)


_slow = pytest.mark.slow


@pytest.mark.parametrize('c,layout,window,L', [  # the kernel's blocks: multiples of 128
    (2, 'balanced', 100, 512),  # ~6 s
    pytest.param(2, 'balanced', None, 512, marks=_slow),  # ~12 s
    pytest.param(2, 'contiguous', None, 512, marks=_slow),
    pytest.param(4, 'balanced', 300, 1024, marks=_slow),  # halo over 3 chunks of 128
    pytest.param(4, 'balanced', None, 1024, marks=_slow)])
def test_interpreted_kernel_equals_whole_rows_with_gradients(c, layout, window, L):
  """The Pallas kernels (interpreted) inside the context shard_map: outputs and the gradients
  of a weighted sum of the real queries' outputs equal the reference over whole rows."""
  B, N, K, H = 1, 2, 1, 128
  rng = np.random.default_rng(c)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((B, L, N, H), (B, L, K, H), (B, L, K, H)))
  pos, seg = (jnp.asarray(x) for x in _rows(B, L, rng))
  w = jnp.asarray(rng.normal(size=(B, L, N, H)), jnp.float32) * (seg > 0)[:, :, None, None]

  def whole(q, k, v):
    return jnp.sum(w * attention.reference(q, k, v, attention.make_mask(pos, seg, window)))

  def split(q, k, v):
    return jnp.sum(w * _attend(_mesh(c), layout, window, 'splash', q, k, v, pos, seg))
  want, want_grads = jax.value_and_grad(whole, argnums=(0, 1, 2))(q, k, v)
  got, got_grads = jax.value_and_grad(split, argnums=(0, 1, 2))(q, k, v)
  helpers.assert_close(got, want, 'weighted sum')
  for name, g, e in zip('qkv', got_grads, want_grads):
    helpers.assert_close(g, e, f'd{name}')


@pytest.mark.slow
def test_kernels_compile_under_context_for_v5e():
  """The TPU compiler takes both kernels inside the context shard_map (trimmed tiny, rows of
  1,024 over context 2 x fsdp 2 of a v5e-4, balanced chunks of 256, window 32)."""
  from tests.test_aot import _config, needs_libtpu  # pylint: disable=g-import-not-at-top
  from gemma3_train.planning import aot  # pylint: disable=g-import-not-at-top
  if needs_libtpu.args[0]:
    pytest.skip('libtpu not installed')
  c = _config('tiny', model=dict(num_layers=6, vocab_size=4096, attention_impl='splash'),
              data=dict(seq_len=1024), train=dict(global_batch_size=2),
              mesh=dict(context=2, fsdp=-1))
  r = aot.compile_report(c, aot.parse_topology('v5e-4'))
  assert r.mesh['context'] == 2 and r.fits and not r.error
  assert r.tpu_kernels > 0  # the splash TPU kernels, not their interpreter
