"""Training objectives: what a train step optimizes (base.Objective), chosen by train.objective."""

from __future__ import annotations

from gemma3_train import config as config_lib
from gemma3_train.training.objectives import base
from gemma3_train.training.objectives import ce
from gemma3_train.training.objectives import distill
from gemma3_train.training.objectives import dpo
from gemma3_train.training.objectives import grpo

OBJECTIVES: dict[str, type[base.Objective]] = {
    o.name: o for o in (ce.CrossEntropy, dpo.Preference, distill.Distill, grpo.Grpo)}


def get(c: config_lib.Config) -> base.Objective:
  """The Objective of c.train.objective (config validation names the choices)."""
  return OBJECTIVES[c.train.objective](c)
