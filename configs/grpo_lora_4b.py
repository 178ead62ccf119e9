"""GRPO of Gemma 3 4b-it with LoRA adapters and a KL to the base (the adapters off: no copy).

gemma3-train --config=configs/grpo_lora_4b.py --workdir=gs://B/grpo4b \
  --config.checkpoint.init_from=/path/to/gemma-3-4b-it \
  --config.data.train_path='gs://B/gsm8k/train.jsonl'

Fits a TPU v5e-8 (8 x 16 GiB, fsdp over 8), AOT-proven: the train step 9.1 GiB per chip
(docs/aot/grpo_lora_4b_v5e-8.json); the rollout, the train state resident, at most 6.6 GiB
(the decode loop over 64 rows x 1024 columns, its KV cache 1.06 GiB per chip:
docs/aot/grpo_lora_4b_v5e-8_rollout.json).
Rows as configs/grpo_1b.py's (docs/rl.md).
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '4b'
  c.model.update(config_lib.PRESETS['4b'])
  c.model.dtype = 'bfloat16'
  # 'minimal' needs 21.9 GiB of temporaries per chip at 8 rows of 1024 (AOT, v5e-8); 'full'
  # keeps only each block's input, as configs/lora_27b.py.
  c.model.remat_policy = 'full'
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.targets = 'q,k,v,o,gate,up,down'
  c.lora.base_dtype = 'bfloat16'
  c.train.objective = 'grpo'
  c.rl.loss = 'dapo'
  c.rl.beta = 0.04  # the reference is the base with the adapters off
  c.rl.prompts_per_step = 8
  c.rl.group_size = 8
  c.train.global_batch_size = 64
  c.rl.max_completion_len = 768
  c.data.seq_len = 1024
  # The log-probabilities' [rows, chunk, vocab] float32 logits: 8 rows x 128 x 262k per chip
  # is 1 GiB (the default 1024 positions would be 8 GiB).
  c.train.loss_chunk_size = 128
  c.rl.temperature = 1.0  # no top-k / top-p: as configs/grpo_1b.py
  c.rl.epsilon_high = 0.28
  c.rl.rewards = 'accuracy,format'
  c.rl.reward_weights = '1.0,0.1'
  c.data.source = 'jsonl'
  c.data.train_path = 'gsm8k/train.jsonl'  # placeholder
  c.train.num_steps = 500
  c.train.eval_every = 0
  c.train.sample_every = 25
  c.optim.lr = 1e-5  # adapters take a ~10x larger lr than a full fine-tune
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 50
  c.checkpoint.init_from = '/path/to/gemma-3-4b-it'  # placeholder
  return c
