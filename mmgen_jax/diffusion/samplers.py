"""ODE / SDE samplers over the velocity field, with per-modality times and tasks.

One call covers MMGen's three uses:

* joint generation (condition=None, task 0): class -> every image modality;
* understanding (condition={'rgb': x}): RGB is held at t = t_cond and never
  updated, the other modalities are integrated (RGB -> depth/normal/seg);
* conditional generation (condition={'depth': d}): depth held, RGB and the rest
  generated.

As in MMGen's inference, a condition enters the model noised to t_cond
((1 - t_cond) c + t_cond eps) with task index m + 1; its velocity is zeroed so
the slot never moves, and the returned dict holds the clean condition.
Classifier-free guidance mixes the class-conditional and null-class (id
num_classes) velocities: v = v_null + cfg_scale (v_y - v_null).

Methods: 'euler' and 'heun' integrate dx/dt = v on linspace(t_max, 0, N + 1)
(Heun's last step is plain Euler since it would evaluate at t = 0, as in
MMGen/EDM); 'euler_maruyama' is MMGen's default SDE sampler (grid
linspace(1, 0.04, N) then 0, drift v - var * score, diffusion 2 var with var = t
on the linear path, no noise on the last step).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mmgen_jax import modalities as modalities_lib
from mmgen_jax.diffusion import paths

METHODS = ('euler', 'heun', 'euler_maruyama')


def num_function_evals(num_steps: int, method: str) -> int:
  """Model calls per sample batch (doubled internally when guidance is on)."""
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not one of {METHODS}.')
  return 2 * num_steps - 1 if method == 'heun' else num_steps


def time_grid(num_steps: int, method: str, t_max: float = 1.0) -> jax.Array:
  """The decreasing times visited, num_steps + 1 of them, ending at 0."""
  if method == 'euler_maruyama':
    return jnp.concatenate([jnp.linspace(t_max, 0.04, num_steps), jnp.zeros((1,))])
  return jnp.linspace(t_max, 0.0, num_steps + 1)


def sample(model, rng, *, mods: Sequence[modalities_lib.Modality], shape: tuple[int, int, int],
           y: jax.Array, num_classes: int, condition: Mapping[str, jax.Array] | None = None,
           num_steps: int = 50, cfg_scale: float = 1.0, method: str = 'euler',
           t_cond: float = 0.005, t_max: float = 1.0, path: str = 'linear',
           prediction: str = 'v', channels: Sequence[int] | None = None,
           use_task: bool = True) -> dict[str, jax.Array]:
  """Samples every image modality; returns {name: (N, H, W, C)}.

  shape: (N, H, W) in model space; channels: model-space channels per image
  modality in slot order (default: pixel channels from `mods`); y: (N,) class
  ids; condition: at most one image modality held fixed; use_task=False for a
  model without task embedding.
  """
  images = modalities_lib.images(mods)
  names = [m.name for m in images]
  ch = list(channels) if channels is not None else [m.channels for m in images]
  if len(ch) != len(images):
    raise ValueError(f'channels={ch} must give one count per image modality {names}.')
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not one of {METHODS}.')
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
  paths.check_path(path, prediction)
  if prediction == 'eps' and t_max >= 1.0:
    raise ValueError('an eps-predicting model has no velocity at t = 1 (alpha = 0); '
                     'pass t_max < 1.')
  condition = dict(condition or {})
  unknown = sorted(set(condition) - set(names))
  if unknown:
    raise KeyError(f'condition {unknown} is not an image modality; choose from {names}.')
  if len(condition) > 1:
    raise ValueError(f'condition on at most one modality (the task index names one), '
                     f'got {sorted(condition)}.')
  n, h, w = shape
  if y.shape != (n,):
    raise ValueError(f'y must have shape ({n},), got {y.shape}.')
  cond_name = next(iter(condition), None)
  task = modalities_lib.task_index(mods, cond_name)
  cond_slots = np.array([name == cond_name for name in names])
  cond_ch = jnp.asarray(np.repeat(cond_slots, ch))

  k_init, k_cond, k_sde = jax.random.split(rng, 3)
  x = paths.normal(k_init, (n, h, w, sum(ch)))
  if cond_name is not None:
    slot = names.index(cond_name)
    c = jnp.asarray(condition[cond_name], jnp.float32)
    if c.shape != (n, h, w, ch[slot]):
      raise ValueError(f'condition[{cond_name!r}] has shape {c.shape}; expected '
                       f'{(n, h, w, ch[slot])}.')
    start = sum(ch[:slot])
    noisy = paths.interpolate(path, c, paths.normal(k_cond, c.shape), t_cond)
    x = x.at[..., start:start + ch[slot]].set(noisy)

  guided = cfg_scale != 1.0
  y_in = jnp.concatenate([y, jnp.full_like(y, num_classes)]) if guided else y
  n_in = y_in.shape[0]
  task_in = jnp.full((n_in,), task, jnp.int32)
  graphdef, state = nnx.split(model)

  def velocity(x, t):
    net = nnx.merge(graphdef, state)
    t_slots = jnp.where(cond_slots[None, :], t_cond, jnp.full((n_in, len(ch)), t))
    x_in = jnp.concatenate([x, x]) if guided else x
    out = net(x_in, t_slots, y_in, task=task_in if use_task else None)
    pred = jnp.concatenate(out.images, axis=-1).astype(jnp.float32)
    v = paths.to_velocity(path, prediction, pred, x_in, paths.slot_times_to_channels(t_slots, ch))
    if guided:
      v_y, v_null = jnp.split(v, 2)
      v = v_null + cfg_scale * (v_y - v_null)
    return jnp.where(cond_ch, 0.0, v)  # the condition never moves

  ts = time_grid(num_steps, method, t_max)

  def euler_step(i, x):
    return x + (ts[i + 1] - ts[i]) * velocity(x, ts[i])

  def heun_step(i, x):
    dt = ts[i + 1] - ts[i]
    v = velocity(x, ts[i])
    v_next = velocity(x + dt * v, ts[i + 1])
    return x + dt * 0.5 * (v + v_next)

  def sde_step(i, x):
    t, dt = ts[i], ts[i + 1] - ts[i]
    v = velocity(x, t)
    alpha, sigma, d_alpha, d_sigma = paths.coefficients(path, t)
    ratio = alpha / d_alpha
    var = sigma * sigma - ratio * d_sigma * sigma  # = t on the linear path
    score = (ratio * v - x) / var
    mean = x + dt * (v - var * score)
    noise = paths.normal(jax.random.fold_in(k_sde, i), x.shape)
    noise = jnp.where(cond_ch, 0.0, noise)
    return mean + jnp.sqrt(2.0 * var * jnp.abs(dt)) * noise

  if method == 'euler':
    x = jax.lax.fori_loop(0, num_steps, euler_step, x)
  elif method == 'heun':
    x = jax.lax.fori_loop(0, num_steps - 1, heun_step, x)
    x = euler_step(num_steps - 1, x)
  else:
    x = jax.lax.fori_loop(0, num_steps - 1, sde_step, x)
    x = euler_step(num_steps - 1, x)

  result = dict(zip(names, paths.split_slots(x, ch)))
  if cond_name is not None:
    result[cond_name] = jnp.asarray(condition[cond_name], jnp.float32)
  return result
