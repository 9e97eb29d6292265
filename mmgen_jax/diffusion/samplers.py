"""ODE / SDE samplers over the velocity field, with per-modality times and tasks.

One call covers MMGen's three uses:

* joint generation (condition=None, task 0): class -> every image modality;
* understanding (condition={'rgb': x}): RGB is held at t = t_cond and never
  updated, the other modalities are integrated (RGB -> depth/normal/seg);
* conditional generation (condition={'depth': d}): depth held, RGB and the rest
  generated.

Read against MMGen's `samplers.py` and `exp_sample.py` (jiepengwang/MMGen):

* The start is one Gaussian draw over every channel; a condition replaces its
  slot by the path's alpha(t_cond) c + sigma(t_cond) eps with eps that slot's
  own draw (on the linear path (1 - t_cond) c + t_cond eps, exp_sample.py's
  `--t-blend-start` blend, which it uses on every path). The model sees the condition slot
  at time t_cond with task index m + 1 at every call, and the slot never moves
  (MMGen's euler_maruyama_sampler keeps its time at t_blend_start, a zero
  step); the returned dict holds the clean condition. MMGen's euler_sampler has
  no condition; here the ODE methods hold it the same way.
* Classifier-free guidance mixes the class-conditional and null-class (id
  num_classes) velocities, v = v_null + cfg_scale (v_y - v_null), only at the
  calls whose time t (the generated modalities' time, where the velocity is
  evaluated: for Heun's corrector the step's end) satisfies
  guidance_low <= t <= guidance_high, as euler_sampler does. MMGen's
  euler_maruyama_sampler guides every step, which is the default interval [0, 1].
* Prompt guidance (a multimodal prompt, models/prompt_encoder.py): the model
  sees the null class (as in training) and three prompts per sample on a
  tripled batch, none / text only (entity images dropped) / full, combined by
  `prompt_encoder.combine_guidance` with separate text and entity scales, at the
  same calls (guidance_low <= t <= guidance_high). Scales 1 and 1 are the full
  prompt alone, one pass.
* 'euler' and 'heun' integrate dx/dt = v on linspace(t_max, 0, N + 1); Heun's
  last step is plain Euler (it would evaluate at t = 0), as in euler_sampler.
* 'euler_maruyama' (exp_sample.py's sampler) steps on linspace(t_max, 0.04, N)
  then 0, with drift v - w/2 score and diffusion w = 2 t on every path (the
  score from the velocity, score = (alpha/alpha' v - x) / var); every step but
  the last adds sqrt(w |dt|) noise, the last (0.04 -> 0) applies the drift alone.
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmgen_jax import modalities as modalities_lib
from mmgen_jax.diffusion import paths
from mmgen_jax.models import prompt_encoder as prompt_lib

METHODS = ('euler', 'heun', 'euler_maruyama')
SDE_LAST_T = 0.04  # euler_maruyama's last noisy time, as in MMGen's samplers.py


class Noise(NamedTuple):
  """Pre-drawn noise used instead of draws from `rng` (to replay another sampler's noise).

  initial: (N, H, W, C), the start (and, in its slot, the condition's noise);
  steps: (num_steps - 1, N, H, W, C), euler_maruyama's noise per noisy step.
  """
  initial: jax.Array
  steps: jax.Array | None = None


def num_function_evals(num_steps: int, method: str) -> int:
  """Model calls per sample batch (each on a doubled batch where guidance is on)."""
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not one of {METHODS}.')
  return 2 * num_steps - 1 if method == 'heun' else num_steps


def time_grid(num_steps: int, method: str, t_max: float = 1.0) -> np.ndarray:
  """The decreasing times visited, num_steps + 1 of them, ending at 0.

  float64 as MMGen's grids, since the guidance interval is tested on them.
  """
  if method == 'euler_maruyama':
    return np.concatenate([np.linspace(t_max, SDE_LAST_T, num_steps), [0.0]])
  return np.linspace(t_max, 0.0, num_steps + 1)


def guided_times(ts: np.ndarray, cfg_scale: float, guidance_low: float,
                 guidance_high: float) -> np.ndarray:
  """Whether the velocity at each grid time is guided (bounds inclusive, as in MMGen)."""
  return (cfg_scale > 1.0) & (guidance_low <= ts) & (ts <= guidance_high)


def prompt_settings_from_config(config: ml_collections.ConfigDict) -> dict:
  """`sample`'s prompt guidance scales from config.sample (used with a prompt)."""
  return dict(text_scale=float(config.sample.text_scale),
              entity_scale=float(config.sample.entity_scale))


def settings_from_config(config: ml_collections.ConfigDict) -> dict:
  """`sample` keyword arguments from config.sample (and the path/prediction trained on)."""
  s = config.sample
  return dict(method=s.method, num_steps=int(s.num_steps), cfg_scale=float(s.cfg_scale),
              guidance_low=float(s.guidance_low), guidance_high=float(s.guidance_high),
              t_cond=float(s.t_cond), path=config.objective.path,
              prediction=config.objective.prediction)


def sample(model, rng, *, mods: Sequence[modalities_lib.Modality], shape: tuple[int, int, int],
           y: jax.Array | None, num_classes: int,
           condition: Mapping[str, jax.Array] | None = None,
           num_steps: int = 50, cfg_scale: float = 1.0, guidance_low: float = 0.0,
           guidance_high: float = 1.0, method: str = 'euler', t_cond: float = 0.005,
           t_max: float = 1.0, path: str = 'linear', prediction: str = 'v',
           channels: Sequence[int] | None = None, use_task: bool = True,
           noise: Noise | None = None, prompt: prompt_lib.Prompt | None = None,
           text_scale: float = 1.0, entity_scale: float = 1.0) -> dict[str, jax.Array]:
  """Samples every image modality; returns {name: (N, H, W, C)}.

  shape: (N, H, W) in model space; channels: model-space channels per image
  modality in slot order (default: pixel channels from `mods`); y: (N,) class
  ids; condition: at most one image modality held fixed, at time t_cond;
  guidance (cfg_scale > 1) where guidance_low <= t <= guidance_high;
  use_task=False for a model without task embedding; noise: replaces the
  draws from `rng`. prompt: (N, ...) multimodal prompts of a model with a prompt
  encoder; it replaces the label (pass y=None: the model sees the null class)
  and is guided by text_scale / entity_scale (module docstring).
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
  if cfg_scale < 1.0:
    raise ValueError(f'cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}.')
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
  prompt_guided = prompt is not None and (text_scale != 1.0 or entity_scale != 1.0)
  if prompt is not None:
    if y is not None:
      raise ValueError('pass y=None with a prompt: the prompt replaces the class label (the '
                       'model sees the null class, as in training).')
    if cfg_scale != 1.0:
      raise ValueError(f'cfg_scale={cfg_scale} guides the class label, which a prompt replaces; '
                       'use text_scale / entity_scale.')
    if prompt.tokens.shape[0] != n:
      raise ValueError(f'prompt holds {prompt.tokens.shape[0]} prompts for {n} samples.')
    y = jnp.full((n,), num_classes, jnp.int32)
  elif text_scale != 1.0 or entity_scale != 1.0:
    raise ValueError(f'text_scale={text_scale} / entity_scale={entity_scale} guide a prompt; '
                     'none was given.')
  if y is None or y.shape != (n,):
    raise ValueError(f'y must have shape ({n},), got {None if y is None else y.shape}.')
  full_shape = (n, h, w, sum(ch))
  if noise is None:
    k_init, k_sde = jax.random.split(rng)
    noise = Noise(paths.normal(k_init, full_shape))
    step_noise = lambda i: paths.normal(jax.random.fold_in(k_sde, i), full_shape)
  else:
    _check_noise(noise, full_shape, num_steps, method)
    steps = None if noise.steps is None else jnp.asarray(noise.steps, jnp.float32)
    step_noise = lambda i: steps[i]

  cond_name = next(iter(condition), None)
  task = modalities_lib.task_index(mods, cond_name)
  cond_slots = np.array([name == cond_name for name in names])
  cond_ch = jnp.asarray(np.repeat(cond_slots, ch))
  x = jnp.asarray(noise.initial, jnp.float32)
  if cond_name is not None:
    slot = names.index(cond_name)
    c = jnp.asarray(condition[cond_name], jnp.float32)
    if c.shape != (n, h, w, ch[slot]):
      raise ValueError(f'condition[{cond_name!r}] has shape {c.shape}; expected '
                       f'{(n, h, w, ch[slot])}.')
    start = sum(ch[:slot])
    noisy = paths.interpolate(path, c, x[..., start:start + ch[slot]], t_cond)
    x = x.at[..., start:start + ch[slot]].set(noisy)
  x_start = x

  def hold(x):
    """Every state the model sees carries the same condition input."""
    return jnp.where(cond_ch, x_start, x)

  # The model's state goes into every loop and branch as an argument: NNX refuses
  # Variables holding tracers of an enclosing trace (e.g. inside the model's nnx.scan).
  graphdef, model_state = nnx.split(model)

  def velocity(model_state, x, t, guided: bool):
    net = nnx.merge(graphdef, model_state)
    if prompt is not None:  # guided: [none; text only; full] on a tripled batch
      copies, kw = (3, dict(prompt=prompt_lib.guidance_passes(prompt))) if guided else (
          1, dict(prompt=prompt))
      y_in = jnp.tile(y, copies)
    else:
      copies, kw = (2, {}) if guided else (1, {})
      y_in = jnp.concatenate([y, jnp.full_like(y, num_classes)]) if guided else y
    x_in = jnp.tile(x, (copies, 1, 1, 1))
    t_slots = jnp.where(cond_slots[None, :], t_cond, jnp.full((x_in.shape[0], len(ch)), t))
    task_in = jnp.full((x_in.shape[0],), task, jnp.int32) if use_task else None
    out = net(x_in, t_slots, y_in, task=task_in, **kw)
    pred = jnp.concatenate(out.images, axis=-1).astype(jnp.float32)
    v = paths.to_velocity(path, prediction, pred, x_in, paths.slot_times_to_channels(t_slots, ch))
    if guided and prompt is not None:
      v = prompt_lib.combine_guidance(*jnp.split(v, 3), text_scale, entity_scale)
    elif guided:
      v_y, v_null = jnp.split(v, 2)
      v = v_null + cfg_scale * (v_y - v_null)
    return v

  grid = time_grid(num_steps, method, t_max)
  guided = (guided_times(grid, cfg_scale, guidance_low, guidance_high) if prompt is None else
            prompt_guided & (guidance_low <= grid) & (grid <= guidance_high))
  ts = jnp.asarray(grid, jnp.float32)

  def velocity_at(model_state, i, x):
    """v at grid time ts[i]; guided or not as that time lies in the guidance interval."""
    if guided.all() or not guided.any():  # decided now: no branch in the loop
      return velocity(model_state, x, ts[i], bool(guided[0]))
    return jax.lax.cond(jnp.asarray(guided)[i], functools.partial(velocity, guided=True),
                        functools.partial(velocity, guided=False), model_state, x, ts[i])

  def euler_step(model_state, i, x):
    return hold(x + (ts[i + 1] - ts[i]) * velocity_at(model_state, i, x))

  def heun_step(model_state, i, x):
    dt = ts[i + 1] - ts[i]
    v = velocity_at(model_state, i, x)
    v_next = velocity_at(model_state, i + 1, hold(x + dt * v))
    return hold(x + dt * 0.5 * (v + v_next))

  def sde_step(model_state, i, x, noisy: bool = True):
    t, dt = ts[i], ts[i + 1] - ts[i]
    v = velocity_at(model_state, i, x)
    alpha, sigma, d_alpha, d_sigma = paths.coefficients(path, t)
    ratio = alpha / d_alpha
    score = (ratio * v - x) / (sigma * sigma - ratio * d_sigma * sigma)
    diffusion = 2.0 * t
    x = x + dt * (v - 0.5 * diffusion * score)
    if noisy:
      x = x + jnp.sqrt(diffusion * jnp.abs(dt)) * step_noise(i)
    return hold(x)

  def loop(step, num, x):
    """step(model_state, i, x) for i = 0, ..., num - 1."""
    body = lambda i, carry: (carry[0], step(carry[0], i, carry[1]))
    return jax.lax.fori_loop(0, num, body, (model_state, x))[1]

  if method == 'euler':
    x = loop(euler_step, num_steps, x)
  elif method == 'heun':
    x = loop(heun_step, num_steps - 1, x)
    x = euler_step(model_state, num_steps - 1, x)
  else:
    x = loop(sde_step, num_steps - 1, x)
    x = sde_step(model_state, num_steps - 1, x, noisy=False)

  result = dict(zip(names, paths.split_slots(x, ch), strict=True))
  if cond_name is not None:
    result[cond_name] = jnp.asarray(condition[cond_name], jnp.float32)
  return result


def _check_noise(noise: Noise, full_shape: tuple[int, ...], num_steps: int, method: str) -> None:
  if noise.initial.shape != full_shape:
    raise ValueError(f'noise.initial has shape {noise.initial.shape}; expected {full_shape}.')
  if method == 'euler_maruyama':
    expected = (num_steps - 1, *full_shape)
    got = None if noise.steps is None else noise.steps.shape
    if got != expected:
      raise ValueError(f'noise.steps has shape {got}; euler_maruyama with num_steps='
                       f'{num_steps} expects {expected}.')
