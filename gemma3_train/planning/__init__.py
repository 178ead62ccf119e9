"""Ahead-of-time compiles for a TPU topology and the fit planner."""
