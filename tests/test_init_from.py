"""checkpoint.init_from: a fine-tune starts from released (HF) weights, sharded on the mesh."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import tiny
from gemma3_train import config as config_lib
from gemma3_train import sharding
from gemma3_train.training import checkpoint
from gemma3_train.training import init_from
from gemma3_train.training import state as train_state
from tests import helpers


def test_init_from_hf_directory_gives_hf_logits(tmp_path):
  hf = helpers.randomize_hf(
      transformers.Gemma3ForCausalLM(helpers.hf_text_config(attn_implementation='eager')), 3)
  hf.save_pretrained(tmp_path, max_shard_size='100KB')
  c = config_lib.from_config_dict(tiny.get_config()).replace(
      model=dict(vocab_size=helpers.V, embed_dim=helpers.D, num_layers=helpers.L,
                 num_heads=helpers.N, num_kv_heads=helpers.K, head_dim=helpers.H,
                 mlp_dim=helpers.F, sliding_window=helpers.W,
                 query_pre_attn_scalar=float(helpers.H), global_rope_scale=8.0),
      mesh=dict(fsdp=4, tensor=2), checkpoint=dict(init_from=str(tmp_path)))
  s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
  params = init_from.load_init_params(str(tmp_path), c, s.abstract_state)
  emb = params['embedder']['embedding'].get_value()
  assert emb.sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')  # born sharded
  model = nnx.merge(s.graphdef, params)
  ours = np.asarray(jax.jit(lambda t: model(t))(helpers.TOKENS))
  ref = helpers.hf_logits(hf, helpers.TOKENS)
  assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5


def test_init_from_wrong_shape_names_the_field(tmp_path):
  hf = transformers.Gemma3ForCausalLM(helpers.hf_text_config(attn_implementation='eager'))
  hf.save_pretrained(tmp_path)
  c = config_lib.from_config_dict(tiny.get_config()).replace(
      model=dict(vocab_size=helpers.V, embed_dim=helpers.D * 2, num_layers=helpers.L))
  s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
  try:
    init_from.load_init_params(str(tmp_path), c, s.abstract_state)
  except config_lib.ConfigError as e:
    assert str(e).startswith(f'model.embed_dim={helpers.D * 2}: checkpoint.init_from=')
  else:
    raise AssertionError('no error')


@pytest.mark.slow
def test_init_from_reads_one_layer_at_a_time(tmp_path):
  # 26 layers (4 scanned blocks of six + 2 unscanned) whose MLPs dwarf the embedding; the
  # params must equal the whole-model conversion bitwise, and the host must never have held
  # more than a few layers (tracemalloc sees every numpy buffer).
  import tracemalloc
  from gemma3_train import convert
  from gemma3_train.convert import layout
  layers, wide = 26, 1024
  config = helpers.hf_text_config(attn_implementation='eager')
  config.num_hidden_layers, config.intermediate_size = layers, wide
  config.layer_types = ['full_attention' if (i + 1) % 6 == 0 else 'sliding_attention'
                        for i in range(layers)]
  hf = transformers.Gemma3ForCausalLM(config)
  hf.save_pretrained(tmp_path, max_shard_size='2MB')
  c = config_lib.from_config_dict(tiny.get_config()).replace(
      model=dict(vocab_size=helpers.V, embed_dim=helpers.D, num_layers=layers, num_heads=helpers.N,
                 num_kv_heads=helpers.K, head_dim=helpers.H, mlp_dim=wide, sliding_window=helpers.W,
                 query_pre_attn_scalar=float(helpers.H), global_rope_scale=8.0),
      mesh=dict(fsdp=4, tensor=2))
  s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
  # Once before measuring: the modules the loader imports lazily are not the arrays' memory.
  jax.tree.map(lambda x: x.delete(),
               jax.tree.leaves(init_from.load_init_params(str(tmp_path), c, s.abstract_state)))
  tracemalloc.start()
  params = init_from.load_init_params(str(tmp_path), c, s.abstract_state)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()

  _, top, canon = convert.load_canonical(str(tmp_path), c.model)
  whole = layout.canonical_to_state(c.model, top, canon)
  got = dict(nnx.to_flat_state(params))
  total = 0
  for key, var in nnx.to_flat_state(whole):
    want = var.get_value()
    total += want.nbytes
    np.testing.assert_array_equal(np.asarray(got[key].get_value()), want, err_msg=str(key))
  layer_bytes = 3 * helpers.D * wide * 4
  assert total > layers * layer_bytes
  assert peak < 4 * layer_bytes + total / 10, (peak, total)


@pytest.mark.slow
def test_training_workdir_source_streams(tmp_path):
  # A training checkpoint (scanned: 4 blocks of six + 2 tail layers, MLPs that dwarf the
  # embedding): read layer by layer, the host holds one position's stacked leaves (4 layers)
  # and the layer being built, never the model; init_from from it equals the saved params.
  import tracemalloc
  from gemma3_train import convert
  from gemma3_train.convert import layout
  layers, wide = 26, 1024
  c = config_lib.from_config_dict(tiny.get_config()).replace(
      model=dict(vocab_size=helpers.V, embed_dim=helpers.D, num_layers=layers, mlp_dim=wide),
      mesh=dict(fsdp=4, tensor=2))
  s = train_state.setup(c, sharding.make_mesh(c))
  rng = np.random.default_rng(0)
  rand = lambda x: jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), x.sharding)
  saved = jax.tree.map(rand, s.state['params'])
  ckpt = checkpoint.Checkpointer(str(tmp_path), c)
  ckpt.save(1, {**s.state, 'params': saved}, None, force=True)
  ckpt.close()

  src = convert.open_source(tmp_path)
  tracemalloc.start()
  got = {}
  for i, layer in convert.layers(src):
    got[i] = {k: float(np.sum(v)) for k, v in layer.items()}  # keep nothing of the layer
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  top, want = layout.state_to_canonical(c.model, saved)
  assert sorted(got) == list(range(layers))
  for i in range(layers):
    assert got[i] == {k: float(np.sum(v)) for k, v in want[i].items()}, i
  layer_bytes = 3 * helpers.D * wide * 4
  total = sum(x.nbytes for x in jax.tree.leaves(top)) + sum(
      x.nbytes for layer in want for x in layer.values())
  assert total > layers * layer_bytes
  assert peak < 6 * layer_bytes, (peak, total)

  params = init_from.load_init_params(str(tmp_path), c, s.abstract_state)
  for (key, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(saved), strict=True):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                  err_msg=str(key))
