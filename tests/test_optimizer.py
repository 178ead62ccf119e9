"""Schedules against their closed forms; the weight-decay mask; clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.training import optimizer as optimizer_lib


def _o(**kw):
  return config_lib.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, **kw)


def test_warmup_then_cosine():
  f = optimizer_lib.make_schedule(_o(schedule='cosine'), 110)
  assert float(f(0)) == 0.0
  assert float(f(5)) == pytest.approx(0.5)
  assert float(f(10)) == pytest.approx(1.0)
  for t in (30, 60, 90):
    frac = (t - 10) / 100
    assert float(f(t)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)), rel=1e-5)
  assert float(f(110)) == pytest.approx(0.1)


def test_linear_constant_wsd():
  lin = optimizer_lib.make_schedule(_o(schedule='linear'), 110)
  assert float(lin(60)) == pytest.approx(1.0 - 0.9 * 0.5)
  const = optimizer_lib.make_schedule(_o(schedule='constant'), 110)
  assert float(const(100)) == pytest.approx(1.0)
  wsd = optimizer_lib.make_schedule(_o(schedule='wsd', decay_fraction=0.2), 110)
  assert float(wsd(50)) == pytest.approx(1.0)   # stable phase
  assert float(wsd(90)) == pytest.approx(1.0)   # decay starts after 80 of 100 post-warmup steps
  assert float(wsd(100)) == pytest.approx(1.0 - 0.9 * 0.5)
  assert float(wsd(110)) == pytest.approx(0.1)


class _Tiny(nnx.Module):
  def __init__(self):
    self.table = nnx.Param(jnp.ones((4, 2)), logical_axes=('vocab', 'embed'))
    self.w = nnx.Param(jnp.ones((2, 2)), logical_axes=('embed', 'mlp'))
    self.scale = nnx.Param(jnp.ones((2,)), logical_axes=('norm',))


@pytest.mark.parametrize('decay_norms,decay_embedding', [(False, False), (True, True)])
def test_weight_decay_mask(decay_norms, decay_embedding):
  c = config_lib.Config().replace(optim=dict(lr=0.1, warmup_steps=0, schedule='constant',
                                             weight_decay=0.5, clip_norm=0.0,
                                             decay_norms=decay_norms,
                                             decay_embedding=decay_embedding))
  tx, _ = optimizer_lib.make_optimizer(c)
  params = nnx.state(_Tiny(), nnx.Param)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  u = nnx.to_pure_dict(updates)
  # With zero gradients, AdamW's update is -lr * wd * p exactly where decay applies.
  np.testing.assert_allclose(u['w'], -0.05 * np.ones((2, 2)))
  np.testing.assert_allclose(u['scale'], -0.05 * np.ones(2) if decay_norms else 0)
  np.testing.assert_allclose(u['table'], -0.05 * np.ones((4, 2)) if decay_embedding else 0)


def _adam_by_hand(grads, lr, b1, b2, eps):
  """Per-step Adam updates (bias-corrected, no weight decay), written out in numpy."""
  m = v = 0.0
  out = []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    out.append(-lr * m_hat / (np.sqrt(v_hat) + eps))
  return out


def test_global_norm_clipping():
  o = dict(lr=1.0, warmup_steps=0, schedule='constant', weight_decay=0.0, b1=0.9, b2=0.99,
           eps=1e-8)
  c = config_lib.Config().replace(optim=dict(o, clip_norm=1.0))
  tx, _ = optimizer_lib.make_optimizer(c)
  params = {'a': jnp.zeros((1, 2))}
  # A step with norm 50 (clipped to 1), then one with norm 0.5 (kept). Adam's first update is
  # sign(g) whatever the scale; the second depends on the first step's scale, so it tells
  # whether the gradients were clipped before they reached Adam.
  grads = [np.array([[30.0, 40.0]]), np.array([[0.3, -0.4]])]
  clipped = [g * min(1.0, 1.0 / np.linalg.norm(g)) for g in grads]
  state, got = tx.init(params), []
  for step, g in enumerate(grads, start=1):
    u, state = tx.update({'a': jnp.asarray(g)}, state, params)
    got.append(np.asarray(u['a']))
    if step == 1:  # what reached Adam: its first moment is (1 - b1) x the clipped [[0.6, 0.8]]
      mu = optax.tree_utils.tree_get(state, 'mu')
      np.testing.assert_allclose(mu['a'], [[0.06, 0.08]], rtol=1e-6)
  want = _adam_by_hand(clipped, 1.0, 0.9, 0.99, 1e-8)
  unclipped = _adam_by_hand(grads, 1.0, 0.9, 0.99, 1e-8)
  assert np.abs(got[1] - unclipped[1]).max() > 0.1  # not what unclipped Adam would do
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5)
