"""The sampler's token draws (inference/draws.py: categorical, top_k_top_p, argmax) against
their definitions: token frequencies against softmax, the kept sets against a float64 numpy
top-k / top-p with ties, greedy against jnp.argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3_train.inference import draws
from gemma3_train.inference import sampler as sample


def _kept(z, k, p):
  """transformers' TopK then TopP warpers in float64: values >= the k-th largest (ties kept),
  then a token while the mass of the larger ones is below p (ties together)."""
  z = np.asarray(z, np.float64)
  keep = np.ones_like(z, bool)
  if k:
    keep &= z >= np.sort(z)[::-1][min(k, len(z)) - 1]
  if p < 1:
    zk = np.where(keep, z, -np.inf)
    order = np.argsort(-zk, kind='stable')
    probs = np.exp(zk[order] - zk[order][0])
    probs /= probs.sum()
    n = max(int(np.sum(np.cumsum(probs) - probs < p)), 1)
    keep &= zk >= zk[order[n - 1]]
  return keep & np.isfinite(z)


def test_cutoffs_equal_the_warpers_with_ties_and_masked_tokens():
  rng = np.random.default_rng(0)
  cut = jax.jit(lambda z, k, p: draws.top_k_top_p(z, {'top_k': k, 'top_p': p}))
  V = 300  # one shape, one compile: fewer tokens are -inf columns
  for trial in range(60):
    z = rng.normal(size=(3, V)) * rng.uniform(0.1, 5)
    if trial % 3 == 0:
      z = np.round(z)  # ties at the cutoffs
    if trial % 5 == 0:
      z[:, rng.integers(1, V):] = -np.inf  # tokens filtered before (k may exceed the rest)
    z = z.astype(np.float32)
    k = int(rng.integers(0, V + 3))
    p = float(rng.choice([1.0, rng.uniform(0.01, 1.0)]))
    got = np.isfinite(np.asarray(cut(jnp.asarray(z), jnp.int32(k), jnp.float32(p))))
    for b in range(3):
      assert np.array_equal(got[b], _kept(z[b], k, p)), (trial, V, k, p, b)


@pytest.mark.parametrize('V', [7, 300, 1200])  # one block; several with a padded last one
def test_draw_frequencies_are_softmax(V):
  """40k draws per row: counts within the chi-square spread of softmax; mass 0 never drawn."""
  rng = np.random.default_rng(V)
  z = rng.normal(size=(2, V)) * 2
  z[1, ::3] = -np.inf
  z = jnp.asarray(z, jnp.float32)
  n = 40_000
  ids = np.asarray(jax.jit(jax.vmap(lambda k: draws.categorical(z, k)))(
      jax.random.split(jax.random.PRNGKey(0), n)))  # [n, 2]
  for b in range(2):
    p = np.asarray(jax.nn.softmax(z[b]), np.float64)
    counts = np.bincount(ids[:, b], minlength=V)
    assert counts[p == 0].sum() == 0
    expected = p * n
    big = expected > 5  # the rest pooled
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2, dof = float(np.sum((obs - exp) ** 2 / exp)), len(obs) - 1
    assert abs(chi2 - dof) < 5 * np.sqrt(2 * max(dof, 1)), (chi2, dof)


def test_draw_is_seeded():
  z = jnp.asarray(np.random.default_rng(1).normal(size=(4, 2048)), jnp.float32)
  draw = jax.jit(draws.categorical)
  key = jax.random.PRNGKey(3)
  assert np.array_equal(draw(z, key), draw(z, key))
  assert not np.array_equal(draw(z, key), draw(z, jax.random.PRNGKey(4)))


def test_greedy_is_argmax():
  rng = np.random.default_rng(2)
  x = np.round(rng.normal(size=(6, 1000)) * 2).astype(np.float32)  # ties: the first wins
  x[5] = -np.inf
  x[5, 17] = 0.0
  assert np.array_equal(np.asarray(draws.argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
  logits = jnp.asarray(x)
  out = sample.sample_logits(logits, jax.random.PRNGKey(0), sample.Sampling(0.0))
  assert out.dtype == jnp.int32 and np.array_equal(out, np.argmax(x, axis=-1))
