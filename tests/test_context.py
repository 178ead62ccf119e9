"""Context parallelism (models/context.py): attention with the sequence split over the context
axis equals attention over whole rows, for global and local layers, both layouts, packed rows,
windows shorter and longer than a chunk, and image blocks straddling a shard boundary."""

import dataclasses
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from gemma3_train import config as config_lib
from gemma3_train import sharding
from gemma3_train.models import attention
from gemma3_train.models import context
from gemma3_train.models import decoder
from gemma3_train.training import objectives


def _mesh(degree, **mesh):
  c = config_lib.Config().replace(mesh=dict(context=degree, fsdp=-1, **mesh),
                                  data=dict(seq_len=64))
  return sharding.make_mesh(c)


def _rows(B, L, rng):
  """Packed rows: three documents of random lengths (positions restart), a padded tail
  (segment 0, positions 0, as the pipeline pads) on all rows but the first."""
  segments = np.zeros((B, L), np.int32)
  positions = np.zeros((B, L), np.int32)
  for b in range(B):
    cuts = [0] + sorted(rng.choice(np.arange(4, L - 4), 3, replace=False).tolist()) + [L]
    for s, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
      if s == 3 and b > 0:
        continue  # padding
      segments[b, lo:hi] = s + 1
      positions[b, lo:hi] = np.arange(hi - lo)
  return positions, segments


def _blocks(B, L, width, starts):
  """Image block ids: a block of `width` tokens at each of `starts` (numbered 1, 2, ...)."""
  blocks = np.zeros((B, L), np.int32)
  for i, s in enumerate(starts):
    blocks[:, s:s + width] = i + 1
  return blocks


def _split_attend(mesh, layout, q, k, v, pos, seg, blk, window, lookahead, impl='reference'):
  def f(q, k, v, pos, seg, blk):
    if layout == 'balanced':
      q, k, v, pos, seg = context.to_balanced(q, k, v, pos, seg)
      blk = None if blk is None else context.to_balanced(blk)[0]
    out = context.attend(q, k, v, pos, seg, blk, window=window, lookahead=lookahead,
                         layout=layout, impl=impl)
    return context.from_balanced(out)[0] if layout == 'balanced' else out
  with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
    return jax.jit(f)(q, k, v, pos, seg, blk)


_SPLITS = [
    (2, 'contiguous', None, False),
    (2, 'contiguous', 5, False),
    (4, 'balanced', None, False),
    (4, 'balanced', 5, False),
    (4, 'balanced', 20, False),   # W - 1 > a chunk of 8: halos from two chunks back
    (2, 'balanced', 3, True),     # an image block straddling a shard boundary
    (4, 'contiguous', 12, True),
]


@pytest.mark.parametrize('impl', ['reference', 'cudnn'])
@pytest.mark.parametrize('degree,layout,window,image', _SPLITS)
def test_split_attention_equals_whole_rows(degree, layout, window, image, impl):
  """impl cudnn: off GPU the shard runs jax.nn.dot_product_attention's xla implementation with
  the arguments cuDNN gets (models/context_cudnn.py), so this checks their index arithmetic."""
  B, L, N, K, H = 2, 64, 4, 2, 8
  rng = np.random.default_rng(degree * 7 + (window or 0))
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((B, L, N, H), (B, L, K, H), (B, L, K, H)))
  pos, seg = _rows(B, L, rng)
  # A block of 10 across position 32 (a shard boundary for both degrees), one of 6 at 13.
  blk = _blocks(B, L, 10, [27, 13 - 6]) if image else None
  want = attention.reference(q, k, v, attention.make_mask(pos, seg, window, blk))
  with mock.patch.object(jax.nn, 'dot_product_attention',
                         wraps=jax.nn.dot_product_attention) as kernel:
    got = _split_attend(_mesh(degree), layout, q, k, v, jnp.asarray(pos), jnp.asarray(seg),
                        None if blk is None else jnp.asarray(blk), window, 9 if image else 0,
                        impl)
  # the cudnn path's kernel, once per chunk of a local layer, once for a global one
  chunks = 2 if layout == 'balanced' else 1
  calls = 0 if impl == 'reference' else 1 if window is None else chunks
  assert kernel.call_count == calls
  if calls:
    assert kernel.call_args.kwargs['implementation'] == 'xla'
    assert kernel.call_args.kwargs.get('is_causal', False) == (window is not None and not image)
  real = seg > 0  # padded queries attend differently (to padding only): the loss ignores them
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5,
                             atol=1e-5)


# --- the whole model: losses and gradients at context degree 1, 2 and 4 ----------------------


def _config(degree, layout='balanced', **sections):
  """helpers.small_config (7 layers: a block of six and a tail) in float32 with rows of 64 and
  a window of 6: shorter than the chunks at degree 2 (16 or 32) and longer than the balanced
  chunks of 8 at degree 4 (halos from two chunks back)."""
  base = dict(model=dict(sliding_window=6, dtype='float32',
                         param_dtype='float32', context_layout=layout),
              data=dict(seq_len=64), mesh=dict(context=degree, fsdp=-1))
  for k, v in sections.items():
    base[k] = {**base.get(k, {}), **v}
  return helpers.small_config(**base)


def _loss_and_grads(c, batch):
  """The ce objective's summed loss, parts and gradients (every parameter) on c's mesh."""
  mesh = sharding.make_mesh(c)
  rules = sharding.parse_rules(c.mesh.rules)
  graphdef, params, rest = nnx.split(decoder.build(c), nnx.Param, ...)
  objective = objectives.get(c)

  def f(params, batch):
    with sharding.use_mesh(mesh, rules):
      return objective.loss_sums(nnx.merge(graphdef, params, rest), batch)
  put = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.shape, rules))
         for k, v in batch.items()}
  grads, sums = jax.jit(jax.grad(f, has_aux=True))(params, put)
  return sums, [np.asarray(g) for g in jax.tree.leaves(grads)]


def _packed(c, seed=0):
  """helpers.packed_batch with three documents per row and a padded tail."""
  batch = helpers.packed_batch(c, seed)
  L = c.data.seq_len
  seg = np.repeat([1, 2, 3, 0], [21, 17, L - 44, 6]).astype(np.int32)
  pos = np.concatenate([np.arange(21), np.arange(17), np.arange(L - 44), np.zeros(6)])
  B = c.train.global_batch_size
  batch.update(segment_ids=np.broadcast_to(seg, (B, L)).copy(),
               positions=np.broadcast_to(pos.astype(np.int32), (B, L)).copy(),
               weights=np.broadcast_to((seg > 0).astype(np.float32), (B, L)).copy())
  return batch


def _assert_same(got, want):
  (sums_g, grads_g), (sums_w, grads_w) = got, want
  for k in sums_w:
    helpers.assert_close(sums_g[k], sums_w[k], k)
  assert len(grads_g) == len(grads_w)
  for i, (a, b) in enumerate(zip(grads_g, grads_w)):
    helpers.assert_close(a, b, f'gradient leaf {i}')
  assert any(np.abs(g).max() > 0 for g in grads_w)


# ~25 s each on 2 cores (compiling three meshes' programs): all in the slow lane.
@pytest.mark.slow
@pytest.mark.parametrize('degree,layout', [(2, 'contiguous'), (4, 'balanced'), (2, 'balanced'),
                                           (4, 'contiguous')])
def test_loss_and_grads_equal_context_1(degree, layout):
  """Packed rows of three documents and padding, window 6 over rows of 64: within 1e-5."""
  batch = _packed(_config(1))
  want = _loss_and_grads(_config(1), batch)
  _assert_same(_loss_and_grads(_config(degree, layout), batch), want)


@pytest.mark.slow
def test_cudnn_loss_and_grads_equal_context_1():
  """attention_impl=cudnn under context 4 (off GPU: the same kernel arguments, xla
  implementation; models/context_cudnn.py) against the reference on whole rows."""
  batch = _packed(_config(1))
  want = _loss_and_grads(_config(1), batch)
  _assert_same(_loss_and_grads(_config(4, model=dict(attention_impl='cudnn')), batch), want)


@pytest.mark.slow
def test_lora_loss_and_grads_equal_context_1():
  lora = dict(rank=4, alpha=8.0)
  batch = _packed(_config(1))
  want = _loss_and_grads(_config(1, lora=lora), batch)
  _assert_same(_loss_and_grads(_config(4, lora=lora), batch), want)


# --- the chunked LM head under a split sequence ---------------------------------------------


def test_chunked_loss_and_logprobs_under_context():
  """lm_head's chunks take positions from every shard (a ragged last chunk too): the same
  sums, gradients and per-position log-probabilities as without a mesh."""
  from gemma3_train.models import lm_head  # pylint: disable=g-import-not-at-top
  B, L, D, V = 4, 48, 8, 32
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  weights = jnp.asarray(rng.random((B, L)) > 0.2, jnp.float32)

  def run(x, table):
    sums, grads = jax.value_and_grad(
        lambda x, t: lm_head.chunked_cross_entropy(x, t, targets, weights, chunk_size=20,
                                                   z_loss=1e-2)['loss_sum'],
        argnums=(0, 1))(x, table)
    return sums, grads, lm_head.token_logprobs(x, table, targets, chunk_size=20)
  want = jax.jit(run)(x, table)
  mesh = _mesh(4)
  with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
    assert sharding.sequence_shards(L) == 4
    got = jax.jit(run)(x, table)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# --- what the compiled program moves ---------------------------------------------------------


def _collective_bytes(fn, *args):
  """{op: bytes of its per-device results} over the compiled program's collectives."""
  sizes = {'f32': 4, 's32': 4, 'bf16': 2, 'pred': 1}
  out = {}
  for line in jax.jit(fn).lower(*args).compile().as_text().splitlines():
    m = re.search(r'= (\w+)\[([\d,]*)\]\S* (collective-permute|all-gather|all-reduce|all-to-all)'
                  r'\(', line)
    if m:
      n = np.prod([int(d) for d in m.group(2).split(',') if d])
      out[m.group(3)] = out.get(m.group(3), 0) + int(n) * sizes[m.group(1)]
  return out


@pytest.mark.parametrize('layout', ['contiguous', 'balanced'])
def test_local_layer_moves_only_the_halo(layout):
  """A local layer's collectives are ppermutes of W - 1 keys, values, positions and segments
  per chunk (one chunk per shard contiguous, two balanced); a global layer all-gathers."""
  B, L, N, K, H, W = 2, 64, 4, 2, 8, 6
  mesh = _mesh(4)  # context 4 x fsdp 2: one row per device
  q, k = jnp.zeros((B, L, N, H)), jnp.zeros((B, L, K, H))
  pos = jnp.zeros((B, L), jnp.int32)
  attend = lambda window: lambda q, k, v, p, s: context.attend(
      q, k, v, p, s, None, window=window, lookahead=0, layout=layout)
  with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
    local = _collective_bytes(attend(W), q, k, k, pos, pos)
    whole = _collective_bytes(attend(None), q, k, k, pos, pos)
  chunks = 2 if layout == 'balanced' else 1
  # per chunk, per row: W - 1 keys and values (K x H float32) and their position and segment
  halo = chunks * 1 * (W - 1) * (2 * K * H * 4 + 2 * 4)
  assert set(local) == {'collective-permute'}
  assert local['collective-permute'] == halo
  assert whole == {'all-gather': 1 * L * (2 * K * H * 4 + 2 * 4)}


_VISION = dict(vision=True, vision_image_size=16, vision_patch_size=4, vision_width=16,
               vision_depth=2, vision_mlp_dim=32, vision_num_heads=2, vision_pool=2,
               vision_trainable=True)


def _vision_batch(c, seed=0):
  """_packed's rows with two images of 4 soft tokens each in the first document, the second
  across position 32 (a shard boundary at degree 2 and 4, a chunk boundary balanced)."""
  batch = _packed(c, seed)
  V, T = c.model.vocab_size, c.model.tokens_per_image
  for start in (5, 30):
    batch['inputs'][:, start:start + T] = V
  batch['targets'] = np.concatenate([batch['inputs'][:, 1:], batch['targets'][:, -1:]], 1)
  batch['weights'] = np.where(batch['targets'] == V, 0.0, batch['weights']).astype(np.float32)
  rng = np.random.default_rng(seed)
  B, S = c.train.global_batch_size, c.model.vision_image_size
  batch['images'] = rng.integers(0, 256, size=(B, 2, S, S, 3)).astype(np.uint8)
  batch['image_counts'] = np.full((B,), 2, np.int32)
  return batch


@pytest.mark.slow
@pytest.mark.parametrize('degree', [2, 4])
def test_vision_loss_and_grads_equal_context_1(degree):
  """Bidirectional image blocks, one straddling a shard boundary: a local layer's halo reaches
  ahead into the next shard."""
  c1 = _config(1, model=_VISION, data=dict(max_images=2))
  batch = _vision_batch(c1)
  want = _loss_and_grads(c1, batch)
  _assert_same(_loss_and_grads(_config(degree, model=_VISION, data=dict(max_images=2)), batch),
               want)


# --- the planner ---------------------------------------------------------------------------


def test_planner_adds_context_degrees_for_long_rows():
  """Auto degrees: 1, and for long rows each leaving LONG_SHARD positions a shard (dividing the
  sequence into 2 chunks a shard); candidates split the chips over fsdp x context x tensor."""
  from gemma3_train.planning import aot, plan  # pylint: disable=g-import-not-at-top
  c = dataclasses.replace(config_lib.Config(), model=config_lib.ModelConfig.from_preset('4b'))
  assert plan.context_degrees(c.replace(data=dict(seq_len=4096)), plan.PlanSpace()) == (1,)
  long = c.replace(data=dict(seq_len=32768))
  assert plan.context_degrees(long, plan.PlanSpace()) == (1, 2, 4, 8)
  assert plan.context_degrees(long, plan.parse_plan_space(context='1,3,4')) == (1, 4)
  space = plan.PlanSpace(remat_policies=('full',), rows_per_shard=(1,), tensor_degrees=(1, 2),
                         layouts=('layer/layer',))
  got = {(k.tensor, k.context, k.trial.mesh.fsdp, k.trial.train.global_batch_size)
         for k in plan._candidates(long, aot.parse_topology('v5e-16'), space)}
  assert got == {(t, x, 16 // (t * x), 16 // (t * x)) for t in (1, 2) for x in (1, 2, 4, 8)}


@pytest.mark.slow
def test_train_step_equals_context_1():
  """The real train step (train.state.setup: parameters ZeRO-3 over fsdp x context, the
  batch's positions on the context axis): the same loss and gradient norm as context 1."""
  from gemma3_train.training import state as state_lib  # pylint: disable=g-import-not-at-top
  metrics = {}
  for degree in (1, 2):
    c = _config(degree)
    s = state_lib.setup(c, sharding.make_mesh(c))
    if degree > 1:
      spec = s.state_shardings['params']['embedder']['embedding'].get_value().spec
      assert spec == jax.sharding.PartitionSpec(None, ('fsdp', 'context'))
      assert s.batch_sharding['inputs'].spec == jax.sharding.PartitionSpec(
          sharding.BATCH_AXES, 'context')
    batch = {k: jax.device_put(v, s.batch_sharding[k]) for k, v in _packed(c).items()}
    _, m = s.train_step(s.state, batch)
    metrics[degree] = {k: float(m[k]) for k in ('loss', 'grad_norm')}
  for k in ('loss', 'grad_norm'):
    helpers.assert_close(metrics[2][k], metrics[1][k], k)
