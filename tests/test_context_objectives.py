"""The dpo and distill objectives under context degree 2 equal degree 1 (models/context.py):
loss sums within 1e-5, float32, a 2-layer model on rows of 64 with packed documents."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from tests.test_context import _packed
from tests.test_dpo import _packed_batch_rows
from gemma3_train import sharding
from gemma3_train.models import decoder
from gemma3_train.training import objectives
from gemma3_train.training.objectives import distill
from gemma3_train.training.objectives import dpo


def _config(degree, objective, **sections):
  return helpers.small_config(
      model=dict(num_layers=2, sliding_window=6, dtype='float32', param_dtype='float32'),
      data=dict(seq_len=64), mesh=dict(context=degree, fsdp=-1),
      train=dict(objective=objective), **sections)


def _sums(c, batch, frozen_name):
  """The objective's loss sums on c's mesh; the frozen model (dpo's reference, distill's
  teacher) is the same architecture from another seed."""
  mesh = sharding.make_mesh(c)
  rules = sharding.parse_rules(c.mesh.rules)
  graphdef, params = nnx.split(decoder.build(c))
  frozen_def, frozen = nnx.split(decoder.build(c, nnx.Rngs(c.train.seed + 1)))
  objective = objectives.get(c)

  def f(params, frozen, batch):
    with sharding.use_mesh(mesh, rules):
      models = {frozen_name: nnx.merge(frozen_def, frozen)}
      return objective.loss_sums(nnx.merge(graphdef, params), batch, models)[1]
  put = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.shape, rules))
         for k, v in batch.items()}
  return jax.jit(f)(params, frozen, put)


def _assert_same(got, want):
  assert set(got) == set(want)
  for k in want:
    helpers.assert_close(got[k], want[k], k)


@pytest.mark.slow
def test_dpo_under_context_2_equals_context_1():
  rng = np.random.default_rng(0)
  pairs = []
  for _ in range(10):
    prompt = [2, *rng.integers(3, 512, rng.integers(2, 9))]
    pairs.append((prompt, list(rng.integers(3, 512, rng.integers(2, 9))),
                  list(rng.integers(3, 512, rng.integers(2, 9)))))
  c1 = _config(1, 'dpo')
  batch = _packed_batch_rows(pairs, c1.data.seq_len, c1.train.global_batch_size)
  want = _sums(c1, batch, dpo.REFERENCE)
  _assert_same(_sums(_config(2, 'dpo'), batch, dpo.REFERENCE), want)


@pytest.mark.slow
def test_online_distill_under_context_2_equals_context_1():
  teacher = dict(teacher='/unused', loss='kl', alpha=0.25)  # the teacher is passed in
  c1 = _config(1, 'distill', distill=teacher)
  batch = {k: v for k, v in _packed(c1).items()}
  want = _sums(c1, batch, distill.TEACHER)
  _assert_same(_sums(_config(2, 'distill', distill=teacher), batch, distill.TEACHER), want)
