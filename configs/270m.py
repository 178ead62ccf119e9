"""Gemma 3 270m (18 layers, D=640). gemma3-train --config=configs/270m.py --workdir=gs://B/run"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '270m'
  c.model.update(config_lib.PRESETS['270m'])
  c.model.dtype = 'bfloat16'  # bf16 matmuls on accelerators; params stay float32
  c.model.remat_policy = 'full'  # fits v5e-4 with >10% HBM free: docs/aot/270m_v5e-4.json
  c.data.seq_len = 4096
  c.train.global_batch_size = 16
  return c
