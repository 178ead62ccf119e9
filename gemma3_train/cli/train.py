"""gemma3-train: train (or AOT-compile for a TPU topology) a Gemma 3 model from a config file.

A bad command line (a missing or broken config file, an unknown or mistyped --config.SECTION.KEY
override, an invalid config) prints one line, `gemma3-train: error: ...`, and exits with status 2.
Our modules log through the standard library under the `gemma3_train` logger, shown at INFO in
absl's format; the libraries (orbax and grain log through absl's logger, jax through its own)
stay at absl's default WARNING; `--verbose` shows their INFO lines too. Data errors met mid-run
are one line and exit status 2 as well; Ctrl-C is signals.py's (save, then exit 0).
`--help` shows our flags and the most-used config fields; `--helpfull` shows every field and the
libraries' flags.
"""

import os
import re
import sys
import textwrap

from absl import app
from absl import flags
from ml_collections import config_flags

from gemma3_train.cli import errors
from gemma3_train.cli import logs
from gemma3_train import config as config_lib

PROG = 'gemma3-train'


def _config_help() -> str:
  lines = ['Path to a config file (configs/*.py). Override any field with --config.SECTION.KEY=V.',
           'Fields (default  # meaning):']
  docs = config_lib.field_docs()
  for section, section_help in config_lib.sections():
    lines.append(f'  # {section}: {section_help}')
    lines += [f'    --config.{d.name}={d.default!r}  # {d.help}' for d in docs
              if d.name.startswith(f'{section}.')]
  return '\n'.join(lines)


_CONFIG = config_flags.DEFINE_config_file('config', None, _config_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (local or gs://): checkpoints, '
                               'metrics.jsonl, TensorBoard events. Rerunning resumes from it.')
_AOT_TOPOLOGY = flags.DEFINE_string('aot_topology', None, 'Compile the train step for this TPU '
                                    'topology (e.g. v5p-128, v5e-16) without TPUs and report '
                                    'memory and estimated step time instead of training.')
_AOT_REPORT = flags.DEFINE_string('aot_report', None, 'With --aot_topology: also write the '
                                  'report as JSON to this file (train.objective=grpo: the '
                                  "rollout's to FILE_rollout.json).")
_AOT_PLAN = flags.DEFINE_bool('aot_plan', False, 'With --aot_topology: try remat policy x '
                              'per-chip batch x (fsdp, tensor) and rank the plans that fit.')
_AOT_PLAN_REMAT = flags.DEFINE_string('aot_plan_remat', '', 'With --aot_plan: comma list of '
                                      'remat policies to try (default: all).')
_AOT_PLAN_ROWS = flags.DEFINE_string('aot_plan_rows', '', 'With --aot_plan: comma list of rows '
                                     'per batch shard to try (default: 1,2,4,8).')
_AOT_PLAN_TENSOR = flags.DEFINE_string('aot_plan_tensor', '', 'With --aot_plan: comma list of '
                                       'tensor-parallel degrees to try (default: 1,2,4,8).')
_AOT_PLAN_CONTEXT = flags.DEFINE_string('aot_plan_context', '', 'With --aot_plan: comma list '
                                        'of context-parallel degrees to try (default: 1, and '
                                        'for long rows those leaving 4096+ positions a shard).')
_AOT_PLAN_CONFIRM = flags.DEFINE_string('aot_plan_confirm', '', 'With --aot_plan: N > 0 '
                                        'predicts each candidate from compiles of the model '
                                        'shortened to 2 and 3 blocks, then compiles the best N '
                                        'whole (only those are printed); default 0: compile '
                                        'every candidate whole (as fast for scanned layers).')
_AOT_PLAN_LAYOUTS = flags.DEFINE_string('aot_plan_layouts', '', 'With --aot_plan: comma list '
                                        'of memory layouts REMAT_UNIT/SCAN_UNIT, tried in order '
                                        'per candidate until one fits (default: '
                                        'block/block,layer/layer; docs/memory.md).')
_AOT_PLAN_ALL = flags.DEFINE_bool('aot_plan_all', False, 'With --aot_plan: compile every '
                                  'candidate and list every plan that fits; default: best '
                                  'first, stopping once no candidate left can rank above the '
                                  'best plan (the same top plan, fewer compiles).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for '
                                   'multi-process runs off TPU/GKE (auto-detected there).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (0-based).')
_REMEASURE_PEAK = flags.DEFINE_bool(
    'remeasure_peak', False, "Measure this CPU's matmul peak (what MFU on CPU is against) again "
    "and keep it in train.cache_dir when higher than the cached one; then train if --workdir is "
    'given, else exit.')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show every library's INFO log lines too (orbax, "
                             'grain, jax); by default only ours and warnings.')

_HELP_FLAGS = ('-?', '--help', '--helpshort', '--helpfull', '--helpxml')
_SHORT_HELP_FLAGS = ('-?', '--help', '--helpshort')  # ours; --helpfull and --helpxml: absl's
# Shown by --help; every field is in --helpfull.
_COMMON_FIELDS = ('data.source', 'data.train_path', 'data.eval_path', 'data.format',
                  'data.seq_len', 'train.num_steps', 'train.global_batch_size',
                  'train.eval_every', 'optim.lr', 'optim.warmup_steps', 'checkpoint.every',
                  'checkpoint.init_from', 'logging.log_every')
_NEEDS_TOPOLOGY = (_AOT_PLAN, _AOT_REPORT, _AOT_PLAN_REMAT, _AOT_PLAN_ROWS, _AOT_PLAN_TENSOR,
                   _AOT_PLAN_CONFIRM, _AOT_PLAN_LAYOUTS)
_OVERRIDE = re.compile(r'--?(?:no)?config\.([^=]*)')


def main(argv) -> None:
  if _VERBOSE.value:
    logs.verbose()
  if len(argv) > 1:
    errors.fail(PROG, f'unexpected arguments {argv[1:]}; fields are set with '
                '--config.SECTION.KEY=VALUE')
  for holder in _NEEDS_TOPOLOGY:
    if holder.value and not _AOT_TOPOLOGY.value:
      errors.fail(PROG, f'--{holder.name} needs --aot_topology, e.g. --aot_topology=v5p-128')
  if _CONFIG.value is None:
    errors.fail(PROG, '--config is required, e.g. --config=configs/tiny.py')
  try:
    config = config_lib.from_config_dict(_CONFIG.value)
  except config_lib.ConfigError as e:
    errors.fail(PROG, str(e))
  # aot and train load jax, flax and orbax (~5 s): imported here so that --help and a bad
  # command line answer at once.
  if _AOT_TOPOLOGY.value:
    from gemma3_train.planning import aot  # pylint: disable=g-import-not-at-top
    from gemma3_train.planning import plan  # pylint: disable=g-import-not-at-top
    try:
      space = plan.parse_plan_space(_AOT_PLAN_REMAT.value, _AOT_PLAN_ROWS.value,
                                    _AOT_PLAN_TENSOR.value, _AOT_PLAN_CONFIRM.value,
                                    _AOT_PLAN_LAYOUTS.value, _AOT_PLAN_ALL.value,
                                    _AOT_PLAN_CONTEXT.value)
      if _AOT_PLAN.value:
        plan.main(config, _AOT_TOPOLOGY.value, report_path=_AOT_REPORT.value, space=space)
      else:
        aot.main(config, _AOT_TOPOLOGY.value, report_path=_AOT_REPORT.value)
        if config.train.objective == 'grpo':  # rollouts share the mesh: their programs too
          from gemma3_train.planning import rollout_aot  # pylint: disable=g-import-not-at-top
          rollout_aot.main(config, _AOT_TOPOLOGY.value, report_path=_AOT_REPORT.value)
    except config_lib.ConfigError as e:
      errors.fail(PROG, str(e))
    return
  if _REMEASURE_PEAK.value:
    _remeasure_peak(config)
    if not _WORKDIR.value:
      return
  if not _WORKDIR.value:
    errors.fail(PROG, '--workdir is required to train, e.g. --workdir=/tmp/run')
  workdir = _WORKDIR.value
  if '://' not in workdir:  # orbax wants absolute paths; a relative one is the current dir's
    workdir = os.path.abspath(workdir)
  _train(config, workdir)


def _remeasure_peak(config: config_lib.Config) -> None:
  """--remeasure_peak: one line, the cached peak after a fresh measurement."""
  from gemma3_train.infra import cpu_peak  # pylint: disable=g-import-not-at-top
  dtype, cache = config.model.dtype, config.train.cache_dir
  tflops, measured = cpu_peak.cached_cpu_matmul_peak(dtype, cache, remeasure=True)
  where = f' in {cache}/cpu_peak.json' if cache else ' (train.cache_dir is off: not kept)'
  print(f'CPU matmul peak ({dtype}): {tflops * 1e3:.1f} GFLOP/s, measured {measured}{where}',
        flush=True)


def _train(config: config_lib.Config, workdir: str) -> None:
  """Runs train.train_and_evaluate; what a user's config, files or data can cause is one line."""
  from gemma3_train.training import checkpoint  # pylint: disable=g-import-not-at-top
  from gemma3_train import data  # pylint: disable=g-import-not-at-top
  from gemma3_train.infra import lease  # pylint: disable=g-import-not-at-top
  from gemma3_train.infra import signals  # pylint: disable=g-import-not-at-top
  from gemma3_train.infra import storage  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import loop as train  # pylint: disable=g-import-not-at-top
  train.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train_and_evaluate(config, workdir)
  except (config_lib.ConfigError, lease.LeaseHeldError) as e:  # held: writes nothing
    errors.fail(PROG, str(e))
  except storage.StorageError as e:  # a full disk, storage down past the retries
    errors.fail(PROG, str(e), code=1)
  except data.DataError as e:  # bad data met mid-run; its async checkpoint write has finished
    step = checkpoint.latest_step(workdir)
    errors.fail(PROG, f'{e}; ' + (f'the checkpoint at step {step} in {workdir}/checkpoints is '
                                  'intact: fix the data and rerun to resume' if step is not None
                                  else 'nothing was saved'))
  except KeyboardInterrupt:  # Ctrl-C before the loop's handler was installed (or multi-process)
    errors.say(PROG, 'interrupted; exiting without saving')
    sys.exit(signals.EXIT_INTERRUPTED)
  except FloatingPointError as e:  # a diverged run: say so plainly, exit non-zero
    errors.fail(PROG, str(e), code=1)


def _check_command_line(args: list[str]) -> None:
  """Fails (exit 2) on an unknown override field or a config file that does not load.

  absl reports both later, in text that names neither the whole field nor the file's path.
  """
  fields = [d.name for d in config_lib.field_docs()]
  path = None
  for i, arg in enumerate(args):
    if arg == '--':
      break
    if arg.split('=', 1)[0] in ('--config', '-config'):
      path = arg.split('=', 1)[1] if '=' in arg else (args[i + 1] if i + 1 < len(args) else '')
    elif match := _OVERRIDE.match(arg):
      name = match.group(1)
      if name not in fields:  # another trainer's name for a field maps to ours (aliases.py)
        errors.fail(PROG, f'--config.{name}: unknown config field' +
                    config_lib.field_hint(name, '--config.'))
  if path:
    try:
      config_lib.load_config_dict(path)
    except config_lib.ConfigError as e:
      errors.fail(PROG, f'--config={e}')


def _short_help() -> str:
  """--help: our flags and the most-used config fields (absl's would list neither when run as
  the `gemma3-train` script, whose main module defines no flags)."""
  def wrap(text: str) -> str:
    return textwrap.fill(text, 100, initial_indent='  ', subsequent_indent='      ',
                         break_on_hyphens=False)
  out = [__doc__.strip(), '', 'Usage: gemma3-train --config=configs/tiny.py --workdir=DIR '
         '[--config.SECTION.KEY=VALUE ...]', '', 'flags:']
  for holder in (_CONFIG, _WORKDIR, _AOT_TOPOLOGY, _AOT_REPORT, _AOT_PLAN, _AOT_PLAN_REMAT,
                 _AOT_PLAN_ROWS, _AOT_PLAN_TENSOR, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID,
                 _VERBOSE):
    flag = flags.FLAGS[holder.name]
    text = flag.help.splitlines()[0] if holder is _CONFIG else flag.help
    out.append(wrap(f'--{holder.name}: {" ".join(text.split())}'))
  out += ['', 'Most-used config fields (default  # meaning):']
  docs = {d.name: d for d in config_lib.field_docs()}
  out += [wrap(f'--config.{n}={docs[n].default!r}  # {docs[n].help}')
          for n in _COMMON_FIELDS]
  out += ['', 'Try --helpfull for every config field and the libraries\' flags (--verbosity, '
          '--logger_levels, ...).']
  return '\n'.join(out)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag or override is one line on stderr and exit code 2."""
  if any(a.split('=', 1)[0] in _SHORT_HELP_FLAGS for a in argv[1:]):
    print(_short_help())
    sys.exit(0)
  asks_help = any(a.split('=', 1)[0] in _HELP_FLAGS for a in argv[1:])
  if not asks_help:
    _check_command_line(argv[1:])
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl exits 1 after printing --help/--helpfull; that is a success
    if asks_help and e.code == 1:
      sys.exit(0)
    raise
  except Exception as e:  # pylint: disable=broad-except  # e.g. `could not convert to float`
    errors.fail(PROG, ' '.join(str(e).split()))


def run() -> None:
  logs.setup(absl_app=True)  # before app.run, so that --verbosity and --logger_levels still win
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
