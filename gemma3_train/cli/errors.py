"""How every gemma3-* command reports a user's mistake: one line `PROG: error: ...` on stderr
and exit status 2 (EXIT_USAGE), never a traceback.

  with errors.exit_on(PROG, config_lib.ConfigError, OSError):  # a command's run()
    main(sys.argv[1:])

  errors.fail(PROG, '--ckpt is required')  # or at once, with a message built on the spot
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, NoReturn

EXIT_USAGE = 2  # a bad command line, a missing or bad file, bad data: what the user can fix


class UsageError(ValueError):
  """A bad command line (printed as one line, exit status 2)."""


def say(prog: str, line: str) -> None:
  """`PROG: line` on stderr in one write, so that a log record from another thread cannot
  split it."""
  sys.stderr.flush()
  sys.stderr.write(f'{prog}: {line}\n')
  sys.stderr.flush()


def first_line(e: BaseException) -> str:
  """An exception's message as one line: its first, or the exception's type when empty."""
  lines = str(e).splitlines()
  return lines[0] if lines and lines[0] else type(e).__name__


def fail(prog: str, message: str, code: int = EXIT_USAGE) -> NoReturn:
  """Prints `PROG: error: message` and exits with `code`."""
  say(prog, f'error: {message}')
  sys.exit(code)


@contextlib.contextmanager
def exit_on(prog: str, *kinds: type[BaseException]) -> Iterator[None]:
  """Turns an exception of one of `kinds` (default: UsageError) into
  `PROG: error: <its first line>` and exit status 2."""
  kinds = kinds or (UsageError,)
  try:
    yield
  except kinds as e:
    fail(prog, first_line(e))


class ArgParser(argparse.ArgumentParser):
  """argparse, but a usage error is one line `PROG: error: ...` and exit status 2 (argparse's
  own prints the usage first)."""

  def error(self, message):
    fail(self.prog, message)


class RaisingArgParser(argparse.ArgumentParser):
  """argparse, but a usage error raises UsageError (so that main() called from Python raises
  instead of exiting; run()'s exit_on prints it under the command's name, not a subcommand's)."""

  def error(self, message):
    raise UsageError(message)
