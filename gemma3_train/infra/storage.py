"""Telling storage faults apart: a full disk (permanent until space is freed) from a transient
error of remote storage (a dropped connection, a timeout, HTTP 408/429/5xx), which is worth
retrying with backoff; and `retry`, the backoff loop for small writes (checkpoint.py has its own
for checkpoints, which must also reopen orbax's manager between attempts)."""

from __future__ import annotations

import errno
import logging
import re
import time
from typing import Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

_TRANSIENT = re.compile(r'UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|connect|timed? ?out|reset by '
                        r'peer|broken pipe|temporar|\b(408|429|500|502|503|504)\b', re.I)

T = TypeVar('T')


class StorageError(OSError):
  """A write that cannot be done: a full disk, or storage down past the retries. The message
  is one line naming the path; earlier checkpoints stay intact."""


def chain(e: BaseException | None) -> Iterator[BaseException]:
  """e, then its causes and contexts."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [''])[0][:300]


def is_disk_full(e: BaseException) -> bool:
  return any((isinstance(x, OSError) and x.errno == errno.ENOSPC) or
             'No space left on device' in str(x) for x in chain(e))


def is_transient(e: BaseException) -> bool:
  return any(isinstance(x, (ConnectionError, TimeoutError)) or _TRANSIENT.search(str(x))
             for x in chain(e))


def retry(fn: Callable[[], T], what: str, retries: int = 6, first_delay: float = 1.0,
          sleep: Callable[[float], None] = time.sleep) -> T:
  """fn(), retried on transient errors with backoff first_delay, 2x, ... (at most 32 s), each
  retry one WARNING naming `what`; any other error, or the last failure, is raised."""
  delay = first_delay
  for attempt in range(retries + 1):
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except  # classified below
      if attempt == retries or not is_transient(e):
        raise
      log.warning('%s failed (%s: %s); retry %d of %d in %.0f s', what, type(e).__name__,
                  first_line(e), attempt + 1, retries, delay)
      sleep(delay)
      delay = min(2 * delay, 32.0)
  raise AssertionError('unreachable')
