"""Builds the `mmgen_scenes` (or `mmgen_prompts`) TFDS dataset offline (ArrayRecord).

    python -m mmgen_jax.data.build --config=res64 --data_dir=~/tensorflow_datasets
    python -m mmgen_jax.data.build --config=res64 --train_size=1000 --val_size=100
    python -m mmgen_jax.data.build --dataset=mmgen_prompts --config=res32_small

With --train_size/--val_size the config is a custom one named
`res{R}_n{train}_{val}`; point `config.data.builder_config` at that name.
An existing build is reused, never overwritten.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags

from mmgen_jax.data import tfds_prompts
from mmgen_jax.data import tfds_scenes

_DATASETS = {tfds_scenes.NAME: tfds_scenes, tfds_prompts.NAME: tfds_prompts}
_DATASET = flags.DEFINE_enum('dataset', tfds_scenes.NAME, list(_DATASETS),
                             'The builder: scenes, or scenes with multimodal prompts.')
_CONFIG = flags.DEFINE_string(
    'config', 'res32_small',
    f'Builder config: one of {[c.name for c in tfds_scenes.BUILDER_CONFIGS]} '
    '(or res{R}_n{train}_{val}).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: $TFDS_DATA_DIR or '
                                '~/tensorflow_datasets).')
_TRAIN_SIZE = flags.DEFINE_integer('train_size', None, 'Override the number of train records.')
_VAL_SIZE = flags.DEFINE_integer('val_size', None, 'Override the number of validation records.')
_WORKERS = flags.DEFINE_integer('workers', 2, 'Rendering processes (0 = render in this process).')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  module = _DATASETS[_DATASET.value]
  config = module.get_config(_CONFIG.value)
  if _TRAIN_SIZE.value is not None or _VAL_SIZE.value is not None:
    config = module.custom_config(
        config.resolution,
        config.train_size if _TRAIN_SIZE.value is None else _TRAIN_SIZE.value,
        config.val_size if _VAL_SIZE.value is None else _VAL_SIZE.value)
  data_dir = os.path.expanduser(_DATA_DIR.value or os.environ.get('TFDS_DATA_DIR', '')
                                or '~/tensorflow_datasets')
  what = (f'{module.NAME}/{config.name}: {config.train_size} train + {config.val_size} '
          f'validation images at {config.resolution}x{config.resolution}')
  builder = module.make_builder(config, data_dir)
  if builder.is_prepared():
    print(f'{what} already built in {builder.data_dir}; nothing to do.')
    return
  tfds.disable_progress_bar()  # ours counts rendered images; TFDS's would duplicate it
  start = time.perf_counter()
  builder = module.build(config, data_dir, render_workers=_WORKERS.value,
                              show_progress=True)
  seconds = time.perf_counter() - start
  total = config.train_size + config.val_size
  print(f'{what} written to {builder.data_dir}')
  print(f'time: {seconds:.1f} s, {total / seconds:.1f} images/s '
        f'({_WORKERS.value} render workers)')


if __name__ == '__main__':
  app.run(main)
