"""Test session set-up: 8 fake CPU devices for sharding tests, before JAX starts."""

import os

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
# Many tests compile the same small functions; a session-wide compilation cache
# roughly halves the suite's time on CPU and changes no numbers.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('MMGEN_TEST_JAX_CACHE', os.path.join(os.path.dirname(__file__), '..', '.jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: slower tests (still run in CI)')
  config.addinivalue_line('markers', 'multiprocess: tests that start several local processes')


@pytest.fixture(scope='session')
def parity_dir():
  """Where the parity vectors copied from ../shared/parity live."""
  return os.path.join(os.path.dirname(__file__), 'data')
