"""ODE/SDE samplers against toy models whose exact velocity is known, and against
trajectories of MMGen's official samplers (tests/data/README_samplers.md)."""

import importlib.util
import json
import os
import re
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from mmgen_jax import config_schema
from mmgen_jax import config_validation
from mmgen_jax import modalities
from mmgen_jax.diffusion import paths
from mmgen_jax.diffusion import samplers

MODS = modalities.from_config(config_schema.scenes_modalities())
CHANNELS = [m.channels for m in modalities.images(MODS)]  # rgb 3, depth 1, normal 3, seg 3
K = 4  # classes; K is the null id
SHAPE = (3, 2, 2)


class Out(NamedTuple):
  images: tuple
  logits: tuple = ()
  zs: tuple = ()


def _split(v):
  return Out(images=paths.split_slots(v, CHANNELS))


class PointMass(nnx.Module):
  """Data is the single point mu(y) = y + slot (null class: 0): v = (x - mu) / t exactly."""

  def __call__(self, x, t, y, task=None):
    t_ch = paths.slot_times_to_channels(t, CHANNELS)
    slot = paths.slot_times_to_channels(jnp.broadcast_to(jnp.arange(4.0), t.shape), CHANNELS)
    real = (y < K)[:, None, None, None]
    mu = jnp.where(real, y[:, None, None, None] + slot, 0.0)
    return _split((x - mu) / t_ch)


class TimeOnly(nnx.Module):
  """v(x, t) = t, so a sampler's result minus its start is a quadrature of t over its grid."""

  def __call__(self, x, t, y, task=None):
    return _split(paths.slot_times_to_channels(t, CHANNELS) + 0 * x)


class Zero(nnx.Module):

  def __call__(self, x, t, y, task=None):
    return _split(jnp.zeros_like(x))


class CopyCondition(nnx.Module):
  """Generated slots converge to mean(condition input) + 10 task + 1000 t_condition.

  The condition slot itself is pushed with a huge velocity, which the sampler must ignore.
  """

  def __init__(self, slot: int, read_input: bool = True):
    self.slot, self.read_input = slot, read_input

  def __call__(self, x, t, y, task=None):
    cond = paths.split_slots(x, CHANNELS)[self.slot]
    mu = 10.0 * task + 1000.0 * t[:, self.slot]
    if self.read_input:
      mu = mu + cond.mean(axis=(1, 2, 3))
    t_ch = paths.slot_times_to_channels(t, CHANNELS)
    v = (x - mu[:, None, None, None]) / t_ch
    start = sum(CHANNELS[:self.slot])
    channel = jnp.arange(sum(CHANNELS))
    in_slot = (channel >= start) & (channel < start + CHANNELS[self.slot])
    return _split(jnp.where(in_slot, 1e3, v))


class Gaussian(nnx.Module):
  """Data ~ N(mu, s^2) per pixel; the exact velocity of the linear path."""
  mu, s = 0.5, 0.3

  def __call__(self, x, t, y, task=None):
    t = paths.slot_times_to_channels(t, CHANNELS)
    a, s2 = 1.0 - t, self.s ** 2
    var = a * a * s2 + t * t
    r = x - a * self.mu
    e_x0 = self.mu + a * s2 / var * r
    e_eps = t / var * r
    return _split(e_eps - e_x0)


def _run(model, method='euler', num_steps=5, y=None, **kw):
  y = jnp.array([1, 2, 3], jnp.int32) if y is None else y
  return samplers.sample(model, jax.random.key(0), mods=MODS, shape=SHAPE, y=y, num_classes=K,
                         num_steps=num_steps, method=method, **kw)


@pytest.mark.parametrize('method', ['euler', 'heun'])
def test_point_mass_is_recovered_exactly(method):
  out = _run(PointMass(), method)
  y = np.array([1, 2, 3])
  for slot, m in enumerate(modalities.images(MODS)):
    assert out[m.name].shape == (*SHAPE, m.channels)
    expected = np.broadcast_to((y + slot)[:, None, None, None], out[m.name].shape)
    np.testing.assert_allclose(out[m.name], expected, atol=1e-5)


def test_classifier_free_guidance_mixes_velocities():
  # v = v_null + s (v_y - v_null) = (x - s mu(y)) / t: the sample lands on s mu(y).
  out = _run(PointMass(), cfg_scale=3.0)
  y = np.array([1, 2, 3])
  np.testing.assert_allclose(out['rgb'][:, 0, 0, 0], 3.0 * y, atol=1e-4)
  np.testing.assert_allclose(out['depth'][:, 0, 0, 0], 3.0 * (y + 1), atol=1e-4)


@pytest.mark.parametrize('method,num_steps', [('euler', 1), ('euler', 4), ('heun', 1), ('heun', 4)])
def test_step_count_and_grid(method, num_steps):
  start = _run(Zero(), method, num_steps)['rgb']
  moved = _run(TimeOnly(), method, num_steps)['rgb'] - start
  n = num_steps
  if method == 'euler':  # left Riemann sum of t over linspace(1, 0, n + 1)
    expected = -(n + 1) / (2 * n)
  else:  # exact trapezoids down to 1/n, then one Euler step
    expected = -(0.5 * (1 - 1 / n ** 2) + 1 / n ** 2)
  np.testing.assert_allclose(moved, expected, atol=1e-5)
  assert samplers.num_function_evals(n, method) == (n if method == 'euler' else 2 * n - 1)


def test_condition_is_held_and_names_the_task():
  cond = jnp.arange(3.0)[:, None, None, None] * jnp.ones((*SHAPE, 1))
  out = _run(CopyCondition(slot=1), condition={'depth': cond}, t_cond=0.0)
  np.testing.assert_array_equal(out['depth'], cond)
  # depth is slot 1 -> task 2; its input stayed the clean condition at t = 0.
  for name in ('rgb', 'normal', 'segmentation'):
    np.testing.assert_allclose(out[name], jnp.broadcast_to(cond + 20.0, out[name].shape), atol=1e-4)


def test_condition_enters_at_t_cond():
  cond = jnp.ones((*SHAPE, 3))
  out = _run(CopyCondition(slot=0, read_input=False), condition={'rgb': cond}, t_cond=0.005)
  np.testing.assert_array_equal(out['rgb'], cond)  # the clean condition is returned
  # rgb is slot 0 -> task 1, held at t = 0.005 for the whole run: 10 + 1000 * 0.005.
  for name in ('depth', 'normal', 'segmentation'):
    np.testing.assert_allclose(out[name], 15.0, atol=1e-4)


def test_jit_matches_eager():
  model = PointMass()
  eager = _run(model, 'heun', 3)

  @nnx.jit
  def run(model, y):
    return samplers.sample(model, jax.random.key(0), mods=MODS, shape=SHAPE, y=y, num_classes=K,
                           num_steps=3, method='heun')

  jitted = run(model, jnp.array([1, 2, 3], jnp.int32))
  for name in eager:
    np.testing.assert_allclose(jitted[name], eager[name], atol=1e-6)


@pytest.mark.parametrize('method,num_steps,tol',
                         [('euler', 50, 0.05), ('euler_maruyama', 100, 0.08)])
def test_gaussian_data_distribution(method, num_steps, tol):
  y = jnp.zeros((400,), jnp.int32)
  out = samplers.sample(Gaussian(), jax.random.key(1), mods=MODS, shape=(400, 2, 2), y=y,
                        num_classes=K, num_steps=num_steps, method=method)
  x = np.asarray(out['rgb'])
  assert abs(x.mean() - Gaussian.mu) < tol
  assert abs(x.std() - Gaussian.s) < tol


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match='at most one'):
    _run(Zero(), condition={'rgb': jnp.zeros((*SHAPE, 3)), 'depth': jnp.zeros((*SHAPE, 1))})
  with pytest.raises(KeyError, match='label'):
    _run(Zero(), condition={'label': jnp.zeros((3,))})
  with pytest.raises(ValueError, match=r'\(3, 2, 2, 1\)'):
    _run(Zero(), condition={'depth': jnp.zeros((3, 2, 2, 3))})
  with pytest.raises(ValueError, match='method'):
    _run(Zero(), method='dpm')
  with pytest.raises(ValueError, match='cfg_scale must be >= 1'):
    _run(Zero(), cfg_scale=0.5)
  with pytest.raises(ValueError, match=r'noise.steps has shape None; .* \(4, 3, 2, 2, 10\)'):
    _run(Zero(), 'euler_maruyama', noise=samplers.Noise(jnp.zeros((*SHAPE, 10))))


@pytest.mark.slow
def test_real_mmdit_under_jit():
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  config = config_schema.base_config()
  config.data.resolution = 4
  config.model.update(hidden_size=32, depth=1, num_heads=2, mlp_ratio=2.0)
  model = nnx.jit(lambda: build.build_model(config, rngs=nnx.Rngs(0)))()
  cond = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)

  @nnx.jit
  def understand(model, cond):
    return samplers.sample(model, jax.random.key(0), mods=MODS, shape=(2, 4, 4),
                           y=jnp.array([0, 3]), num_classes=config.data.num_classes,
                           condition={'rgb': cond}, num_steps=3, cfg_scale=1.5, method='heun',
                           guidance_high=0.5)  # guided at t = 1/3 only: a branch in the loop

  out = understand(model, cond)
  np.testing.assert_array_equal(out['rgb'], cond)
  assert {k: v.shape[-1] for k, v in out.items()} == dict(rgb=3, depth=1, normal=3, segmentation=3)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in out.values())


# ---- parity with MMGen's official samplers.py ---------------------------------------------

PARITY_FILE = os.path.join(os.path.dirname(__file__), 'data', 'sampler_parity.safetensors')
with safetensors.safe_open(PARITY_FILE, 'np') as _f:
  PARITY_CASES = json.loads(_f.metadata()['cases'])
PARITY_CHANNELS = [4, 4, 4, 4]  # the released model's four 4-channel latent slots
NAMES = [m.name for m in modalities.images(MODS)]
PATH_NAMES = {'linear': 'linear', 'cosine': 'vp_cosine'}  # official name -> ours


class LinearVelocity(nnx.Module):
  """The analytic field of tests/data/sampler_parity_make.py; `record` sees every call."""

  def __init__(self, params, record):
    self.a, self.b, self.e, self.g = (nnx.Variable(jnp.asarray(params[f'model/{k}']))
                                      for k in 'ABEG')
    self.record = record

  def __call__(self, x, t, y, task=None):
    t = paths.slot_times_to_channels(t, PARITY_CHANNELS)[:, 0, 0, :]
    task = jnp.zeros_like(y) if task is None else task
    v = x @ self.a[...] + (t @ self.b[...] + self.e[...][y] + self.g[...][task])[:, None, None, :]
    jax.debug.callback(self.record, x, t, y, task, ordered=True)
    return Out(images=paths.split_slots(v, PARITY_CHANNELS))


@pytest.fixture(scope='module')
def parity():
  return safetensors.numpy.load_file(PARITY_FILE)


def _replay(case, data):
  """Runs our sampler on a case's noise; returns ({name: output}, the model's calls)."""
  s, get = PARITY_CASES[case], lambda key: data[f'{case}/{key}']
  calls = []
  model = LinearVelocity(data, lambda *a: calls.append(tuple(np.asarray(v) for v in a)))
  condition = None if s['slot'] is None else {NAMES[s['slot']]: get('condition')}
  steps = get('steps') if s['method'] == 'euler_maruyama' else None
  out = samplers.sample(
      model, None, mods=MODS, shape=get('initial').shape[:3], y=jnp.asarray(get('y')),
      num_classes=len(data['model/E']) - 1, condition=condition, num_steps=s['num_steps'],
      cfg_scale=s['cfg_scale'], guidance_low=s.get('guidance_low', 0.0),
      guidance_high=s.get('guidance_high', 1.0), method=s['method'], t_cond=s['t_cond'],
      path=PATH_NAMES[s.get('path_type', 'linear')], channels=PARITY_CHANNELS,
      noise=samplers.Noise(get('initial'), steps))
  jax.effects_barrier()
  return out, calls


# Float32 round-off against the official float64 state (measured: at most 6e-6, over
# 250 steps); a dropped
# step, a wrong noise or score coefficient or a fading condition moves it by > 1e-3.
PARITY_ATOL = 2e-5


@pytest.mark.parametrize('case', sorted(PARITY_CASES))
def test_matches_official_trajectory(case, parity):
  out, calls = _replay(case, parity)
  get = lambda key: parity[f'{case}/{key}']
  n, null = len(get('y')), len(parity['model/E']) - 1
  assert len(calls) == len(get('calls_x'))
  for i, ((x, t, y, task), guided) in enumerate(zip(calls, get('calls_guided'), strict=True)):
    assert len(y) == n * (1 + guided), f'call {i}: guidance on = {bool(guided)} expected'
    np.testing.assert_array_equal(y[n:], null)
    np.testing.assert_array_equal(task, get('calls_task')[i])
    np.testing.assert_allclose(t[:n], get('calls_t')[i], atol=1e-7, err_msg=f'call {i}')
    np.testing.assert_allclose(x[:n], get('calls_x')[i], atol=PARITY_ATOL, err_msg=f'call {i}')
  final = paths.split_slots(get('final'), PARITY_CHANNELS)
  slot = PARITY_CASES[case]['slot']
  for i, name in enumerate(NAMES):
    # MMGen returns the held (noised) condition; we return the clean one.
    expected = get('condition') if i == slot else final[i]
    np.testing.assert_allclose(out[name], expected, atol=PARITY_ATOL, err_msg=name)


@pytest.mark.parametrize('method', samplers.METHODS)
def test_model_sees_the_same_condition_at_every_call(method):
  seen = []

  class Recorder(nnx.Module):

    def __call__(self, x, t, y, task=None):
      jax.debug.callback(lambda *a: seen.append(a), x[..., :3], t[:, 0], ordered=True)
      return _split(0.5 * x + t[:, 1:2, None, None])

  cond = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (*SHAPE, 3)), jnp.float32)
  _run(Recorder(), method, num_steps=20, condition={'rgb': cond}, cfg_scale=2.0,
       guidance_low=0.3, guidance_high=0.6)
  jax.effects_barrier()
  assert len(seen) == samplers.num_function_evals(20, method)
  for x, t in seen:
    np.testing.assert_array_equal(x[:3], seen[0][0][:3])
    np.testing.assert_array_equal(t, np.float32(0.005))


def test_settings_come_from_config_sample():
  config = config_schema.base_config()
  config.sample.update(method='heun', num_steps=3, cfg_scale=2.0, guidance_low=0.2,
                       guidance_high=0.7, t_cond=0.01)
  settings = samplers.settings_from_config(config)
  assert settings == dict(method='heun', num_steps=3, cfg_scale=2.0, guidance_low=0.2,
                          guidance_high=0.7, t_cond=0.01, path=config.objective.path,
                          prediction=config.objective.prediction)
  _run(Zero(), **settings)  # every setting is one of sample's arguments


@pytest.mark.parametrize('changes, expected', [
    ({'method': 'rk4'}, "config.sample.method='rk4' is not one of ['euler', 'heun', "
     "'euler_maruyama']"),
    ({'cfg_scale': 0.5}, 'config.sample.cfg_scale=0.5 must be >= 1.0'),
    ({'guidance_high': 1.5}, 'config.sample.guidance_high=1.5 must be in [0.0, 1.0]'),
    ({'guidance_low': 0.8, 'guidance_high': 0.2}, 'guidance_low=0.8 exceeds guidance_high=0.2'),
    ({'t_cond': -0.1}, 'config.sample.t_cond=-0.1 must be in [0.0, 1.0]'),
])
def test_config_sample_checks_name_key_and_value(changes, expected):
  config = config_schema.base_config()
  config.sample.update(changes)
  with pytest.raises(config_validation.ConfigError, match=re.escape(expected)):
    config_validation.validate(config, num_devices=1, num_processes=1)


def test_guidance_needs_a_null_class():
  config = config_schema.base_config()
  config.sample.cfg_scale, config.model.class_dropout_prob = 2.0, 0.0
  with pytest.raises(config_validation.ConfigError, match='class_dropout_prob=0 does not have'):
    config_validation.validate(config, num_devices=1, num_processes=1)


def test_xl2_config_samples_as_mmgen_inference():
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', 'imagenet256_xl2.py')
  spec = importlib.util.spec_from_file_location('imagenet256_xl2', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  settings = samplers.settings_from_config(module.get_config())
  assert settings == dict(method='euler_maruyama', num_steps=250, cfg_scale=1.0, guidance_low=0.0,
                          guidance_high=1.0, t_cond=0.005, path='linear', prediction='v')
