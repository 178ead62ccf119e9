"""Gemma 3 1b (26 layers, D=1152). gemma3-train --config=configs/1b.py --workdir=gs://B/run"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '1b'
  c.model.update(config_lib.PRESETS['1b'])
  c.model.dtype = 'bfloat16'  # bf16 matmuls on accelerators; params stay float32
  # The planner's best estimated throughput with >10% HBM free on v5e-8 (8.5 of
  # 16 GiB): docs/aot/1b_v5e-8.json, 1b_v5e-8_plan.json.
  c.model.remat_policy = 'save_qkv_proj'
  c.data.seq_len = 4096
  c.train.global_batch_size = 16
  return c
