"""LoRA fine-tuning of Gemma 3 27b on chat data with a frozen int8 base, sized for a small slice.

gemma3-train --config=configs/lora_27b.py --workdir=gs://B/lora27b \
  --config.checkpoint.init_from=/path/to/gemma-3-27b-it \
  --config.data.train_path='gs://B/chats/train-*.jsonl'
gemma3-train --config=configs/lora_27b.py --aot_topology=v5e-16   # compile-only fit check

A full fine-tune of 27b needs a v5p-128 (configs/27b.py); with the base frozen in int8 (27 GB)
and adapters of rank 16 (~0.1 B params, their Adam state alone), 16 v5e chips suffice: 14.1 GiB
of 16 per chip, 11.7% free (docs/aot/lora_27b_v5e-16.json; the full fine-tune's state alone is
18.9 GiB per chip there: docs/aot/27b_full_v5e-16.json).
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  config_lib.use_chat_data(c)
  c.data.seq_len = 2048
  c.train.num_steps = 2000
  c.optim.warmup_steps = 50
  c.checkpoint.every = 250
  c.model.preset = '27b'
  c.model.update(config_lib.PRESETS['27b'])
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'full'
  c.data.seq_len = 4096
  c.train.global_batch_size = 16
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.base_dtype = 'int8'
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.0
  c.checkpoint.init_from = '/path/to/gemma-3-27b-it'  # placeholder: the released weights
  return c

