"""Prompts with images (inference/image_prompts.py, the sampler's prefill, the export's processor
files, gemma3-sample --image, multiple choice) against transformers: Gemma3ForConditionalGeneration
's generate and logits, and AutoProcessor on our export.

One random tiny vision model with the real vocabulary (the processor's <image_soft_token> is id
262144 = model.vocab_size): 28 x 28 images, patch 7, pool 2 -> 4 soft tokens per image; a decoder
of 6 layers (one scanned block: five local, one global) with window 3, narrower than an image
block, so the local layers' composition of window and image block is exercised.
"""

import io
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import gemma3_train
from gemma3_train import convert
from gemma3_train.cli import sample as sample_cli
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import image_prompts
from gemma3_train.inference import sampler as sample
from gemma3_train.inference import scoring

V, S, T = 262144, 28, 4  # vocabulary = the image placeholder id, image side, soft tokens
BOI = tokenizer_lib.START_OF_IMAGE


@pytest.fixture(scope='module')
def hf_model(tmp_path_factory):
  """(directory, model): a random Gemma3ForConditionalGeneration as transformers saves it, its
  64 appended embedding rows the mean row (as our export writes them)."""
  text = transformers.Gemma3TextConfig(
      vocab_size=V + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
      num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
      sliding_window=3, max_position_embeddings=512,
      rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 8.0,
                                          'rope_theta': 1e6},
                       'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}})
  vision = dict(model_type='siglip_vision_model', hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, image_size=S, patch_size=7,
                vision_use_head=False)
  config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision,
                                     mm_tokens_per_image=T, image_token_index=V,
                                     attn_implementation='eager')
  model = transformers.Gemma3ForConditionalGeneration(config)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():  # norm scales and biases too
      p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else 0.2))
    emb = model.get_input_embeddings().weight
    emb[V:] = emb[:V].double().mean(0).float()
  path = tmp_path_factory.mktemp('hf_vision')
  model.save_pretrained(path)
  return path, model.eval()


@pytest.fixture(scope='module')
def ours(hf_model):
  return gemma3_train.load(hf_model[0], dtype='float32', attention_impl='reference')


def _image(seed, shape=(40, 33)):
  """A uint8 image of another size than S (both preprocessings resize it)."""
  return np.random.default_rng(seed).integers(0, 256, (*shape, 3), np.uint8)


def _hf_pixels(images):
  """Hugging Face's Gemma 3 image processor (the reference preprocessing): [n, 3, S, S]."""
  from transformers.models.gemma3 import image_processing_pil_gemma3  # pylint: disable=g-import-not-at-top
  processor = image_processing_pil_gemma3.Gemma3ImageProcessorPil(
      size={'height': S, 'width': S}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
  return torch.tensor(processor(images=list(images), return_tensors='np')['pixel_values'])


def _hf_generate(model, prompt, images, n):
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = model.generate(input_ids=ids, pixel_values=_hf_pixels(images),
                         token_type_ids=(ids == V).long(), attention_mask=torch.ones_like(ids),
                         max_new_tokens=n, do_sample=False, eos_token_id=list(sample.STOP_TOKENS),
                         pad_token_id=0)
  return out[0, len(prompt):].tolist()


def test_greedy_with_two_images_equals_transformers_generate(hf_model, ours):
  """Two images in one prompt (bare <start_of_image> ids, expanded) beside a one-image prompt of
  another length (left padding): greedy tokens equal Gemma3ForConditionalGeneration.generate's."""
  a, b, c = _image(1), _image(2, (20, 50)), _image(3)
  prompts = [[2, 651, 6037, BOI, 108, 1000, 2000, BOI, 3000],
             [2, BOI, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 11000, 12000]]
  images = [[a, b], [c]]
  n = 16
  got = ours.generate(prompts, n, images=images)
  for p, imgs, g in zip(prompts, images, got):
    want = _hf_generate(hf_model[1], image_prompts.expand(p, ours.cfg)[0], imgs, n)
    assert g == want
    assert len(g) == n  # no early stop: every step compared
  # The images matter: swapping the two of the first prompt changes its continuation.
  assert ours.generate(prompts[:1], n, images=[[b, a]]) != got[:1]
