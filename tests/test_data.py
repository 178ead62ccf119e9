"""Data pipeline: tokenizer, packing invariants, chat loss mask, sharding, save/restore."""

import collections
import importlib.resources
import json
import sys

import grain
import jax
import numpy as np
import pytest
import sentencepiece as spm

from configs import tiny
from gemma3_train import config as config_lib
from gemma3_train import data
from gemma3_train.data import pipeline
from tests import helpers

KEYS = tuple(data.BATCH_DTYPES)


@pytest.fixture(scope='module')
def sp():
  """Independent reference: sentencepiece on the shipped model file itself."""
  path = importlib.resources.files('gemma3_train') / 'assets' / 'tokenizer_gemma3.model'
  return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope='module')
def tok():
  return data.Tokenizer()


def _packing_efficiency(*batches) -> float:
  """Real (non-padding) token slots / all slots."""
  real = sum(int(np.count_nonzero(b['segment_ids'])) for b in batches)
  return real / sum(b['segment_ids'].size for b in batches)


def make_config(**data_fields) -> config_lib.Config:
  c = config_lib.from_config_dict(tiny.get_config())
  return c.replace(data=data_fields) if data_fields else c


def write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def pieces(batches):
  """(inputs, targets, weights) per segment of every row, as tuples."""
  out = []
  for b in batches:
    for r in range(b['inputs'].shape[0]):
      seg = b['segment_ids'][r]
      for s in range(1, seg.max() + 1):
        sel = seg == s
        out.append((tuple(b['inputs'][r][sel]), tuple(b['targets'][r][sel]),
                    tuple(b['weights'][r][sel])))
  return out


def expected_pieces(token_docs, L):
  out = []
  for t in token_docs:
    for s in range(0, len(t) - 1, L):
      x, y = t[:-1][s:s + L], t[1:][s:s + L]
      out.append((tuple(x), tuple(y), (1.0,) * len(y)))
  return out


# --- tokenizer ------------------------------------------------------------------


def test_tokenizer_round_trip_and_special_ids(tok, sp):
  assert tok.vocab_size == sp.get_piece_size() == 262144
  texts = ['Hello world', '  To be,\n\nor not to be.  ', 'Füße, 日本語, 🎭', 'x' * 300]
  for text in texts:
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    assert data.tokenizer.BOS not in ids and data.tokenizer.EOS not in ids
    assert tok.decode(ids) == text
  pieces_ = {data.tokenizer.PAD: '<pad>', data.tokenizer.EOS: '<eos>', data.tokenizer.BOS: '<bos>',
             data.tokenizer.START_OF_TURN: '<start_of_turn>',
             data.tokenizer.END_OF_TURN: '<end_of_turn>'}
  assert {i: sp.id_to_piece(i) for i in pieces_} == pieces_
  assert (data.tokenizer.PAD, data.tokenizer.EOS, data.tokenizer.BOS) == (0, 1, 2)
  assert (data.tokenizer.START_OF_TURN, data.tokenizer.END_OF_TURN) == (105, 106)


def test_tokenizer_vocab_mismatch_is_config_error():
  c = make_config()
  c = c.replace(model=dict(vocab_size=1000))
  with pytest.raises(config_lib.ConfigError, match=r'data.tokenizer_path=.*262144.*'
                     r'model.vocab_size=1000'):
    data.make_train_iterator(c)


def test_tokenizer_missing_file_is_config_error(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='data.tokenizer_path.*not found'):
    data.Tokenizer(str(tmp_path / 'nope.model'))


# --- packing --------------------------------------------------------------------


def _docs_file(tmp_path, n=40, seed=0):
  rng = np.random.default_rng(seed)
  words = 'the king queen sword crown night day love death ghost'.split()
  texts = [' '.join(rng.choice(words, size=rng.integers(1, 40))) + f' doc{i}.' for i in range(n)]
  return write_jsonl(tmp_path / 'docs.jsonl', [{'text': t} for t in texts]), texts


@pytest.mark.parametrize('packing', [True, False])
def test_packing_invariants(tmp_path, sp, packing):
  path, texts = _docs_file(tmp_path)
  L = 16
  c = make_config(source='jsonl', train_path=path, seq_len=L, shuffle=False, packing=packing,
                  prefetch=0)
  batches = list(pipeline.make_dataset(c, num_epochs=1, batch_size=4))
  for b in batches:
    assert {k: v.dtype for k, v in b.items()} == data.BATCH_DTYPES  # what training/loop.py compiles for
    assert b['inputs'].dtype == b['targets'].dtype == np.int32
    assert b['positions'].dtype == b['segment_ids'].dtype == np.int32
    assert b['weights'].dtype == np.float32
    assert all(v.shape[1] == L and v.shape[0] == b['inputs'].shape[0] for v in b.values())
    pad = b['segment_ids'] == 0
    assert not b['weights'][pad].any() and not b['inputs'][pad].any()
    for r in range(b['inputs'].shape[0]):
      seg, pos = b['segment_ids'][r], b['positions'][r]
      ids = [s for s in seg if s]
      assert ids == sorted(ids) and set(ids) == set(range(1, max(ids) + 1))  # 1, 2, ... in order
      for s in set(ids):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))  # reset
  # No token lost or invented: the segments are exactly the split documents.
  docs = [[2] + sp.encode(t) + [1] for t in texts]
  got, want = pieces(batches), expected_pieces(docs, L)
  assert collections.Counter(got) == collections.Counter(want)
  real = sum(len(d) - 1 for d in docs)
  assert sum(int(np.count_nonzero(b['segment_ids'])) for b in batches) == real
  if packing:
    assert len(batches) * 4 < len(want)  # rows hold several documents


def test_bundled_tiny_batches(tok):
  c = make_config()
  it = data.make_train_iterator(c)
  b = next(it)
  assert {k: v.shape for k, v in b.items()} == {k: (8, 128) for k in KEYS}
  assert {k: v.dtype for k, v in b.items()} == data.BATCH_DTYPES
  assert _packing_efficiency(b) > 0.9
  seg = b['segment_ids']
  starts = (b['positions'] == 0) & (seg > 0)
  # Inside a segment the next input is the current target (same document).
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  np.testing.assert_array_equal(b['inputs'][:, 1:][same], b['targets'][:, :-1][same])
  assert starts[:, 0].all()
  assert 'the' in tok.decode(b['inputs'][0]).lower()


def test_synthetic_source_needs_no_tokenizer():
  c = make_config(source='synthetic', tokenizer_path='/nonexistent.model', seq_len=64)
  a = next(data.make_train_iterator(c))
  b = next(data.make_train_iterator(c))
  for k in KEYS:
    np.testing.assert_array_equal(a[k], b[k])
  assert a['inputs'].max() < c.model.vocab_size
  assert _packing_efficiency(a) > 0.9


def test_eval_iterator_is_fresh_and_deterministic():
  c = make_config()
  a, b = data.make_eval_iterator(c), data.make_eval_iterator(c)
  for _ in range(3):
    x, y = next(a), next(b)
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  train = next(data.make_train_iterator(c))
  assert not np.array_equal(train['inputs'], x['inputs'])
  # Another data.seed reorders training, not the held-out rows.
  other = data.make_eval_iterator(c.replace(data=dict(seed=c.data.seed + 1)))
  first = data.make_eval_iterator(c)
  for _ in range(3):
    x, y = next(first), next(other)
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_missing_eval_path_is_config_error(tmp_path):
  path, _ = _docs_file(tmp_path)
  c = make_config(source='jsonl', train_path=path)
  with pytest.raises(config_lib.ConfigError, match='data.eval_path'):
    data.make_eval_iterator(c)


# --- chat / SFT -----------------------------------------------------------------

CHAT = [{'role': 'system', 'content': 'Speak in verse.'},
        {'role': 'user', 'content': 'Who is there?'},
        {'role': 'assistant', 'content': 'Nay, answer me.'},
        {'role': 'user', 'content': ' Long live the king! '},
        {'role': 'model', 'content': 'Bernardo?'}]


def test_chat_format_and_loss_mask(tok, sp):
  tokens, mask = data.format_chat(CHAT, tok)
  # Reference: HF's Gemma 3 chat template as text, tokenized in one piece by sentencepiece.
  text = ('<start_of_turn>user\nSpeak in verse.\n\nWho is there?<end_of_turn>\n'
          '<start_of_turn>model\nNay, answer me.<end_of_turn>\n'
          '<start_of_turn>user\nLong live the king!<end_of_turn>\n'
          '<start_of_turn>model\nBernardo?<end_of_turn>\n')
  assert tokens.tolist() == [2] + sp.encode(text) + [1]
  assert tokens.tolist().count(2) == 1
  counted = tokens[mask > 0].tolist()
  assert counted == sp.encode('Nay, answer me.') + [106] + sp.encode('Bernardo?') + [106]


def test_chat_weights_through_pipeline(tmp_path, sp):
  path = write_jsonl(tmp_path / 'chat.jsonl', [{'messages': CHAT}] * 3)
  c = make_config(source='jsonl', format='chat', train_path=path, seq_len=128, shuffle=False,
                  prefetch=0)
  want = sp.encode('Nay, answer me.') + [106] + sp.encode('Bernardo?') + [106]
  segments = 0
  for b in pipeline.make_dataset(c, num_epochs=1, batch_size=1):
    seg = b['segment_ids'][0]
    for s in range(1, seg.max() + 1):
      sel = seg == s
      targets, w = b['targets'][0][sel], b['weights'][0][sel]
      assert targets[w > 0].tolist() == want
      # The prompt (and the <start_of_turn>model\n header) is never a counted target.
      assert 105 not in targets[w > 0] and b['inputs'][0][sel][0] == 2
      segments += 1
  assert segments == 3


# --- sharding and epochs ----------------------------------------------------------


def test_two_processes_cover_each_document_once_per_epoch(tmp_path, sp):
  path, texts = _docs_file(tmp_path, n=37)
  L = 64  # every document fits one row piece
  c = make_config(source='jsonl', train_path=path, seq_len=L, prefetch=0)
  got = []
  per_process = []
  for p in (0, 1):
    ps = pieces(pipeline.make_dataset(c, process_index=p, process_count=2, num_epochs=1,
                                      batch_size=4))
    per_process.append(len(ps))
    got += ps
  want = expected_pieces([[2] + sp.encode(t) + [1] for t in texts], L)
  assert collections.Counter(got) == collections.Counter(want)
  assert per_process == [19, 18]


def test_shuffle_is_per_epoch_and_seeded(tmp_path):
  path, texts = _docs_file(tmp_path, n=20)
  c = make_config(source='jsonl', train_path=path, seq_len=64, packing=False, prefetch=0)
  def order(cfg):
    rows = [b['inputs'][0] for b in pipeline.make_dataset(cfg, process_index=1,
                                                          process_count=2, num_epochs=2,
                                                          batch_size=1)]
    return [tuple(r[r > 0]) for r in rows]
  a = order(c)
  assert len(a) == 20 and sorted(a[:10]) == sorted(a[10:]) and a[:10] != a[10:]
  assert order(c) == a
  assert order(c.replace(data=dict(seed=1))) != a


# --- checkpointable iterator ----------------------------------------------------------


@pytest.mark.parametrize('fields', [dict(), dict(packing=False, prefetch=0)])
def test_restored_iterator_yields_the_same_batches(fields):
  c = make_config(**fields)
  it = data.make_train_iterator(c)
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(6)]
  restored = data.make_train_iterator(c)
  restored.set_state(json.loads(json.dumps(state)))  # the state survives JSON (orbax handler)
  helpers.assert_same_batches([next(restored) for _ in range(6)], want)


def test_split_batches_equal_plain_batches_and_resume_at_every_position():
  """Worker elements of k batches, split in the main process: the same batches as batching
  directly, and a state taken at any position (inside an element or at its end) resumes there;
  a state saved before the split existed (the parent's own) resumes too."""
  from gemma3_train.data import pipeline  # pylint: disable=g-import-not-at-top
  # (at least 2**16 tokens per element, at most 16 batches)
  assert [pipeline.crossing_batches(*s) for s in ((8, 1024), (16, 4096), (1, 64), (3, 8192))] \
      == [8, 1, 16, 3]
  rows = grain.MapDataset.range(40).map(lambda i: {'x': np.full(3, i, np.int32)})
  xs = lambda batches: [b['x'].tolist() for b in batches]
  plain = xs(rows.to_iter_dataset().batch(2))
  split = pipeline.SplitBatches(rows.to_iter_dataset().batch(8), 2)
  assert xs(split) == plain
  for skip in range(13):
    it = iter(split)
    for _ in range(skip):
      next(it)
    state = it.get_state()
    again = iter(split)
    again.set_state(state)
    assert xs([next(again), next(again)]) == plain[skip:skip + 2]
  old = iter(rows.to_iter_dataset().batch(8))
  next(old)
  again = iter(split)
  again.set_state(old.get_state())
  assert xs([next(again)]) == plain[4:5]


@pytest.mark.slow  # starting grain worker processes takes 10-25 s here
def test_restore_with_worker_processes():
  helpers.assert_resumes(make_config(num_workers=2, seq_len=64), 3, 4)


def test_orbax_checkpoint_of_iterator(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  c = make_config(seq_len=64)
  it = data.make_train_iterator(c)
  next(it)
  with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data',)) as mngr:
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = [next(it) for _ in range(3)]
    restored = data.make_train_iterator(c)
    mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  helpers.assert_same_batches([next(restored) for _ in range(3)], want)


# --- global arrays -----------------------------------------------------------------------


def test_global_batch_is_sharded_over_devices():
  c = make_config()
  local = next(data.make_train_iterator(c))
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  g = data.global_batch(local, sharding)
  for k in KEYS:
    assert g[k].shape == local[k].shape and g[k].dtype == local[k].dtype
    assert g[k].sharding == sharding
    np.testing.assert_array_equal(np.asarray(g[k]), local[k])


def test_local_batch_must_divide():
  c = make_config()
  with pytest.raises(config_lib.ConfigError, match='train.global_batch_size=8'):
    data.make_train_iterator(c, process_index=0, process_count=3)


# --- other sources -------------------------------------------------------------------------


def test_parquet_arrayrecord_glob_and_comma_list(tmp_path, sp):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  texts = [f'Parquet document number {i}.' for i in range(6)]
  (tmp_path / 'pq').mkdir()
  pq.write_table(pa.table({'body': texts[:3], 'id': [0, 1, 2]}), tmp_path / 'pq' / 'a.parquet')
  pq.write_table(pa.table({'body': texts[3:], 'id': [3, 4, 5]}), tmp_path / 'pq' / 'b.parquet')
  ar_texts = ['Raw text record.', json.dumps({'text': 'JSON record.'})]
  w = array_record_module.ArrayRecordWriter(str(tmp_path / 'x.array_record'), 'group_size:1')
  for t in ar_texts:
    w.write(t.encode())
  w.close()
  cases = [
      (dict(source='parquet', train_path=str(tmp_path / 'pq' / '*.parquet'), text_field='body'),
       texts),
      (dict(source='parquet', text_field='body',
            train_path=f"{tmp_path / 'pq' / 'b.parquet'},{tmp_path / 'pq' / 'a.parquet'}"),
       texts),
      (dict(source='arrayrecord', train_path=str(tmp_path / 'x.array_record')),
       ['Raw text record.', 'JSON record.']),
  ]
  for fields, want_texts in cases:
    c = make_config(shuffle=False, seq_len=32, prefetch=0, **fields)
    got = pieces(pipeline.make_dataset(c, num_epochs=1, batch_size=2))
    want = expected_pieces([[2] + sp.encode(t) + [1] for t in want_texts], 32)
    assert collections.Counter(got) == collections.Counter(want), fields


def test_tfds_without_tensorflow_datasets_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # import fails as if absent
  c = make_config(source='tfds', tfds_name='lm1b')
  with pytest.raises(config_lib.ConfigError, match=r"tensorflow_datasets is not installed.*"
                     r"gemma3-train\[tfds\]"):
    data.make_train_iterator(c)
