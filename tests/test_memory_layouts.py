"""Memory layouts (model.remat_unit, model.scan_unit): the block layout's function and gradients.

remat_unit='layer' nests a checkpoint around each layer inside the checkpoint of its block of
six; it changes what the backward pass keeps alive, never the math: float32 losses and gradients
must equal the block layout's to 1e-6, scanned and unscanned, for 'full' and a named policy.
"""

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.convert import layout
from gemma3_train.models import decoder as model_lib

# One scanned block of six and a one-layer tail (seven layers), tiny widths.
TINY7 = config_lib.ModelConfig(
    preset='tiny', vocab_size=128, num_layers=7, embed_dim=32, mlp_dim=64, num_heads=4,
    num_kv_heads=2, head_dim=8, query_pre_attn_scalar=12.0, sliding_window=4,
    global_rope_scale=8.0)


def _random_canonical(cfg, seed=0):
  """Random weights in the canonical layout (numpy: no per-shape compiles)."""
  rng = np.random.default_rng(seed)
  N, K, D, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim, cfg.mlp_dim
  r = lambda *s, std=0.2: (rng.normal(size=s) * std).astype(np.float32)
  top = {'embedding': r(cfg.vocab_size, D, std=0.5), 'final_norm': r(D, std=0.5)}
  layers = [{'pre_attention_norm': r(D), 'post_attention_norm': r(D), 'pre_ffw_norm': r(D),
             'post_ffw_norm': r(D), 'q_einsum': r(N, D, H), 'k_einsum': r(K, D, H),
             'v_einsum': r(K, D, H), 'attn_vec_einsum': r(N, H, D), 'query_norm': r(H),
             'key_norm': r(H), 'gating_einsum': r(2, F, D), 'linear': r(F, D)}
            for _ in range(cfg.num_layers)]
  return top, layers


def _loss_and_grads(cfg, tokens_BL):
  """Loss (mean square of the logits, every position and layer reaches it) and its canonical
  gradients, jitted as a train step would be."""
  model = nnx.eval_shape(lambda: model_lib.Gemma3(cfg, rngs=nnx.Rngs(0)))
  nnx.update(model, layout.canonical_to_state(cfg, *_random_canonical(cfg)))
  graphdef, params = nnx.split(model)
  f = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens_BL) ** 2)
  loss, grads = jax.jit(jax.value_and_grad(f))(params)
  return float(loss), layout.state_to_canonical(cfg, grads)


def _assert_close(a, b, what):
  """Within 1e-6 absolute (float32): XLA fuses the two programs differently (the nested
  checkpoint's barrier), so sums may round differently, a few ulps of values of order 0.1."""
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=what)


def _assert_same_results(got, want):
  """Loss within 1e-6 relative, every canonical gradient within 1e-6 absolute."""
  (l_got, (top_g, layers_g)), (l_want, (top_w, layers_w)) = got, want
  np.testing.assert_allclose(l_got, l_want, rtol=1e-6)
  for k in top_w:
    _assert_close(top_g[k], top_w[k], k)
  for i, (a, b) in enumerate(zip(layers_g, layers_w)):
    for k in b:
      _assert_close(a[k], b[k], f'layer {i} {k}')


# The fast lane keeps one case of each test (the shipped 1b/4b/270m policy, scanned; the layer
# scan under full remat); the slow marker runs the rest (~10 s each on 2 cores).
_SLOW = pytest.mark.slow


@pytest.mark.parametrize('scan,policy', [
    pytest.param(True, 'save_qkv_proj', id='save_qkv_proj-scanned'),
    pytest.param(False, 'save_qkv_proj', id='save_qkv_proj-unscanned', marks=_SLOW),
    pytest.param(True, 'full', id='full-scanned', marks=_SLOW),
    pytest.param(False, 'full', id='full-unscanned', marks=_SLOW)])
def test_layer_unit_equals_block_unit(scan, policy):
  tokens_BL = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)
  results = {}
  for unit in config_lib.REMAT_UNITS:
    cfg = dataclasses.replace(TINY7, scan_layers=scan, remat_policy=policy, remat_unit=unit)
    results[unit] = _loss_and_grads(cfg, tokens_BL)
  _assert_same_results(results['layer'], results['block'])
  layers_b = results['block'][1][1]
  # The absolute bound means something only against gradients of order 0.01 to 1.
  scale = max(float(np.max(np.abs(g))) for layer in layers_b for g in layer.values())
  assert 0.01 < scale < 100


@pytest.mark.parametrize('policy,remat_unit', [
    ('full', 'layer'), pytest.param('save_qkv_proj', 'layer', marks=_SLOW),
    pytest.param('full', 'block', marks=_SLOW), pytest.param('none', 'block', marks=_SLOW)])
def test_layer_scan_equals_block_layout(policy, remat_unit):
  """scan_unit='layer' (each block's six layers as an inner scan, the layer type as data: the
  RoPE frequencies by select, the attention kernel by lax.cond) computes the block layout's
  function: losses and gradients within 1e-6."""
  tokens_BL = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 12)), jnp.int32)
  base = dataclasses.replace(TINY7, remat_policy=policy)
  _assert_same_results(_loss_and_grads(dataclasses.replace(base, remat_unit=remat_unit,
                                                            scan_unit='layer'), tokens_BL),
                       _loss_and_grads(base, tokens_BL))


def _checkpoints(jaxpr, depth=0):
  """The nesting depth of every checkpoint (remat) equation in a jaxpr, through scans and
  other sub-jaxprs (1 = outermost)."""
  found = []
  for eqn in jaxpr.eqns:
    inner = depth + 1 if eqn.primitive.name in ('checkpoint', 'remat', 'remat2') else depth
    if inner > depth:
      found.append(inner)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _checkpoints(sub, inner)
  return found


def test_layer_unit_nests_one_checkpoint_per_layer():
  """The structure the memory saving rests on: with 'layer', each of the block's six layers has
  its own checkpoint inside the block's; the one-layer tail gets no pointless second one."""
  tokens_BL = jnp.zeros((1, 8), jnp.int32)
  depths = {}
  for unit in config_lib.REMAT_UNITS:
    for scan in (True, False):
      cfg = dataclasses.replace(TINY7, scan_layers=scan, remat_policy='full', remat_unit=unit)
      model = nnx.eval_shape(lambda c=cfg: model_lib.Gemma3(c, rngs=nnx.Rngs(0)))
      graphdef, params = nnx.split(model)
      jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p).hidden(tokens_BL))(params)
      depths[unit, scan] = sorted(_checkpoints(jaxpr.jaxpr))
  for scan in (True, False):
    assert depths['block', scan] == [1, 1]  # the block (or group of six) and the tail layer
    assert depths['layer', scan] == [1, 1] + [2] * 6


def test_layer_scan_nests_one_checkpoint_in_the_inner_scan():
  """scan_unit='layer': the block's layers are one scan body, so one checkpoint (under
  remat_unit='layer') nested in the block's, and one lax.cond choosing the attention kernel."""
  tokens_BL = jnp.zeros((1, 8), jnp.int32)
  for unit, expected in (('block', [1, 1]), ('layer', [1, 1, 2])):
    cfg = dataclasses.replace(TINY7, remat_policy='full', remat_unit=unit, scan_unit='layer')
    model = nnx.eval_shape(lambda c=cfg: model_lib.Gemma3(c, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p).hidden(tokens_BL))(params)
    assert sorted(_checkpoints(jaxpr.jaxpr)) == expected
    assert str(jaxpr).count('cond[') == 1


def test_remat_unit_is_validated():
  c = config_lib.default_config_dict()
  c.model.remat_unit = 'row'
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.from_config_dict(c)
  message = str(e.value)
  assert 'model.remat_unit' in message and 'block | layer' in message and '\n' not in message


def test_scan_unit_is_validated():
  for fields, expected in (({'scan_unit': 'row'}, 'block | layer'),
                           ({'scan_unit': 'layer', 'scan_layers': False}, 'scan_layers=False')):
    c = config_lib.default_config_dict()
    c.model.update(fields)
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.from_config_dict(c)
    message = str(e.value)
    assert message.startswith('model.scan_unit=') and expected in message and '\n' not in message


def test_aot_counts_the_second_replay():
  """The AOT step-time estimate counts what 'layer' costs: with 'full', each layer of a block
  of six runs its forward projections once more (its own replay after the block's); the tail
  layers and the splash kernels' block counts follow the same rule."""
  from gemma3_train.planning import estimate  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file('configs/tiny.py')  # 8 layers: one block of six + 2 tail
  c = dataclasses.replace(c, model=dataclasses.replace(c.model, remat_policy='full',
                                                       attention_impl='splash'))
  m, T, B = c.model, c.data.seq_len, c.train.global_batch_size
  D, N, K, H, F = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
  per_token = 2 * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)  # by hand
  units = {}
  for unit in config_lib.REMAT_UNITS:
    cu = dataclasses.replace(c, model=dataclasses.replace(m, remat_unit=unit))
    units[unit] = estimate.executed_flops_per_step(cu)
  (xla_b, splash_b), (xla_l, splash_l) = units['block'], units['layer']
  assert xla_l - xla_b == 6 * per_token * T * B
  # Splash: the forward kernel (2 of the 2 + 3 + 4 matmuls per block, + 2 replayed) once more.
  assert splash_l / splash_b == pytest.approx(
      (6 * (11 + 2) + 2 * 11) / (8 * 11))
