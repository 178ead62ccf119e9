"""storage.py: which errors are retried, and the backoff loop."""

import errno
import logging

import pytest

from gemma3_train.infra import storage


class _Flaky:
  """Fails with the given errors in turn, then returns 'ok'."""

  def __init__(self, *errors):
    self.errors, self.calls = list(errors), 0

  def __call__(self):
    self.calls += 1
    if self.errors:
      raise self.errors.pop(0)
    return 'ok'


def test_transient_errors_are_retried_with_doubling_delays(caplog):
  sleeps = []
  fn = _Flaky(ConnectionError('Connection refused'), OSError('HTTP 503 Service Unavailable'),
              RuntimeError('DEADLINE_EXCEEDED while writing'))
  with caplog.at_level(logging.WARNING):
    assert storage.retry(fn, 'Writing gs://b/metrics.jsonl', sleep=sleeps.append) == 'ok'
  assert fn.calls == 4 and sleeps == [1.0, 2.0, 4.0]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 3 and all('Writing gs://b/metrics.jsonl failed' in w for w in warnings)
  assert 'retry 1 of 6 in 1 s' in warnings[0]


def test_permanent_errors_and_the_last_failure_are_raised():
  sleeps = []
  with pytest.raises(PermissionError):
    storage.retry(_Flaky(PermissionError('denied')), 'x', sleep=sleeps.append)
  assert sleeps == []
  fn = _Flaky(*[TimeoutError('timed out')] * 4)
  with pytest.raises(TimeoutError):
    storage.retry(fn, 'x', retries=3, sleep=sleeps.append)
  assert fn.calls == 4 and sleeps == [1.0, 2.0, 4.0]


def test_classification_follows_causes():
  full = OSError(errno.ENOSPC, 'No space left on device')
  try:
    try:
      raise full
    except OSError as e:
      raise RuntimeError('orbax: write failed') from e
  except RuntimeError as wrapped:
    assert storage.is_disk_full(wrapped) and not storage.is_transient(wrapped)
  assert storage.is_transient(RuntimeError('HTTP 429 Too Many Requests'))
  assert not storage.is_transient(ValueError('bad shape (4, 8)'))
