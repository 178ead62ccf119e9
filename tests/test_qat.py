"""Quantization-aware training (quant.qat, quant.embedding): the block math against gguf's numpy
quantizers, the fake-quantized forward against a float model holding the dequantized weights,
the straight-through gradient, LoRA, QLoRA's int8 base on the same code, and the GGUF export of a
QAT model holding the numbers its forward used."""

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.convert import gguf as gguf_lib
from gemma3_train.convert import layout
from gemma3_train.convert import run_source
from gemma3_train.models import decoder as model_lib
from gemma3_train.models import lora
from gemma3_train.models import quant
from tests import helpers
from tests import test_gguf

Q = gguf.GGMLQuantizationType
MODEL = config_lib.ModelConfig(
    preset='test', vocab_size=256, embed_dim=64, mlp_dim=128, num_layers=7, num_heads=2,
    num_kv_heads=1, head_dim=32, query_pre_attn_scalar=32.0, sliding_window=8,
    param_dtype='float32', dtype='float32', remat_policy='none', attention_impl='reference')
TOKENS = np.random.default_rng(2).integers(0, MODEL.vocab_size, (2, 16)).astype(np.int32)
IN_AXES = test_gguf.IN_AXES


def _config(model=MODEL, **sections):
  return config_lib.Config(model=model).replace(**sections)


def _edge_rows(rng, n=256):
  """Rows of scales 1e-6 .. 1e3, with a zero block, a constant block, a +-max tie and halves
  (x / d exactly k + 0.5) that the rounding rules decide."""
  w = (rng.standard_normal((16, n)) * np.logspace(-6, 3, 16)[:, None]).astype(np.float32)
  w[0, :32] = 0
  w[1, :32] = 0.75
  w[2, :32] = rng.standard_normal(32)
  w[2, 5], w[2, 9] = 4.0, -4.0
  w[3, :32] = np.arange(32) - 15.5
  w[4, :32] = (np.arange(32) - 16) * 127 / 16 / 2  # Q8_0: halves at d = 127/127
  return w


@pytest.mark.parametrize('kind', ['q8_0', 'q4_0'])
def test_block_math_and_bytes_match_gguf_numpy(kind):
  rng = np.random.default_rng(0)
  w = np.concatenate([_edge_rows(rng), rng.standard_normal((48, 256)).astype(np.float32)])
  qtype = Q.Q8_0 if kind == 'q8_0' else Q.Q4_0
  ref_bytes = gguf.quants.quantize(w, qtype)
  np.testing.assert_array_equal(gguf_lib.encode(w, kind)[0], ref_bytes)
  np.testing.assert_array_equal(np.asarray(quant.dequantized(w, (1,), kind)),
                                gguf.quants.dequantize(ref_bytes, qtype))
  # A weight with two input axes ([N, H, D], input N, H) is blocked as the HF matrix [D, N H].
  o = rng.standard_normal((2, 48, 64)).astype(np.float32)
  rows = o.transpose(2, 0, 1).reshape(64, 96)
  np.testing.assert_array_equal(
      np.asarray(quant.dequantized(o, (0, 1), kind)).transpose(2, 0, 1).reshape(64, 96),
      gguf.quants.dequantize(gguf.quants.quantize(rows, qtype), qtype))


@pytest.mark.parametrize('mode, levels', [('int8', 127), ('int4_channel', 7)])
def test_channel_modes_are_symmetric_absmax_per_output_channel(mode, levels):
  w = np.random.default_rng(1).standard_normal((3, 64, 5)).astype(np.float32)  # inputs: axis 1
  dq = np.asarray(quant.dequantized(w, (1,), mode))
  scale = np.abs(w).max(axis=1, keepdims=True) / levels
  q = dq / scale
  np.testing.assert_allclose(q, np.round(q), atol=1e-4)
  assert np.abs(np.round(q)).max() == levels
  assert np.all(np.abs(w - dq) <= scale / 2 * (1 + 1e-5))
  if mode == 'int8':  # QLoRA's int8 base is this code
    q8, s8 = lora.quantize(jnp.asarray(w), (1,))
    np.testing.assert_array_equal(np.asarray(quant.channel_dequantize(q8, s8)), dq)


def _dequantized_model(c, params):
  """A float model (no QAT) whose weights are `params` run through c.quant's modes."""
  cfg = c.model
  top, layers = layout.state_to_canonical(cfg, params)
  if c.quant.embedding:
    top['embedding'] = np.asarray(quant.dequantized(top['embedding'], (1,), c.quant.embedding))
  for layer in layers:
    for k, axes in IN_AXES.items():
      if k in layer:
        layer[k] = np.asarray(quant.dequantized(layer[k], axes, c.quant.qat))
  model = nnx.eval_shape(lambda: model_lib.Gemma3(cfg, rngs=nnx.Rngs(0)))
  nnx.update(model, layout.canonical_to_state(cfg, top, layers))
  return model


def _loss(model):
  logits = model(jnp.asarray(TOKENS))
  return jnp.mean(jax.nn.log_softmax(logits)[..., 3])


_logits = nnx.jit(lambda model: model(jnp.asarray(TOKENS)))
_grad = nnx.jit(nnx.grad(_loss))


@pytest.mark.parametrize('qat, embedding', [
    pytest.param('int8', '', marks=pytest.mark.slow),
    pytest.param('int4_channel', '', marks=pytest.mark.slow),
    pytest.param('q4_0', 'q8_0', marks=pytest.mark.slow)])
def test_forward_is_the_dequantized_model(qat, embedding):
  c = _config(quant=dict(qat=qat, embedding=embedding))
  model = model_lib.build(c)
  ref = _dequantized_model(c, nnx.state(model, nnx.Param))
  ours_logits, ref_logits = np.asarray(_logits(model)), np.asarray(_logits(ref))
  np.testing.assert_allclose(ours_logits, ref_logits, rtol=0, atol=1e-6 * np.abs(ref_logits).max())
  plain = np.asarray(_logits(model_lib.Gemma3(c.model, rngs=nnx.Rngs(c.train.seed))))
  assert np.abs(plain - ours_logits).max() > 1e-4  # the quantization shows


@pytest.mark.slow
def test_gradient_is_straight_through():
  """d loss / d W of a QAT model is the float model's at the dequantized W (the fake quant's
  own derivative, zero almost everywhere, is replaced by the identity); the code is one for
  every mode, checked on q4_0 with a q8_0 embedding."""
  c = _config(quant=dict(qat='q4_0', embedding='q8_0'))
  model = model_lib.build(c)
  grad, grad_ref = _grad(model), _grad(_dequantized_model(c, nnx.state(model, nnx.Param)))
  flat_ref = dict(nnx.to_flat_state(nnx.state(grad_ref, nnx.Param)))
  for path, g in nnx.to_flat_state(nnx.state(grad, nnx.Param)):
    np.testing.assert_allclose(np.asarray(g[...]), np.asarray(flat_ref[path][...]), rtol=1e-5,
                               atol=1e-7, err_msg=str(path))


@pytest.mark.slow
def test_lora_qat_quantizes_the_merged_weight_and_trains_the_adapters():
  c = _config(quant=dict(qat='q4_0'), lora=dict(rank=4, alpha=8.0))
  model = model_lib.build(c)
  rng = np.random.default_rng(3)
  for _, node in nnx.iter_graph(model):  # B != 0, so that the merge matters
    if isinstance(node, lora.Adapter):
      node.b.set_value(jnp.asarray(rng.standard_normal(node.b.shape) * 0.05, jnp.float32))
  merged = nnx.eval_shape(lambda: model_lib.Gemma3(c.model, rngs=nnx.Rngs(0)))
  flat = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, lora.Adapter):
      flat[tuple(path)] = node
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  plain = []
  for path, var in nnx.to_flat_state(nnx.state(merged, nnx.Param)):
    w = params[path][...]
    name = str(path[-1])
    adapter = flat.get(path[:-1] + (f'{lora.WEIGHT_TARGET.get(name, "")}_lora',))
    if adapter is not None:
      lead = 1 if path[0] == 'blocks' else 0
      ws = 'LABCD'[:lead] + 'ABC'[:w.ndim - lead]
      axes = lora.TARGETS[lora.WEIGHT_TARGET[name]][1]
      d = jax.vmap(lambda a, b: _delta(a, b, ws[lead:], axes)) if lead else (
          lambda a, b: _delta(a, b, ws, axes))
      w = w + d(adapter.a[...], adapter.b[...])
    plain.append((path, var.replace(jnp.asarray(w))))
  params = nnx.from_flat_state(plain)
  ref = _dequantized_model(c, params)
  np.testing.assert_allclose(np.asarray(_logits(model)), np.asarray(_logits(ref)), rtol=0,
                             atol=1e-5)
  grads = nnx.jit(nnx.grad(_loss, argnums=nnx.DiffState(0, lora.TRAINABLE)))(model)
  for path, g in nnx.to_flat_state(grads):
    assert np.abs(np.asarray(g[...])).max() > 0, path


def _delta(a, b, ws, in_axes):
  ins = ''.join(ws[i] for i in in_axes)
  outs = ''.join(ch for ch in ws if ch not in ins)
  return jnp.einsum(f'{ins}r,r{outs}->{ws}', a, b) * 2.0  # alpha / rank = 8 / 4


@pytest.mark.slow  # (fast-lane budget)
def test_qlora_int8_base_is_unchanged_by_qat_off():
  """lora.einsum without quant.qat: an int8 base reads int8 * scale in the compute dtype, as
  before the move onto quant.py."""
  c = _config(lora=dict(rank=2, base_dtype='int8'))
  model = model_lib.build(c)
  attn = model.tail[0].attn
  x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 3, 64)), jnp.float32)
  w = attn.k_einsum[...].astype(jnp.float32) * attn.k_einsum_scale[...]
  np.testing.assert_array_equal(lora.einsum('BLD,KDH->BLKH', x, attn, 'k_einsum', jnp.float32),
                                jnp.einsum('BLD,KDH->BLKH', x, w))


@pytest.mark.slow
def test_export_of_a_qat_model_holds_its_forward_numbers(tmp_path):
  """A q4_0 QAT model (embedding q8_0) written as q4_0: the file's dequantized tensors are the
  weights the forward used, bit for bit, and transformers' logits equal the QAT forward's."""
  cfg = test_gguf.CFG
  c = _config(model=cfg, quant=dict(qat='q4_0', embedding='q8_0'))
  model = model_lib.build(c)
  top, layers = layout.state_to_canonical(cfg, nnx.state(model, nnx.Param))
  tok = test_gguf.small_tokenizer(tmp_path / 'tok.model')
  src = run_source._MemorySource(cfg, top, layers)  # pylint: disable=protected-access
  gguf_lib.write(src, tmp_path / 'q.gguf', 'q4_0', tok, qat='q4_0', qat_embedding='q8_0',
                 embedding='q8_0', progress=False)
  tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / 'q.gguf')).tensors}
  read = lambda name: gguf.quants.dequantize(np.asarray(tensors[name].data),
                                             tensors[name].tensor_type)
  np.testing.assert_array_equal(read('token_embd.weight'),
                                np.asarray(model.embedder.table()))
  mlp = model.blocks.layers[1].mlp  # layer 1 of the scanned block: index 0 of its stack
  np.testing.assert_array_equal(read('blk.1.ffn_down.weight'),
                                np.asarray(quant.fake_quant(mlp.linear[...][0], (0,), 'q4_0')).T)
  hf, _ = test_gguf.load_hf(tmp_path / 'q.gguf')
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(test_gguf.TOKENS).long()).logits.float().numpy()
  ours = np.asarray(nnx.jit(lambda m: m(jnp.asarray(test_gguf.TOKENS)))(model))
  assert test_gguf.rel(ref, ours) < 1e-4
  # int8 per channel has no GGUF type: at f32 the file holds its numbers exactly.
  gguf_lib.write(src, tmp_path / 'i8.gguf', 'f32', tok, qat='int8', progress=False)
  tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / 'i8.gguf')).tensors}
  np.testing.assert_array_equal(
      np.asarray(tensors['blk.0.attn_q.weight'].data),
      np.asarray(quant.dequantized(layers[0]['q_einsum'], (1,), 'int8')).transpose(0, 2, 1)
      .reshape(-1, cfg.embed_dim))


@pytest.mark.parametrize('section, expected', [
    (dict(quant=dict(qat='int3')), "quant.qat='int3': expected '' (off) | int8"),
    (dict(quant=dict(embedding='q5_0')), "quant.embedding='q5_0'"),
    (dict(quant=dict(qat='q4_0'), model=dict(embed_dim=48)),
     'model.embed_dim=48 is not a multiple of 32'),
    (dict(quant=dict(qat='int8'), lora=dict(rank=2, dropout=0.1)),
     'lora.dropout=0.1: expected 0 with quant.qat'),
])
def test_bad_quant_config_is_one_line(section, expected):
  c = config_lib.Config(model=dataclasses.replace(MODEL, **section.pop('model', {})))
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c.replace(**section))
  assert expected in str(e.value) and '\n' not in str(e.value), str(e.value)


@pytest.mark.slow
def test_cli_qat_run_exports_its_numbers(tmp_path):
  """gemma3-train with quant.qat=q4_0 (full fine-tune, 2 steps), then export --format=gguf:
  the file's blocks are the trained weights as the QAT forward quantized them."""
  from gemma3_train.cli import convert as convert_cli  # pylint: disable=g-import-not-at-top
  from gemma3_train import convert  # pylint: disable=g-import-not-at-top
  helpers.train_ok(tmp_path / 'run', 2, '--config.quant.qat=q4_0')
  tok = test_gguf.small_tokenizer(tmp_path / 'tok.model', 512)
  convert_cli.main(['export', '--format=gguf', '--quant=q4_0', f'--src={tmp_path / "run"}',
                    f'--dst={tmp_path / "m.gguf"}', f'--tokenizer={tok}'])
  cfg, _, layers = convert.load_canonical(tmp_path / 'run')
  tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / 'm.gguf')).tensors}
  for i in (0, 6):
    got = gguf.quants.dequantize(np.asarray(tensors[f'blk.{i}.ffn_up.weight'].data), Q.Q4_0)
    np.testing.assert_array_equal(got, np.asarray(
        quant.dequantized(layers[i]['gating_einsum'][1], (1,), 'q4_0')))
  assert cfg.num_layers == 7
