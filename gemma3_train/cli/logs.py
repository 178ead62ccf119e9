"""How every gemma3-* command logs: absl's format (`W1206 12:00:00.000 123 sources.py:73] ...`)
for every record, ours (the `gemma3_train` logger) from INFO, the libraries' (orbax, grain, jax)
from WARNING unless asked for more.

  logs.setup()  # first thing in an argparse command's run()
  logs.setup(absl_app=True)  # gemma3-train's, before app.run parses absl's flags
"""

from __future__ import annotations

import logging

from absl import flags
from absl import logging as absl_logging


def setup(*, absl_app: bool = False) -> None:
  """absl's handler on the root logger, in place of a plain `logging.basicConfig()` one (absl
  adds that when a library logs through it before any handler is set, e.g. at import time).

  A command that does not run absl.app (argparse's) takes absl's flag defaults as parsed: else
  absl's handler starts with 'WARNING: Logging before flag parsing goes to stderr.'"""
  root = logging.getLogger()
  for handler in list(root.handlers):
    if (type(handler) is logging.StreamHandler  # pylint: disable=unidiomatic-typecheck
        and getattr(handler.formatter, '_fmt', None) == logging.BASIC_FORMAT):
      root.removeHandler(handler)
  absl_logging.use_absl_handler()
  if not absl_app and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  # absl.app.run (gemma3-train) would raise absl's (the root logger's) level to INFO when no
  # --verbosity is given; set here, a --verbosity or --logger_levels flag still wins.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('gemma3_train').setLevel(logging.INFO)


def verbose() -> None:
  """Every library's INFO lines too (gemma3-train --verbose)."""
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.getLogger().setLevel(logging.INFO)
