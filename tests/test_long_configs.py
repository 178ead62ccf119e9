"""configs/long_*.py are the configs their AOT proofs compiled (docs/aot/long_*.json; compiles
of many minutes, rerun by hand with gemma3-train --config=configs/NAME.py --aot_topology=T
--aot_report=docs/aot/NAME_T.json): the same mesh, shapes and layouts, the splash kernels
under context parallelism, fitting with the shipped configs' headroom. Nothing is recompiled."""

import importlib
import json

import pytest

from tests import helpers
from gemma3_train import config as config_lib
from gemma3_train import sharding
from gemma3_train.planning import aot
from gemma3_train.training import flops

PROOFS = [('long_27b', 'v5p-32')]


@pytest.mark.parametrize('name,topology', PROOFS)
def test_long_configs_are_the_ones_their_aot_proofs_compiled(name, topology):
  c = config_lib.from_config_dict(importlib.import_module(f'configs.{name}').get_config())
  r = json.loads((helpers.ROOT / 'docs' / 'aot' / f'{name}_{topology}.json').read_text())
  assert r['fits'] and r['headroom'] >= aot.HEADROOM and not r['error']
  assert r['tpu_kernels'] > 0 and r['attention'] == 'splash'  # not the reference's logits
  chips = aot.parse_topology(topology).total_chips
  want = dict(topology=topology, chips=chips, mesh=sharding.mesh_shape(c, chips),
              remat_policy=c.model.remat_policy, seq_len=c.data.seq_len,
              global_batch=c.train.global_batch_size, param_dtype=c.model.param_dtype,
              dtype=c.model.dtype, remat_unit=c.model.remat_unit, scan_unit=c.model.scan_unit)
  assert {k: r[k] for k in want} == want
  assert r['mesh']['context'] > 1 and c.model.attention_impl in ('auto', 'splash')
  assert r['model_flops_per_step'] == pytest.approx(flops.train_flops_per_step(c), rel=1e-12)
