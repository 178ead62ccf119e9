"""gemma3-data: the command line of data/prepare.py (whose docstring is --help's description).

  gemma3-data prepare --src=FILES --dst=DIR [--format=text|chat] [--workers=N] ...

A bad command line, a missing input file or bad data is one line `gemma3-data: error: ...` and
exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gemma3_train.cli import errors
from gemma3_train.cli import logs
from gemma3_train import config as config_lib
from gemma3_train.data import prepare
from gemma3_train.data import sources

PROG = 'gemma3-data'


def _parser() -> argparse.ArgumentParser:
  # A usage error raises (main() called from Python raises too); run() prints it as one line
  # under our name, not the subcommand's.
  p = errors.RaisingArgParser(prog=PROG, description=prepare.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True, metavar='{prepare}',
                         parser_class=errors.RaisingArgParser)
  pp = sub.add_parser('prepare', help='Tokenize a corpus once into ArrayRecord shards.')
  pp.add_argument('--src', required=True, help='File, glob or comma list (as data.train_path).')
  pp.add_argument('--dst', required=True, help='Output directory (local or gs://); rerun the '
                  'same command to resume it.')
  pp.add_argument('--source', default='auto', choices=('auto', 'jsonl', 'parquet',
                                                       'arrayrecord'),
                  help='Input kind (auto: from the first file name; default jsonl).')
  pp.add_argument('--format', default='text', choices=('text', 'chat'), help='As data.format.')
  pp.add_argument('--text_field', default='text', help='As data.text_field.')
  pp.add_argument('--messages_field', default='messages', help='As data.messages_field.')
  pp.add_argument('--tokenizer_path', default='', help="As data.tokenizer_path ('' = the "
                  'bundled Gemma 3 tokenizer); training must use the same one.')
  pp.add_argument('--rows_per_shard', type=int, default=50_000, help='Input rows per shard.')
  pp.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                  help='Processes writing shards (default: one per CPU).')
  pp.add_argument('--max_shards', type=int, default=0, help='Write at most N more shards in '
                  'this run, then stop (0 = all); for bounded jobs on preemptible machines.')
  return p


def main(argv: list[str]) -> dict[str, Any]:
  """Runs the command; returns prepare's manifest ({} when stopped by --max_shards)."""
  args = _parser().parse_args(argv)
  if args.rows_per_shard < 1:
    raise errors.UsageError(f'--rows_per_shard={args.rows_per_shard}: expected >= 1')
  if args.workers < 1:
    raise errors.UsageError(f'--workers={args.workers}: expected >= 1')
  return prepare.prepare(args)


def run() -> None:
  logs.setup()  # the trainer's absl format (cli/logs.py)
  with errors.exit_on(PROG, errors.UsageError, config_lib.ConfigError, sources.DataError,
                      OSError):
    main(sys.argv[1:])


if __name__ == '__main__':
  run()
