"""Gemma 3 in Flax NNX: the decoder, attention, the vision tower, LoRA adapters, the chunked LM head."""
