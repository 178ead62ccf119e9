"""Next-token cross-entropy (pretraining and SFT): train.objective='ce', the default.

The summed target NLL over weighted targets (packed documents; SFT weights only the model turns)
plus train.z_loss * sum(w * logsumexp^2), from the chunked LM head (models/lm_head.py); the step
divides by the weighted target count.
"""

from __future__ import annotations

import jax

from gemma3_train import data as data_lib
from gemma3_train.data import images as images_lib
from gemma3_train.models import lm_head
from gemma3_train.training.objectives import base


class CrossEntropy(base.Objective):
  name = 'ce'

  def batch_shapes(self) -> base.Shapes:
    """[B, L] token arrays; with model.vision also 'images' uint8 [B, data.max_images, S, S, 3]
    and 'image_counts' int32 [B]."""
    c = self.config
    B, m = c.train.global_batch_size, c.model
    shapes = {k: ((B, c.data.seq_len), dtype) for k, dtype in data_lib.BATCH_DTYPES.items()}
    if m.vision:
      S = m.vision_image_size
      image_shapes = {'images': (B, c.data.max_images, S, S, 3), 'image_counts': (B,)}
      shapes.update({k: (image_shapes[k], dtype)
                     for k, dtype in data_lib.IMAGE_BATCH_DTYPES.items()})
    return shapes

  def loss_sums(self, model, batch, frozen_models=None):
    t = self.config.train
    sums = lm_head.next_token_sums(model, batch, images_lib.from_batch(batch),
                                   chunk_size=t.loss_chunk_size, z_loss=t.z_loss,
                                   vocab_parallel=t.loss_vocab_parallel)
    return sums['loss_sum'] + t.z_loss * sums['z_loss_sum'], sums

  def metrics(self, sums):
    weight = jax.numpy.maximum(sums['weight_sum'], 1.0)
    return {'loss': sums['loss_sum'] / weight, 'z_loss': sums['z_loss_sum'] / weight,
            'accuracy': sums['correct_sum'] / weight}

  def eval_summary(self, totals):
    return lm_head.summarize(totals)
