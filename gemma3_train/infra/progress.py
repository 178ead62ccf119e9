"""One progress line on stderr for a long job, and the duration format the logs share.

  eval eval: 30/100 batches (30%) | 4.2 batches/s | ETA 0m17s
  eval eval: 100/100 batches (100%) | 4.3 batches/s | took 0m23s

On a terminal the line is redrawn in place (at most every TTY_EVERY seconds); elsewhere (a log
file, a pipe) the first update is written at once and then one line at most every EVERY
seconds, none for the last count of a known total (the final line follows). close() writes the
final line, once, with the time taken instead of the ETA. The rate counts only what this run did
(a resumed job's earlier work, `done=` at the start, is left out).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

TTY_EVERY = 0.2  # seconds between redraws on a terminal
EVERY = 5.0  # seconds between lines elsewhere
clock = time.monotonic  # the time source (a test swaps in a fake clock)


def duration(seconds: float) -> str:
  """'1h05m' from an hour or more, else '4m09s'."""
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def _rate(x: float) -> str:
  return f'{x:,.0f}' if x >= 100 else f'{x:.3g}'


def _isatty(stream: TextIO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


class Progress:
  """'<what>: done/total unit (pct) | rate unit/s | [note |] ETA' (total None: no pct, no ETA).

  update(done) sets the count; close() (or leaving a `with` block) writes the final line.
  """

  def __init__(self, what: str, total: int | None, unit: str, *, done: int = 0,
               every: float | None = None, stream: TextIO | None = None):
    self.what, self.total, self.unit = what, total or None, unit
    self.stream = sys.stderr if stream is None else stream
    self.tty = _isatty(self.stream)
    self.every = (TTY_EVERY if self.tty else EVERY) if every is None else every
    self.done = self._done_at_start = done
    self.note = ''
    self.start = clock()
    self._last: float | None = None  # when the last line was written
    self._width = 0  # length of the line drawn on a terminal
    self._closed = False

  @property
  def elapsed(self) -> float:
    """Seconds since the start (never 0: a safe divisor)."""
    return max(clock() - self.start, 1e-9)

  def line(self, final: bool = False) -> str:
    elapsed = self.elapsed
    rate = (self.done - self._done_at_start) / elapsed
    if self.total:
      count = f'{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)'
    else:
      count = f'{self.done} {self.unit}'
    parts = [f'{self.what}: {count}', f'{_rate(rate)} {self.unit}/s']
    if self.note:
      parts.append(self.note)
    if final:
      parts.append(f'took {duration(elapsed)}')
    elif self.total and rate > 0:
      parts.append(f'ETA {duration(max(self.total - self.done, 0) / rate)}')
    return ' | '.join(parts)

  def update(self, done: int, note: str = '') -> None:
    """Sets the count (and a note shown before the ETA); writes a line when one is due."""
    self.done, self.note = done, note
    now = clock()
    if self._closed or (self._last is not None and now - self._last < self.every):
      return
    if not self.tty and self.total and done >= self.total:
      return  # close() writes this count's line, with the time taken: not twice in a log
    self._last = now
    self._write(self.line(), final=False)

  def close(self, note: str | None = None) -> None:
    """Writes the final line (once)."""
    if self._closed:
      return
    self._closed = True
    if note is not None:
      self.note = note
    self._write(self.line(final=True), final=True)

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _write(self, line: str, final: bool) -> None:
    if self.tty:  # over the last line, blanking what a shorter one leaves
      pad = ' ' * max(self._width - len(line), 0)
      self._width = len(line)
      self.stream.write(f'\r{line}{pad}' + ('\n' if final else ''))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()
