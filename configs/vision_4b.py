"""Gemma 3 4b image+text fine-tuning: the released model with its SigLIP tower (frozen).

gemma3-train --config=configs/vision_4b.py --workdir=gs://B/run \
  --config.checkpoint.init_from=/path/to/gemma-3-4b-it \
  --config.data.train_path='gs://B/chats/train-*.jsonl'
gemma3-train --config=configs/vision_4b.py --aot_topology=v6e-16   # compile-only fit check

Chat rows whose messages hold image parts (docs/data.md); each image is 256 soft tokens (about
260 positions with its markers), so 2048 tokens hold the text around data.max_images=2 images.
The tower is frozen (model.vision_trainable=False: no gradient, no optimizer state); the
projector and the decoder train. Rows with images run the reference attention on TPU (splash
cannot take the image blocks' mask). Fit: docs/vision.md and docs/aot/vision_4b_v6e-16.json.
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  config_lib.use_chat_data(c)
  c.model.preset = '4b'
  c.model.update(config_lib.PRESETS['4b'])
  c.model.vision = True
  c.model.dtype = 'bfloat16'  # bf16 matmuls; params (and the tower) stay float32
  c.model.remat_policy = 'full'
  c.data.seq_len = 2048
  c.data.max_images = 2
  c.train.global_batch_size = 32
  c.train.num_steps = 2000
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 50
  c.checkpoint.every = 250
  c.checkpoint.init_from = '/path/to/gemma-3-4b-it'  # placeholder: the released weights
  return c
