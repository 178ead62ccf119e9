"""gemma3-data prepare and data.source=prepared: same batches as on the fly, resumable, refusals."""

import importlib.resources
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from configs import tiny
from gemma3_train.cli import data as data_cli
from gemma3_train import config as config_lib
from gemma3_train import data
from gemma3_train.data import prepared
from gemma3_train.data import sources
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _corpus(path, n=60):
  """Text rows of varied lengths, with rows the trainer skips (bad JSON, empty, no field)."""
  words = 'the quick brown fox jumps over a lazy dog while seven wizards hum'.split()
  lines = []
  for k in range(n):
    if k % 17 == 5:
      lines.append('{not json')
    elif k % 23 == 7:
      lines.append(json.dumps({'text': '   '}))
    elif k % 29 == 11:
      lines.append(json.dumps({'other': 'x'}))
    else:
      lines.append(json.dumps({'text': ' '.join(words[(k + j) % len(words)]
                                                for j in range(3 + (k * 7) % 40))}))
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def _chats(path, n=24):
  rows = [{'messages': [{'role': 'user', 'content': f'question {k} ' * (1 + k % 4)},
                        {'role': 'model', 'content': f'answer {k} ' * (1 + k % 6)}]}
          for k in range(n)]
  rows[9] = {'messages': [{'role': 'user', 'content': 'long ' * 300},
                          {'role': 'model', 'content': 'x'}]}  # longer than seq_len: skipped
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _prepare(src, dst, *flags):
  return data_cli.main(['prepare', f'--src={src}', f'--dst={dst}', *flags])


def _config(**fields):
  c = config_lib.from_config_dict(tiny.get_config())
  return c.replace(data=dict(seq_len=64, **fields), train=dict(global_batch_size=4))


def _batches(c, n):
  it = data.make_train_iterator(c)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _assert_same(xs, ys):
  for x, y in zip(xs, ys, strict=True):
    assert set(x) == set(y) == set(data.BATCH_DTYPES)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize('fmt,workers', [('text', 0), ('chat', 0), ('text', 2)])
def test_prepared_gives_the_on_the_fly_batches(tmp_path, fmt, workers):
  src = (_corpus if fmt == 'text' else _chats)(tmp_path / 'in.jsonl')
  manifest = _prepare(src, tmp_path / 'prep', f'--format={fmt}', '--rows_per_shard=7',
                      '--workers=1')
  assert len(manifest['shards']) == manifest['rows'] // 7 + 1
  fields = dict(format=fmt, shuffle=True, seed=3, num_workers=workers)
  live = _batches(_config(source='jsonl', train_path=src, **fields), 12)  # several epochs
  ready = _batches(_config(source='prepared', train_path=str(tmp_path / 'prep'), **fields), 12)
  _assert_same(ready, live)
  if fmt == 'chat':
    assert 0 < sum(b['weights'].sum() for b in ready) < sum(
        (b['segment_ids'] > 0).sum() for b in ready)  # the chat mask came through


def test_a_vision_model_reads_text_only_prepared_shards_as_it_reads_them_on_the_fly(tmp_path):
  src = _corpus(tmp_path / 'in.jsonl')
  _prepare(src, tmp_path / 'prep', '--workers=1')
  vision = dict(vision=True, vision_image_size=48, vision_patch_size=8, vision_width=64,
                vision_depth=2, vision_mlp_dim=256, vision_num_heads=4, vision_pool=2)
  config = lambda **d: _config(max_images=2, **d).replace(model=vision)
  live = _batches(config(source='jsonl', train_path=src), 3)
  ready = _batches(config(source='prepared', train_path=str(tmp_path / 'prep')), 3)
  for x, y in zip(ready, live, strict=True):
    assert set(x) == set(y) == set(data.BATCH_DTYPES) | {'images', 'image_counts'}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  assert not any(b['image_counts'].any() for b in ready)  # text rows: empty image slots


@pytest.mark.parametrize('workers', [0, 2])
def test_prepared_iterator_resumes_where_it_stood(tmp_path, workers):
  """get_state mid-group (prepared pieces are read a chunk of documents at a time), then a new
  iterator from that state gives the batches the first one went on to give."""
  src = _corpus(tmp_path / 'in.jsonl', n=200)
  _prepare(src, tmp_path / 'prep', '--rows_per_shard=30', '--workers=1')
  helpers.assert_resumes(
      _config(source='prepared', train_path=str(tmp_path / 'prep'), num_workers=workers), 5, 9)


@pytest.mark.parametrize('remote', [False, True])
def test_records_read_ahead_give_the_same_batches_and_resume(tmp_path, monkeypatch, remote):
  """data.prefetch on remote prepared shards reads the next chunk of records in a thread (in
  parallel); local shards are read inline, with no thread. With chunks of 8 documents, many
  chunks are read ahead, and the batches are those of prefetch=0 and of on-the-fly
  tokenization, also after a resume mid-chunk."""
  monkeypatch.setattr(prepared, 'READ_CHUNK', 8)
  if remote:  # (the files are local; remote paths get the read-ahead and the parallel read)
    monkeypatch.setattr(prepared.PreparedSource, 'remote', property(lambda self: True))
  src = _corpus(tmp_path / 'in.jsonl', n=80)
  _prepare(src, tmp_path / 'prep', '--rows_per_shard=9', '--workers=1')
  fields = dict(shuffle=True, seed=5)
  ready = lambda prefetch: _config(source='prepared', train_path=str(tmp_path / 'prep'),
                                   prefetch=prefetch, **fields)
  before = set(threading.enumerate())
  it = data.make_train_iterator(ready(2))
  next(it)
  readers = [t for t in set(threading.enumerate()) - before
             if t.name.startswith(prepared.READ_AHEAD_THREAD)]
  assert bool(readers) == remote
  it.close()
  ahead = _batches(ready(2), 10)
  _assert_same(ahead, _batches(ready(0), 10))
  _assert_same(ahead, _batches(_config(source='jsonl', train_path=src, **fields), 10))
  helpers.assert_resumes(ready(2), 3, 6)


def test_local_records_are_read_in_order(tmp_path):
  src = _corpus(tmp_path / 'in.jsonl', n=40)
  _prepare(src, tmp_path / 'prep', '--rows_per_shard=7', '--workers=1')
  source = prepared.PreparedSource(str(tmp_path / 'prep'), 'data.train_path', '')
  indices = [31, 2, 2, 17, 0, 39]
  assert source.records(indices) == [source[i] for i in indices]
  assert source.records(indices) == source._source.__getitems__(indices)  # the remote path's


def test_records_hold_the_trainer_documents(tmp_path):
  """The independent check: record tokens are SentencePiece's ids between BOS and EOS."""
  model = importlib.resources.files('gemma3_train') / 'assets' / 'tokenizer_gemma3.model'
  sp = spm.SentencePieceProcessor(model_file=str(model))
  src = _corpus(tmp_path / 'in.jsonl', n=12)
  _prepare(src, tmp_path / 'prep', '--workers=1')
  source = prepared.PreparedSource(str(tmp_path / 'prep'), 'data.train_path', '')
  rows = pathlib.Path(src).read_text().splitlines()
  assert len(source) == len(rows)
  for i, line in enumerate(rows):
    doc = prepared.decode(source[i], 'text')
    try:
      text = json.loads(line).get('text')
    except json.JSONDecodeError:
      text = None
    if not (text or '').strip():
      assert doc is None, i
    else:
      assert doc['tokens'].tolist() == [2, *sp.encode(text), 1], i


def test_interrupted_prepare_resumes_to_the_same_shards(tmp_path):
  src = _corpus(tmp_path / 'in.jsonl', n=80)
  clean = tmp_path / 'clean'
  _prepare(src, clean, '--rows_per_shard=10', '--workers=1')
  part = tmp_path / 'part'
  assert _prepare(src, part, '--rows_per_shard=10', '--workers=1', '--max_shards=3') == {}
  assert not (part / 'manifest.json').exists()
  kept = {p.name: p.stat().st_mtime_ns for p in part.glob('*.arrayrecord')}
  assert len(kept) == 3
  (part / 'shard-00005-of-00008.arrayrecord.tmp999').write_bytes(b'half a shard')  # a kill
  # The rest by the real command with two worker processes (forked: not from this process,
  # which has jax's threads running).
  r = subprocess.run([sys.executable, '-m', 'gemma3_train.cli.data', 'prepare',
                      f'--src={src}', f'--dst={part}', '--rows_per_shard=10', '--workers=2'],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert '8/8 shards' in r.stderr and 'ETA' in r.stderr  # the progress line
  for name, mtime in kept.items():
    assert (part / name).stat().st_mtime_ns == mtime, f'{name} was redone'
  shards = sorted(p.name for p in clean.glob('*.arrayrecord'))
  assert len(shards) == 8
  for name in shards:
    assert (part / name).read_bytes() == (clean / name).read_bytes(), name
  manifest = json.loads((part / 'manifest.json').read_text())
  assert manifest == json.loads((clean / 'manifest.json').read_text())
  # 80 rows: 5 bad JSON, 4 blank texts, 3 without the field (see _corpus), each counted once.
  assert manifest['rows'] - manifest['documents'] == 12
  assert sorted(manifest['counts'].values()) == [3, 4, 5]


@pytest.mark.slow  # a real SIGKILL of a running prepare; ~10-20 s here
def test_killed_prepare_resumes(tmp_path):
  src = sources.bundled_path('train')
  dst = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'gemma3_train.cli.data', 'prepare', f'--src={src}',
         f'--dst={dst}', '--rows_per_shard=4', '--workers=1']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while len(list(dst.glob('*.stats.json'))) < 5 and time.time() < deadline:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  done = len(list(dst.glob('*.stats.json')))
  assert 5 <= done < 202 and not (dst / 'manifest.json').exists()
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)  # resumes
  clean = tmp_path / 'clean'
  _prepare(src, clean, '--rows_per_shard=4', '--workers=1')
  for p in sorted(clean.glob('*.arrayrecord')):
    assert (dst / p.name).read_bytes() == p.read_bytes(), p.name


def test_other_input_in_the_same_dst_is_refused(tmp_path):
  a = _corpus(tmp_path / 'a.jsonl', n=20)
  b = _corpus(tmp_path / 'b.jsonl', n=21)
  _prepare(a, tmp_path / 'prep', '--workers=1', '--rows_per_shard=5')
  with pytest.raises(config_lib.ConfigError, match=r'--dst=.*holds a prepare of other input '
                     r'\(differs in src, files, rows\);'):
    _prepare(b, tmp_path / 'prep', '--workers=1', '--rows_per_shard=5')


def _other_tokenizer(path) -> str:
  """The Gemma 3 model with one score changed: same vocabulary size, another sha256."""
  model = importlib.resources.files('gemma3_train') / 'assets' / 'tokenizer_gemma3.model'
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model.read_bytes())
  proto.pieces[1000].score += 1.0
  path.write_bytes(proto.SerializeToString())
  return str(path)


def test_prepared_with_another_tokenizer_is_refused_naming_both(tmp_path):
  src = _corpus(tmp_path / 'in.jsonl', n=10)
  other = _other_tokenizer(tmp_path / 'other.model')
  _prepare(src, tmp_path / 'prep', '--workers=1', f'--tokenizer_path={other}')
  c = _config(source='prepared', train_path=str(tmp_path / 'prep'))
  with pytest.raises(config_lib.ConfigError) as e:
    data.make_train_iterator(c)
  msg = str(e.value)
  assert other in msg and 'tokenizer_gemma3.model' in msg and '\n' not in msg, msg
  # Through the real CLI: one error line, exit 2, nothing written to the workdir.
  workdir = tmp_path / 'run'
  r = subprocess.run([sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
                      f'--workdir={workdir}', '--config.mesh.fsdp=-1',
                      '--config.data.source=prepared',
                      f'--config.data.train_path={tmp_path / "prep"}'],
                     cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  errors = [l for l in r.stderr.splitlines() if 'error' in l]
  assert r.returncode == 2 and len(errors) == 1, r.stderr
  assert errors[0].startswith('gemma3-train: error: data.train_path=') and other in errors[0]
  assert not workdir.exists() or not any(workdir.iterdir())


def test_cli_errors_are_one_line_exit_2(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'gemma3_train.cli.data', 'prepare',
                      f'--src={tmp_path}/none/*.jsonl', f'--dst={tmp_path / "out"}'],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip() == (f"gemma3-data: error: --src='{tmp_path}/none/*.jsonl': no file "
                              f"matches '{tmp_path}/none/*.jsonl'")
  assert not (tmp_path / 'out').exists()
