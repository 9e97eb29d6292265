"""Noise paths: interpolants, targets, conversions, VP schedules, slot helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen_jax.diffusion import paths


def _draws(seed=0, shape=(4, 3, 3, 2)):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, shape), jax.random.normal(k2, shape)


def test_linear_helpers():
  x0, eps = _draws()
  t = 0.3
  x_t = paths.linear_interpolate(x0, eps, t)
  np.testing.assert_allclose(x_t, 0.7 * x0 + 0.3 * eps, rtol=1e-6)
  v = paths.linear_velocity(x0, eps)
  np.testing.assert_allclose(paths.linear_v_to_x0(x_t, v, t), x0, atol=1e-5)
  np.testing.assert_allclose(paths.linear_v_to_eps(x_t, v, t), eps, atol=1e-5)


@pytest.mark.parametrize('path', paths.PATHS)
def test_velocity_is_time_derivative(path):
  x0, eps = _draws(1)
  for t in (0.2, 0.5, 0.8):
    h = 1e-3
    x_t = lambda s: paths.interpolate(path, x0, eps, s)
    fd = (x_t(t + h) - x_t(t - h)) / (2 * h)
    np.testing.assert_allclose(paths.target(path, 'v', x0, eps, t), fd, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('path', paths.PATHS)
@pytest.mark.parametrize('prediction', paths.PREDICTIONS)
def test_prediction_round_trip(path, prediction):
  x0, eps = _draws(2)
  t = jnp.full((4, 1, 1, 1), 0.4)
  x_t = paths.interpolate(path, x0, eps, t)
  out = paths.target(path, prediction, x0, eps, t)
  x0_hat, eps_hat = paths.to_x0_eps(path, prediction, out, x_t, t)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4)
  np.testing.assert_allclose(paths.to_velocity(path, prediction, out, x_t, t),
                             paths.target(path, 'v', x0, eps, t), atol=1e-4)


def test_unknown_path_and_prediction_are_named():
  with pytest.raises(ValueError, match="'cosine'"):
    paths.coefficients('cosine', 0.5)
  with pytest.raises(ValueError, match="'score'"):
    paths.target('linear', 'score', 0.0, 0.0, 0.5)


def test_discrete_linear_schedule_is_ddpm():
  ab = paths.vp_alpha_bar_discrete('linear', 1000)
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(ab[1:], np.cumprod(1 - betas), rtol=1e-10)
  assert ab[0] == 1.0
  # Rescaled betas: another T discretises the same process.
  ab2 = paths.vp_alpha_bar_discrete('linear', 2000)
  assert abs(np.log(ab[-1]) - np.log(ab2[-1])) < 0.1
  # ... which is the continuous DDPM schedule.
  u = np.array([100, 400, 700, 1000])
  continuous = np.asarray(paths.vp_alpha_bar('linear', u / 1000))
  np.testing.assert_allclose(np.log(ab[u]), np.log(continuous), rtol=0.02)


def test_discrete_cosine_schedule():
  T = 1000
  ab = paths.vp_alpha_bar_discrete('cosine', T)
  assert ab[0] == 1.0 and np.all(np.diff(ab) < 0) and 0 < ab[-1] < 1e-6
  s = 0.008
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  u = np.arange(T) / T  # before the 0.999 beta cap bites at the last step
  np.testing.assert_allclose(ab[:T], f(u) / f(0), rtol=1e-8)
  with pytest.raises(ValueError, match='sigmoid'):
    paths.vp_alpha_bar_discrete('sigmoid', 10)


@pytest.mark.parametrize('src', paths.PREDICTIONS)
@pytest.mark.parametrize('dst', paths.PREDICTIONS)
def test_vp_convert(src, dst):
  x0, eps = _draws(3)
  ab = jnp.asarray(0.37)
  x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
  values = {'eps': eps, 'x0': x0, 'v': jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0}
  np.testing.assert_allclose(paths.vp_convert(x_t, values[src], ab, src, dst), values[dst],
                             atol=1e-5)


def test_slot_helpers():
  t = jnp.array([[0.1, 0.5, 0.9], [0.2, 0.3, 0.4]])
  per_channel = paths.slot_times_to_channels(t, (3, 1, 2))
  assert per_channel.shape == (2, 1, 1, 6)
  np.testing.assert_allclose(per_channel[0, 0, 0], [0.1, 0.1, 0.1, 0.5, 0.9, 0.9])
  parts = paths.split_slots(jnp.arange(12.).reshape(2, 1, 1, 6), (3, 1, 2))
  assert [p.shape[-1] for p in parts] == [3, 1, 2]
  np.testing.assert_allclose(parts[1][1, 0, 0], [9.0])
  with pytest.raises(ValueError, match=r'\(N, 2\)'):
    paths.slot_times_to_channels(t, (3, 3))
  with pytest.raises(ValueError, match='expected 5 channels'):
    paths.split_slots(jnp.zeros((1, 1, 1, 6)), (3, 2))
