"""Inference on a trained model: the KV-cache sampler and scoring."""
