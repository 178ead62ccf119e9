"""Training: the loop (loop.py), the train state and its setup (state.py), the jitted steps
(step.py), what they optimize (objectives/), frozen parts (frozen.py), the optimizer, restore
order, checkpoints, init_from, metrics, FLOPs and in-run samples."""
