"""Gemma 3 4b distilled from Gemma 3 27b, the way the report trained every size.

gemma3-train --config=configs/distill_27b_to_4b.py --workdir=gs://B/distill4b \
  --config.distill.teacher=gs://B/gemma-3-27b-pt \
  --config.data.source=prepared --config.data.train_path='gs://B/shards/train-*'

The teacher is the 27b (any checkpoint convert reads; its shapes come from it), held frozen in
bfloat16 and sharded by the same rules: 54 GB, 1.7 GB per chip on 32 chips, besides the 4b's
float32 params and Adam moments (69 GB, 2.2 GB per chip). Each step runs the teacher forward
(~2 x 27e9 FLOPs a token) beside the student's forward and backward (~6 x 4e9): the teacher is
most of the compute. Slice: v6e-32 (the 4b's v6e-16, docs/aot/4b_v6e-16.json, with twice the
chips for the teacher). distill.teacher_preset gives the teacher's shapes without reading its
checkpoint, so the AOT proof compiles without it (docs/aot/distill_27b_to_4b_v6e-32.json: 16.96
of 32 GiB per chip, 47% free):
  gemma3-train --config=configs/distill_27b_to_4b.py --aot_topology=v6e-32 \
    --aot_report=docs/aot/distill_27b_to_4b_v6e-32.json
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '4b'
  c.model.update(config_lib.PRESETS['4b'])
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'save_qkv_proj'
  c.data.seq_len = 4096
  c.train.global_batch_size = 64
  c.train.objective = 'distill'
  c.distill.teacher = '/path/to/gemma-3-27b-pt'  # placeholder: a HF, Kaggle or our checkpoint
  c.distill.teacher_preset = '27b'  # its shapes (a checkpoint of other shapes fails to load)
  c.distill.teacher_dtype = 'bfloat16'
  c.distill.loss = 'sampled'  # the report's: 256 ids per token from the teacher
  c.distill.samples = 256
  # A chunk's [B, C, V] float32 arrays (teacher log-probs, their CDF, student logits) are the
  # loss's largest temporaries: 512 positions keep each at 0.5 GiB per row.
  c.train.loss_chunk_size = 512
  return c
