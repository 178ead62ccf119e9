"""Model structure: presets, scan vs unscanned, remat policies, logical axes, dtypes."""

import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gemma3_train import config as config_lib
from gemma3_train.convert import layout
from gemma3_train.models import decoder as model_lib
from gemma3_train import sharding

TINY = config_lib.ModelConfig(
    preset='tiny', vocab_size=128, num_layers=8, embed_dim=32, mlp_dim=64, num_heads=4,
    num_kv_heads=2, head_dim=8, query_pre_attn_scalar=12.0, sliding_window=4,
    global_rope_scale=8.0)

# Published non-embedding parameter counts (the Gemma 3 technical report), in millions.
PUBLISHED = {'270m': 100.3, '1b': 697.9, '4b': 3209.0, '12b': 10759.2, '27b': 25599.7}


def _random_canonical(cfg, seed=0):
  """Random weights in the canonical layout (numpy: fast, no per-shape compiles)."""
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


def _model(cfg, seed=0):
  model = nnx.eval_shape(lambda: model_lib.Gemma3(cfg, rngs=nnx.Rngs(0)))
  nnx.update(model, layout.canonical_to_state(cfg, *_random_canonical(cfg, seed)))
  return model


def _tokens(B=2, L=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, (B, L)), jnp.int32)


@pytest.mark.parametrize('name', list(PUBLISHED))
def test_preset_param_counts_from_shapes_only(name):
  cfg = config_lib.ModelConfig.from_preset(name)
  compiles = []
  def on_event(event, secs, **kwargs):
    del secs, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    abstract = nnx.eval_shape(lambda: model_lib.Gemma3(cfg, rngs=nnx.Rngs(0)))
    non_embedding, embedding = model_lib.param_count(cfg)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  assert not compiles  # nothing compiled, so nothing ran: shapes only, whatever the preset
  assert embedding == 262144 * cfg.embed_dim
  assert round(non_embedding / 1e6, 1) == PUBLISHED[name]
  assert sum(int(np.prod(x.shape)) for x in leaves) == non_embedding + embedding


def test_param_count_formula_tiny():
  c = TINY
  per_layer = (4 * c.embed_dim + 2 * c.head_dim + 3 * c.mlp_dim * c.embed_dim +
               (2 * c.num_heads + 2 * c.num_kv_heads) * c.embed_dim * c.head_dim)
  assert model_lib.param_count(c) == (c.num_layers * per_layer + c.embed_dim,
                                      c.vocab_size * c.embed_dim)


def _logits(model, *args):
  graphdef, params = nnx.split(model)
  return jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(params, *args)


def test_scan_equals_unscanned_forward():
  """One scanned block of six (the HF tests also cover 8 and 13 layers against HF)."""
  cfg = dataclasses.replace(TINY, num_layers=6)
  tokens = _tokens()
  a = _logits(_model(cfg), tokens)
  b = _logits(_model(dataclasses.replace(cfg, scan_layers=False)), tokens)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def _close(a, b, err_msg=''):
  """Equal to 1e-5 of the largest magnitude (remat and scan change fusion, not math)."""
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))),
                             err_msg=err_msg)


@pytest.mark.slow
def test_scan_equals_unscanned_gradients():
  """One scanned block and a one-layer tail: loss and gradients agree."""
  cfg = dataclasses.replace(TINY, num_layers=7)
  tokens = _tokens()

  def loss_and_grads(scan):
    c = dataclasses.replace(cfg, scan_layers=scan)
    graphdef, params = nnx.split(_model(c))
    f = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
    loss, grads = jax.jit(jax.value_and_grad(f))(params)
    return loss, layout.state_to_canonical(c, grads)

  (l1, (t1, g1)), (l2, (t2, g2)) = loss_and_grads(True), loss_and_grads(False)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for k in t1:
    _close(t1[k], t2[k], k)
  for a, b in zip(g1, g2):
    for k in a:
      _close(a[k], b[k], k)


def _saved(policy):
  """Residuals the backward pass keeps, as printed by jax.ad_checkpoint (2 unscanned layers)."""
  cfg = dataclasses.replace(TINY, remat_policy=policy, scan_layers=False, num_layers=2)
  graphdef, params = nnx.split(_model(cfg))
  tokens = _tokens()
  f = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(f, params)
  return out.getvalue()


def test_remat_policies_save_the_named_activations():
  names = {'minimal': {'query_proj', 'key_proj', 'value_proj', 'attention_out', 'out_proj',
                       'mlp_gate', 'mlp_up', 'mlp_out'},
           'save_decoder_layer_input': {'decoder_layer_input'},
           'save_qkv_proj': {'query_proj', 'key_proj', 'value_proj'},
           'full': set()}
  sizes = {}
  for policy, want in names.items():
    text = _saved(policy)
    got = {line.split("named '")[1].split("'")[0] for line in text.splitlines()
           if "named '" in line}
    assert got == want, policy
    sizes[policy] = len(text.splitlines())
  sizes['none'] = len(_saved('none').splitlines())
  assert sizes['full'] < sizes['save_qkv_proj'] < sizes['minimal'] < sizes['none']


@pytest.mark.slow
def test_remat_policies_compute_the_same_gradients():
  """Every policy, around a scanned block of six and a tail layer, gives the same gradients."""
  scan = True
  tokens = _tokens()
  results = {}
  for policy in config_lib.REMAT_POLICIES:
    cfg = dataclasses.replace(TINY, remat_policy=policy, scan_layers=scan, num_layers=7)
    graphdef, params = nnx.split(_model(cfg))
    f = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)))
    results[policy] = jax.tree.leaves(f(params))
  for policy, grads in results.items():
    for a, b in zip(grads, results['none']):
      _close(a, b, policy)


def test_every_param_has_logical_axes_and_shards():
  cfg = config_lib.ModelConfig.from_preset('4b')
  state = model_lib.abstract_state(cfg)
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata()['logical_axes']
    assert len(names) == len(var.shape), path
    assert set(names) <= set(sharding.DEFAULT_RULES), path
    assert (names[0] == 'layers') == (path[0] == 'blocks'), path
    assert 'sharding' not in var.get_metadata() and 'out_sharding' not in var.get_metadata()
  mesh = sharding.make_mesh(config_lib.Config().replace(mesh=dict(fsdp=4, tensor=2)))
  specs = {path: v.get_value().spec if hasattr(v, 'get_value') else v.value.spec
           for path, v in nnx.to_flat_state(sharding.state_shardings(state, mesh,
                                                                     sharding.DEFAULT_RULES))}
  assert specs[('embedder', 'embedding')] == P('tensor', 'fsdp')
  assert specs[('final_norm', 'scale')] == P(None)
  assert specs[('blocks', 'layers', 0, 'attn', 'q_einsum')] == P(None, 'tensor', 'fsdp', None)
  assert specs[('blocks', 'layers', 5, 'attn', 'k_einsum')] == P(None, 'tensor', 'fsdp', None)
  assert specs[('blocks', 'layers', 0, 'mlp', 'gate')] == P(None, 'tensor', 'fsdp')
  assert specs[('tail', 0, 'attn', 'attn_vec_einsum')] == P('tensor', None, 'fsdp')
  # 1b has a single kv head: it cannot split over tensor=2 and stays replicated there.
  specs_1b = sharding.state_shardings(model_lib.abstract_state(
      config_lib.ModelConfig.from_preset('1b')), mesh, sharding.DEFAULT_RULES)
  k = nnx.to_flat_state(specs_1b)
  k = dict(k)[('blocks', 'layers', 0, 'attn', 'k_einsum')]
  assert (k.get_value() if hasattr(k, 'get_value') else k.value).spec == P(None, None, 'fsdp',
                                                                           None)


def test_sharded_forward_equals_single_device():
  cfg = dataclasses.replace(TINY, num_layers=7)
  model = _model(cfg)
  tokens = jnp.tile(_tokens(), (2, 1))  # 4 rows over fsdp=4
  want = _logits(model, tokens)
  mesh = sharding.make_mesh(config_lib.Config().replace(mesh=dict(fsdp=4, tensor=2)))
  rules = sharding.DEFAULT_RULES
  graphdef, params = nnx.split(model)
  shardings = sharding.state_shardings(nnx.state(model), mesh, rules)
  params = jax.device_put(params, shardings)

  @jax.jit
  def forward(params, tokens):
    with sharding.use_mesh(mesh, rules):
      return nnx.merge(graphdef, params)(tokens)
  got = forward(params, jax.device_put(tokens, sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_compute_and_embed_scale_rounding():
  cfg = dataclasses.replace(TINY, dtype='bfloat16', num_layers=2)
  model = _model(cfg)
  tokens = _tokens()
  graphdef, params = nnx.split(model)
  x = jax.eval_shape(lambda p: nnx.merge(graphdef, p).hidden(tokens), params)
  logits = _logits(model, tokens)
  assert x.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  want = _logits(_model(dataclasses.replace(cfg, dtype='float32')), tokens)
  assert float(jnp.max(jnp.abs(logits - want)) / jnp.max(jnp.abs(want))) < 0.05
  # bf16 parameters: sqrt(3072) = 55.4256 becomes 55.5, as in HF and the gemma library.
  emb = model_lib.Embedder(dataclasses.replace(TINY, vocab_size=4, embed_dim=3072,
                                               param_dtype='bfloat16', dtype='float32'),
                           rngs=nnx.Rngs(0))
  table = np.asarray(emb.embedding[...].astype(jnp.float32))
  np.testing.assert_array_equal(emb.encode(jnp.asarray([[1]])),
                                (jnp.asarray(table[1]) * 55.5).astype(jnp.bfloat16)[None, None])


def test_defaults_and_packing_arguments():
  model = _model(dataclasses.replace(TINY, num_layers=2))
  tokens = _tokens()
  B, L = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None], (B, L))
  np.testing.assert_array_equal(_logits(model, tokens),
                                _logits(model, tokens, positions, jnp.ones((B, L), jnp.int32)))


def test_bad_canonical_input():
  top, layers = _random_canonical(TINY)
  with pytest.raises(ValueError, match='num_layers'):
    layout.canonical_to_state(TINY, top, layers[:-1])
  layers[3]['q_einsum'] = layers[3]['q_einsum'][:, :, :4]
  with pytest.raises(ValueError, match='q_einsum'):
    layout.canonical_to_state(TINY, top, layers)


@pytest.mark.slow
@pytest.mark.parametrize('scan_unit', ['block', 'layer'])
def test_splash_model_equals_reference_model(scan_unit):
  """attention_impl='splash' (interpreted off TPU) through the whole model, packed rows; with
  scan_unit='layer' the local and global kernels are the two branches of a lax.cond."""
  cfg = dataclasses.replace(TINY, num_layers=7, sliding_window=20, scan_unit=scan_unit)
  L = 128
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, L)), jnp.int32)
  segments = jnp.asarray((np.arange(L) >= 50).astype(np.int32) + 1)[None]
  positions = jnp.asarray(np.where(np.arange(L) >= 50, np.arange(L) - 50, np.arange(L)),
                          jnp.int32)[None]
  want = _logits(_model(cfg), tokens, positions, segments)
  got = _logits(_model(dataclasses.replace(cfg, attention_impl='splash',
                                           attention_block_size=128)),
                tokens, positions, segments)
  _close(got, want)
