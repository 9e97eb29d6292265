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


# The small scenes build the data tests share: 24 train and 8 validation records.
SCENES_TEST_BUILD = 'res32_n24_8'


@pytest.fixture(scope='session')
def scenes_data_dir(tmp_path_factory):
  """A TFDS data dir holding SCENES_TEST_BUILD, built once per test session."""
  from mmgen_jax.data import tfds_scenes  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('tfds')
  tfds_scenes.build(SCENES_TEST_BUILD, path)
  return str(path)
