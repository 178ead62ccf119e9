"""Loaded at start-up by a training subprocess whose PYTHONPATH names this folder (the gs://
outage test of tests/test_faults_gcs.py): the storage clients' own retries, shortened tenfold,
so that an outage past them costs seconds of the suite, not minutes.

  gcsfs (etils.epath's gs:// backend): its backoff between tries (1, 2, 4, 8 and 16 s, each
    plus up to 1 s of jitter: about 35 s before a request is out of retries) is divided by
    DIVISOR; its retry loop, the errors it retries and its 6 tries are its own.
  google-cloud-storage (orbax's bucket lookup, the workdir lease): DEFAULT_RETRY's deadline
    (120 s) and delays (1 s doubling to 60 s) are divided by DIVISOR, in place, since the
    client's methods took that object as their default argument at import.
"""

import asyncio
import types

import gcsfs.retry
from google.cloud.storage import retry as gcs_retry

DIVISOR = 10.0

_sleep = asyncio.sleep


class _ShortSleeps(types.ModuleType):
  """asyncio as gcsfs.retry sees it: the same module, but sleep() divided."""

  def __getattr__(self, name):
    return getattr(asyncio, name)

  @staticmethod
  async def sleep(delay, *args, **kwargs):
    return await _sleep(delay / DIVISOR, *args, **kwargs)


# retry_request's one sleep is `asyncio.sleep(...)` through the module global: replace that
# global only (core.py's other sleeps, and everyone else's asyncio, are untouched).
assert gcsfs.retry.asyncio is asyncio, 'gcsfs.retry no longer sleeps through asyncio'
gcsfs.retry.asyncio = _ShortSleeps('asyncio')

for name in ('_timeout', '_deadline', '_initial', '_maximum'):
  setattr(gcs_retry.DEFAULT_RETRY, name, getattr(gcs_retry.DEFAULT_RETRY, name) / DIVISOR)
