"""A few-million-parameter Gemma-3-shaped model that trains on CPU in minutes.

gemma3-train --config=configs/tiny.py --workdir=/tmp/run

Real Gemma 3 vocabulary and tokenizer (so the bundled text trains as is), 8 layers: one scanned
block of six (five local, one global) plus a two-layer tail, GQA 4:1, window 32 < seq_len.
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = 'tiny'
  c.model.update(num_layers=8, embed_dim=64, mlp_dim=256, num_heads=4, num_kv_heads=1,
                 head_dim=16, query_pre_attn_scalar=16.0, sliding_window=32)
  c.data.seq_len = 128
  c.train.global_batch_size = 8
  # 200 steps of 8 x 128 tokens: ~12.9 -> below 7 on the bundled text in a few CPU minutes.
  c.train.num_steps = 200
  c.train.eval_every = 50
  c.train.eval_steps = 2
  c.train.loss_chunk_size = 256
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  c.optim.b2 = 0.99
  c.checkpoint.every = 50
  c.logging.log_every = 10
  return c
