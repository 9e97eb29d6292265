"""Input pipeline throughput at 64x64: steady-state images/s with 0 and 2 Grain workers.

    python bench/data_throughput.py                        # builds res64_n512_64 in a tmp dir
    python bench/data_throughput.py --data_dir=DIR --builder_config=res64

Prints one JSON object. Each run makes a fresh training iterator (shuffle,
repeat, flip + crop augmentation, normalisation, batching), discards the
warm-up batches (worker start-up, first reads) and times the next ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags

from mmgen_jax import config_schema
from mmgen_jax.data import pipeline
from mmgen_jax.data import tfds_scenes

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir; default: a tmp dir with a '
                                'freshly built small res64 dataset.')
_BUILDER_CONFIG = flags.DEFINE_string('builder_config', 'res64_n512_64', 'Builder config to read.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global batch size (one process).')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Batches discarded before timing.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Batches timed.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'Grain worker counts to measure.')
_CROP = flags.DEFINE_float('crop_min_scale', 0.75, 'Random crop scale (1 = no crop).')


def measure(config, workers: int) -> dict[str, float]:
  config.data.worker_count = workers
  start = time.perf_counter()
  it = pipeline.make_iterator(config, 'train', train=True, process_index=0, process_count=1)
  for _ in range(_WARMUP.value):
    next(it)
  warm = time.perf_counter()
  for _ in range(_STEPS.value):
    next(it)
  seconds = time.perf_counter() - warm
  it.close()
  return {
      'workers': workers,
      'images_per_s': round(_STEPS.value * _BATCH.value / seconds, 1),
      'batches_per_s': round(_STEPS.value / seconds, 2),
      'warmup_s': round(warm - start, 2),
  }


def main(argv: list[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = _DATA_DIR.value
    build_s = None
    if data_dir is None:
      data_dir = tmp
      start = time.perf_counter()
      with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is the JSON
        tfds_scenes.build(_BUILDER_CONFIG.value, data_dir, render_workers=2)
      build_s = round(time.perf_counter() - start, 1)
    config = config_schema.base_config()
    config.data.builder_config = _BUILDER_CONFIG.value
    config.data.data_dir = data_dir
    config.data.resolution = tfds_scenes.get_config(_BUILDER_CONFIG.value).resolution
    config.data.global_batch_size = _BATCH.value
    config.data.augment.hflip = True
    config.data.augment.crop_min_scale = _CROP.value
    load_before = os.getloadavg()[0]
    results = [measure(config, int(w)) for w in _WORKERS.value]
  print(json.dumps({
      'benchmark': 'data_throughput',
      'builder_config': _BUILDER_CONFIG.value,
      'resolution': config.data.resolution,
      'batch_size': _BATCH.value,
      'warmup_batches': _WARMUP.value,
      'timed_batches': _STEPS.value,
      'crop_min_scale': _CROP.value,
      'read_threads': config.data.read_threads,
      'build_s': build_s,
      'cpu_count': os.cpu_count(),
      # Other jobs on the machine slow every figure down: report how busy it was.
      'load_average_1min': [round(load_before, 2), round(os.getloadavg()[0], 2)],
      'machine': platform.machine(),
      'results': results,
  }, indent=2))


if __name__ == '__main__':
  app.run(main)
