"""The FLOPs model against a brute-force count of every matmul."""

import dataclasses
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.models import decoder as model
from gemma3_train.training import flops

TINY = config_lib.ModelConfig(
    preset='t', vocab_size=97, num_layers=8, embed_dim=24, mlp_dim=40, num_heads=4,
    num_kv_heads=2, head_dim=6, sliding_window=5)


def _brute_force_flops(m, seq_len):
  """Training FLOPs of one row, listing every matmul's (M, K, N) and masking keys explicitly."""
  d, n, k, h = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim
  q_pos, k_pos = np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]
  causal = k_pos <= q_pos
  local = causal & (k_pos > q_pos - m.sliding_window)  # W keys including itself
  matmuls = []  # (rows, contraction, cols)
  for layer in range(m.num_layers):
    matmuls += [(seq_len, d, n * h), (seq_len, d, k * h), (seq_len, d, k * h),  # q, k, v
                (seq_len, n * h, d),  # out
                (seq_len, d, m.mlp_dim), (seq_len, d, m.mlp_dim), (seq_len, m.mlp_dim, d)]
    mask = causal if layer % 6 == 5 else local
    for row in mask:  # one query position: scores over its keys, then probs @ V
      keys = int(row.sum())
      matmuls += [(n, h, keys), (n, keys, h)]
  matmuls.append((seq_len, d, m.vocab_size))  # tied LM head
  return 3 * sum(2 * a * b * c for a, b, c in matmuls)


@pytest.mark.parametrize('seq_len', [1, 4, 5, 6, 13, 32])
def test_flops_match_brute_force(seq_len):
  expected = _brute_force_flops(TINY, seq_len)
  assert flops.model_flops_per_token(TINY, seq_len) * seq_len == pytest.approx(expected, 1e-12)
  assert flops.model_flops_per_step(TINY, seq_len, 3) == pytest.approx(3 * expected, 1e-12)


def test_flops_local_layers_cheaper_than_global_beyond_window():
  full = dataclasses.replace(TINY, sliding_window=10_000)
  assert flops.model_flops_per_token(TINY, 64) < flops.model_flops_per_token(full, 64)
  assert flops.model_flops_per_token(TINY, 5) == flops.model_flops_per_token(full, 5)


def test_flops_near_six_n_for_1b():
  # Short rows: attention is < 1% of the work, so FLOPs/token ~ 6 x params (tied head counted
  # once as the V x D matmul). Params from the Gemma 3 report: 697.9M + 302.0M embedding.
  m = config_lib.ModelConfig.from_preset('1b')
  ratio = flops.model_flops_per_token(m, 128) / (6 * (697.9e6 + 302.0e6))
  assert 1.0 < ratio < 1.01


@pytest.mark.parametrize('seq_len,window', [(1, None), (9, None), (9, 5), (5, 5), (4, 5), (64, 7)])
def test_attention_pairs_count_the_mask(seq_len, window):
  q, k = np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]
  allowed = (k <= q) & (k > q - (window or seq_len))
  assert flops.attention_pairs(seq_len, window) == allowed.sum()


def _named_matmul_flops(m, seq_len):
  """{checkpoint name: FLOPs per token of the dot_general it names} from a traced DecoderLayer."""
  # Abstract parameters: tracing needs their shapes only (eager init would compile every op).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model.DecoderLayer(m, 0, rngs=nnx.Rngs(0))))
  x = jax.ShapeDtypeStruct((1, seq_len, m.embed_dim), m.dtype)
  positions, segments = jnp.arange(seq_len)[None], jnp.ones((1, seq_len), jnp.int32)
  producer, named = {}, {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      producer.update({v: eqn for v in eqn.outvars})
      if eqn.primitive.name == 'name':  # jax.ad_checkpoint.checkpoint_name
        named[eqn.params['name']] = eqn.invars[0]
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  def layer(state, x):
    return nnx.merge(graphdef, state)(x, positions, segments)
  walk(jax.make_jaxpr(layer)(state, x).jaxpr)
  out = {}
  for name, var in named.items():
    while var in producer and producer[var].primitive.name != 'dot_general':
      var = producer[var].invars[0]  # through casts, transposes and sharding constraints
    if var in producer:
      dot = producer[var]
      (contract, _), _ = dot.params['dimension_numbers']
      k = math.prod(dot.invars[0].aval.shape[i] for i in contract)
      out[name] = 2 * math.prod(dot.outvars[0].aval.shape) * k / seq_len
  return out


def test_layer_matmul_flops_are_the_model_checkpoint_names():
  # aot counts the remat replay by these names: each must name the model's matmul of that cost.
  m = dataclasses.replace(TINY, attention_impl='reference')
  named = _named_matmul_flops(m, seq_len=7)
  assert flops.layer_matmul_flops(m) == {k: v for k, v in named.items() if k != 'attention_out'}
  assert 'attention_out' in named  # probs @ V: attention, counted by attention_flops_per_row


def test_distill_counts_the_online_teachers_forward_of_its_own_shape():
  """An online teacher adds its own forward (a third of its 3x-forward count, at the teacher's
  shape, not the student's); stored targets (distill.teacher='') add nothing."""
  c = config_lib.Config().replace(
      model=config_lib.PRESETS['4b'], data=dict(seq_len=4096),
      train=dict(objective='distill', global_batch_size=8),
      distill=dict(teacher='/path/to/27b', teacher_preset='27b'))
  T, B = 4096, 8
  student = flops.model_flops_per_step(c.model, T, B)
  teacher = flops.model_flops_per_step(c.replace(model=config_lib.PRESETS['27b']).model, T, B)
  assert flops.train_flops_per_step(c) == pytest.approx(student + teacher / 3, rel=1e-12)
  assert teacher / 3 > student  # the 27b's forward outweighs the 4b's whole step
  offline = c.replace(distill=dict(teacher='', teacher_preset=''))
  assert flops.train_flops_per_step(offline) == student


def test_distill_counts_a_vision_teachers_tower_over_every_image_slot():
  """A vision student's online teacher also runs its tower on every image slot (global batch x
  data.max_images): its encoder and projector forward, once, beside the student's own."""
  c = config_lib.Config().replace(
      model=dict(config_lib.PRESETS['4b'], vision=True), data=dict(seq_len=4096, max_images=2),
      train=dict(objective='distill', global_batch_size=8),
      distill=dict(teacher='/path/to/27b', teacher_preset='27b'))
  T, B = 4096, 8
  text = c.replace(model=dict(vision=False), data=dict(max_images=0))
  teacher_cfg = c.replace(model=config_lib.PRESETS['27b']).model
  encoder, projector = flops.vision_forward_flops(teacher_cfg)
  want = (flops.model_flops_per_step(text.model, T, B) + flops.vision_flops_per_step(c)
          + flops.model_flops_per_step(teacher_cfg, T, B) / 3 + (encoder + projector) * B * 2)
  assert encoder > 0 and projector > 0
  assert flops.train_flops_per_step(c) == pytest.approx(want, rel=1e-12)
