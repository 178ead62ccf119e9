"""Run safety and the machine: the workdir lease, stop signals, storage retries, the hardware
table and measured CPU peak, progress lines. Imports nothing else from gemma3_train."""
