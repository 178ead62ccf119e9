"""Offline distillation targets (gemma3-data prepare --teacher): the stored targets are the
online loss's (same draws, same losses), the record layout round-trips, the manifest reports
bytes per token and the teacher's rate, and a run on them is checked against what was stored."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train import data as data_lib
from gemma3_train.cli import data as data_cli
from gemma3_train.convert import layout
from gemma3_train.convert import ours
from gemma3_train.data import teacher as teacher_data
from gemma3_train.models import decoder
from gemma3_train.models import lora
from gemma3_train.models import soft_targets
from gemma3_train.training import teacher_labels
from gemma3_train.training.objectives import distill
from tests import helpers

WORDS = 'the teacher reads every word of this small corpus and the student learns from it'.split()


def _corpus(path, n=10):
  rng = np.random.default_rng(0)
  with open(path, 'w') as f:
    for i in range(n):  # lengths around seq_len: some documents are split
      f.write(json.dumps({'text': ' '.join(rng.choice(WORDS, size=8 + 7 * i))}) + '\n')


def _setup(tmp_path, **distill_fields):
  """(online config, the saved teacher): a 1-layer student and a 2-layer teacher of another
  width, both with the real vocabulary (the corpus is tokenized with it)."""
  c = helpers.small_config(
      model=dict(num_layers=1, vocab_size=262144, embed_dim=16, mlp_dim=32, num_heads=2,
                 num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8.0),
      data=dict(source='jsonl', train_path=str(tmp_path / 'c.jsonl'), shuffle=False),
      train=dict(objective='distill', seed=3, global_batch_size=2, loss_chunk_size=16,
                 z_loss=0.0),
      distill={'teacher': str(tmp_path / 'teacher'), 'teacher_dtype': 'float32', 'samples': 16,
               'temperature': 0.8, 'alpha': 0.25, **distill_fields})
  _corpus(tmp_path / 'c.jsonl')
  return c, helpers.save_peaked_teacher(tmp_path / 'teacher', c.model)


def _prepare(tmp_path, c, *extra):
  loss_flag = (f'--teacher_topk={c.distill.samples}' if c.distill.loss == 'topk'
               else f'--teacher_samples={c.distill.samples}')
  return data_cli.main(['prepare', f'--src={tmp_path / "c.jsonl"}', f'--dst={tmp_path / "p"}',
                        '--workers=1', '--rows_per_shard=4', f'--teacher={c.distill.teacher}',
                        f'--seq_len={c.data.seq_len}', loss_flag, '--teacher_dtype=float32',
                        f'--teacher_temperature={c.distill.temperature}',
                        f'--teacher_seed={c.train.seed}', *extra])


def _offline(c, tmp_path):
  return c.replace(data=dict(source='prepared', train_path=str(tmp_path / 'p')),
                   distill=dict(teacher=''))


@pytest.mark.slow  # (a teacher pass and two pipelines: ~20 s)
@pytest.mark.parametrize('loss, dtype', [('sampled', 'float32'), ('topk', 'float32'),
                                         ('sampled', 'int8')])
def test_stored_targets_give_the_online_losses(tmp_path, monkeypatch, loss, dtype):
  """int8: the online teacher of distill.teacher_dtype=int8 (frozen.py: the projections
  quantized from the weights read in bfloat16, computing in the student's float32), and the
  prepare's --teacher_dtype=int8 computing in float32 too (its default is bfloat16)."""
  c, _ = _setup(tmp_path, loss=loss, teacher_dtype=dtype)
  monkeypatch.setattr(teacher_labels, 'Labeler', functools.partial(
      teacher_labels.Labeler, compute_dtype=c.model.dtype))
  manifest = _prepare(tmp_path, c, f'--teacher_dtype={dtype}')
  t = manifest['teacher']
  assert (t['loss'], t['samples'], t['seed'], t['seq_len'], t['dtype']) == (loss, 16, 3, 32,
                                                                            dtype)
  assert t['tokens_per_sec'] > 0 and t['bytes_per_token'] > 4 + 2
  off = _offline(c, tmp_path)
  student = decoder.build(c, nnx.Rngs(0))
  if dtype == 'int8':  # as restore._load_frozen_model holds it
    teacher = lora.quantize_projections(convert.load(c.distill.teacher, param_dtype='bfloat16',
                                                     dtype=c.model.dtype))
  else:
    teacher = convert.load(c.distill.teacher)
  on_it, off_it = data_lib.make_train_iterator(c), data_lib.make_train_iterator(off)
  for _ in range(3):  # the same rows; the online keys and the stored targets beside them
    on_batch, off_batch = next(on_it), next(off_it)
    helpers.assert_same_batches([{k: on_batch[k] for k in data_lib.BATCH_DTYPES}],
                                [{k: off_batch[k] for k in data_lib.BATCH_DTYPES}])
    assert set(off_batch) - set(data_lib.BATCH_DTYPES) == {'teacher_ids', 'teacher_probs'}
    on_total, on_sums = jax.jit(lambda b: distill.Distill(c).loss_sums(
        student, b, {distill.TEACHER: teacher}))(on_batch)
    off_total, off_sums = jax.jit(lambda b: distill.Distill(off).loss_sums(student, b))(
        off_batch)
    # The same ids; q within float32 rounding of the teacher run at another batch shape.
    np.testing.assert_allclose(float(off_total), float(on_total), rtol=2e-5)
    for k in ('distill_sum', 'hard_sum', 'weight_sum'):
      np.testing.assert_allclose(float(off_sums[k]), float(on_sums[k]), rtol=2e-5)
  for it in (on_it, off_it):
    it.close()


@pytest.mark.slow
def test_records_round_trip_and_runs_check_what_was_stored(tmp_path):
  ids = np.array([[5, 9, 0], [7, 0, 0]], np.int32)
  q = np.array([[0.75, 0.25, 0.0], [1.0, 0.0, 0.0]], np.float32)
  tokens = np.arange(3, dtype='<i4').tobytes()
  record = teacher_data.encode(tokens, 3, ids, q)
  assert len(record) == 4 + 12 + 2 * 2 + 3 * 8  # n, tokens, counts, 3 kept (id, prob)
  back, ids2, q2 = teacher_data.decode(record, False, 3)
  assert back == tokens
  np.testing.assert_array_equal(ids2, ids)
  np.testing.assert_array_equal(q2, q)

  c, _ = _setup(tmp_path)
  _prepare(tmp_path, c)
  assert _prepare(tmp_path, c)['teacher']['samples'] == 16  # a rerun: every shard done
  with pytest.raises(config_lib.ConfigError, match=r'^--dst=.*differs in teacher'):
    _prepare(tmp_path, c.replace(train=dict(seed=4)))
  with pytest.raises(config_lib.ConfigError, match=r'^--dst=.*differs in teacher'):
    _prepare(tmp_path, c, '--teacher_dtype=int8')  # the manifest pins the dtype
  assert json.loads((tmp_path / 'p' / '.prepare.json').read_text())['teacher']['dtype'] == (
      'float32')
  off = _offline(c, tmp_path)
  for fix, field in ((dict(distill=dict(samples=8)), 'distill.samples=8'),
                     (dict(distill=dict(loss='topk')), "distill.loss='topk'"),
                     (dict(data=dict(seq_len=64)), 'data.seq_len=64')):
    with pytest.raises(config_lib.ConfigError, match=f'^{field}: .* stores teacher targets '
                       'made with'):
      data_lib.make_train_iterator(off.replace(**fix))
  with pytest.raises(config_lib.ConfigError, match=r"^distill.teacher='': data.source='jsonl' "):
    data_lib.make_train_iterator(off.replace(data=dict(source='jsonl',
                                                       train_path=str(tmp_path / 'c.jsonl'))))
  # Plain training reads the same shards (the targets are skipped).
  plain = off.replace(train=dict(objective='ce'))
  it = data_lib.make_train_iterator(plain)
  assert set(next(it)) == set(data_lib.BATCH_DTYPES)
  it.close()


def test_stored_ids_are_the_online_draws():
  """The draws depend on (seed, record, position) only: the same ids whatever the chunking
  and the row a position is packed in."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 12, 8)).astype(np.float32)
  table = (2 * rng.normal(size=(64, 8))).astype(np.float32)
  record = np.array([[4] * 12, [9] * 6 + [4] * 6], np.int32)
  pos = np.array([list(range(12)), list(range(6)) + list(range(12, 18))], np.int32)
  args = dict(k=8, temperature=1.0, seed=1, record_BL=record)
  ids, q = soft_targets.teacher_targets(x, table, chunk_size=5, pos_BL=pos, **args)
  ids2, q2 = soft_targets.teacher_targets(x[::-1], table, chunk_size=12, pos_BL=pos[::-1],
                                          k=8, temperature=1.0, seed=1, record_BL=record[::-1])
  np.testing.assert_array_equal(np.asarray(ids2)[::-1], ids)
  np.testing.assert_allclose(np.asarray(q2)[::-1], q, rtol=1e-6)
  q = np.asarray(q)
  kept = q > 0
  assert np.all(kept[..., :-1] >= kept[..., 1:])  # the distinct ids first
  np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-6)


def _docs(n=5):
  """Token documents around seq_len 32 (some split, several packed into a row)."""
  rng = np.random.default_rng(1)
  lengths = [6 + 17 * i for i in range(n)]
  return [(i, {'tokens': rng.integers(3, 262144, size=n).astype(np.int32),
               'mask': np.ones(n, np.uint8)}) for i, n in enumerate(lengths)]


def _spec(path, dtype='float32', loss='sampled'):
  # Temperature 0.5: at 1 a random teacher's distribution over 262144 ids is so flat that
  # float32 rounding of its CDF (which differs with the reduction order) moves ~1 draw in 1,000
  # to the neighbouring id (_setup); a sharper one is a trained teacher's case.
  return teacher_labels.Spec(path=str(path), loss=loss, samples=16, temperature=0.5,
                             seed=3, seq_len=32, dtype=dtype)


def _assert_same_targets(got, want, rtol=0.0):
  for (ids, q), (ids2, q2) in zip(got, want, strict=True):
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(q, q2, rtol=rtol, atol=0 if rtol else 1e-6)


@pytest.mark.slow  # (two teacher compiles: ~15 s)
def test_teacher_sharded_over_the_local_devices_gives_the_one_device_targets(tmp_path):
  c, _ = _setup(tmp_path)
  spec = _spec(c.distill.teacher)
  with pytest.raises(config_lib.ConfigError, match=r'^--teacher_rows=4: expected a multiple '
                     'of the 8 local devices'):
    teacher_labels.Labeler(spec, rows=4)
  sharded = teacher_labels.Labeler(spec, rows=8)
  assert dict(sharded.mesh.shape) == {'data': 1, 'fsdp': 8, 'context': 1, 'tensor': 1}
  table = sharded.state['embedder']['embedding'].get_value()  # [vocab, embed]: embed on fsdp
  assert table.sharding.spec == P(None, 'fsdp') and len(table.sharding.device_set) == 8
  assert table.addressable_shards[0].data.shape == (262144, 32 // 8)
  one = teacher_labels.Labeler(spec, rows=8, devices=jax.local_devices()[:1])
  docs = _docs()
  # The same ids; q within float32 rounding of logits summed over the embed shards (as
  # test_stored_targets_give_the_online_losses at another batch shape).
  _assert_same_targets(sharded(docs), one(docs), rtol=2e-5)


@pytest.mark.slow  # (two teacher compiles: ~15 s)
def test_int8_teacher_is_the_float_teacher_of_its_dequantized_weights(tmp_path):
  """--teacher_dtype=int8 holds the seven projections as int8 with absmax / 127 scales per
  output channel (of the weights read in bfloat16) and the rest in bfloat16; its targets are
  those of a float32 teacher holding the dequantized weights (numpy), computed alike."""
  c, teacher = _setup(tmp_path)
  int8 = teacher_labels.Labeler(_spec(c.distill.teacher, 'int8'), rows=8,
                                compute_dtype='float32')
  original = {k: np.asarray(v.get_value()) for k, v in
              nnx.to_flat_state(nnx.state(teacher, nnx.Param))}
  held = {k: v.get_value() for k, v in nnx.to_flat_state(int8.state)}
  m = teacher_labels.teacher_model_config(_spec(c.distill.teacher))  # float32
  reference = decoder.Gemma3(m, rngs=nnx.Rngs(0))
  flat = []
  for k, var in nnx.to_flat_state(nnx.state(reference, nnx.Param)):
    if k[-1] in lora.WEIGHT_TARGET:
      w = np.asarray(jnp.asarray(original[k]).astype(jnp.bfloat16).astype(jnp.float32))
      q, scale = np.asarray(held[k]), np.asarray(held[k[:-1] + (f'{k[-1]}_scale',)])
      assert q.dtype == np.int8 and scale.dtype == np.float32, k
      assert held[k].sharding.spec != P(), k  # quantized in its shardings
      np.testing.assert_allclose(scale, np.abs(w).max(axis=lora.weight_in_axes(k),
                                                      keepdims=True) / 127, rtol=2.4e-7)
      value = q.astype(np.float32) * scale
      assert np.all(np.abs(value - w) / scale <= 0.5 + 1e-5), k  # rounded to the nearest
    else:
      assert held[k].dtype == jnp.bfloat16, k
      value = np.asarray(held[k].astype(jnp.float32))
    flat.append((k, var.replace(jnp.asarray(value))))
  top, layers = layout.state_to_canonical(m, nnx.from_flat_state(flat))
  ours.save_params(tmp_path / 'dequantized', m, top, enumerate(layers))
  want = teacher_labels.Labeler(_spec(tmp_path / 'dequantized'), rows=8)
  # Its table in bfloat16 too, as the int8 teacher holds it: Embedder.encode rounds sqrt(D) to
  # the table's dtype.
  table = want.state['embedder']['embedding']
  want.state['embedder']['embedding'] = table.replace(table.get_value().astype(jnp.bfloat16))
  docs = _docs()
  _assert_same_targets(int8(docs), want(docs))
