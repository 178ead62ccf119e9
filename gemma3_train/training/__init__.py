"""The train loop, its state and steps, objectives, optimizer, checkpoints and metrics."""
