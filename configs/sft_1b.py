"""Supervised fine-tuning of Gemma 3 1b on chat data (Gemma chat format, loss on model turns).

gemma3-train --config=configs/sft_1b.py --workdir=gs://B/sft \
  --config.data.train_path='gs://B/chats/train-*.jsonl' \
  --config.data.eval_path=gs://B/chats/eval.jsonl \
  --config.checkpoint.init_from=/path/to/gemma-3-1b-it

Each JSONL row holds data.messages_field = [{"role": "system"|"user"|"assistant"|"model",
"content": "..."}, ...]; roles alternate user/model after an optional system message.
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
  c.optim.lr = 1e-5  # fine-tuning lr: ~30x below pretraining
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 250
  # Released weights to start from (params only, resharded): a Hugging Face directory
  # (e.g. google/gemma-3-1b-it downloaded locally), a Kaggle/Flax Orbax checkpoint dir
  # (gs://gemma-data/checkpoints/gemma3-1b-it) or one of our checkpoints. Placeholder path.
  c.checkpoint.init_from = '/path/to/gemma-3-1b-it'
  return c
