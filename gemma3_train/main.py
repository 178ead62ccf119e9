"""gemma3-train: train (or AOT-compile for a TPU topology) a Gemma 3 model from a config file."""

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from gemma3_train import config as config_lib

_REPO_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / 'configs'


def _config_help() -> str:
  base = _REPO_CONFIGS / 'base.py'
  lines = ['Path to a config file (configs/*.py). Override any field with --config.SECTION.KEY=V.']
  if base.exists():
    lines.append('Fields (default  # meaning):')
    for name, default, doc in config_lib.field_docs(base.read_text()):
      lines.append(f'  --config.{name}={default}  # {doc}')
  return '\n'.join(lines)


_CONFIG = config_flags.DEFINE_config_file('config', None, _config_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (local or gs://): checkpoints, '
                               'metrics.jsonl, TensorBoard events. Rerunning resumes from it.')
_AOT_TOPOLOGY = flags.DEFINE_string('aot_topology', None, 'Compile the train step for this TPU '
                                    'topology (e.g. v5p-128, v5e-16) without TPUs and report memory '
                                    'and estimated step time instead of training.')
_AOT_REPORT = flags.DEFINE_string('aot_report', None, 'With --aot_topology: also write the '
                                  'report as JSON to this file.')
_AOT_PLAN = flags.DEFINE_bool('aot_plan', False, 'With --aot_topology: try remat policy x '
                              'per-chip batch x (fsdp, tensor) and rank the plans that fit.')
_AOT_PLAN_REMAT = flags.DEFINE_string('aot_plan_remat', '', 'With --aot_plan: comma list of '
                                      'remat policies to try (default: all).')
_AOT_PLAN_ROWS = flags.DEFINE_string('aot_plan_rows', '', 'With --aot_plan: comma list of rows '
                                     'per batch shard to try (default: 1,2,4,8).')
_AOT_PLAN_TENSOR = flags.DEFINE_string('aot_plan_tensor', '', 'With --aot_plan: comma list of '
                                       'tensor-parallel degrees to try (default: 1,2,4,8).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for '
                                   'multi-process runs off TPU/GKE (auto-detected there).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (0-based).')


def _fail(message: str) -> None:
  print(f'gemma3-train: error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; fields are set with --config.SECTION.KEY=VALUE')
  if _CONFIG.value is None:
    _fail('--config is required, e.g. --config=configs/tiny.py')
  try:
    config = config_lib.from_config_dict(_CONFIG.value)
  except config_lib.ConfigError as e:
    _fail(str(e))
  except OSError as e:  # config_flags defers a missing/broken config file to first access
    path = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--config=')), '?')
    _fail(f'--config={path}: cannot load the config file ({e.__class__.__name__})')
  if _AOT_TOPOLOGY.value:
    from gemma3_train import aot  # pylint: disable=g-import-not-at-top
    try:
      space = aot.parse_plan_space(_AOT_PLAN_REMAT.value, _AOT_PLAN_ROWS.value,
                                   _AOT_PLAN_TENSOR.value)
      aot.main(config, _AOT_TOPOLOGY.value, report_path=_AOT_REPORT.value, plan=_AOT_PLAN.value,
               space=space)
    except config_lib.ConfigError as e:
      _fail(str(e))
    return
  if not _WORKDIR.value:
    _fail('--workdir is required to train, e.g. --workdir=/tmp/run')
  from gemma3_train import train  # pylint: disable=g-import-not-at-top
  train.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except config_lib.ConfigError as e:
    _fail(str(e))
  except FloatingPointError as e:  # a diverged run: say so plainly, exit non-zero
    print(f'gemma3-train: error: {e}', file=sys.stderr)
    sys.exit(1)


def _add_config_root_to_path(argv: list[str]) -> None:
  """Config files say `from configs import base`: make their parent importable."""
  for arg in argv:
    if arg.startswith('--config='):
      root = pathlib.Path(arg.split('=', 1)[1].split(':')[0]).resolve().parent.parent
      if str(root) not in sys.path:
        sys.path.insert(0, str(root))
  if str(_REPO_CONFIGS.parent) not in sys.path:
    sys.path.append(str(_REPO_CONFIGS.parent))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag or override is one line on stderr and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl exits 1 after printing --help/--helpfull; that is a success
    if any(a.startswith(('--help', '-h', '-?')) for a in argv[1:]) and e.code == 1:
      sys.exit(0)
    raise
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
    if 'Did you mean' in text or isinstance(e, (KeyError, AttributeError)):
      hint = text.split('Did you mean')[-1].strip(' \'"\n') if 'Did you mean' in text else ''
      where = overrides[-1] if overrides else '--config'
      _fail(f'{where}: unknown config field' + (f'; did you mean {hint}' if hint else ''))
    _fail(' '.join(text.split()))


class _OurInfoOnly:
  """Shows our INFO lines; libraries (orbax, grain, jax) only reach the log at WARNING."""

  def filter(self, record) -> bool:
    return record.levelno >= logging.WARNING or 'gemma3_train' in record.pathname


def run() -> None:
  _add_config_root_to_path(sys.argv)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OurInfoOnly())
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
