"""Gemma 3 4b fine-tuned on 32k-token rows, the sequence split over a context axis of 4.

gemma3-train --config=configs/long_4b.py --workdir=gs://B/run --config.init_from=...

On 16 chips (a v5e-16, say): fsdp 2 x context 8, one 32,768-token row per fsdp shard, each chip
holding 4,096 positions of its row (two chunks of 2,048 from opposite ends: the balanced
layout). The released 4b already has the global layers' RoPE scaled by 8 (128k positions), so
32k rows need no RoPE change. AOT proof: docs/aot/long_4b_v5e-16.json, 10.96 of 16 GiB per
chip (context 4 x fsdp 4 with two more rows needed 15.47 GiB: under the 10% headroom);
docs/long_context.md.
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '4b'
  c.model.update(config_lib.PRESETS['4b'])
  c.model.dtype = 'bfloat16'
  c.data.seq_len = 32768
  c.mesh.context = 8
  c.mesh.fsdp = -1
  c.train.global_batch_size = 2  # one row per fsdp shard of a 16-chip slice
  c.train.loss_chunk_size = 1024
  c.train.loss_vocab_parallel = True
  c.model.remat_policy = 'full'  # long rows: keep only the layer inputs (docs/memory.md)
  c.model.remat_unit = 'layer'
  c.model.scan_unit = 'layer'
  return c
