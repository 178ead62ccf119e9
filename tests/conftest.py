"""Test setup before jax loads: the CPU backend, with eight simulated devices (unless the caller
chose JAX_PLATFORMS or XLA_FLAGS)."""

import os

# The tests run on CPU. Without this, jax probes every installed plugin at start-up, and
# libtpu (the test extra installs it) logs its TPU search and takes /tmp/libtpu_lockfile in each
# xdist worker. The AOT tests still get libtpu's compile-only TPU devices: get_topology_desc
# loads the plugin itself, whatever the default backend (tests/test_aot.py checks both).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

# One persistent XLA compilation cache for the session and the CLI subprocesses it starts (they
# inherit the environment): the resume tests compile the same step a dozen times.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_numpy_rank_promotion', 'raise')


def pytest_collection_modifyitems(config, items):
  """Leaves out the tpu_proof compiles (tens of minutes each) unless a -m expression names them,
  so that `-m "not slow"` and the default run both skip them."""
  if 'tpu_proof' in (config.option.markexpr or ''):
    return
  kept = [item for item in items if item.get_closest_marker('tpu_proof') is None]
  if len(kept) != len(items):
    config.hook.pytest_deselected(items=[i for i in items if i not in kept])
    items[:] = kept
