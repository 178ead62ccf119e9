"""The objective seam: the train step asks one Objective (training/objectives/) for the batch
it reads, the frozen models it needs, its loss sums and its metrics; nothing about
cross-entropy is wired into the step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from gemma3_train import config as config_lib
from gemma3_train import sharding
from gemma3_train.convert import layout
from gemma3_train.convert import ours
from gemma3_train.models import decoder
from gemma3_train.training import checkpoint as checkpoint_lib
from gemma3_train.training import objectives
from gemma3_train.training import restore as restore_lib
from gemma3_train.training import state as train_state
from gemma3_train.training.objectives import ce
from tests import helpers


def _config(**train):
  c = config_lib.from_config_dict(tiny.get_config())
  return c.replace(data=dict(source='synthetic', seq_len=16),
                   model=dict(vocab_size=128, num_layers=1),
                   train=dict(global_batch_size=8, loss_chunk_size=8, **train))


def test_config_names_exactly_the_registered_objectives():
  assert set(config_lib.OBJECTIVES) == set(objectives.OBJECTIVES)
  assert isinstance(objectives.get(_config()), ce.CrossEntropy)
  with pytest.raises(config_lib.ConfigError,
                     match=r"^train.objective='rlhf': expected ce \| dpo \| distill \| grpo$"):
    config_lib.validate(_config(objective='rlhf'))


class _Weighted(ce.CrossEntropy):
  """Cross-entropy with a per-row weight that the batch carries: a new batch key, a new
  metric, and a loss the step must differentiate as given."""

  def batch_shapes(self):
    B = self.config.train.global_batch_size
    return {**super().batch_shapes(), 'row_weight': ((B,), np.float32)}

  def loss_sums(self, model, batch, frozen_models=None):
    weighted = {**batch, 'weights': batch['weights'] * batch['row_weight'][:, None]}
    total, sums = super().loss_sums(model, weighted)
    return total, {**sums, 'row_weight_sum': jnp.sum(batch['row_weight'])}

  def metrics(self, sums):
    return {**super().metrics(sums), 'row_weight': sums['row_weight_sum']}


def _batch(c, row_weight):
  """helpers.packed_batch's rows, each with its weight under the objective's own batch key."""
  return {**helpers.packed_batch(c), 'row_weight': np.asarray(row_weight, np.float32)}


def test_the_step_reads_the_objectives_batch_loss_and_metrics(monkeypatch):
  """An objective of its own, swapped in: its batch key gets a sharding, its metric is logged,
  and its loss is what trains (rows of weight 0 change nothing: the same step as on the rows
  of weight 1 alone, and the same as plain cross-entropy there)."""
  c = _config()
  monkeypatch.setattr(objectives, 'get', _Weighted)
  s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
  assert 'row_weight' in s.batch_sharding
  put = lambda b: {k: jax.device_put(v, s.batch_sharding[k]) for k, v in b.items()}
  half = [1.0] * 4 + [0.0] * 4
  batch = _batch(c, half)
  state, metrics = s.train_step(s.init_state(), put(batch))
  assert float(metrics['row_weight']) == 4.0
  assert float(metrics['tokens']) == batch['weights'][:4].sum()  # the weighted rows' targets

  monkeypatch.undo()
  s_ce = train_state.setup(c, sharding.make_mesh(c), abstract=True)
  b = _batch(c, half)
  b['weights'][4:] = 0.0  # the same rows counted by plain cross-entropy
  del b['row_weight']
  state_ce, metrics_ce = s_ce.train_step(s_ce.init_state(), {k: jax.device_put(
      v, s_ce.batch_sharding[k]) for k, v in b.items()})
  assert float(metrics['loss']) == pytest.approx(float(metrics_ce['loss']), rel=1e-6)
  for x, y in zip(jax.tree.leaves(state['params']), jax.tree.leaves(state_ce['params'])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


class _Anchored(ce.CrossEntropy):
  """Cross-entropy plus a frozen reference model's loss on the same batch, as a metric: the
  shape of a preference or distillation objective."""

  def __init__(self, c, reference_path):
    super().__init__(c)
    self.reference_path = reference_path

  def frozen_models(self):
    return {'reference': self.reference_path}

  def loss_sums(self, model, batch, frozen_models=None):
    total, sums = super().loss_sums(model, batch)
    _, ref = super().loss_sums(frozen_models['reference'], batch)
    return total, {**sums, 'reference_loss_sum': ref['loss_sum']}

  def metrics(self, sums):
    weight = jnp.maximum(sums['weight_sum'], 1.0)
    return {**super().metrics(sums), 'reference_loss': sums['reference_loss_sum'] / weight}


@pytest.mark.slow
def test_an_objectives_frozen_model_is_loaded_passed_and_never_trained_or_saved(
    tmp_path, monkeypatch):
  """objective.frozen_models() names a checkpoint: it is loaded at the start, handed to
  loss_sums, never moved by a step, has no optimizer state and is not in the checkpoint."""
  c = _config()
  reference = decoder.Gemma3(c.model, rngs=nnx.Rngs(7))  # another seed than the trained model
  top, layers = layout.state_to_canonical(c.model, nnx.state(reference, nnx.Param))
  ours.save_params(tmp_path / 'reference', c.model, top, enumerate(layers))
  monkeypatch.setattr(objectives, 'get', lambda c: _Anchored(c, str(tmp_path / 'reference')))
  s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'run'), c)
  state, step = restore_lib.restore_or_init(s, ckpt, None)
  assert step == 0
  want = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(reference,
                                                                                  nnx.Param))}
  flat = lambda part: {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(part)}
  for k, v in flat(state['frozen_models']['reference']).items():
    np.testing.assert_array_equal(v, want[k], err_msg=str(k))

  batch = {k: v for k, v in _batch(c, [1.0] * 8).items() if k != 'row_weight'}
  new_state, metrics = s.train_step(state, {k: jax.device_put(v, s.batch_sharding[k])
                                            for k, v in batch.items()})
  ref_sums = ce.CrossEntropy(c).loss_sums(reference, {k: jnp.asarray(v)
                                                      for k, v in batch.items()})[1]
  assert float(metrics['reference_loss']) == pytest.approx(
      float(ref_sums['loss_sum'] / ref_sums['weight_sum']), rel=1e-5)
  for k, v in flat(new_state['frozen_models']['reference']).items():
    np.testing.assert_array_equal(v, want[k], err_msg=str(k))
  trainable = sum(x.size for x in jax.tree.leaves(new_state['params']))
  moments = sum(x.size for x in jax.tree.leaves(new_state['opt_state']) if x.ndim > 0)
  assert moments == 2 * trainable
  ckpt.save(1, new_state, None, force=True)
  ckpt.close()
  tree = (tmp_path / 'run' / 'checkpoints' / '1' / 'state' / '_METADATA').read_text()
  assert 'embedder' in tree and 'frozen_models' not in tree and 'reference' not in tree
