"""Gemma 3 12b text (48 layers, D=3840). gemma3-train --config=configs/12b.py --workdir=gs://B/run"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '12b'
  c.model.update(config_lib.PRESETS['12b'])
  c.model.dtype = 'bfloat16'  # bf16 matmuls on accelerators; params stay float32
  # The planner's best estimated throughput with >10% HBM free on v5p-64 (59.9 of 95 GiB):
  # docs/aot/12b_v5p-64.json, 12b_v5p-64_plan.json.
  c.model.remat_policy = 'minimal'
  c.data.seq_len = 8192
  c.train.global_batch_size = 32
  return c
