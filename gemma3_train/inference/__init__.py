"""Inference on a trained model: the KV-cache sampler (sampler.py, and the Gemma3 class with
generate() that gemma3_train.load returns) and scoring (scoring.py: dataset loss, multiple
choice, the batch sums the trainer's evals share)."""
