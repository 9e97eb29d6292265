r"""Train-step speed on this machine, as JSON: step time, images/s, FLOPs and utilisation.

Cases:
  tiny      the tiny CPU config (pixel space, width 128, depth 4);
  dit_s2    tiny's data (10 pixel channels at 32×32) at DiT-S/2 size: width 384,
            depth 12, 6 heads, patch 2 (256 tokens);
  mmgen_s2  MMGen's recipe (configs/imagenet256_xl2.py) at SiT-S/2 size: 4
            modalities × 4 latent channels at 32×32, REPA projector after block 8
            with its loss (coefficient 0.5, against random stand-in features), the
            size `bench/peer_mmgen_torch.py` runs the official PyTorch model at;
  a path    any config file.
Each in float32 and bfloat16 compute, on every local device (one CPU device
unless XLA_FLAGS asks for more), timed after one warm-up step.

FLOPs: the analytic matmul count of `plan.analytic_forward_flops` × 3 (forward +
backward) × batch, and XLA's count beside it (the step lowered with the trunk's
scan unrolled: XLA counts a loop body once). Utilisation is the analytic FLOP rate over this machine's own matmul
peak (a square matmul timed in the same dtype right after each case; bfloat16
accumulates in float32 as the model does), not a datasheet figure.

  python bench/train_step.py [--steps=10] [--batch=8] [--cases=tiny,dit_s2,mmgen_s2,configs/x.py] \
      [--dtypes=float32,bfloat16] [--matmul_size=2048]
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections

from mmgen_jax import config_validation
import step_timing  # bench/step_timing.py, beside this file

_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per case (after one warm-up step).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Global batch of the dit_s2 and mmgen_s2 cases.')
_CASES = flags.DEFINE_list('cases', ['tiny', 'dit_s2', 'mmgen_s2'], 'Which models.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
_MATMUL = flags.DEFINE_integer('matmul_size', 2048, 'Side of the square peak-matmul.')


def case_config(name: str, dtype: str, batch: int) -> ml_collections.ConfigDict:
  """'tiny', 'dit_s2', 'mmgen_s2' (see the module docstring) or a config file path."""
  if name.endswith('.py'):
    c = step_timing.load_config(name)
  elif name == 'mmgen_s2':
    return step_timing.mmgen_config(dtype, batch)
  else:
    c = step_timing.load_config(os.path.join(step_timing.REPO, 'configs', 'tiny_cpu.py'))
    if name == 'dit_s2':
      c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 384, 12, 6, 2
      c.data.global_batch_size = batch
    elif name != 'tiny':
      raise ValueError(f'unknown case {name!r}; cases: tiny, dit_s2, mmgen_s2 or a config '
                       'file path.')
  c.model.dtype = dtype
  return c


def matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
  """Best FLOP/s of an n×n @ n×n matmul in `dtype` (float32 accumulation)."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def main(argv: list[str]) -> None:
  del argv
  results = []
  for name in _CASES.value:
    for dtype in _DTYPES.value:
      config = case_config(name, dtype, _BATCH.value)
      prepared = step_timing.prepare(config)
      r = step_timing.summary(prepared, prepared.run(_STEPS.value))
      # The peak is timed right after the case: on a shared machine both see the same load.
      peak = matmul_peak(dtype, _MATMUL.value)
      r.update(case=name, dtype=dtype, description=config_validation.describe(config),
               matmul_peak_flops_per_s=peak,
               utilisation_of_matmul_peak=r['analytic_flops_per_s'] / jax.device_count() / peak)
      results.append(r)
      print(json.dumps(r), flush=True)
  print(json.dumps(dict(machine=step_timing.machine(), matmul_size=_MATMUL.value, results=results),
                   indent=1))


if __name__ == '__main__':
  app.run(main)
