"""Gemma 3 in Flax NNX: the decoder (decoder.py), attention over every kernel (attention.py), the
SigLIP vision tower (vision.py), shared layers (layers.py), LoRA adapters and the quantized base
(lora.py), and the chunked tied LM head (lm_head.py). Imports only config and sharding."""
