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

PROOFS = [('long_4b', 'v5e-16'), ('long_27b', 'v5p-32')]


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


def test_long_27b_does_not_fit_without_the_context_axis():
  """docs/aot/long_27b_v5p-32_context1.json: the same config at context 1 (--config.mesh.context=1
  --config.train.global_batch_size=16: one 128k row per chip) runs out of HBM."""
  c = config_lib.from_config_dict(importlib.import_module('configs.long_27b').get_config())
  r = json.loads((helpers.ROOT / 'docs' / 'aot' / 'long_27b_v5p-32_context1.json').read_text())
  assert not r['fits'] and 'RESOURCE_EXHAUSTED' in r['error'] and r['total_gib'] > 95
  assert r['mesh']['context'] == 1 and r['mesh']['fsdp'] == 16 and r['global_batch'] == 16
  assert (r['seq_len'], r['remat_policy']) == (c.data.seq_len, c.model.remat_policy)
