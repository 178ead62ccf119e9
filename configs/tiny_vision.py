"""A tiny Gemma-3-shaped vision-language model that learns to caption shapes on CPU.

gemma3-train --config=configs/tiny_vision.py --workdir=/tmp/run

The decoder is configs/tiny.py's; the image encoder is SigLIP-shaped but tiny: 48 x 48 images cut
into 8 x 8 patches (a 6 x 6 grid), 2 encoder layers of width 64, pooled 2 x 2 to 9 soft tokens per
image (one per cell of the 3 x 3 grid the shapes are placed on). data.source='shapes' generates
captioned images deterministically ("A red circle at the top left."), so nothing is downloaded.
Trained from scratch, the tower has nothing worth freezing: model.vision_trainable is on here
(fine-tuning configs keep the released tower frozen, the default). docs/vision.md shows the
held-out caption loss against the same run with the images blanked.
"""

from gemma3_train import config as config_lib


def get_config():
  c = config_lib.default_config_dict()
  c.model.preset = 'tiny_vision'
  c.model.update(num_layers=8, embed_dim=64, mlp_dim=256, num_heads=4, num_kv_heads=1,
                 head_dim=16, query_pre_attn_scalar=16.0, sliding_window=32)
  c.model.update(vision=True, vision_image_size=48, vision_patch_size=8, vision_width=64,
                 vision_depth=2, vision_mlp_dim=256, vision_num_heads=4, vision_pool=2,
                 vision_trainable=True)
  c.data.source = 'shapes'
  c.data.seq_len = 128
  c.data.max_images = 5  # a caption row is ~25 tokens: up to 5 fit a packed row of 128
  c.train.global_batch_size = 8
  c.train.num_steps = 200
  c.train.eval_every = 50
  c.train.eval_steps = 2
  c.train.loss_chunk_size = 256
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  c.optim.b2 = 0.99
  c.checkpoint.every = 50
  c.logging.log_every = 10
  return c
