"""Two real jax processes on localhost: per-process batches assemble into one global batch."""

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

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
