"""The five entry points (gemma3-train, -convert, -sample, -eval, -data) and their one error helper."""
