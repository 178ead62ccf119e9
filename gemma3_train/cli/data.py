"""gemma3-data: the command line of data/prepare.py (whose docstring is --help's description).

  gemma3-data prepare --src=FILES --dst=DIR [--format=text|chat] [--workers=N] ...
      [--teacher=PATH --seq_len=L [--teacher_samples=256 | --teacher_topk=K] ...]

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
  t = pp.add_argument_group('teacher targets (train.objective=distill with distill.teacher=\'\')')
  t.add_argument('--teacher', default='', help='A teacher checkpoint (as distill.teacher): '
                 'store its distillation targets of every position with the tokens.')
  t.add_argument('--teacher_samples', type=int, default=0, help='Ids drawn per position (as '
                 'distill.loss=sampled, distill.samples); default 256 unless --teacher_topk.')
  t.add_argument('--teacher_topk', type=int, default=0, help="The teacher's k most probable "
                 'ids instead (as distill.loss=topk, distill.samples=K).')
  t.add_argument('--teacher_temperature', type=float, default=1.0,
                 help='As distill.temperature.')
  t.add_argument('--teacher_seed', type=int, default=0, help='The draws\' seed: train.seed of '
                 'the online run that would draw the same ids.')
  t.add_argument('--teacher_dtype', default='bfloat16', choices=('bfloat16', 'float32', 'int8'),
                 help="The teacher's params and compute; int8: the seven projections int8 "
                 'per output channel, the rest bfloat16 (held as distill.teacher_dtype=int8 '
                 'holds it), computing in bfloat16.')
  t.add_argument('--seq_len', type=int, default=0, help='data.seq_len of the runs that read '
                 'the targets (documents are split at it, as training splits them).')
  t.add_argument('--teacher_rows', type=int, default=8, help='Rows of --seq_len per forward, '
                 'split over the local devices the teacher is sharded over (a multiple of '
                 'their count).')
  return p


def _labeler(args: argparse.Namespace):
  """The teacher pass of --teacher, or None."""
  if not args.teacher:
    if args.teacher_samples or args.teacher_topk:
      raise errors.UsageError('--teacher_samples/--teacher_topk: expected with --teacher=PATH')
    return None
  if args.teacher_samples and args.teacher_topk:
    raise errors.UsageError('--teacher_topk: expected alone, not with --teacher_samples')
  if args.seq_len < 1:
    raise errors.UsageError(f'--seq_len={args.seq_len}: expected the runs\' data.seq_len '
                            '(>= 1) with --teacher')
  k = args.teacher_topk or args.teacher_samples or 256
  if not 1 <= k <= 65535 or args.teacher_temperature <= 0 or args.teacher_rows < 1:
    raise errors.UsageError(f'--teacher_samples/--teacher_topk={k}, --teacher_temperature='
                            f'{args.teacher_temperature}, --teacher_rows={args.teacher_rows}: '
                            'expected k in [1, 65535], a temperature > 0, rows >= 1')
  from gemma3_train.training import teacher_labels  # pylint: disable=g-import-not-at-top
  spec = teacher_labels.Spec(
      path=args.teacher, loss='topk' if args.teacher_topk else 'sampled', samples=k,
      temperature=args.teacher_temperature, seed=args.teacher_seed, seq_len=args.seq_len,
      dtype=args.teacher_dtype)
  return teacher_labels.Labeler(spec, rows=args.teacher_rows)


def main(argv: list[str]) -> dict[str, Any]:
  """Runs the command; returns prepare's manifest ({} when stopped by --max_shards)."""
  args = _parser().parse_args(argv)
  if args.rows_per_shard < 1:
    raise errors.UsageError(f'--rows_per_shard={args.rows_per_shard}: expected >= 1')
  if args.workers < 1:
    raise errors.UsageError(f'--workers={args.workers}: expected >= 1')
  return prepare.prepare(args, _labeler(args))


def run() -> None:
  logs.setup()  # the trainer's absl format (cli/logs.py)
  with errors.exit_on(PROG, errors.UsageError, config_lib.ConfigError, sources.DataError,
                      OSError):
    main(sys.argv[1:])


if __name__ == '__main__':
  run()
