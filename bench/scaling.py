r"""How the train step's time grows with depth, tokens and modalities, as JSON.

Three sweeps around `bench/train_step.py`'s mmgen_s2 case (SiT-S/2: width 384,
6 heads, patch 2, 4 × 4 latent channels at 32×32 = 256 tokens, depth 12, batch 8,
REPA after block min(8, depth)), one knob at a time:

  depth       blocks in the trunk;
  tokens      latent side 2·√tokens (patch 2), so 64, 256, 1024 tokens are 16², 32², 64²;
  modalities  image modalities of 4 latent channels each (concatenated before
              the one patch embedding, so the token count stays the same).

Every point of a sweep is compiled first; then the points take turns, `--rounds`
times `--steps` steps each, so a shared machine's load falls on all alike. Each
point reports its minimum and median step time; each sweep a least-squares line
step_time = intercept + slope · knob (over the minima) and the largest point's
time over the smallest's.

  python bench/scaling.py [--dtype=float32] [--depths=1,4,12,28] [--tokens=64,256,1024] \
      [--modalities=1,2,4,6] [--rounds=3] [--steps=2]
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

from absl import app
from absl import flags
import numpy as np

import step_timing  # bench/step_timing.py, beside this file

_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Global batch.')
_DEPTHS = flags.DEFINE_list('depths', ['1', '4', '12', '28'], 'Depths of the depth sweep.')
_TOKENS = flags.DEFINE_list('tokens', ['64', '256', '1024'], 'Token counts (squares).')
_MODALITIES = flags.DEFINE_list('modalities', ['1', '2', '4', '6'], 'Modality counts.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Turns each point takes.')
_STEPS = flags.DEFINE_integer('steps', 2, 'Steps per turn.')

BASE = dict(depth=12, tokens=256, modalities=4)


def point_config(dtype: str, batch: int, *, depth: int, tokens: int, modalities: int):
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f'tokens={tokens} is not a square (a side×side grid of patches).')
  return step_timing.mmgen_config(dtype, batch, depth=depth, latent_side=2 * side,
                                 num_modalities=modalities)


def fit_line(xs: list[float], ys: list[float]) -> dict[str, float] | None:
  """Least-squares y = intercept + slope·x (None for fewer than two distinct x)."""
  if len(set(xs)) < 2:
    return None
  slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
  return dict(slope_s=float(slope), intercept_s=float(intercept))


def main(argv: list[str]) -> None:
  del argv
  sweeps = {'depth': [int(d) for d in _DEPTHS.value],
            'tokens': [int(t) for t in _TOKENS.value],
            'modalities': [int(m) for m in _MODALITIES.value]}
  points: dict[tuple[int, int, int], Any] = {}  # (depth, tokens, modalities) -> PreparedStep
  for knob, values in sweeps.items():
    for value in values:
      key = dict(BASE, **{knob: value})
      index = (key['depth'], key['tokens'], key['modalities'])
      if index not in points:
        config = point_config(_DTYPE.value, _BATCH.value, **key)
        points[index] = step_timing.prepare(config, count_xla_flops=False)
  times: dict[tuple[int, int, int], list[float]] = {index: [] for index in points}
  for _ in range(_ROUNDS.value):
    for index, prepared in points.items():
      times[index] += prepared.run(_STEPS.value)

  result: dict[str, Any] = dict(dtype=_DTYPE.value, batch=_BATCH.value, base=BASE,
                                rounds=_ROUNDS.value, steps_per_round=_STEPS.value)
  for knob, values in sweeps.items():
    rows = []
    for value in values:
      key = dict(BASE, **{knob: value})
      index = (key['depth'], key['tokens'], key['modalities'])
      prepared = points[index]
      rows.append({knob: value, 'step_time_min_s': min(times[index]),
                   'step_time_median_s': statistics.median(times[index]),
                   'analytic_flops_per_step': prepared.analytic_flops,
                   'params': prepared.params, 'compile_s': prepared.compile_s})
    minima = [r['step_time_min_s'] for r in rows]
    result[knob] = dict(points=rows, fit=fit_line(values, minima),
                        largest_over_smallest=minima[-1] / minima[0])
  result['machine'] = step_timing.machine()
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  app.run(main)
