"""Gemma 3 27b fine-tuned on 131,072-token rows (its full window), one row split over a
context axis of 16.

gemma3-train --config=configs/long_27b.py --workdir=gs://B/run --config.init_from=...

On a v5p-32 (16 chips): context 16 x fsdp 1, one row per step, each chip holding 8,192
positions of it (two chunks of 4,096 from opposite ends: the balanced layout); the parameters
and Adam moments are ZeRO-3 sharded over the 16 chips too (sharding.py: 'embed' over fsdp x
context). The released 27b already has the global layers' RoPE scaled by 8 (128k positions).
AOT proof: docs/aot/long_27b_v5p-32.json (docs/long_context.md). More chips: raise fsdp (one
more row per fsdp shard), keeping context 16.
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '27b'
  c.model.update(config_lib.PRESETS['27b'])
  c.model.param_dtype = 'float32'
  c.model.dtype = 'bfloat16'
  c.data.seq_len = 131072
  c.mesh.context = 16
  c.mesh.fsdp = -1
  c.train.global_batch_size = 1  # one row over the 16 chips of the context axis
  c.train.loss_chunk_size = 1024
  c.train.loss_vocab_parallel = True
  c.model.remat_policy = 'full'  # long rows: keep only the layer inputs (docs/memory.md)
  c.model.remat_unit = 'layer'
  c.model.scan_unit = 'layer'
  return c
