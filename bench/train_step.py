r"""Train-step speed on this machine, as JSON: step time, images/s, FLOPs utilisation.

Utilisation is measured against this machine's own matmul peak (a large
square matmul timed in the same dtype right after each case), not a datasheet
figure. Cases: the
tiny CPU config and a DiT-S/2-sized one (width 384, depth 12, 6 heads, patch
2, 32×32 pixel space), each in float32 and bfloat16 compute, on every local
device (one CPU device unless XLA_FLAGS asks for more).

  python bench/train_step.py [--steps=10] [--batch=8] [--cases=tiny,dit_s2,configs/x.py] \
      [--dtypes=float32,bfloat16] [--matmul_size=2048]
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mmgen_jax import config_validation
from mmgen_jax import parallel
from mmgen_jax import plan as plan_lib
from mmgen_jax import train
from mmgen_jax import train_state

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per case (after one warm-up step).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Global batch of the DiT-S/2 case.')
_CASES = flags.DEFINE_list('cases', ['tiny', 'dit_s2'], 'Which model sizes.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
_MATMUL = flags.DEFINE_integer('matmul_size', 2048, 'Side of the square peak-matmul.')


def matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
  """Best FLOP/s of an n×n @ n×n matmul in `dtype` on the default device."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def load_config(path: str):
  """`get_config()` of a config file (what --config=path does)."""
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def case_config(name: str, dtype: str, batch: int):
  """'tiny', 'dit_s2' (tiny's data at DiT-S/2 size, batch `batch`) or a config file path."""
  if name.endswith('.py'):
    c = load_config(name)
  else:
    c = load_config(os.path.join(_REPO, 'configs', 'tiny_cpu.py'))
    if name == 'dit_s2':
      c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 384, 12, 6, 2
      c.data.global_batch_size = batch
    elif name != 'tiny':
      raise ValueError(f'unknown case {name!r}; cases: tiny, dit_s2 or a config file path.')
  c.model.dtype = dtype
  return c


def random_batch(config, sharding) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  out = {}
  for key, spec in plan_lib.abstract_batch(config, config.data.global_batch_size).items():
    if jnp.issubdtype(spec.dtype, jnp.integer):
      x = rng.integers(0, config.data.num_classes, spec.shape).astype(spec.dtype)
    else:
      x = rng.uniform(-1, 1, spec.shape).astype(spec.dtype)
    out[key] = jax.device_put(x, sharding)
  return out


def time_case(config, steps: int) -> dict[str, Any]:
  config_validation.validate(config)
  parts = train.default_parts(config)
  mesh = parallel.make_mesh(config.mesh)
  schedule = train_state.make_schedule(config.optim, config.train.num_steps)
  tx = train_state.make_optimizer(config.optim, schedule)
  rng_impl = config.train.rng_impl
  plan = train_state.plan_train_state(parts.model_fn, tx, mesh, config.sharding_rules, 0,
                                      rng_impl)
  step = train_state.jit_train_step(
      train_state.make_train_step(plan.graphdef, parts.loss_fn, tx, schedule,
                                  ema_decay=float(config.optim.ema_decay), rng_impl=rng_impl),
      plan.shardings, parallel.batch_sharding(mesh, config.sharding_rules), mesh)
  with jax.set_mesh(mesh):
    state = plan.init()
    batch = random_batch(config, parallel.batch_sharding(mesh, config.sharding_rules))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = train_state.step_flops(compiled.cost_analysis())  # per device, no accumulation
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  n = config.data.global_batch_size
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return dict(params=params, batch=n, step_time_s=step_s, step_time_min_s=min(times), images_per_s=n / step_s,
              flops_per_step_per_device=flops, flops_per_s_per_device=flops / step_s,
              compile_s=compile_s, loss=float(metrics['loss']))


def main(argv: list[str]) -> None:
  del argv
  devices = jax.devices()
  results = []
  for name in _CASES.value:
    for dtype in _DTYPES.value:
      config = case_config(name, dtype, _BATCH.value)
      r = time_case(config, _STEPS.value)
      # The peak is timed right after the case: on a shared machine both see the same load.
      peak = matmul_peak(dtype, _MATMUL.value)
      r.update(case=name, dtype=dtype, description=config_validation.describe(config),
               matmul_peak_flops_per_s=peak,
               utilisation_of_matmul_peak=r['flops_per_s_per_device'] / peak)
      results.append(r)
      print(json.dumps(r), flush=True)
  print(json.dumps(dict(
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), load_average_1min=os.getloadavg()[0],
                   backend=jax.default_backend(), devices=len(devices),
                   device_kind=devices[0].device_kind, jax=jax.__version__),
      matmul_size=_MATMUL.value, results=results), indent=1))


if __name__ == '__main__':
  app.run(main)
