"""LoRA supervised fine-tuning of Gemma 3 1b-it on chat data (adapters only; the base frozen).

gemma3-train --config=configs/lora_1b.py --workdir=gs://B/lora1b \
  --config.checkpoint.init_from=/path/to/gemma-3-1b-it \
  --config.data.train_path='gs://B/chats/train-*.jsonl' \
  --config.data.eval_path=gs://B/chats/eval.jsonl
gemma3-convert export-lora --src=gs://B/lora1b --dst=/tmp/adapter   # a PEFT adapter

The run's checkpoints hold the adapters, their optimizer state and the data iterator; the base
is read from checkpoint.init_from on every start (docs/lora.md).
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '1b'
  c.model.update(config_lib.PRESETS['1b'])
  c.model.remat_policy = 'minimal'
  config_lib.use_chat_data(c)
  c.data.seq_len = 2048
  c.train.global_batch_size = 16
  c.train.num_steps = 2000
  c.train.eval_every = 250
  c.optim.warmup_steps = 50
  c.checkpoint.every = 250
  # Released weights (the base): a HF directory (google/gemma-3-1b-it downloaded), a Kaggle/Flax
  # Orbax checkpoint or one of ours. Placeholder path.
  c.checkpoint.init_from = '/path/to/gemma-3-1b-it'
  c.model.dtype = 'bfloat16'
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.targets = 'q,k,v,o,gate,up,down'
  c.lora.base_dtype = 'bfloat16'  # frozen base storage; 'int8' for QLoRA-style
  c.optim.lr = 2e-4  # adapters take a ~10x larger lr than a full fine-tune
  c.optim.weight_decay = 0.0
  return c

