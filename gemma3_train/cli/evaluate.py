"""gemma3-eval: loss, perplexity and token accuracy over a dataset; multiple-choice accuracy.

  gemma3-eval --ckpt=DIR [--config=configs/x.py] [--split=eval] [--max_batches=N]
  gemma3-eval --ckpt=DIR --choices=FILE.jsonl [--output=scores.json]

The dataset is whatever the config's data section reads (any source, text or chat; default:
the bundled corpus's eval split), batched by train.global_batch_size rows of data.seq_len; the
first train.eval_steps batches by default, as the trainer's evals (--max_batches=N: N of them,
--max_batches=0: the whole split);
--config.data.*/--config.train.global_batch_size override fields, --config.model.* the model's
non-shape fields (dtype). The checkpoint fixes the model shape. --choices scores a JSONL of
{"context", "choices", "answer"} rows by summed log-likelihood (inference/scoring.py). The
result is JSON on stdout, or in --output, with per-row scores for --choices; what is read and
one progress line with its rate and ETA go to stderr (redrawn in place on a terminal, a line
every 5 s in a log).
A bad command line, a missing checkpoint or a bad file is one line `gemma3-eval: error: ...` and
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from gemma3_train.cli import errors
from gemma3_train.cli import logs
from gemma3_train.cli import sample as sample_cli
from gemma3_train import config as config_lib

PROG = 'gemma3-eval'


def _parser() -> errors.ArgParser:
  p = errors.ArgParser(prog=PROG, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--ckpt', required=True, help='checkpoint or workdir to evaluate')
  p.add_argument('--config', default='', help='config file whose data section names the '
                 'dataset (default: the built-in defaults, the bundled corpus)')
  p.add_argument('--split', default='eval', choices=('eval', 'train'), help='dataset split')
  p.add_argument('--max_batches', type=int, default=None, help="stop after N batches (default: "
                 "the config's train.eval_steps; 0 = the whole split)")
  p.add_argument('--choices', default='', help='JSONL of {context, choices, answer} rows: '
                 'multiple-choice log-likelihood scoring instead of the dataset')
  p.add_argument('--batch_size', type=int, default=8, help='--choices: sequences per batch')
  p.add_argument('--tokenizer', default='', help="--choices: SentencePiece model ('' = the "
                 "config's data.tokenizer_path)")
  p.add_argument('--output', default='', help='write the JSON result here (default: stdout)')
  return p


def _reading(c: config_lib.Config, split: str, max_batches: int, default: bool) -> str:
  """The stderr line that says how much of the split is read, and how to read more."""
  rows = f'{c.train.global_batch_size} x {c.data.seq_len} tokens'
  if not max_batches:
    return f'{PROG}: the whole {split} split, in batches of {rows} (--max_batches=N: N batches)'
  why = ("the config's train.eval_steps; --max_batches=N for N, 0 for the whole split"
         if default else '--max_batches; 0 for the whole split')
  return f'{PROG}: {max_batches} batches of {rows} from the {split} split ({why})'


def main(argv: Sequence[str], stdout=None) -> dict:
  stdout = sys.stdout if stdout is None else stdout
  rest, overrides = sample_cli.split_overrides(
      argv, ('model', 'data', 'train'),
      tuple(f'model.{f}' for f in config_lib.MODEL_SHAPE_FIELDS))
  args = _parser().parse_args(rest)
  if args.max_batches is not None and args.max_batches < 0:
    raise errors.UsageError(f'--max_batches={args.max_batches}: expected >= 0')
  if args.batch_size < 1:
    raise errors.UsageError(f'--batch_size={args.batch_size}: expected >= 1')
  cd = (config_lib.load_config_dict(args.config) if args.config
        else config_lib.default_config_dict())
  for section in ('data', 'train'):
    cd[section].update(overrides.get(section, {}))
  c = config_lib.from_config_dict(cd)
  rows = None
  if args.choices:
    from gemma3_train.inference import scoring as evaluate  # pylint: disable=g-import-not-at-top
    try:
      rows = evaluate.read_choices(args.choices)
    except ValueError as e:
      raise errors.UsageError(f'--choices: {e}') from None
  # Imported here: a bad command line answers before jax loads.
  from gemma3_train import convert  # pylint: disable=g-import-not-at-top
  from gemma3_train.inference import scoring as evaluate  # pylint: disable=g-import-not-at-top
  from gemma3_train import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    model = convert.load(args.ckpt, **overrides.get('model', {}))
  except (convert.ConversionError, OSError) as e:
    raise errors.UsageError(f'--ckpt={args.ckpt}: {errors.first_line(e)}') from None
  c = c.replace(model={k: getattr(model.cfg, k) for k in config_lib.MODEL_SHAPE_FIELDS})
  if rows is not None:
    tok = data_lib.Tokenizer(args.tokenizer or c.data.tokenizer_path)
    result = evaluate.multiple_choice(model, rows, tok, batch_size=args.batch_size)
  else:
    max_batches = c.train.eval_steps if args.max_batches is None else args.max_batches
    print(_reading(c, args.split, max_batches, args.max_batches is None), file=sys.stderr,
          flush=True)
    try:
      result = evaluate.dataset_metrics(model, c, split=args.split, max_batches=max_batches)
    except data_lib.DataError as e:
      raise errors.UsageError(str(e)) from None
  result = {'ckpt': args.ckpt, **result}
  text = json.dumps(result, indent=2)
  if args.output:
    with open(args.output, 'w') as f:
      f.write(text + '\n')
    summary = {k: v for k, v in result.items() if k != 'rows'}
    print(json.dumps(summary), file=stdout)
  else:
    print(text, file=stdout)
  return result


def run() -> None:
  logs.setup()
  with errors.exit_on(PROG, errors.UsageError, config_lib.ConfigError, OSError):
    main(sys.argv[1:])


if __name__ == '__main__':
  run()
