"""gemma3-eval: loss, perplexity and token accuracy over a dataset; multiple-choice accuracy.

  gemma3-eval --ckpt=DIR [--config=configs/x.py] [--split=eval] [--max_batches=N]
  gemma3-eval --ckpt=DIR --choices=FILE.jsonl [--output=scores.json]
  gemma3-eval --ckpt=DIR --tasks=hellaswag,arc_easy [--num_fewshot=N] [--limit=N]
              [--include_path=DIR] [--output=results.json]

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
--tasks runs lm-evaluation-harness tasks by the harness's names (or local task YAMLs under
--include_path) on our model (inference/harness.py; the `eval` extra installs lm-eval); the
result is the harness's own results JSON (docs/evaluation.md).
A bad command line, a missing checkpoint or a bad file is one line `gemma3-eval: error: ...` and
exit status 2; so is a harness task whose dataset is not available (it names the dataset).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

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
  p.add_argument('--tasks', default='', help='comma-separated lm-evaluation-harness task names '
                 '(e.g. hellaswag,arc_easy): run them instead of the dataset')
  p.add_argument('--num_fewshot', type=int, default=None, help="--tasks: few-shot examples "
                 "(default: each task's own)")
  p.add_argument('--limit', type=float, default=None, help='--tasks: at most N documents per '
                 'task (a value below 1: that fraction of them)')
  p.add_argument('--include_path', default='', help='--tasks: a folder of local task YAMLs')
  p.add_argument('--apply_chat_template', action='store_true', help='--tasks: prompts in the '
                 'Gemma 3 chat format (instruction-tuned models)')
  p.add_argument('--batch_size', type=int, default=8, help='--choices, --tasks: sequences per '
                 'batch')
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


def _tasks(args) -> tuple[list[str], Any]:
  """(--tasks names, the harness module), the names checked against the harness's index
  before the checkpoint loads."""
  if args.limit is not None and args.limit <= 0:
    raise errors.UsageError(f'--limit={args.limit:g}: expected > 0')
  try:
    from gemma3_train.inference import harness  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if not (e.name or '').startswith('lm_eval'):
      raise
    raise errors.UsageError("--tasks needs lm-evaluation-harness: pip install "
                            "'gemma3-train[eval]'") from None
  tasks = harness.task_names(args.tasks)
  try:
    harness.task_manager(tuple(tasks), args.include_path)
  except harness.HarnessError as e:
    raise errors.UsageError(f'--tasks: {e}') from None
  return tasks, harness


def _run_tasks(model, c: config_lib.Config, args, tasks: list[str], harness) -> dict:
  """The harness's results dict for --tasks, run on a mesh of all devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from gemma3_train.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  c = c.replace(train=dict(global_batch_size=jax.device_count()), optim=dict(grad_accum_steps=1))
  lm = harness.Gemma3LM(model, tokenizer_lib.Tokenizer(args.tokenizer or c.data.tokenizer_path),
                        batch_size=args.batch_size, mesh=sharding.make_mesh(c),
                        rules=sharding.parse_rules(c.mesh.rules))
  limit = None if args.limit is None else args.limit if args.limit < 1 else int(args.limit)
  try:
    results = harness.run_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=limit,
                                include_path=args.include_path,
                                apply_chat_template=args.apply_chat_template)
  except harness.HarnessError as e:
    raise errors.UsageError(f'--tasks: {e}') from None
  print(harness.table(results), file=sys.stderr, flush=True)
  return results


def _jsonable(x):
  """What the harness's results hold besides JSON types (numpy numbers, functions in task
  configs), as the harness writes them."""
  return x.item() if hasattr(x, 'item') else str(x)


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
  if args.tasks and args.choices:
    raise errors.UsageError('--tasks and --choices: give one of them')
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
  tasks, harness = _tasks(args) if args.tasks else ([], None)
  # Imported here: a bad command line answers before jax loads.
  from gemma3_train import convert  # pylint: disable=g-import-not-at-top
  from gemma3_train.inference import scoring as evaluate  # pylint: disable=g-import-not-at-top
  from gemma3_train import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    model = convert.load(args.ckpt, **overrides.get('model', {}))
  except (convert.ConversionError, OSError) as e:
    raise errors.UsageError(f'--ckpt={args.ckpt}: {errors.first_line(e)}') from None
  c = c.replace(model={k: getattr(model.cfg, k) for k in config_lib.MODEL_SHAPE_FIELDS})
  if tasks:
    result = _run_tasks(model, c, args, tasks, harness)
  elif rows is not None:
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
  text = json.dumps(result, indent=2, default=_jsonable)
  if args.output:
    with open(args.output, 'w') as f:
      f.write(text + '\n')
    summary = ({k: v for k, v in result.items() if k != 'rows'} if not tasks
               else {'ckpt': args.ckpt, 'results': result['results']})
    print(json.dumps(summary, default=_jsonable), file=stdout)
  else:
    print(text, file=stdout)
  return result


def run() -> None:
  logs.setup()
  with errors.exit_on(PROG, errors.UsageError, config_lib.ConfigError, OSError):
    main(sys.argv[1:])


if __name__ == '__main__':
  run()
