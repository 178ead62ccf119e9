"""DPO of Gemma 3 1b, a full fine-tune from an SFT (or instruction-tuned) checkpoint.

gemma3-train --config=configs/dpo_1b.py --workdir=gs://B/dpo1b \
  --config.checkpoint.init_from=gs://B/sft1b \
  --config.data.train_path='gs://B/pairs/train-*.jsonl' \
  --config.data.eval_path='gs://B/pairs/eval.jsonl'
gemma3-train --config=configs/dpo_1b.py --aot_topology=v5e-8   # compile-only fit check

The reference is a frozen bfloat16 copy of checkpoint.init_from, sharded like the policy; each
step runs it forward on the same rows (docs/preference.md). Rows of 2048 tokens hold whole
pairs, each sequence at most 1024. Fits a v5e-8: docs/aot/dpo_1b_v5e-8.json.
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = '1b'
  c.model.update(config_lib.PRESETS['1b'])
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'save_qkv_proj'
  c.train.objective = 'dpo'
  c.dpo.loss = 'sigmoid'
  c.dpo.beta = 0.1  # TRL's default
  c.dpo.max_prompt_len = 512
  c.dpo.reference_dtype = 'bfloat16'
  c.data.source = 'jsonl'
  c.data.train_path = 'pairs/train.jsonl'  # {prompt, chosen, rejected} rows (placeholder)
  c.data.eval_path = 'pairs/eval.jsonl'
  c.data.seq_len = 2048
  c.train.global_batch_size = 16
  c.train.num_steps = 1000
  c.train.eval_every = 100
  c.optim.lr = 1e-6  # TRL's DPOConfig default; DPO wants a small step
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 200
  c.checkpoint.init_from = '/path/to/sft-1b'  # placeholder: your SFT run or gemma-3-1b-it
  return c
