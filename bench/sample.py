r"""Sampling speed of the inference tasks, as JSON (images/s after a compiling call).

  joint            class -> all image modalities in one sampler run (one image = every modality)
  separate         the same modalities from two single-task runs: class -> RGB (a joint run
                   whose other modalities are dropped), then RGB -> the rest
  rgb_to_x         understanding at the configured step count
  rgb_to_x_files   the command's whole path on PNG files: read, resize, sample, decode,
                   resize back, write the PNG/.npy/PLY outputs

The model is freshly initialised (speed does not depend on the weights), or
restored from --workdir. Every local device is used (XLA_FLAGS can ask for
fake CPU devices); on a shared machine the figures are upper bounds on time.

  python bench/sample.py [--config=configs/tiny_cpu.py] [--steps=20] [--batch=8] [--repeats=2] \
      [--workdir=DIR] [--method=euler]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmgen_jax import inference  # noqa: E402  pylint: disable=g-import-not-at-top
from mmgen_jax import parallel  # noqa: E402  pylint: disable=g-import-not-at-top
import step_timing  # noqa: E402  bench/step_timing.py, beside this file

_CONFIG = flags.DEFINE_string('config', os.path.join(step_timing.REPO, 'configs', 'tiny_cpu.py'),
                              'Config file.')
_STEPS = flags.DEFINE_integer('steps', None, 'Sampler steps (default config.sample.num_steps).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Images per sampler call.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed calls per case (after one compiling call).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Restore this run\'s checkpoint (default: fresh).')
_METHOD = flags.DEFINE_string('method', None, 'Sampler method (default config.sample.method).')


def fresh_model(config):
  """A freshly initialised model in its shards, as restore_for_inference returns one."""
  # pylint: disable=g-import-not-at-top
  from mmgen_jax import train
  from mmgen_jax import train_state as ts_lib
  mesh = parallel.make_mesh(config.mesh)
  tx = ts_lib.make_optimizer(config.optim,
                             ts_lib.make_schedule(config.optim, config.train.num_steps))
  plan = ts_lib.plan_train_state(train.default_parts(config).model_fn, tx, mesh,
                                 config.sharding_rules, int(config.seed), config.train.rng_impl)
  state = plan.init()
  with jax.set_mesh(mesh):
    model = ts_lib.merge_model(plan.graphdef, state.ema_params, state.model_state)
  return model, mesh


def timed(fn, repeats: int) -> dict[str, float]:
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {'first_call_s': round(first, 3), 'seconds': round(float(np.median(times)), 4)}


def main(argv):
  del argv
  config = step_timing.load_config(_CONFIG.value)
  if _STEPS.value is not None:
    config.sample.num_steps = _STEPS.value
  if _METHOD.value is not None:
    config.sample.method = _METHOD.value
  config.sample.num_images = _BATCH.value
  inference.check_config(config)
  if _WORKDIR.value:
    from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
    model, _, mesh = evaluate.restore_for_inference(config, _WORKDIR.value)
  else:
    model, mesh = fresh_model(config)
  n, repeats = _BATCH.value, _REPEATS.value
  sampler = inference.Sampler(config, model, mesh, seed=0)
  first = sampler.images[0].name
  num_classes = sampler.num_classes
  rows = dict(index=np.arange(n), member=np.zeros(n, np.int32))
  classes = (np.arange(n) % num_classes).astype(np.int32)
  null = np.full(n, num_classes, np.int32)
  held = {}

  def joint():
    held['joint'] = sampler(stage=0, y=classes, **rows)

  def rgb_to_x():
    sampler(stage=1, y=null, cond_name=first, cond=held['joint'][first], **rows)

  results = {'joint': timed(joint, repeats), 'rgb_to_x': timed(rgb_to_x, repeats)}
  results['separate'] = {'seconds': round(results['joint']['seconds']
                                          + results['rgb_to_x']['seconds'], 4)}
  for r in results.values():
    r['images_per_s'] = round(n / r['seconds'], 2)

  with tempfile.TemporaryDirectory() as d:
    g = np.random.default_rng(0)
    for i in range(n):
      Image.fromarray(g.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(f'{d}/in{i}.png')
    opts = inference.Options(task=f'{first}_to_x', inputs=f'{d}/in*.png', out=f'{d}/out')
    images = inference._images(config)  # pylint: disable=protected-access

    def files():
      for r in inference.run_task(config, model, mesh, opts):
        inference.write_result(opts.out, r, images, 50.0)
    results['rgb_to_x_files'] = timed(files, repeats)
    results['rgb_to_x_files']['images_per_s'] = round(n / results['rgb_to_x_files']['seconds'], 2)

  s = config.sample
  print(json.dumps({
      'config': os.path.relpath(_CONFIG.value, step_timing.REPO),
      'weights': _WORKDIR.value or 'fresh',
      'resolution': int(config.data.resolution), 'batch': n, 'method': s.method,
      'num_steps': int(s.num_steps), 'devices': jax.device_count(),
      'platform': jax.devices()[0].platform, 'cpu_count': os.cpu_count(),
      'joint_vs_separate_speedup': round(results['separate']['seconds']
                                         / results['joint']['seconds'], 3),
      'cases': results}, indent=1))


if __name__ == '__main__':
  app.run(main)
