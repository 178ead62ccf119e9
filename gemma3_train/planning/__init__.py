"""Ahead-of-time compiles for a TPU topology (aot.py; rollout_aot.py adds a GRPO run's sampler
programs) and the fit planner (plan.py)."""
