"""Writes tests/data/sampler_parity.safetensors from MMGen's official samplers.

Run in a PyTorch environment (torch, numpy, safetensors) with the official
repository (jiepengwang/MMGen) checked out; its samplers.py is imported from
there, nothing of it is copied here:

  python tests/data/sampler_parity_make.py --official /path/to/MMGen \
      --out tests/data/sampler_parity.safetensors

The "model" is an analytic velocity field with the official model's call
signature, model(x, t, y=..., lis_idx_taskcond_rand=...) -> (v, zs), per-channel
t of shape (B, C, 1, 1) and a `num_classes` attribute:

  v[b, d] = sum_c x[b, c] A[c, d] + sum_c t[b, c] B[c, d] + E[y_b, d] + G[task_b, d]

(task 0 when no task is passed). Every call records its input (first half of a
guided batch), its per-channel times, whether the batch was guided and its task.
The initial noise is drawn with torch.randn as exp_sample.py does; the per-step
noise of euler_maruyama_sampler is recorded by wrapping torch.randn_like (each
draw rounded to float32, so both sides add identical values). All tensors are
stored channels-last (N, H, W, C); the cases' settings are in the file's
metadata under 'cases' (JSON).
"""

import argparse
import contextlib
import importlib.util
import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file

NUM_CLASSES = 5  # the null class is id 5
NUM_TASKS = 4
CHANNELS = 4 * NUM_TASKS  # four 4-channel slots, as the released model
SHAPE = (2, CHANNELS, 2, 1)  # (B, C, H, W)
T_COND = 0.005

# name: (sampler, settings). 'slot' is the held condition (None: joint generation).
CASES = {
    'ode_euler': ('euler', dict(num_steps=10, cfg_scale=1.0, slot=None)),
    'ode_heun': ('heun', dict(num_steps=10, cfg_scale=1.0, slot=None)),
    # Dyadic grids: the interval's bounds fall exactly on grid times (inclusive).
    'ode_euler_guided': ('euler', dict(num_steps=8, cfg_scale=2.5, guidance_low=0.25,
                                       guidance_high=0.75, slot=None)),
    'ode_heun_guided': ('heun', dict(num_steps=8, cfg_scale=2.5, guidance_low=0.25,
                                     guidance_high=0.75, slot=None)),
    'ode_euler_cond': ('euler', dict(num_steps=10, cfg_scale=1.8, guidance_low=0.35,
                                     guidance_high=0.85, slot=1)),
    'ode_heun_cond': ('heun', dict(num_steps=10, cfg_scale=1.0, slot=0)),
    'sde': ('euler_maruyama', dict(num_steps=12, cfg_scale=1.0, slot=None)),
    'sde_guided_cond': ('euler_maruyama', dict(num_steps=12, cfg_scale=1.8, slot=0)),
    'sde_cond_cosine': ('euler_maruyama', dict(num_steps=12, cfg_scale=1.0, slot=2,
                                               path_type='cosine')),
    'sde_cond_250': ('euler_maruyama', dict(num_steps=250, cfg_scale=1.0, slot=0)),
}


def load_official(root):
  spec = importlib.util.spec_from_file_location('mmgen_samplers', os.path.join(root, 'samplers.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class LinearVelocity(torch.nn.Module):
  """The analytic velocity field above; records every call."""

  def __init__(self, params):
    super().__init__()
    self.num_classes = NUM_CLASSES
    self.p = {k: torch.from_numpy(v) for k, v in params.items()}
    self.calls = []

  def forward(self, x, t, y, lis_idx_taskcond_rand=None):
    assert x.dtype == torch.float32 and t.shape == (x.shape[0], CHANNELS, 1, 1), (x.dtype, t.shape)
    task = (torch.zeros_like(y) if lis_idx_taskcond_rand is None else lis_idx_taskcond_rand)
    t = t[:, :, 0, 0]
    v = (torch.einsum('bchw,cd->bdhw', x, self.p['A'])
         + (t @ self.p['B'] + self.p['E'][y] + self.p['G'][task])[:, :, None, None])
    n = SHAPE[0]
    guided = x.shape[0] == 2 * n
    self.calls.append(dict(x=x[:n].clone(), t=t[:n].clone(), guided=guided, task=int(task[0]),
                           y=y.clone()))
    return v, []


class HeldCondition(torch.nn.Module):
  """Gives euler_sampler (which has no condition argument) MMGen's condition convention.

  As euler_maruyama_sampler does: the slot's time is t_cond, the task index is
  slot + 1, and the slot takes a zero step (here: zero velocity).
  """

  def __init__(self, inner, slot):
    super().__init__()
    self.inner, self.slot = inner, slot
    self.num_classes = inner.num_classes

  def forward(self, x, t, y):
    held = slice(4 * self.slot, 4 * self.slot + 4)
    t = t.clone()
    t[:, held] = T_COND
    task = torch.full_like(y, self.slot + 1)
    v, zs = self.inner(x, t, y, lis_idx_taskcond_rand=task)
    v = v.clone()
    v[:, held] = 0.0
    return v, zs


@contextlib.contextmanager
def recorded_randn_like(draws):
  original = torch.randn_like

  def randn_like(x, *args, **kwargs):
    z = original(x, *args, **kwargs).to(torch.float32)
    draws.append(z.clone())
    return z.to(x.dtype)

  torch.randn_like = randn_like
  try:
    yield
  finally:
    torch.randn_like = original


def nhwc(x):
  return np.ascontiguousarray(x.detach().to(torch.float32).numpy().transpose(0, 2, 3, 1))


def run_case(official, params, sampler, s, seed):
  torch.manual_seed(seed)
  latents = torch.randn(SHAPE)  # the start, as exp_sample.py draws it
  y = torch.randint(NUM_CLASSES, (SHAPE[0],))
  condition = torch.randn((SHAPE[0], 4, *SHAPE[2:]))
  initial = latents.clone()
  slot = s['slot']
  if slot is not None:  # exp_sample.py's --t-blend-start blend, on the slot's own noise
    held = slice(4 * slot, 4 * slot + 4)
    # exp_sample.py blends linearly on every path; on the cosine path we use the path's
    # own coefficients, as training noises a condition (loss.py's interpolant).
    alpha, sigma = ((np.cos(T_COND * np.pi / 2), np.sin(T_COND * np.pi / 2))
                    if s.get('path_type') == 'cosine' else (1 - T_COND, T_COND))
    latents[:, held] = latents[:, held] * sigma + condition * alpha
  model = LinearVelocity(params)
  draws = []
  cfg = dict(cfg_scale=s['cfg_scale'])
  if sampler == 'euler_maruyama':
    with recorded_randn_like(draws):
      out = official.euler_maruyama_sampler(
          model, latents, y, num_steps=s['num_steps'], path_type=s.get('path_type', 'linear'),
          condition_task=slot, t_blend_start=T_COND, **cfg)
  else:
    net = model if slot is None else HeldCondition(model, slot)
    out = official.euler_sampler(
        net, latents, y, num_steps=s['num_steps'], heun=sampler == 'heun',
        guidance_low=s.get('guidance_low', 0.0), guidance_high=s.get('guidance_high', 1.0),
        use_decouple_task=True, **cfg)
  y_null = torch.full_like(y, NUM_CLASSES)
  for call in model.calls:
    assert torch.equal(call['y'], torch.cat([y, y_null]) if call['guided'] else y)
  arrays = {
      'initial': nhwc(initial), 'y': y.numpy().astype(np.int32), 'final': nhwc(out),
      'calls_x': np.stack([nhwc(c['x']) for c in model.calls]),
      'calls_t': np.stack([c['t'].numpy() for c in model.calls]),
      'calls_guided': np.array([c['guided'] for c in model.calls], np.int32),
      'calls_task': np.array([c['task'] for c in model.calls], np.int32),
  }
  if slot is not None:
    arrays['condition'] = nhwc(condition)
  if sampler == 'euler_maruyama':
    arrays['steps'] = np.stack([nhwc(z) for z in draws]) if draws else np.zeros(
        (0, *nhwc(initial).shape), np.float32)
  return arrays


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--official', required=True, help='checkout of jiepengwang/MMGen')
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  official = load_official(args.official)
  torch.set_default_dtype(torch.float32)
  rng = np.random.default_rng(0)
  c = CHANNELS
  params = {
      'A': (0.3 / np.sqrt(c) * rng.standard_normal((c, c))).astype(np.float32),
      'B': (0.5 / np.sqrt(c) * rng.standard_normal((c, c))).astype(np.float32),
      'E': rng.standard_normal((NUM_CLASSES + 1, c)).astype(np.float32),
      'G': rng.standard_normal((NUM_TASKS + 1, c)).astype(np.float32),
  }
  tensors = {f'model/{k}': v for k, v in params.items()}
  cases = {}
  for seed, (name, (sampler, s)) in enumerate(CASES.items()):
    for key, value in run_case(official, params, sampler, s, seed).items():
      tensors[f'{name}/{key}'] = value
    cases[name] = dict(method=sampler, t_cond=T_COND, **s)
  save_file(tensors, args.out, metadata={'cases': json.dumps(cases)})
  print(f'wrote {args.out}: {len(cases)} cases, '
        f'{sum(v.nbytes for v in tensors.values()) / 1024:.0f} KiB')


if __name__ == '__main__':
  main()
