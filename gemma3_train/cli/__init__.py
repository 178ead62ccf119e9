"""The five entry points: gemma3-train (train.py), gemma3-convert (convert.py), gemma3-sample
(sample.py), gemma3-eval (evaluate.py), gemma3-data (data.py); errors.py turns a user's mistake
into one line and exit status 2 for all of them."""
