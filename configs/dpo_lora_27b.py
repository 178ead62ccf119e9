"""DPO of Gemma 3 27b with LoRA adapters on a frozen int8 base, sized for a small slice.

gemma3-train --config=configs/dpo_lora_27b.py --workdir=gs://B/dpo27b \
  --config.checkpoint.init_from=/path/to/gemma-3-27b-it \
  --config.data.train_path='gs://B/pairs/train-*.jsonl'
gemma3-train --config=configs/dpo_lora_27b.py --aot_topology=v5e-16   # compile-only fit check

The reference is the base with the adapters off: no second copy of the weights, one more
forward pass per step (docs/preference.md). As configs/lora_27b.py, whose SFT step this adds
that forward to: fits a v5e-16, docs/aot/dpo_lora_27b_v5e-16.json.
"""

import os

from gemma3_train import config as config_lib


def get_config():
  # configs/lora_27b.py beside this file, by path: a config file must load where the repository
  # is not importable (an installed package, a copied configs folder).
  c = config_lib.load_config_dict(os.path.join(os.path.dirname(__file__), 'lora_27b.py'))
  c.train.objective = 'dpo'
  c.dpo.loss = 'sigmoid'
  c.dpo.beta = 0.1
  c.dpo.max_prompt_len = 1024
  c.data.format = 'text'  # pairs carry their own format (strings or messages)
  c.data.train_path = 'pairs/train.jsonl'  # {prompt, chosen, rejected} rows (placeholder)
  c.data.eval_path = 'pairs/eval.jsonl'
  c.optim.lr = 5e-6
  c.train.num_steps = 1000
  return c
