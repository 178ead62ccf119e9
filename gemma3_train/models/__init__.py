"""Gemma 3 in Flax NNX: the decoder (decoder.py), attention over every kernel (attention.py;
context.py and context_splash.py when the sequence is split over the context mesh axis), the
SigLIP vision tower (vision.py), shared layers (layers.py), LoRA adapters and the quantized base
(lora.py), QAT and GGUF block quantization (quant.py), and the chunked tied LM head
(lm_head.py). Imports only config and sharding."""
