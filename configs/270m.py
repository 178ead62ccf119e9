"""Gemma 3 270m (18 layers, D=640). gemma3-train --config=configs/270m.py --workdir=gs://B/run"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '270m'
  c.model.update(config_lib.PRESETS['270m'])
  c.model.dtype = 'bfloat16'  # bf16 matmuls on accelerators; params stay float32
  # The planner's best estimated throughput with >10% HBM free on v5e-4 (10.70 of 16 GiB):
  # docs/aot/270m_v5e-4.json, docs/aot/270m_v5e-4_plan.json
  c.model.remat_policy = 'save_qkv_proj'
  c.data.seq_len = 4096
  c.train.global_batch_size = 16
  return c
