"""The chip table, how jax device kinds map onto it, and TPU slice names and their GKE facts."""

import math
import pathlib
import subprocess
import sys
import types

import jax
import pytest

from gemma3_train.infra import hardware

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_chip_table_and_device_kinds():
  kinds = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5p': 'v5p', 'TPU v5': 'v5p',
           'TPU v6 lite': 'v6e', 'NVIDIA H100 80GB HBM3': 'h100', 'NVIDIA H200': 'h200'}
  for kind, key in kinds.items():
    assert hardware.chip_for_device(types.SimpleNamespace(device_kind=kind)) is hardware.CHIPS[key]
  assert hardware.chip_for_device(jax.devices('cpu')[0]) is None
  assert hardware.chip_for_device(types.SimpleNamespace(device_kind='NVIDIA H100 PCIe')) is None
  assert hardware.CHIPS['v5p'].peak_bf16_tflops == 459.0
  assert hardware.peak_tflops(jax.devices('cpu')[0]) is None
  assert hardware.peak_tflops(jax.devices('cpu')[0], override=0.07) == 0.07


def test_interconnect_per_chip():
  # GB/s into one chip: half the docs' bidirectional ICI figures (v4: the pod's all-reduce
  # bandwidth over its chips); DCN only where a page states it
  ici = {k: spec.ici_gbps for k, spec in hardware.TPU_KINDS.items()}
  assert ici == pytest.approx({'v4': 268.55, 'v5e': 200.0, 'v5p': 600.0, 'v6e': 400.0}, rel=1e-4)
  dcn = {k: spec.dcn_gbps for k, spec in hardware.TPU_KINDS.items()}
  assert dcn == {'v4': None, 'v5e': 3.125, 'v5p': 6.25, 'v6e': None}


@pytest.mark.parametrize('name,kind,chips', [
    ('v4-8', 'v4', 4), ('v5p-128', 'v5p', 64), ('v5p-8', 'v5p', 4), ('v5e-16', 'v5e', 16),
    ('v5e-1', 'v5e', 1), ('v6e-256', 'v6e', 256), ('V6E-8', 'v6e', 8)])
def test_parse_topology(name, kind, chips):
  topo = hardware.parse_topology(name)
  assert (topo.kind, topo.chips, topo.num_slices) == (kind, chips, 1)
  assert topo.chip is hardware.CHIPS[kind]
  assert hardware.parse_topology(name, 3).total_chips == 3 * chips


@pytest.mark.parametrize('name', ['v5p-7', 'v5p-6', 'v5e-2', 'v7-8', 'v5litepod-16', 'tpu', ''])
def test_unknown_topology_is_one_line(name):
  with pytest.raises(ValueError) as e:
    hardware.parse_topology(name)
  assert str(e.value).startswith(f'{name}: unknown TPU slice') and '\n' not in str(e.value)


# GKE's TPU tables (cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus): node label,
# physical topology, TPU VMs per slice and chips per VM, and xpk's --tpu-type spelling.
GKE = {
    'v4-16': ('tpu-v4-podslice', '2x2x2', 2, 4, 'v4-16'),
    'v5p-8': ('tpu-v5p-slice', '2x2x1', 1, 4, 'v5p-8'),
    'v5p-128': ('tpu-v5p-slice', '4x4x4', 16, 4, 'v5p-128'),
    'v5e-1': ('tpu-v5-lite-podslice', '1x1', 1, 1, 'v5litepod-1'),
    'v5e-4': ('tpu-v5-lite-podslice', '2x2', 1, 4, 'v5litepod-4'),
    'v5e-8': ('tpu-v5-lite-podslice', '2x4', 1, 8, 'v5litepod-8'),
    'v5e-16': ('tpu-v5-lite-podslice', '4x4', 4, 4, 'v5litepod-16'),
    'v6e-8': ('tpu-v6e-slice', '2x4', 1, 8, 'v6e-8'),
    'v6e-256': ('tpu-v6e-slice', '16x16', 64, 4, 'v6e-256'),
}


@pytest.mark.parametrize('name', GKE)
def test_gke_facts(name):
  assert tuple(hardware.parse_topology(name).gke().values()) == GKE[name]


@pytest.mark.parametrize('kind', hardware.TPU_KINDS)
def test_every_slice_is_consistent(kind):
  names = hardware.topology_names(kind)
  assert len(set(names)) == len(names)
  for name in names:
    topo = hardware.parse_topology(name)
    g = topo.gke()
    assert math.prod(int(n) for n in g['topology'].split('x')) == topo.chips
    assert g['hosts'] * g['chips_per_host'] == topo.chips
    assert g['xpk_tpu_type'].split('-')[-1] == name.split('-')[-1]


def _cli(*args):
  # -I -S: no site-packages, so the table must need nothing beyond the standard library.
  return subprocess.run([sys.executable, '-I', '-S', 'gemma3_train/infra/hardware.py', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def test_cli_prints_shell_assignments_with_the_standard_library_alone():
  out = _cli('v5e-16')
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == ['ACCELERATOR=tpu-v5-lite-podslice', 'TOPOLOGY=4x4', 'HOSTS=4',
                                     'CHIPS_PER_HOST=4', 'XPK_TPU_TYPE=v5litepod-16']
  bad = _cli('v5p-7')
  assert bad.returncode == 1 and not bad.stdout
  assert bad.stderr.startswith('error: TPU_TYPE=v5p-7: unknown TPU slice')
  assert bad.stderr.count('\n') == 1
  assert _cli().returncode == 2 and _cli('--help').returncode == 2
