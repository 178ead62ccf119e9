"""Training objectives: what a train step optimizes (base.Objective), chosen by train.objective."""

from __future__ import annotations

from gemma3_train import config as config_lib
from gemma3_train.training.objectives import base
from gemma3_train.training.objectives import ce

OBJECTIVES: dict[str, type[base.Objective]] = {ce.CrossEntropy.name: ce.CrossEntropy}


def get(c: config_lib.Config) -> base.Objective:
  """The Objective of c.train.objective (config validation names the choices)."""
  return OBJECTIVES[c.train.objective](c)
