"""Sampling under context parallelism (inference/sampler.py, models/context.py): the prompt runs
with its columns split over the context axis and the KV cache's columns are split the same way;
greedy tokens and their logits equal the context-1 sampler's."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from gemma3_train import config as config_lib
from gemma3_train import sharding
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import sampler as sample
from gemma3_train.models import decoder

# 8 layers (a scanned block of six and a two-layer tail), window 8: longer than the balanced
# chunks of 6 at degree 4 (halos from two chunks back), shorter than the prompts.
MODEL = dict(preset='test', vocab_size=512, embed_dim=32, mlp_dim=48, num_layers=8,
             num_heads=4, num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24.0,
             global_rope_scale=8.0, sliding_window=8, param_dtype='float32', dtype='float32',
             attention_impl='reference')
LENGTHS = [5, 21, 33, 40]  # left-padded to 48 columns; pads 43 .. 8
NEW = 22  # 48 + 22 = 70 global columns: rounded up to 72 at degree 4


def _model(layout):
  cfg = config_lib.ModelConfig(**MODEL, context_layout=layout)
  return decoder.Gemma3(cfg, rngs=nnx.Rngs(0))


def _prompts():
  rng = np.random.default_rng(1)
  return [[tokenizer_lib.BOS] + rng.integers(200, 512, n - 1).tolist() for n in LENGTHS]


@pytest.fixture(scope='module')
def context_1():
  """The context-1 sampler's greedy tokens and logits (no stop tokens: every step runs)."""
  return sample.Sampler(_model('balanced')).generate(_prompts(), NEW, return_logits=True,
                                                     stop_tokens=())


def _column_axes(x):
  """The mesh axes of a cache array's column dimension ([..., B, C, K, H])."""
  spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
  return spec[x.ndim - 3]


# 6-14 s each with the XLA cache warm, 16-25 s cold on the shared 2-core box (load 8-13): one in
# the fast lane.
@pytest.mark.parametrize('degree,layout', [
    (4, 'balanced'),  # halos from two chunks back; 70 global columns rounded up to 72
    pytest.param(2, 'balanced', marks=pytest.mark.slow),
    pytest.param(4, 'contiguous', marks=pytest.mark.slow),
])
def test_greedy_equals_context_1(degree, layout, context_1):
  """Rows over fsdp, columns over context: the same tokens, logits within 1e-5, and every
  layer's cache (global and the local rings) split over the context axis, as
  sampler.cache_sharding (what rollout_aot compiles with) says."""
  m = _model(layout)
  c = config_lib.Config(model=m.cfg, mesh=config_lib.MeshConfig(context=degree, fsdp=-1))
  rules = dict(sharding.DEFAULT_RULES)
  mesh = sharding.make_mesh(c)
  s = sample.Sampler(m, mesh, rules)
  got, got_logits = s.generate(_prompts(), NEW, return_logits=True, stop_tokens=())
  want, want_logits = context_1
  assert got == want
  helpers.assert_close(got_logits, want_logits, 'logits')

  tokens, pad = sample.left_pad(_prompts(), s.bucket)
  B, P = tokens.shape
  prefill, decode = s._jitted(P + NEW)  # pylint: disable=protected-access
  knobs, key = sample.sampling_knobs(sample.Sampling()), jax.random.PRNGKey(0)
  cache, first, logits = prefill(s.state, jnp.asarray(tokens), jnp.asarray(pad), key, knobs)
  leaves = jax.tree.leaves(cache)
  assert [x.shape[-3] for x in leaves[:2]] == [8, 8]  # the first local layer's ring
  assert {x.shape[-3] for x in leaves} == {8, -(-(P + NEW) // degree) * degree}
  assert all(_column_axes(x) == 'context' for x in leaves), [x.sharding for x in leaves]
  assert all(x.sharding.shard_shape(x.shape)[-3] == x.shape[-3] // degree for x in leaves)
  assert all(x.sharding.is_equivalent_to(sample.cache_sharding(x.shape, mesh, rules), x.ndim)
             for x in leaves)
  # The decode loop attends each shard's columns: no collective assembles a cache's columns.
  # (The carry generate built, so the compile is the one generate made.)
  carry = {'cache': cache, 'tokens': first, 'step': jnp.int32(0), 'done': first < 0,
           'out': jnp.zeros((NEW, B), jnp.int32).at[0].set(first),
           'logits': jnp.zeros((NEW, B, logits.shape[-1]), jnp.float32).at[0].set(logits)}
  hlo = decode.lower(s.state, carry, jnp.int32(NEW - 1), jnp.int32(P), jnp.asarray(pad), key,
                     knobs, jnp.zeros(0, jnp.int32)).compile().as_text()
  moved = [tuple(int(d) for d in dims.split(',') if d) for dims in
           re.findall(r'= \w+\[([\d,]*)\]\S* (?:all-gather|all-reduce)(?:-start)?\(', hlo)]
  assert moved  # the parameters' FSDP gathers
  whole = {x.shape[-3:] for x in leaves}  # (C, K, H) of every layer's cache
  assert not [dims for dims in moved if dims[-3:] in whole]
