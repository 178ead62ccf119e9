"""Gemma 3 27b text (62 layers, D=5376). gemma3-train --config=configs/27b.py --workdir=gs://B/run

Sized for a v5p-128 slice (64 chips): sequence 8192, one row per chip, FSDP over every chip.
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '27b'
  c.model.update(config_lib.PRESETS['27b'])
  # The planner's best estimated throughput with >10% HBM free on v5p-128 (43.3 of 95 GiB;
  # 'minimal' is faster but leaves 4%): docs/aot/27b_v5p-128.json, 27b_v5p-128_plan.json.
  c.model.remat_policy = 'save_qkv_proj'
  c.model.param_dtype = 'float32'
  c.model.dtype = 'bfloat16'
  c.data.seq_len = 8192
  c.train.global_batch_size = 64
  return c
