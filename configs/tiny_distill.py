"""A tiny student distilled on CPU from a teacher trained with configs/tiny.py.

gemma3-train --config=configs/tiny.py --workdir=/tmp/run            # the teacher (8 layers)
gemma3-train --config=configs/tiny_distill.py --workdir=/tmp/student \
  --config.distill.teacher=/tmp/run

The student is tiny.py's model with two layers instead of eight; the teacher's shapes are read
from its checkpoint (docs/distillation.md). The Gemma 3 report's loss: 256 ids drawn per token
from the teacher, the student's cross-entropy to its renormalized probabilities on them.
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = 'tiny'
  c.model.update(num_layers=2, embed_dim=64, mlp_dim=256, num_heads=4, num_kv_heads=1,
                 head_dim=16, query_pre_attn_scalar=16.0, sliding_window=32)
  c.data.seq_len = 128
  c.train.global_batch_size = 8
  c.train.num_steps = 200
  c.train.eval_every = 50
  c.train.eval_steps = 2
  # A chunk's [B, C, V] float32 arrays (teacher log-probs, their CDF, student logits) are
  # 8 x 64 x 262144 x 4 bytes = 0.5 GiB each.
  c.train.loss_chunk_size = 64
  c.train.objective = 'distill'
  c.distill.teacher = '/tmp/run'  # the teacher's workdir (any checkpoint convert reads)
  c.distill.teacher_dtype = 'float32'
  c.distill.loss = 'sampled'
  c.distill.samples = 256
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  c.optim.b2 = 0.99
  c.checkpoint.every = 50
  c.logging.log_every = 10
  return c
