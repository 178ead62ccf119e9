"""Two real jax processes on localhost: per-process batches assemble into one global batch;
and the data groups (sharding.data_groups) of layouts whose context axis spans processes."""

import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from configs import long_27b
from tests import helpers
from gemma3_train import config as config_lib
from gemma3_train import sharding
from gemma3_train.data import pipeline

_WORKER = textwrap.dedent('''
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'localhost:{sys.argv[2]}', num_processes=2,
                               process_id=int(sys.argv[1]))
    import numpy as np
    from configs import tiny
    from gemma3_train import config as config_lib, data
    c = config_lib.from_config_dict(tiny.get_config()).replace(data=dict(seq_len=32))
    me, n = jax.process_index(), jax.process_count()
    local = next(data.make_train_iterator(c, process_index=me, process_count=n))
    assert local['inputs'].shape == (4, 32)
    mesh = jax.make_mesh((4,), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    g = data.global_batch(local, sharding)
    assert g['inputs'].shape == (8, 32) and g['weights'].dtype == np.float32
    shards = sorted(g['inputs'].addressable_shards, key=lambda s: s.index[0].start)
    assert np.array_equal(np.concatenate([np.asarray(s.data) for s in shards]), local['inputs'])
    # A jitted reduction over the global array sees both processes' rows.
    other = next(data.make_train_iterator(c, process_index=1 - me, process_count=n))
    total = float(jax.jit(lambda w: w.sum())(g['weights']))
    assert total == float(local['weights'].sum() + other['weights'].sum()), total
    print('OK', me)
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two jax processes start in about 12 s here
def test_global_batch_across_two_processes(tmp_path):
  script = tmp_path / 'worker.py'
  script.write_text(_WORKER)
  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, PYTHONPATH=str(root))
  env.pop('XLA_FLAGS', None)
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in (0, 1)]
  outs = [p.communicate(timeout=180)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f'OK {i}' in out, out[-3000:]


def _grid(shape, devices_per_process):
  """A fake device grid over MESH_AXES: device i (row-major) on process i // devices_per_process."""
  n = int(np.prod(shape))
  return np.array([types.SimpleNamespace(id=i, process_index=i // devices_per_process)
                   for i in range(n)], dtype=object).reshape(shape)


def _groups(shape, devices_per_process):
  return [(g.processes, g.row_shards)
          for g in sharding.data_groups(_grid(shape, devices_per_process), sharding.MESH_AXES)]


def test_data_groups_of_context_within_and_across_processes():
  # data, fsdp, context, tensor. Context within a process: every process is its own group.
  assert _groups((1, 2, 4, 1), 4) == [((0,), (0,)), ((1,), (1,))]
  # long_27b on a v5p-32: context 16 over 4 hosts of 4 chips; the hosts load the one row.
  assert _groups((1, 1, 16, 1), 4) == [((0, 1, 2, 3), (0,))]
  c = config_lib.from_config_dict(long_27b.get_config())
  [group] = [g for g in sharding.data_groups(_grid((1, 1, 16, 1), 4), sharding.MESH_AXES)
             if 2 in g.processes]  # host 2's: what its iterator gets
  assert (group.index, group.count) == (0, 1)
  assert pipeline.local_batch_size(c, group.count) == 1
  with pytest.raises(config_lib.ConfigError, match='number of data groups 4'):
    pipeline.local_batch_size(c, 4)  # the per-process split this replaces
  # data x fsdp x context: each context group of 4 spans two processes of 2 devices.
  groups = sharding.data_groups(_grid((2, 2, 4, 1), 2), sharding.MESH_AXES)
  assert [(g.processes, g.row_shards) for g in groups] == [
      ((0, 1), (0,)), ((2, 3), (1,)), ((4, 5), (2,)), ((6, 7), (3,))]
  assert [g.rows(8).tolist() for g in groups] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_processes_holding_overlapping_rows_are_an_error():
  grid = _grid((1, 2, 2, 1), 3)  # process 0 holds row shards 0 and 1, process 1 only 1
  with pytest.raises(config_lib.ConfigError, match='overlapping or unequal'):
    sharding.data_groups(grid, sharding.MESH_AXES)


@pytest.mark.parametrize('shape', [(2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 4, 2)])
def test_group_rows_are_the_batch_shardings(shape):
  """A group's rows (group.rows) are those jax's batch_sharding puts on its processes' devices,
  for a fake split of this process's 8 devices into processes of two."""
  c = helpers.small_config(mesh=dict(zip(sharding.MESH_AXES, shape)))
  mesh = sharding.make_mesh(c)
  process_of = {d.id: i // 2 for i, d in enumerate(mesh.devices.flat)}
  fake = np.vectorize(lambda d: types.SimpleNamespace(process_index=process_of[d.id]),
                      otypes=[object])(mesh.devices)
  B, L = 8, 32
  where = sharding.batch_sharding(mesh, (B, L)).devices_indices_map((B, L))
  for g in sharding.data_groups(fake, mesh.axis_names):
    want = sorted({r for d, index in where.items() if process_of[d.id] in g.processes
                   for r in range(B)[index[0]]})
    assert g.rows(B).tolist() == want
