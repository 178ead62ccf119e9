"""Gemma 3 4b text (34 layers, D=2560). gemma3-train --config=configs/4b.py --workdir=gs://B/run"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '4b'
  c.model.update(config_lib.PRESETS['4b'])
  c.model.dtype = 'bfloat16'  # bf16 matmuls on accelerators; params stay float32
  # The planner's best estimated throughput with >10% HBM free on v6e-16 (17.4 of
  # 32 GiB): docs/aot/4b_v6e-16.json, 4b_v6e-16_plan.json.
  c.model.remat_policy = 'save_qkv_proj'
  c.data.seq_len = 4096
  c.train.global_batch_size = 32
  return c
