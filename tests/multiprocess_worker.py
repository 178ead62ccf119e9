"""Runs a few train steps in one of N processes (or alone) and prints the losses as JSON.

usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json [context]
Each process feeds only its rows of the global batch (make_array_from_process_local_data).
With `context`: mesh.context=8 (over both processes of two) on synthetic data; each process
loads its data group's batches (sharding.data_group) and data.global_batch builds the arrays;
the JSON also holds the group and the iterator's state after the steps.
"""

import json
import sys

import jax

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if nproc > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'localhost:{port}', nproc, pid)

sys.path.insert(0, __file__.rsplit('/', 2)[0])
from tests import helpers  # pylint: disable=g-import-not-at-top
from gemma3_train import data  # pylint: disable=g-import-not-at-top
from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
from gemma3_train.training import loop as train  # pylint: disable=g-import-not-at-top
from gemma3_train.training import state as train_state

context = sys.argv[5:] == ['context']
c = helpers.small_config(mesh=dict(fsdp=-1))
if context:
  c = c.replace(mesh=dict(context=8), data=dict(source='synthetic'))
mesh = sharding.make_mesh(c)
s = train_state.setup(c, mesh)
step = train.compile_train_step(s)  # as the trainer does: compile, then wait for all processes
state, losses, result = s.state, [], {}
if context:
  group = sharding.data_group(sharding.batch_sharding(mesh))
  it = data.make_train_iterator(c, process_index=group.index, process_count=group.count)
rows = c.train.global_batch_size // nproc
for i in range(3):
  if context:  # the trainer's path: the group's rows, each device its rows and positions
    batch = data.global_batch(next(it), s.batch_sharding)
  else:
    full = helpers.packed_batch(c, i)
    local = {k: v[pid * rows:(pid + 1) * rows] for k, v in full.items()}
    batch = {k: jax.make_array_from_process_local_data(s.batch_sharding[k], v)
             for k, v in local.items()}
  state, m = step(state, batch)
  losses.append(float(m['loss']))
if context:
  result = {'group': [group.index, group.count], 'data_state': it.get_state()}
  it.close()  # and dropped before exit (data.make_train_iterator)
  del it
with open(out, 'w') as f:
  json.dump({'losses': losses, 'devices': jax.device_count(), **result}, f)
