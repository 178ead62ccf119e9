"""gemma3-train: pretrain and fine-tune Gemma 3 with JAX."""

__version__ = '0.1.0'


def load(path, **kwargs):
  """Returns a Gemma 3 model for a Hugging Face directory or one of our checkpoints.

  `model(tokens)` on int32 [B, L] returns float logits [B, L, V]; `model.generate(prompts,
  max_new_tokens, ...)` samples (inference/sampler.py).
  """
  # Imported here: `import gemma3_train` (e.g. for config) should not load jax, orbax and
  # safetensors.
  from gemma3_train import convert  # pylint: disable=g-import-not-at-top
  from gemma3_train.inference import sampler  # pylint: disable=g-import-not-at-top
  return convert.load(path, sampler.Gemma3, **kwargs)
