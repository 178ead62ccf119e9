"""The workdir lease: one run at a time writes into a workdir.

A run creates WORKDIR/LEASE atomically before it writes anything else there, keeps its heartbeat
fresh from a background thread, and deletes it on exit. A second run on the same workdir finds
the lease and stops at start with one line naming the holder (host, process id, since when).

  local disks  the lease is written to a private file and hard-linked to its name (link fails
               when the name exists: one creator wins, on NFS too); a heartbeat rewrites it
               through a temporary file and rename.
  gs://        google-cloud-storage uploads with generation preconditions: create with
               if_generation_match=0 (only if absent), heartbeat and take-over with
               if_generation_match=<the generation read> (only if nobody wrote in between).

A lease whose heartbeat is older than checkpoint.lease_timeout_s is stale (its holder died,
e.g. SIGKILL or a lost VM): the next run takes it over with a WARNING naming the old holder.
A holder on this host whose process no longer exists is stale at once (a rerun after a kill
on the same machine need not wait). Hosts judge staleness by their own clocks against the
heartbeat's wall time, so the timeout must exceed the clock skew between hosts (minutes are
safe; the default is 5 minutes).
A multi-process run holds one lease for all its processes: process 0 takes it, and every
process learns the outcome, so that all stop together when the workdir is held.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

from etils import epath

log = logging.getLogger(__name__)

LEASE_NAME = 'LEASE'


class LeaseHeldError(RuntimeError):
  """The workdir belongs to another live run; the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  started: float  # wall-clock seconds (time.time()) when the lease was taken
  heartbeat: float  # wall-clock seconds of the latest heartbeat
  run_id: str  # tells two holders with the same host and pid apart (a container restart)

  def to_bytes(self) -> bytes:
    return json.dumps(dataclasses.asdict(self)).encode()

  @classmethod
  def from_bytes(cls, data: bytes) -> 'Holder':
    d = json.loads(data)
    return cls(host=str(d['host']), pid=int(d['pid']), started=float(d['started']),
               heartbeat=float(d['heartbeat']), run_id=str(d['run_id']))

  def describe(self) -> str:
    since = datetime.datetime.fromtimestamp(self.started).astimezone().isoformat(
        timespec='seconds')
    return f'host {self.host}, pid {self.pid}, since {since}'


# --- storage: one atomic create, a read with a version, a conditional replace ---------


class _LocalStore:
  """A lease file on a local or network file system."""

  def __init__(self, path: str):
    self.path = path

  def create(self, data: bytes) -> object:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    # Written in full under a private name, then hard-linked: link(2) fails if the name
    # exists, so the lease appears atomically and never half-written.
    tmp = f'{self.path}.{uuid.uuid4().hex}.tmp'
    with open(tmp, 'wb') as f:
      f.write(data)
    try:
      os.link(tmp, self.path)
    except FileExistsError:
      return None
    finally:
      os.remove(tmp)
    return data

  def read(self) -> tuple[bytes, object] | None:
    try:
      with open(self.path, 'rb') as f:
        data = f.read()
    except FileNotFoundError:
      return None
    return data, data  # the content is the version: run_id and heartbeat change each write

  def replace(self, data: bytes, version: object) -> object:
    """Writes data if the file still holds `version` and returns the new version; None when
    someone else wrote.

    Not atomic between the check and the rename (a POSIX file system has no compare-and-swap),
    so two runs taking over the same stale lease within milliseconds could both win the rename;
    the loser then finds another holder at its next heartbeat and stops heartbeating."""
    current = self.read()
    if current is None or current[1] != version:
      return None
    tmp = f'{self.path}.{uuid.uuid4().hex}.tmp'
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, self.path)
    return data

  def delete(self, version: object) -> None:
    current = self.read()
    if current is not None and current[1] == version:
      os.remove(self.path)


class _GcsStore:
  """A lease object on Google Cloud Storage, versioned by its generation number."""

  def __init__(self, path: str):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    bucket, _, name = path[len('gs://'):].partition('/')
    self._exceptions = exceptions
    self._bucket = storage.Client().bucket(bucket)
    self._name = name

  def create(self, data: bytes) -> object:
    blob = self._bucket.blob(self._name)
    try:
      blob.upload_from_string(data, if_generation_match=0)
    except self._exceptions.PreconditionFailed:
      return None
    return blob.generation

  def read(self) -> tuple[bytes, object] | None:
    blob = self._bucket.get_blob(self._name)
    if blob is None:
      return None
    try:
      return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
    except (self._exceptions.NotFound, self._exceptions.PreconditionFailed):
      return self.read()  # replaced or deleted between the two requests

  def replace(self, data: bytes, version: object) -> object:
    blob = self._bucket.blob(self._name)
    try:
      blob.upload_from_string(data, if_generation_match=version)
    except (self._exceptions.PreconditionFailed, self._exceptions.NotFound):
      return None
    return blob.generation

  def delete(self, version: object) -> None:
    try:
      self._bucket.blob(self._name).delete(if_generation_match=version)
    except (self._exceptions.PreconditionFailed, self._exceptions.NotFound):
      pass


def _store(workdir: str):
  path = str(epath.Path(workdir) / LEASE_NAME)
  if path.startswith('gs://'):
    return _GcsStore(path)
  if '://' in path:
    raise LeaseHeldError(f'--workdir={workdir}: only local paths and gs:// can hold a lease')
  return _LocalStore(path)


_HELD: set[str] = set()  # run_ids of the leases this process holds


def _dead_here(other: Holder) -> bool:
  """A holder on this host whose process is gone (or is us: a restarted container reusing the
  pid) is stale at once, without waiting for the timeout."""
  if other.host != socket.gethostname():
    return False
  if other.pid == os.getpid():
    return other.run_id not in _HELD
  try:
    os.kill(other.pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False


# --- the lease ------------------------------------------------------------------------


class Lease:
  """Holds WORKDIR/LEASE from `acquire()` to `release()`, heartbeating in between."""

  def __init__(self, workdir: str, timeout_s: float):
    self.workdir = workdir
    self.timeout_s = timeout_s
    self.heartbeat_s = max(0.5, min(60.0, timeout_s / 10))
    self._store = _store(workdir)
    now = time.time()
    self.holder = Holder(host=socket.gethostname(), pid=os.getpid(), started=now,
                         heartbeat=now, run_id=uuid.uuid4().hex)
    self._version: object = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.lost = False  # another run took the lease over (our heartbeat stalled too long)

  @property
  def path(self) -> str:
    return str(epath.Path(self.workdir) / LEASE_NAME)

  def acquire(self) -> None:
    """Takes the lease, or raises LeaseHeldError naming the live holder."""
    data = self.holder.to_bytes()
    for _ in range(3):  # the holder may release or change between our create and our read
      self._version = self._store.create(data)
      if self._version is not None:
        break
      current = self._store.read()
      if current is None:
        continue
      try:
        other = Holder.from_bytes(current[0])
      except (ValueError, KeyError, TypeError):
        other = None  # a torn or foreign file: stale once old enough, judged by its age
      age = time.time() - (other.heartbeat if other else 0.0)
      if other is not None and age < self.timeout_s and not _dead_here(other):
        raise LeaseHeldError(
            f'--workdir={self.workdir} is in use by another run ({other.describe()}, last '
            f'heartbeat {age:.0f} s ago; {self.path}); stop that run or use another --workdir '
            f'(a lease without heartbeat for checkpoint.lease_timeout_s={self.timeout_s:g} s '
            'is taken over)')
      self._version = self._store.replace(data, current[1])
      if self._version is not None:
        log.warning('Took over the stale lease %s from %s: %s', self.path,
                    other.describe() if other else 'an unreadable holder',
                    'that process is gone from this host' if other and _dead_here(other) else
                    f'no heartbeat for {age:.0f} s (checkpoint.lease_timeout_s='
                    f'{self.timeout_s:g})')
        break
    else:
      raise LeaseHeldError(f'--workdir={self.workdir}: could not take {self.path} (another run '
                           'is taking it at the same time)')
    _HELD.add(self.holder.run_id)
    log.info('Holding the workdir lease %s (%s)', self.path, self.holder.describe())
    self._thread = threading.Thread(target=self._heartbeat_loop, name='workdir-lease',
                                    daemon=True)
    self._thread.start()

  def _heartbeat_loop(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        self.beat()
      except Exception as e:  # pylint: disable=broad-except  # a storage hiccup: retry next beat
        log.warning('Workdir lease heartbeat failed (%s: %s); retrying in %.0f s',
                    type(e).__name__, str(e)[:200], self.heartbeat_s)
      if self.lost:
        return

  def beat(self) -> None:
    """Refreshes the heartbeat if the lease is still ours (else marks it lost, loudly)."""
    self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
    data = self.holder.to_bytes()
    version = self._store.replace(data, self._version)
    if version is not None:
      self._version = version
      return
    self.lost = True
    log.error('Lost the workdir lease %s: another run took it over (this run\'s heartbeat '
              'stalled for more than checkpoint.lease_timeout_s=%g s)', self.path,
              self.timeout_s)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    _HELD.discard(self.holder.run_id)
    if self._version is not None and not self.lost:
      try:
        self._store.delete(self._version)
      except Exception as e:  # pylint: disable=broad-except  # stale after the timeout anyway
        log.warning('Could not delete the workdir lease %s (%s); the next run takes it over '
                    'after checkpoint.lease_timeout_s', self.path, e)
      self._version = None


class _NoLease:
  """What processes other than 0 hold: process 0's lease covers them."""

  lost = False

  def release(self) -> None:
    pass


def acquire(workdir: str, timeout_s: float) -> Lease | _NoLease:
  """Process 0 takes the workdir lease for the whole run; every process raises LeaseHeldError
  when it is held (so that all of them stop, none waits on the others)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    lease = Lease(workdir, timeout_s)
    lease.acquire()
    return lease
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  lease, message = _NoLease(), ''
  if jax.process_index() == 0:
    try:
      lease = Lease(workdir, timeout_s)
      lease.acquire()
    except LeaseHeldError as e:
      message = str(e)
  # The coordination service's barrier first (no time limit to speak of), so that the
  # broadcast (a collective; gloo's peers must join within 30 s) starts with all present.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ocp.multihost.get_barrier_sync_fn()(key='gemma3_train_lease', timeout_ms=3_600_000)
  encoded = np.zeros(1024, np.uint8)
  raw = message.encode()[:1024]
  encoded[:len(raw)] = np.frombuffer(raw, np.uint8)
  encoded = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
  message = bytes(encoded).rstrip(b'\0').decode(errors='replace')
  if message:
    raise LeaseHeldError(message)
  return lease
