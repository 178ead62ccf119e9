"""GRPO (RL with verifiable rewards) of Gemma 3 1b-it on GSM8K-style problems, a full fine-tune.

gemma3-train --config=configs/grpo_1b.py --workdir=gs://B/grpo1b \
  --config.checkpoint.init_from=/path/to/gemma-3-1b-it \
  --config.data.train_path='gs://B/gsm8k/train.jsonl'

Rows: {"prompt": [{"role": "user", "content": "<question> ... end with '#### <answer>'"}],
"answer": "<worked solution> #### 42"} (GSM8K's answer field as is). Each step samples 8
completions of 8 prompts on the training mesh and takes one optimizer step on them; rewards
are the exact-match answer and a format check (docs/rl.md). Fits a TPU v5e-8 (fsdp over 8),
AOT-proven: the train step 7.2 GiB of 16 per chip (docs/aot/grpo_1b_v5e-8.json), the rollout
2.7 GiB with the train state resident (docs/aot/grpo_1b_v5e-8_rollout.json).
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '1b'
  c.model.update(config_lib.PRESETS['1b'])
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'save_qkv_proj'
  c.train.objective = 'grpo'
  c.rl.loss = 'dapo'  # TRL's default
  c.rl.prompts_per_step = 8
  c.rl.group_size = 8  # TRL's num_generations default
  c.train.global_batch_size = 64  # = prompts_per_step * group_size: one row per completion
  c.rl.max_completion_len = 512
  c.data.seq_len = 768  # prompt (<= 256 tokens) + completion
  c.model.attention_block_size = 256  # splash blocks must divide the 768 columns
  # The log-probabilities' [rows, chunk, vocab] float32 logits: 8 rows x 128 x 262k per chip
  # is 1 GiB (the default 1024 positions would be 8 GiB).
  c.train.loss_chunk_size = 128
  # TRL's sampling defaults: the full distribution, the one the log-probabilities score (top-k
  # / top-p would sample from another, and cost 64 passes over the vocabulary per token).
  c.rl.temperature = 1.0
  c.rl.epsilon_high = 0.28  # DAPO's clip-higher
  c.rl.beta = 0.0  # TRL's default: no reference held
  c.rl.rewards = 'accuracy,format'
  c.rl.reward_weights = '1.0,0.1'
  c.data.source = 'jsonl'
  c.data.train_path = 'gsm8k/train.jsonl'  # placeholder: your prompt rows
  c.train.num_steps = 500
  c.train.eval_every = 0  # the rollout's rewards are the run's evaluation
  c.train.sample_every = 25  # a few rollout completions into the log
  c.optim.lr = 1e-6  # TRL's GRPOConfig default
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 50
  c.checkpoint.init_from = '/path/to/gemma-3-1b-it'  # placeholder: HF, Kaggle or our checkpoint
  return c
