"""Every attention implementation against the reference boolean mask and einsum attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from gemma3_train import config as config_lib
from gemma3_train.models import attention
from gemma3_train import sharding


def _brute_mask(positions, segments, window):
  """The rule of module docstring written as loops: same segment, q - W < k <= q."""
  B, L = positions.shape
  out = np.zeros((B, L, L), bool)
  for b in range(B):
    for i in range(L):
      for j in range(L):
        q, k = positions[b, i], positions[b, j]
        ok = segments[b, i] == segments[b, j] and k <= q
        out[b, i, j] = ok and (window is None or k > q - window)
  return out


def _packed(B, L, cuts, rng):
  """Segment ids (a trailing 0 = padding) and per-segment positions."""
  segments = np.zeros((B, L), np.int32)
  positions = np.zeros((B, L), np.int32)
  for b in range(B):
    edges = [0] + sorted(rng.choice(np.arange(1, L), cuts, replace=False).tolist()) + [L]
    for s, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
      segments[b, lo:hi] = s + 1 if hi < L or b == 0 else 0
      positions[b, lo:hi] = np.arange(hi - lo)
  return positions, segments


def _qkv(B, T, N, K, H, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))


@pytest.mark.parametrize('window', [None, 1, 3, 4])
def test_reference_mask_is_the_rule(window):
  positions, segments = _packed(2, 12, 2, np.random.default_rng(0))
  got = attention.make_mask(jnp.asarray(positions), jnp.asarray(segments), window)
  np.testing.assert_array_equal(got, _brute_mask(positions, segments, window))
  if window is not None:  # a query sees exactly min(W, position + 1) keys
    np.testing.assert_array_equal(np.asarray(got).sum(-1), np.minimum(window, positions + 1))


@pytest.mark.parametrize('window', [None, 1, 5, 16])
def test_splash_masks_match_reference(window):
  """The static splash masks (W - 1 left for local layers) equal the reference on indices."""
  T = 40
  if window is None:
    kernel_mask = mask_lib.CausalMask((T, T))
  else:
    kernel_mask = mask_lib.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
  positions = np.arange(T, dtype=np.int32)[None]
  want = attention.make_mask(jnp.asarray(positions), jnp.ones((1, T), jnp.int32), window)[0]
  np.testing.assert_array_equal(kernel_mask[0:T, 0:T], want)
  if window is not None:  # the off-by-one a kernel would make with left = W
    wrong = mask_lib.LocalMask((T, T), window_size=(window, 0), offset=0)
    assert not np.array_equal(wrong[0:T, 0:T], want)


@pytest.mark.parametrize('window', [None, 1, 6])
def test_dot_product_window_translation(window):
  """jax.nn.dot_product_attention with the cudnn path's arguments (run by XLA) = reference."""
  q, k, v = _qkv(2, 24, 4, 2, 8)
  positions, segments = _packed(2, 24, 2, np.random.default_rng(1))
  want = attention.reference(q, k, v, attention.make_mask(positions, segments, window))
  got = attention.dot_product(q, k, v, jnp.asarray(segments), window, implementation='xla')
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  if window is not None:  # W keys, not W + 1: the test can tell them apart
    wrong = attention.dot_product(q, k, v, jnp.asarray(segments), window + 1, 'xla')
    assert np.abs(np.asarray(wrong) - np.asarray(want)).max() > 1e-3


def test_reference_matches_naive_loops():
  """GQA head grouping (query head n uses kv head n // G) and softmax, from first principles."""
  B, T, N, K, H, W = 1, 9, 4, 2, 4, 3
  q, k, v = (np.asarray(a) for a in _qkv(B, T, N, K, H, seed=3))
  positions = np.arange(T, dtype=np.int32)[None]
  segments = np.ones((B, T), np.int32)
  mask = _brute_mask(positions, segments, W)[0]
  want = np.zeros((T, N, H))
  for n in range(N):
    s = q[0, :, n] @ k[0, :, n // (N // K)].T
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want[:, n] = (p / p.sum(-1, keepdims=True)) @ v[0, :, n // (N // K)]
  got = attention.reference(*map(jnp.asarray, (q, k, v)),
                            attention.make_mask(positions, segments, W))
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


def _splash_vs_reference(window, grads):
  B, T, N, K, H = 2, 256, 4, 2, 16
  q, k, v = _qkv(B, T, N, K, H, seed=4)
  positions, segments = _packed(B, T, 2, np.random.default_rng(5))
  positions, segments = jnp.asarray(positions), jnp.asarray(segments)
  ref = lambda q, k, v: attention.reference(q, k, v,
                                            attention.make_mask(positions, segments, window))
  spl = lambda q, k, v: attention.splash(q, k, v, segments, window, block_size=128,
                                         interpret=True)
  np.testing.assert_allclose(spl(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  if grads:
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    g_spl = jax.grad(loss(spl), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_spl, g_ref):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_splash_interpret_local_outputs_and_grads():
  """Window 16 across a 128-block boundary, packed rows with padding, GQA 4:2."""
  _splash_vs_reference(16, grads=True)


@pytest.mark.slow
def test_splash_interpret_causal_outputs_and_grads():
  _splash_vs_reference(None, grads=True)


@pytest.mark.slow
def test_splash_under_mesh_uses_shard_map():
  """With a mesh active the kernel runs per shard (rows on fsdp, kv heads on tensor)."""
  c = config_lib.Config().replace(mesh=dict(fsdp=4, tensor=2))
  mesh = sharding.make_mesh(c)
  B, T, N, K, H = 4, 128, 4, 2, 16
  q, k, v = _qkv(B, T, N, K, H, seed=6)
  positions, segments = _packed(B, T, 1, np.random.default_rng(7))
  want = attention.reference(q, k, v, attention.make_mask(positions, segments, 8))
  with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
    got = jax.jit(lambda q, k, v, s: attention.splash(q, k, v, s, 8, block_size=128,
                                                      interpret=True))(
                                                          q, k, v, jnp.asarray(segments))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resolve_auto():
  backend = jax.default_backend()
  assert attention.resolve('auto', jnp.bfloat16) == {
      'cpu': 'reference', 'gpu': 'cudnn', 'tpu': 'splash'}[backend]
  assert attention.resolve('auto', jnp.float32) == ('splash' if backend == 'tpu' else 'reference')
  assert attention.resolve('cudnn', jnp.float32) == 'cudnn'


def test_splash_rejects_bad_block_size():
  q, k, v = _qkv(1, 200, 2, 1, 8)
  with pytest.raises(ValueError, match='attention_block_size'):
    attention.splash(q, k, v, jnp.ones((1, 200), jnp.int32), None, block_size=128,
                     interpret=True)


def test_splash_fits_only_lengths_its_blocks_tile():
  """A sampler prompt bucket (multiples of 16) shorter than the block is one block, which the
  kernel takes only at a multiple of 128; longer ones need the block to divide them."""
  assert attention.splash_fits(256, 512) and attention.splash_fits(1024, 512)
  assert attention.splash_fits(768, 256)
  assert not attention.splash_fits(48, 512)  # one block of 48: not a multiple of 128
  assert not attention.splash_fits(768, 512)  # 512 does not divide 768


@pytest.mark.parametrize('seq_len,block,context,ok', [
    (256, 128, 1, True), (384, 256, 1, False), (96, 128, 1, False), (512, 128, 2, True),
    (256, 128, 2, False)])
def test_setup_refuses_splash_blocks_that_do_not_tile_a_row(seq_len, block, context, ok):
  """Before tracing, one line naming the block size: splash over rows of seq_len, or under
  context parallelism over balanced chunks of seq_len / (2 context); a block is a multiple of
  128 (one shorter row is one block)."""
  from gemma3_train.training import state  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  c = helpers.small_config(model=dict(attention_impl='splash', attention_block_size=block),
                           data=dict(seq_len=seq_len), mesh=dict(context=context, fsdp=1))
  mesh = sharding.make_mesh(c, jax.devices()[:context])
  check = lambda: state._check_splash_blocks(c, mesh, sharding.parse_rules(c.mesh.rules))  # pylint: disable=protected-access
  if ok:
    check()
  else:
    with pytest.raises(config_lib.ConfigError, match=r'^model\.attention_block_size=\d+: splash'):
      check()


@pytest.mark.parametrize('dtype,message', [
    ('float32', r'needs model\.dtype bfloat16 or float16, got float32'),
    ('bfloat16', r'needs a GPU; this run compiles for cpu')])
def test_setup_refuses_cudnn_off_gpu_or_in_float32(dtype, message):
  """attention_impl=cudnn, named: one line naming the field before tracing (JAX's own error
  comes from inside the step, as a traceback)."""
  from gemma3_train.training import state  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  c = helpers.small_config(model=dict(attention_impl='cudnn', dtype=dtype))
  mesh = sharding.make_mesh(c)
  with pytest.raises(config_lib.ConfigError, match=r'^model\.attention_impl=cudnn: cuDNN '
                     r'attention ' + message):
    state.setup(c, mesh, abstract=True)
