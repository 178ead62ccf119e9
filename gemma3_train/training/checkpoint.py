"""One orbax CheckpointManager under WORKDIR/checkpoints, and the restore order.

Restore order (restore.py `restore_or_init` follows it):
  (1) the newest complete checkpoint in this workdir: train state, data iterator, step.
      A checkpoint whose write was interrupted is never listed (orbax writes to a temporary
      directory and renames it when complete; on gs:// it writes a commit marker last); the
      next run deletes such leftovers when it opens the manager. One that fails to read is
      skipped with a warning naming it, and the previous one is tried; nothing is deleted.
  (2) `checkpoint.init_from`: params only, from one of our checkpoints (a training workdir, a
      step of one, or a params-only checkpoint), a Hugging Face directory or a Kaggle/Flax
      checkpoint, streamed into the current mesh's shardings (init_from.py); the optimizer
      starts fresh.
  (3) random init, born sharded.
Saves: a failed write is retried with backoff on transient storage errors, and on a write that
met an orbax executor already shut down (logged; each retry through a fresh manager); a full
disk raises StorageError (one line: the path, the space needed and free) and the partial write
is deleted, so earlier checkpoints stay the resume point. training/loop.py takes the workdir lease
(lease.py) before the Checkpointer is created.
Every restore reads straight into the sharded abstract state, so no host ever holds the whole
model, and a different mesh (8 devices -> 4) reshards on read (init_from: a different
model.scan_layers too).
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
import shutil
import sys
import threading
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from gemma3_train import config as config_lib
from gemma3_train.convert import ours
from gemma3_train.infra import signals
from gemma3_train.infra import storage
from gemma3_train.training import state as state_lib

log = logging.getLogger(__name__)

SAVE_RETRIES = 6  # backoff 1, 2, 4, ... 32 s: rides out about a minute of storage outage
StorageError, _first_line, _is_disk_full, _is_transient = (
    storage.StorageError, storage.first_line, storage.is_disk_full, storage.is_transient)


def _hit_a_shut_down_executor(e: BaseException) -> bool:
  """orbax's write submitted work to one of its executors after a close had shut it down (its
  metadata store's, when a manager is closed while a save of its own still runs): that manager
  is spent, but the fresh one a retry opens has live executors."""
  return any(isinstance(x, RuntimeError) and 'cannot schedule new futures after shutdown' in str(x)
             for x in storage.chain(e))


def _quiet_closed_loop_callbacks() -> None:
  """When a write fails, orbax closes that save's event loop while tensorstore's threads still
  finish its other writes; each completion callback then raises 'Event loop is closed', which
  tensorstore reports through sys.unraisablehook as a bare traceback (dozens of them,
  interleaved with our one-line error). Those, and only those, are dropped."""
  if getattr(sys.unraisablehook, 'gemma3_quiet', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == 'Event loop is closed'
        and threading.current_thread() is not threading.main_thread()):
      return
    previous(unraisable)

  hook.gemma3_quiet = True
  sys.unraisablehook = hook


class _OneLineStorageFaults(logging.Filter):
  """orbax logs a failed background write at ERROR with its traceback, from each of the threads
  it passes through (4 or 5 tracebacks of 40 lines), and asyncio adds 'Task exception was never
  retrieved' at exit for the write's leftover tasks, which then fail on the deleted temporary
  directory. A storage fault is ours to report (a retry warning, or the one-line StorageError),
  so these records keep their first line only."""

  def filter(self, record: logging.LogRecord) -> bool:
    e = record.exc_info[1] if record.exc_info else None
    if e is not None and (record.name == 'asyncio' or 'orbax' in record.pathname) and (
        _is_disk_full(e) or _is_transient(e) or isinstance(e, FileNotFoundError)
        or _hit_a_shut_down_executor(e)
        or '.orbax-checkpoint-tmp' in str(e)):  # the abandoned write's leftovers, deleted
      first = (record.getMessage().splitlines() or [''])[0]
      record.msg, record.args = f'{first} ({type(e).__name__})', ()
      record.exc_info = record.exc_text = None
    return True


def _quiet_storage_faults() -> None:
  _quiet_closed_loop_callbacks()
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OneLineStorageFaults) for f in logger.filters):
      logger.addFilter(_OneLineStorageFaults())


class _StorageRetryLog(logging.Filter):
  """gcsfs (etils.epath's gs:// backend) retries failed requests with backoff but says so only
  at DEBUG: each retry becomes one WARNING of ours; its other DEBUG lines stay hidden."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if record.levelno >= logging.WARNING:  # 'out of retries': the error is ours to report
      if record.exc_info and 'out of retries' in message:
        record.msg, record.args = message.splitlines()[0][:300], ()
        record.exc_info = record.exc_text = None
      return True
    if 'retrying after exception' in message:
      log.warning('Storage request retried with backoff (gcsfs): %s', message[:300])
    return False


def _log_storage_retries() -> None:
  gcsfs_log = logging.getLogger('gcsfs')
  if gcsfs_log.getEffectiveLevel() > logging.DEBUG and not any(
      isinstance(f, _StorageRetryLog) for f in gcsfs_log.filters):
    gcsfs_log.addFilter(_StorageRetryLog())
    gcsfs_log.setLevel(logging.DEBUG)


def _alive(state: Any) -> bool:
  """False once a later train step donated (deleted) the state's buffers."""
  return not any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array))


def _disk_full_message(directory: epath.Path, step: int, last: tuple | None) -> str:
  """The space needed is the newest complete checkpoint's size on disk (else the state's)."""
  need = sum(x.nbytes for x in jax.tree.leaves(last[1]) if hasattr(x, 'nbytes')) if last else 0
  free = ''
  if '://' not in str(directory):
    steps = ours.complete_steps(directory)
    if steps:
      need = sum(p.stat().st_size for p in pathlib.Path(str(directory), str(steps[-1])).rglob('*')
                 if p.is_file())
    probe = pathlib.Path(str(directory))
    while not probe.exists() and probe != probe.parent:
      probe = probe.parent
    free = f', {shutil.disk_usage(probe).free / 1e6:.1f} MB free'
  return (f'no space left on device writing the checkpoint for step {step} to {directory}: '
          f'it needs about {need / 1e6:.1f} MB{free}; the earlier checkpoints are intact '
          '(free space, then rerun to resume)')


def latest_step(workdir: str) -> int | None:
  """The newest complete step under WORKDIR/checkpoints (None: none), read without creating or
  writing anything: a directory listing, no CheckpointManager."""
  steps = ours.complete_steps(epath.Path(workdir) / 'checkpoints')
  return steps[-1] if steps else None


def saved_config(step_dir: epath.Path) -> dict[str, Any] | None:
  """The config (as saved JSON, a nested dict) a checkpoint step was written with."""
  path = step_dir / 'config'
  if not path.exists():
    return None
  # On gs:// orbax also writes a commit_success.txt marker into each item's directory.
  files = sorted(p for p in path.glob('*') if p.name != 'commit_success.txt')
  return json.loads(files[0].read_text()) if files else None


def check_compatible(step_dir: epath.Path, c: config_lib.Config) -> None:
  """A checkpoint of another model shape is a config mistake, never a reason to reinit."""
  saved = (saved_config(step_dir) or {}).get('model', {})
  for k in config_lib.MODEL_SHAPE_FIELDS:
    ours = getattr(c.model, k)
    if k in saved and saved[k] != ours:
      raise config_lib.ConfigError(
          f'model.{k}={ours}: expected {saved[k]} to resume the checkpoint at {step_dir} '
          '(use a new --workdir for a different model)')
  _check_lora_compatible(step_dir, c)


# LoRA fields that fix the adapters' tree: a checkpoint resumes only when they agree.
_LORA_LAYOUT_FIELDS = ('rank', 'targets', 'train_embedding')


def _check_lora_compatible(step_dir: epath.Path, c: config_lib.Config) -> None:
  saved = (saved_config(step_dir) or {}).get('lora', {})
  default = config_lib.LoraConfig()
  for k in _LORA_LAYOUT_FIELDS:
    theirs, ours = saved.get(k, getattr(default, k)), getattr(c.lora, k)
    if k == 'targets':
      theirs, ours = sorted(theirs.split(',')), sorted(ours.split(','))
    if theirs != ours:
      raise config_lib.ConfigError(
          f'lora.{k}={getattr(c.lora, k)!r}: expected {saved.get(k, getattr(default, k))!r} '
          f'to resume the checkpoint at {step_dir} (use a new --workdir for other adapters)')


class Checkpointer:
  """Saves {state, data iterator, config} every N steps; restores per the order above."""

  def __init__(self, workdir: str, c: config_lib.Config):
    self.config = c
    self.directory = epath.Path(workdir) / 'checkpoints'
    if str(self.directory).startswith('gs://'):
      _log_storage_retries()
    _quiet_storage_faults()
    self.manager = self._make_manager()
    self._closed = False  # the manager was closed after a failed write and not yet reopened
    self._last: tuple[int, Any, Any] | None = None  # (step, state, data_iter) of the last save
    self._in_flight: int | None = None  # the step whose background write may still fail
    self._stop = signals.StopRequests()

  def _make_manager(self) -> ocp.CheckpointManager:
    k = self.config.checkpoint
    # cleanup_tmp_directories: an interrupted write's temporary directory is deleted (the
    # workdir lease guarantees that no other run is writing one).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=k.keep, keep_period=k.keep_period or None,
        enable_async_checkpointing=k.async_save, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

  # --- preemption --------------------------------------------------------------

  def install_signal_handlers(self) -> None:
    """SIGTERM (what GKE and TPU VMs send) and Ctrl-C ask for a save at the next step boundary.

    One process: signals.StopRequests (a second Ctrl-C exits at once). Several processes:
    jax.distributed.initialize already installed the preemption sync manager's SIGTERM
    notifier, which tells every process and has them agree on one step to save at
    (`reached_preemption` below). A handler of ours would replace that notifier, so none is
    installed (Ctrl-C stays a KeyboardInterrupt there); and no per-step collective is needed.
    """
    if jax.process_count() > 1:
      return
    self._stop.install()

  @property
  def stop_reason(self) -> str:
    """'SIGTERM', 'Ctrl-C' or 'preemption notice': why should_stop said True."""
    return self._stop.reason or 'preemption notice'

  def should_stop(self, step: int) -> bool:
    """True (on every process at the same step) once SIGTERM, Ctrl-C or a preemption notice
    arrived.

    Called once per step on every process: the sync manager needs each step reported.
    """
    return self._stop.requested.is_set() or self.manager.reached_preemption(step)

  # --- save --------------------------------------------------------------------

  def save(self, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> bool:
    # Frozen parts are never saved: they are rebuilt from their source (training/frozen.py).
    state = state_lib.saved(state)
    self._last = (step, state, data_iter)
    saved = self._write(step, state, data_iter, force=force)
    if saved:
      log.info('Checkpoint for step %d %s to %s', step,
                   'being written' if self.config.checkpoint.async_save else 'written',
                   self.directory)
    return saved

  def _args(self, state: Any, data_iter: Any | None) -> ocp.args.Composite:
    items = {'state': ocp.args.StandardSave(state),
             'config': ocp.args.JsonSave(json.loads(self.config.to_json()))}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    return ocp.args.Composite(**items)

  def wait(self) -> None:
    """Waits for the background write; a failed one is written again while its state lives."""
    try:
      self.manager.wait_until_finished()
      self._in_flight = None
    except Exception as e:  # pylint: disable=broad-except
      self._recover(e, self._last[0] if self._last else -1, attempt=0)
      if self._last is None or not _alive(self._last[1]):
        log.error('The checkpoint write for step %s failed and its state is gone; the newest '
                  'complete checkpoint in %s stays the resume point', self._last and
                  self._last[0], self.directory)
        return
      step, state, data_iter = self._last
      self._write(step, state, data_iter, force=True, wait=True)

  def close(self) -> None:
    self.wait()
    self.manager.close()

  # --- storage faults ----------------------------------------------------------

  def _write(self, step: int, state: Any, data_iter: Any | None, *, force: bool,
             wait: bool = False) -> bool:
    """manager.save, retried with backoff on transient storage errors (see _recover)."""
    delay = 1.0
    for attempt in itertools.count():
      try:
        if self._closed:  # reopening failed last time (storage still down): now or raise
          self.manager, self._closed = self._make_manager(), False
        # The previous background write first, so that a failure is blamed on its step.
        self.manager.wait_until_finished()
        self._in_flight = None
        if step in self.manager.all_steps():  # a failure after the step had committed
          return False
        saved = self.manager.save(step, args=self._args(state, data_iter), force=force)
        self._in_flight = step if saved else self._in_flight
        if wait:
          self.manager.wait_until_finished()
          self._in_flight = None
        if attempt:
          log.warning('Checkpoint for step %d written to %s after %d retries', step,
                      self.directory, attempt)
        return saved
      except Exception as e:  # pylint: disable=broad-except
        self._recover(e, step, attempt, delay)
        time.sleep(delay)
        delay = min(2 * delay, 32.0)
    raise AssertionError('unreachable')

  def _recover(self, e: Exception, step: int, attempt: int, delay: float = 0.0) -> None:
    """After a failed write: raises StorageError (a full disk, or SAVE_RETRIES used up) or e
    itself (not a storage fault, nor a write into a shut-down orbax executor); else logs the
    retry and starts a fresh CheckpointManager (orbax's keeps raising a failed background
    write), which lists only complete steps and deletes the failed write's temporary directory."""
    if self._in_flight is not None:
      step, self._in_flight = self._in_flight, None  # the background write that failed
    if _is_disk_full(e):
      self._reset_manager(delete_partial_writes=True)
      raise StorageError(_disk_full_message(self.directory, step, self._last)) from e
    if not _is_transient(e) and not _hit_a_shut_down_executor(e):
      raise e
    if attempt >= SAVE_RETRIES:
      raise StorageError(f'{self.directory}: the checkpoint for step {step} failed '
                         f'{attempt + 1} times ({type(e).__name__}: {_first_line(e)}); '
                         'earlier checkpoints are intact; rerun to resume') from e
    log.warning('Checkpoint write to %s failed (%s: %s); retry %d of %d in %.0f s',
                self.directory, type(e).__name__, _first_line(e), attempt + 1, SAVE_RETRIES,
                delay)
    self._reset_manager()

  def _delete_partial_writes(self, quiet_s: float = 1.0, limit_s: float = 20.0) -> None:
    """Frees the space a failed write took (its temporary directory; never a complete step).
    tensorstore's threads may still be finishing that write's other files (recreating its
    directories), so this repeats until no temporary directory has appeared for quiet_s."""
    if jax.process_index() != 0 or not self.directory.exists():
      return
    start = last_seen = time.monotonic()
    while time.monotonic() - last_seen < quiet_s and time.monotonic() - start < limit_s:
      for p in self.directory.iterdir():
        if '.orbax-checkpoint-tmp' in p.name:
          p.rmtree(missing_ok=True)
          last_seen = time.monotonic()
      time.sleep(0.05)

  def _reset_manager(self, delete_partial_writes: bool = False) -> None:
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except  # it re-raises the failed write
      pass
    if delete_partial_writes:  # before the new manager starts its own (racing) cleanup
      self._delete_partial_writes()
    self._closed = True  # a closed manager's save raises 'cannot schedule new futures'
    try:
      self.manager, self._closed = self._make_manager(), False
    except Exception as e:  # pylint: disable=broad-except  # storage still down: next retry
      log.warning('Could not reopen %s (%s: %s); the next retry reopens it', self.directory,
                  type(e).__name__, _first_line(e))

  # --- restore -----------------------------------------------------------------

  def _set_aside(self, step: int, aside: epath.Path) -> None:
    """Renames an unreadable step out of orbax's way (kept for inspection, never deleted), so
    that the resumed run can write that step number again."""
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set_aside_{step}')
    self.manager.reload()

  def _restore_data(self, step: int, data_iter: Any) -> None:
    """The data iterator's position, restored after (and apart from) the train state: a
    position this pipeline cannot take (another data config, or a checkpoint from a version
    with other iterator state) is no reason to set the checkpoint aside; it is a one-line
    error that says how to go on."""
    try:
      self.manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:  # pylint: disable=broad-except
      data_dir = self.directory / str(step) / 'data'
      raise config_lib.ConfigError(
          f'{data_dir}: the data iterator position does not fit this data pipeline '
          f'({type(e).__name__}: {" ".join(str(e).split())[:120]}; another data config, or a '
          'checkpoint written by an older version?); rerun with the data config it was written '
          f'with, or move {data_dir} away to resume with the data restarted') from e

  def _restore_state(self, step: int, abstract_state: Any, legacy) -> Any:
    """The state of one step; a checkpoint in an older layout through legacy (its abstract,
    a function to today's layout) when the tree does not match today's."""
    def read(abstract):
      args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
      return self.manager.restore(step, args=args)['state']
    try:
      return read(abstract_state)
    except Exception as e:  # pylint: disable=broad-except
      if legacy is None or 'tree structures do not match' not in str(e):
        raise
      old_abstract, to_today = legacy
      try:
        state = read(old_abstract)
      except Exception:  # pylint: disable=broad-except
        raise e from None  # not the older layout either: today's error
      log.info('Checkpoint %d is in the layout before frozen parts left the params; read as such',
               step)
      return to_today(state)

  def restore_latest(self, abstract_state: Any, data_iter: Any | None,
                     legacy: tuple[Any, Any] | None = None) -> tuple[Any, int] | None:
    """(state, step) from the newest readable checkpoint, or None when there is none.

    legacy: (abstract, function to today's layout) of an older layout this config also reads.
    """
    steps = ours.complete_steps(self.directory)[::-1]
    for step in steps:
      check_compatible(self.directory / str(step), self.config)
      has_data = (self.directory / str(step) / 'data').exists()
      try:
        restored = self._restore_state(step, abstract_state, legacy)
      except Exception as e:  # pylint: disable=broad-except
        if 'tree structures do not match' in str(e):
          # Readable, but a different state layout: the config changed (e.g. optim.clip_norm
          # switched on/off, scan_layers). A config mistake, not damage: touch nothing.
          raise config_lib.ConfigError(
              f'--config: the train state layout differs from the checkpoint at '
              f'{self.directory / str(step)} (a changed model or optim setting?); rerun with '
              f'the config it was written with, or use a new --workdir') from e
        aside = self.directory / f'unreadable_{step}'
        log.warning('Checkpoint %s is unreadable (%s: %s); moved to %s, trying the previous '
                        'one.', self.directory / str(step), type(e).__name__, str(e)[:200], aside)
        self._set_aside(step, aside)
        continue
      if data_iter is not None and not has_data:
        log.warning('Checkpoint %d has no data iterator state; data restarts.', step)
      elif data_iter is not None:
        self._restore_data(step, data_iter)
      log.info('Resumed from %s', self.directory / str(step))
      return restored, step
    if steps:
      raise RuntimeError(f'{self.directory}: no readable checkpoint among steps {steps}; '
                         'refusing to start over in a workdir that has checkpoints')
    return None
