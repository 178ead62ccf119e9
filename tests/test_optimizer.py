"""Schedules against their closed forms; the weight-decay mask; clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train import optimizer as optimizer_lib


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


def test_global_norm_clipping():
  c = config_lib.Config().replace(optim=dict(lr=1.0, warmup_steps=0, schedule='constant',
                                             clip_norm=1.0, weight_decay=0.0, b1=0.0, b2=0.0,
                                             eps=1e-30))
  tx, _ = optimizer_lib.make_optimizer(c)
  params = {'a': jnp.zeros((1, 2))}
  # With b1=b2=0 Adam's direction is sign(g): clipping must not change it, only its input.
  g = {'a': jnp.array([[30.0, 40.0]])}
  clip = optax.clip_by_global_norm(1.0)
  clipped, _ = clip.update(g, clip.init(params))
  np.testing.assert_allclose(clipped['a'], [[0.6, 0.8]], rtol=1e-6)
  updates, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(updates['a'], [[-1.0, -1.0]], rtol=1e-5)
