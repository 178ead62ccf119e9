"""Bad data: each case is either a one-line error or skipped-and-counted with file and row."""

import json
import logging

import pytest

from configs import tiny
from gemma3_train import config as config_lib
from gemma3_train.data import pipeline
from gemma3_train.data import sources

GOOD = [{'text': f'A good document, number {i}.'} for i in range(8)]


def make_config(**data_fields) -> config_lib.Config:
  c = config_lib.from_config_dict(tiny.get_config())
  return c.replace(data=dict(dict(source='jsonl', shuffle=False, prefetch=0, seq_len=32),
                             **data_fields))


def write_lines(path, lines):
  path.write_bytes(b''.join(l + b'\n' for l in lines))
  return str(path)


def rows(rs):
  return [json.dumps(r).encode() for r in rs]


def read_all(c):
  """Number of documents (segments) in one epoch."""
  n = 0
  for b in pipeline.make_dataset(c, num_epochs=1, batch_size=2):
    n += int(b['segment_ids'].max(axis=1).sum())
  return n


def counted(key_part, before):
  return sum(n - before.get(k, 0) for k, n in sources.COUNTS.items() if key_part in k)


@pytest.fixture
def data_log(caplog):
  caplog.set_level(logging.INFO, logger='gemma3_train.data')
  return caplog


def test_missing_file_is_an_error(tmp_path):
  c = make_config(train_path=str(tmp_path / 'missing.jsonl'))
  with pytest.raises(config_lib.ConfigError, match=r"data.train_path=.*file not found: .*missing"):
    pipeline.make_dataset(c)


def test_glob_matching_nothing_is_an_error(tmp_path):
  c = make_config(train_path=str(tmp_path / '*.jsonl'))
  with pytest.raises(config_lib.ConfigError, match=r'data.train_path=.*no file matches'):
    pipeline.make_dataset(c)


def test_empty_file_alone_is_an_error(tmp_path):
  (tmp_path / 'empty.jsonl').write_bytes(b'')
  c = make_config(train_path=str(tmp_path / 'empty.jsonl'))
  with pytest.raises(config_lib.ConfigError, match=r'data.train_path=.*no records in .*empty'):
    pipeline.make_dataset(c)


def test_empty_file_among_others_is_skipped_and_counted(tmp_path, data_log):
  (tmp_path / 'a.jsonl').write_bytes(b'')
  write_lines(tmp_path / 'b.jsonl', rows(GOOD))
  before = dict(sources.COUNTS)
  c = make_config(train_path=str(tmp_path / '*.jsonl'))
  assert read_all(c) == len(GOOD)
  assert counted('empty file', before) == 1
  assert 'a.jsonl' in data_log.text and 'empty file' in data_log.text


def test_row_without_text_field_is_skipped_and_counted(tmp_path, data_log):
  path = write_lines(tmp_path / 'd.jsonl', rows(GOOD[:3] + [{'body': 'no text'}] + GOOD[3:]))
  before = dict(sources.COUNTS)
  assert read_all(make_config(train_path=path)) == len(GOOD)
  assert counted("no field 'text'", before) == 1
  assert f'{path} line 4' in data_log.text


def test_field_missing_on_every_row_is_an_error(tmp_path):
  path = write_lines(tmp_path / 'd.jsonl', rows([{'body': 'x'}] * 5))
  with pytest.raises(config_lib.ConfigError,
                     match=rf"data.text_field='text': none of the first 5 records from {path} "
                     r"line 1 is usable \(skipped: no field 'text'\)"):
    pipeline.make_dataset(make_config(train_path=path))


def test_invalid_utf8_and_invalid_json_are_skipped_and_counted(tmp_path, data_log):
  lines = rows(GOOD[:2]) + [b'{"text": "caf\xe9"}', b'{"text": broken'] + rows(GOOD[2:])
  path = write_lines(tmp_path / 'd.jsonl', lines)
  before = dict(sources.COUNTS)
  assert read_all(make_config(train_path=path)) == len(GOOD)
  assert counted('invalid UTF-8', before) == 1
  assert counted('not valid JSON', before) == 1
  assert f'{path} line 3' in data_log.text and f'{path} line 4' in data_log.text


def test_invalid_utf8_arrayrecord_record_is_skipped(tmp_path, data_log):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'x.array_record')
  w = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  for r in [b'good text one', b'\xff\xfe bad', b'good text two']:
    w.write(r)
  w.close()
  before = dict(sources.COUNTS)
  assert read_all(make_config(source='arrayrecord', train_path=path)) == 2
  assert counted('invalid UTF-8', before) == 1
  assert f'{path} record 2' in data_log.text


CHAT = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}]


def test_non_alternating_chat_is_an_error(tmp_path):
  bad = [{'role': 'user', 'content': 'Hi'}, {'role': 'user', 'content': 'Again?'}]
  path = write_lines(tmp_path / 'c.jsonl', rows([{'messages': CHAT}, {'messages': bad}]))
  c = make_config(train_path=path, format='chat', seq_len=64)
  with pytest.raises(sources.DataError, match=rf"{path} line 2: roles must alternate .*message 1 "
                     r"is 'user' where 'model' was expected"):
    read_all(c)


def test_non_alternating_chat_deep_in_the_file_is_an_error(tmp_path):
  bad = [{'role': 'assistant', 'content': 'I speak first.'}]
  path = write_lines(tmp_path / 'c.jsonl', rows([{'messages': CHAT}] * 80 + [{'messages': bad}]))
  c = make_config(train_path=path, format='chat', seq_len=64)
  with pytest.raises(sources.DataError, match=rf'{path} line 81: roles must alternate'):
    read_all(c)  # past the start-up probe: raised from grain's reader


def test_unknown_role_is_an_error(tmp_path):
  bad = [{'role': 'narrator', 'content': 'Once'}]
  path = write_lines(tmp_path / 'c.jsonl', rows([{'messages': bad}]))
  with pytest.raises(sources.DataError, match=rf"{path} line 1: .*role 'narrator'"):
    read_all(make_config(train_path=path, format='chat'))


def test_long_document_is_split_and_counted(tmp_path, data_log):
  data_log.set_level(logging.DEBUG, logger='gemma3_train.data')  # ordinary: DEBUG, not INFO
  long_text = ' '.join(['word'] * 200)
  path = write_lines(tmp_path / 'd.jsonl', rows(GOOD[:2] + [{'text': long_text}]))
  before = dict(sources.COUNTS)
  n = read_all(make_config(train_path=path, seq_len=32))
  assert n > 2 + 200 // 32  # the long document became several row pieces
  assert counted('split: longer than data.seq_len=32', before) == 1
  assert f'{path} line 3' in data_log.text


def test_long_chat_is_skipped_and_counted(tmp_path, data_log):
  long_chat = [{'role': 'user', 'content': 'word ' * 100}, {'role': 'model', 'content': 'ok'}]
  path = write_lines(tmp_path / 'c.jsonl', rows([{'messages': CHAT}, {'messages': long_chat}]))
  before = dict(sources.COUNTS)
  assert read_all(make_config(train_path=path, format='chat', seq_len=64)) == 1
  assert counted('skipped: chat longer than data.seq_len=64', before) == 1
  assert f'{path} line 2' in data_log.text


def test_parquet_without_the_column_is_an_error(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({'body': ['a', 'b']}), tmp_path / 'x.parquet')
  c = make_config(source='parquet', train_path=str(tmp_path / 'x.parquet'))
  with pytest.raises(config_lib.ConfigError,
                     match=r"data.text_field='text': no such column in .*x.parquet "
                     r"\(columns: body\)"):
    pipeline.make_dataset(c)


def test_bad_row_is_warned_once_over_epochs_and_totalled_per_file(tmp_path, data_log):
  bad = [{'body': 'no text'}] * 7  # more bad rows than are shown one by one
  path = write_lines(tmp_path / 'd.jsonl', rows(GOOD[:2] + bad + GOOD[2:]))
  before = dict(sources.COUNTS)
  c = make_config(train_path=path)
  assert read_all(c) == len(GOOD)
  assert read_all(c) == len(GOOD)  # a second epoch over the same rows
  assert counted("no field 'text'", before) == 7  # rows, not reads
  line3 = [r for r in data_log.records if r.getMessage().endswith(f'{path} line 3')]
  assert len(line3) == 1
  shown = [r for r in data_log.records if f'{path} line' in r.getMessage()]
  assert len(shown) <= 5
  data_log.clear()
  sources.log_summary()
  assert f"data: {path}: 7 rows skipped: no field 'text'" in data_log.text
