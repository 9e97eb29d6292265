"""Noise paths: how clean data x0 and Gaussian noise eps mix at time t.

Two families, both as small pure functions:

* Continuous paths x_t = alpha(t) x0 + sigma(t) eps, t in [0, 1] (0 clean,
  1 noise), used by the MMGen objective and the ODE samplers:
  'linear' (SiT/MMGen: alpha = 1 - t, sigma = t), 'vp_cosine'
  (alpha = cos(pi t / 2), sigma = sin(pi t / 2)) and 'vp_linear' (the
  continuous DDPM schedule, beta(t) = 0.1 + 19.9 t). The velocity is
  dx_t/dt = alpha'(t) x0 + sigma'(t) eps; for 'linear' it is eps - x0.
* Discrete variance-preserving schedules alpha_bar_0..T (DDPM linear betas,
  Nichol & Dhariwal cosine), used by the MT-ELBO objective, with the eps / x0 /
  v (Salimans & Ho: v = sqrt(ab) eps - sqrt(1 - ab) x0) parameterisations.

Per-slot helpers spread one time per modality slot over its channels.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PATHS = ('linear', 'vp_cosine', 'vp_linear')
PREDICTIONS = ('v', 'eps', 'x0')
VP_SCHEDULES = ('cosine', 'linear')

# Continuous DDPM schedule (Song et al. 2021): beta(t) = BETA_MIN + t (BETA_MAX - BETA_MIN).
BETA_MIN, BETA_MAX = 0.1, 20.0


def check_path(path: str, prediction: str | None = None) -> None:
  if path not in PATHS:
    raise ValueError(f'path={path!r} is not one of {PATHS}.')
  if prediction is not None and prediction not in PREDICTIONS:
    raise ValueError(f'prediction={prediction!r} is not one of {PREDICTIONS}.')


def normal(key, shape, dtype=jnp.float32):
  """Gaussian noise of any shape, drawn flat and reshaped.

  XLA:CPU compiles an N-d threefry draw (N >= 3) an order of magnitude slower
  than a 1-d one of the same size (measured: ~20 s vs ~1.5 s for (8, 4, 4, 10)),
  so image-shaped noise is drawn flat.
  """
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


# ---- the linear interpolant (SiT / MMGen) -----------------------------------

def linear_interpolate(x0, eps, t):
  """x_t = (1 - t) x0 + t eps."""
  return (1.0 - t) * x0 + t * eps


def linear_velocity(x0, eps):
  """The target velocity dx_t/dt = eps - x0."""
  return eps - x0


def linear_v_to_x0(x_t, v, t):
  return x_t - t * v


def linear_v_to_eps(x_t, v, t):
  return x_t + (1.0 - t) * v


# ---- continuous paths ---------------------------------------------------------

def _vp_linear_log_alpha_bar(t):
  return -(BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t * t)


def coefficients(path: str, t):
  """(alpha, sigma, d_alpha/dt, d_sigma/dt) of x_t = alpha x0 + sigma eps."""
  check_path(path)
  t = jnp.asarray(t, jnp.float32)
  if path == 'linear':
    one = jnp.ones_like(t)
    return 1.0 - t, t, -one, one
  if path == 'vp_cosine':
    a = 0.5 * math.pi
    return jnp.cos(a * t), jnp.sin(a * t), -a * jnp.sin(a * t), a * jnp.cos(a * t)
  # vp_linear: alpha = sqrt(ab), sigma = sqrt(1 - ab), d log ab / dt = -beta(t).
  log_ab = _vp_linear_log_alpha_bar(t)
  beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
  alpha = jnp.exp(0.5 * log_ab)
  sigma = jnp.sqrt(-jnp.expm1(log_ab))
  # d sigma / dt = beta ab / (2 sigma): unbounded as t -> 0 (sigma -> 0).
  return alpha, sigma, -0.5 * beta * alpha, 0.5 * beta * alpha * alpha / sigma


def interpolate(path: str, x0, eps, t):
  alpha, sigma, _, _ = coefficients(path, t)
  return alpha * x0 + sigma * eps


def target(path: str, prediction: str, x0, eps, t):
  """What a model trained with `prediction` regresses onto."""
  check_path(path, prediction)
  if prediction == 'eps':
    return eps
  if prediction == 'x0':
    return x0
  _, _, d_alpha, d_sigma = coefficients(path, t)
  return d_alpha * x0 + d_sigma * eps


def to_x0_eps(path: str, prediction: str, out, x_t, t):
  """Converts a model output to (x0, eps) estimates.

  Singular where the path loses the information: x0 from eps at alpha = 0
  (t = 1), eps from x0 at sigma = 0 (t = 0).
  """
  check_path(path, prediction)
  alpha, sigma, d_alpha, d_sigma = coefficients(path, t)
  if prediction == 'eps':
    return (x_t - sigma * out) / alpha, out
  if prediction == 'x0':
    return out, (x_t - alpha * out) / sigma
  # Solve [alpha sigma; d_alpha d_sigma] [x0; eps] = [x_t; v].
  det = alpha * d_sigma - sigma * d_alpha
  return (d_sigma * x_t - sigma * out) / det, (alpha * out - d_alpha * x_t) / det


def to_velocity(path: str, prediction: str, out, x_t, t):
  """The ODE velocity dx_t/dt implied by a model output."""
  if prediction == 'v':
    check_path(path, prediction)
    return out
  x0, eps = to_x0_eps(path, prediction, out, x_t, t)
  _, _, d_alpha, d_sigma = coefficients(path, t)
  return d_alpha * x0 + d_sigma * eps


# ---- variance-preserving schedules --------------------------------------------

def vp_alpha_bar(schedule: str, t):
  """Continuous alpha_bar(t), t in [0, 1]: 'cosine' cos^2(pi t / 2), 'linear' DDPM."""
  if schedule not in VP_SCHEDULES:
    raise ValueError(f'VP schedule {schedule!r} is not one of {VP_SCHEDULES}.')
  t = jnp.asarray(t, jnp.float32)
  if schedule == 'cosine':
    return jnp.cos(0.5 * math.pi * t) ** 2
  return jnp.exp(_vp_linear_log_alpha_bar(t))


def vp_alpha_bar_discrete(schedule: str, num_timesteps: int) -> np.ndarray:
  """alpha_bar_0..T in float64 (alpha_bar_0 = 1), shape (T + 1,).

  'linear': Ho et al. betas 1e-4..0.02, scaled by 1000 / T so that every T
  discretises the same process (Nichol & Dhariwal). 'cosine': Nichol & Dhariwal
  with offset s = 0.008 and betas capped at 0.999 (part of that schedule's
  definition: without the cap the last step has beta = 1, alpha_bar_T = 0).
  """
  if schedule not in VP_SCHEDULES:
    raise ValueError(f'VP schedule {schedule!r} is not one of {VP_SCHEDULES}.')
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}.')
  T = int(num_timesteps)
  if schedule == 'linear':
    scale = 1000.0 / T
    betas = np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if betas[-1] >= 1.0:
      raise ValueError(f'num_timesteps={T} is too small for the linear schedule '
                       f'(last beta {betas[-1]:.3f} >= 1); use T >= 21.')
  else:
    s = 0.008
    f = lambda u: np.cos((u + s) / (1 + s) * 0.5 * np.pi) ** 2
    u = np.arange(T + 1, dtype=np.float64) / T
    ab = f(u) / f(0.0)
    betas = np.minimum(1.0 - ab[1:] / ab[:-1], 0.999)
  log_ab = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
  return np.exp(log_ab)


def vp_convert(x_t, out, alpha_bar, src: str, dst: str):
  """Converts between eps / x0 / v predictions on x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
  for name, p in (('src', src), ('dst', dst)):
    if p not in PREDICTIONS:
      raise ValueError(f'{name}={p!r} is not one of {PREDICTIONS}.')
  if src == dst:
    return out
  a = jnp.sqrt(alpha_bar)
  s = jnp.sqrt(1.0 - alpha_bar)
  if src == 'eps':
    x0, eps = (x_t - s * out) / a, out
  elif src == 'x0':
    x0, eps = out, (x_t - a * out) / s
  else:  # v = a eps - s x0 with a^2 + s^2 = 1
    x0, eps = a * x_t - s * out, s * x_t + a * out
  return {'eps': eps, 'x0': x0, 'v': a * eps - s * x0}[dst]


# ---- per-slot times -------------------------------------------------------------

def slot_times_to_channels(t, channels: Sequence[int]):
  """(N, S) times, one per slot -> (N, 1, 1, sum(channels)) for NHWC arrays."""
  t = jnp.asarray(t)
  if t.ndim != 2 or t.shape[1] != len(channels):
    raise ValueError(f'slot times must have shape (N, {len(channels)}) for channels '
                     f'{tuple(channels)}, got {t.shape}.')
  per_channel = jnp.repeat(t, np.asarray(channels), axis=1, total_repeat_length=sum(channels))
  return per_channel[:, None, None, :]


def split_slots(x, channels: Sequence[int]) -> tuple:
  """(N, H, W, sum(channels)) -> one array per slot."""
  if x.shape[-1] != sum(channels):
    raise ValueError(f'expected {sum(channels)} channels (slots {tuple(channels)}), '
                     f'got an array of shape {x.shape}.')
  return tuple(jnp.split(x, np.cumsum(channels)[:-1].tolist(), axis=-1))
