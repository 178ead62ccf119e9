"""Inference on a trained model: the KV-cache sampler (sampler.py, and the Gemma3 class with
generate() that gemma3_train.load returns), its token draws (draws.py: inverse-CDF categorical,
top-k / top-p cutoffs by bisection), prompts with images (image_prompts.py), scoring
(scoring.py: dataset loss, multiple choice, the batch sums the trainer's evals share) and the
lm-evaluation-harness model (harness.py)."""
