"""Stop requests from signals: SIGTERM (what GKE and TPU VMs send before preemption) and Ctrl-C.

SIGTERM and a first Ctrl-C (SIGINT) each log one line and set an event; the train loop then
checkpoints at the next step boundary and exits 0. A second Ctrl-C exits at once, status 130,
with one line on stderr, keeping the last complete checkpoint (an unfinished write is never
picked up: orbax renames a step into place only when it is complete).

"At once" holds even while the main thread is inside a long XLA call (compiling, a step), where
Python-level signal handlers cannot run: CPython's C-level handler writes each caught signal's
number to the wakeup fd, and a daemon thread reading it does the work.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process killed by Ctrl-C

_MESSAGES = {
    signal.SIGTERM: 'Received SIGTERM: will checkpoint at the next step and exit.',
    signal.SIGINT: 'Ctrl-C: will checkpoint at the next step and exit (Ctrl-C again to exit '
                   'at once without saving).',
}


class StopRequests:
  """`requested` is set by SIGTERM or the first Ctrl-C; `reason` says which."""

  def __init__(self):
    self.requested = threading.Event()
    self.reason = ''
    self._interrupts = 0

  def install(self) -> bool:
    """Takes over SIGTERM and SIGINT; False (nothing installed) off the main thread."""
    if threading.current_thread() is not threading.main_thread():
      return False
    read_end, write_end = socket.socketpair()
    write_end.setblocking(False)  # set_wakeup_fd requires it
    self._sockets = (read_end, write_end)  # kept alive for the process's lifetime
    for signum in _MESSAGES:
      signal.signal(signum, _ignore)  # a Python handler, so that the wakeup fd is written
    signal.set_wakeup_fd(write_end.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=self._watch, args=(read_end,), name='gemma3_train-signals',
                     daemon=True).start()
    return True

  def _watch(self, read_end: socket.socket) -> None:
    while True:
      for signum in read_end.recv(64):
        self._on(signal.Signals(signum))

  def _on(self, signum: signal.Signals) -> None:
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts > 1:
        sys.stderr.write('gemma3-train: interrupted again: exiting now without saving; the '
                         'last complete checkpoint is kept.\n')
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access  # skip all cleanup
    if signum in _MESSAGES and not self.requested.is_set():
      self.reason = 'Ctrl-C' if signum == signal.SIGINT else signum.name
      log.warning(_MESSAGES[signum])
      self.requested.set()


def _ignore(signum, frame) -> None:
  del signum, frame  # handled by StopRequests._watch


def ignore_interrupts_in_worker(worker_index: int, worker_count: int) -> None:
  """grain worker_init_fn: Ctrl-C in a terminal signals the whole process group; the main
  process decides what an interrupt means, and its workers must keep feeding it until then."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
