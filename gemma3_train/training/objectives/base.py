"""What a train step optimizes: the one interface the train step asks.

The step (training/step.py) never branches on the objective. It asks the Objective for:
  batch_shapes     the global batch it reads, {key: (shape, dtype)} (rows over the batch axes);
  frozen_models    the frozen models it needs besides the trained model's own frozen parts (a
                   DPO or GRPO reference, a distillation teacher): name -> where they come from;
                   frozen_model_config gives each one's ModelConfig (a teacher's may differ);
  loss_sums        (the summed objective to differentiate, its summed parts); the parts hold
                   'weight_sum', what the step divides the gradients and metrics by, and may
                   hold 'token_sum', the tokens trained on (else weight_sum is);
  metrics          the logged per-step values from those sums;
  eval_sums        the sums of an eval batch (loss_sums' parts by default);
  eval_summary     the eval metrics from sums added over eval batches (host floats);
  reads_step       True for an objective that draws random numbers per position: the step then
                   adds 'step' and 'row' ([B] int32: the step, each row's index in the global
                   batch) to the batch it is given;
  makes_batches    True for an objective (RL) that makes its own batches by sampling; the loop
                   then asks make_batches(s, state, step, train_iter) for each step's batch
                   instead of reading the data, and shows samples() every train.sample_every;
  train_iterator   the checkpointed iterator the loop reads (the data's batches by default; RL:
                   prompt rows, data/prompts.py);
  resolve, prepare the run's config with workdir-relative defaults, and one pass before training
                   (both do nothing by default);
  start_metrics    values logged once at step 0 of a fresh run, e.g. a teacher's own eval loss
                   (none by default).
Objectives differ in what they prepare and how they score, not in the loop (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import jax

from gemma3_train import config as config_lib
from gemma3_train import data as data_lib

Shapes = dict[str, tuple[tuple[int, ...], Any]]


class Objective:
  """The base: subclasses set `name` and implement batch_shapes, loss_sums and metrics."""

  name = ''
  makes_batches = False
  reads_step = False

  def __init__(self, c: config_lib.Config):
    self.config = c

  def batch_shapes(self) -> Shapes:
    raise NotImplementedError

  def frozen_models(self) -> dict[str, str]:
    """name -> source of each extra frozen model: a checkpoint path, or '' for the seed's
    random init (the trained model's start); none by default."""
    return {}

  def frozen_model_config(self, name: str) -> config_lib.ModelConfig:
    """The ModelConfig of frozen model `name` (its storage dtype: frozen_param_dtype): the
    trained model's by default."""
    del name
    return self.config.model

  def resolve(self, c: config_lib.Config, workdir: str) -> config_lib.Config:
    """The run's config with the objective's workdir-relative defaults filled in."""
    del workdir
    return c

  def prepare(self, s, workdir: str, initial_state) -> None:
    """One pass before training (after the workdir lease, before the first batch is read):
    e.g. DPO's precomputed reference log-probabilities. s is the Setup; initial_state() builds
    the state the run would start from. Nothing by default."""

  def start_metrics(self, s, state, eval_batches) -> dict[str, float]:
    """Values to log once before the first step of a fresh run (not on a resume): s is the
    Setup, state the step-0 state with its frozen models, eval_batches() a new iterator over
    the run's eval batches (the ones its evals read). None by default."""
    del s, state, eval_batches
    return {}

  def frozen_param_dtype(self) -> str:
    """The storage dtype of the frozen models ('' = model.param_dtype)."""
    return ''

  def loss_sums(self, model, batch: dict, frozen_models: dict | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(summed objective, summed parts incl. 'weight_sum') of `model` on `batch`."""
    raise NotImplementedError

  def metrics(self, sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    raise NotImplementedError

  def eval_sums(self, model, batch: dict, frozen_models: dict | None = None
                ) -> dict[str, jax.Array]:
    """The summed parts of an eval batch: loss_sums' by default."""
    return self.loss_sums(model, batch, frozen_models)[1]

  def eval_summary(self, totals: dict[str, float]) -> dict[str, float]:
    raise NotImplementedError

  def train_iterator(self, c: config_lib.Config, *, process_index: int = 0,
                     process_count: int = 1):
    """The train data iterator (get_state / set_state: checkpointed with the state)."""
    return data_lib.make_train_iterator(c, process_index=process_index,
                                        process_count=process_count)

  def make_batches(self, s, state, step: int, train_iter) -> dict:
    """makes_batches: the global batch of train step `step`, made with `state` (the Setup s)
    from what train_iter gives."""
    raise NotImplementedError(f'train.objective={self.name!r} reads its batches from the data')

  def samples(self) -> list[tuple[str, str]]:
    """makes_batches: (prompt, completion) pairs of the latest batch made, to show."""
    return []
