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


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: slower tests (still run in CI)')
  config.addinivalue_line('markers', 'multiprocess: tests that start several local processes')


@pytest.fixture(scope='session')
def parity_dir():
  """Where the parity vectors copied from ../shared/parity live."""
  return os.path.join(os.path.dirname(__file__), 'data')
