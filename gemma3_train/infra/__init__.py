"""Run safety and the machine: workdir lease, signals, storage retries, hardware table. Imports nothing else from the package."""
