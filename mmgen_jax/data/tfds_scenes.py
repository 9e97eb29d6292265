"""TFDS builder `mmgen_scenes`: the procedural scenes, written as ArrayRecord.

Every record is rendered by `scenes.render_scene(seed, resolution)` and keeps
its seed, so any record can be re-rendered from the dataset alone.

Seed scheme: record `i` of split `s` has seed `SPLIT_SEED_OFFSETS[s] + i`
(train starts at 0, validation at 10**9), so the splits never share a scene
for any split size below 10**9. Shuffling at write time is disabled: record
index `i` in the ArrayRecord files is the `i`-th seed of its split.

Build offline (`python -m mmgen_jax.data.build --config=res64`) and read with
`tfds.data_source('mmgen_scenes/res64', data_dir=...)`; importing this module
registers the builder with TFDS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import multiprocessing
import multiprocessing.pool
import os
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
import tqdm

from mmgen_jax.data import scenes

NAME = 'mmgen_scenes'
FILE_FORMAT = tfds.core.FileFormat.ARRAY_RECORD
SPLIT_SEED_OFFSETS = {'train': 0, 'validation': 1_000_000_000}

B = TypeVar('B', bound=tfds.core.GeneratorBasedBuilder)


@dataclasses.dataclass
class ScenesConfig(tfds.core.BuilderConfig):
  """One resolution and split sizes."""
  resolution: int = 32
  train_size: int = 2_000
  val_size: int = 200

  def split_sizes(self) -> dict[str, int]:
    return {'train': self.train_size, 'validation': self.val_size}


def custom_config(resolution: int, train_size: int, val_size: int) -> ScenesConfig:
  """A config of any size, named `res{R}_n{train}_{val}` (e.g. for tests)."""
  if resolution not in scenes.RESOLUTIONS:
    raise ValueError(f'resolution={resolution} is not one of {scenes.RESOLUTIONS}.')
  for split, n in (('train', train_size), ('validation', val_size)):
    if not 0 < n < SPLIT_SEED_OFFSETS['validation']:
      raise ValueError(f'{split} size {n} must be in [1, {SPLIT_SEED_OFFSETS["validation"]}).')
  return ScenesConfig(name=f'res{resolution}_n{train_size}_{val_size}', resolution=resolution,
                      train_size=train_size, val_size=val_size,
                      description=f'{resolution}x{resolution}, {train_size} train / '
                                  f'{val_size} validation scenes.')


BUILDER_CONFIGS = [
    ScenesConfig(name='res32_small', resolution=32, train_size=2_000, val_size=200,
                 description='32x32, 2,000 train / 200 validation: the tiny CPU default.'),
    ScenesConfig(name='res32', resolution=32, train_size=20_000, val_size=1_000,
                 description='32x32, 20,000 train / 1,000 validation.'),
    ScenesConfig(name='res64', resolution=64, train_size=20_000, val_size=1_000,
                 description='64x64, 20,000 train / 1,000 validation.'),
    ScenesConfig(name='res128', resolution=128, train_size=20_000, val_size=1_000,
                 description='128x128, 20,000 train / 1,000 validation.'),
    ScenesConfig(name='res256', resolution=256, train_size=20_000, val_size=1_000,
                 description='256x256, 20,000 train / 1,000 validation.'),
]


def seed_for(split: str, index: int) -> int:
  """The render seed of record `index` of `split` (see the module docstring)."""
  if split not in SPLIT_SEED_OFFSETS:
    raise KeyError(f'unknown split {split!r}; splits are {sorted(SPLIT_SEED_OFFSETS)}.')
  return SPLIT_SEED_OFFSETS[split] + index


def features(resolution: int) -> tfds.features.FeaturesDict:
  r = resolution
  zlib = tfds.features.Encoding.ZLIB  # smooth float maps compress well; exact round trip
  return tfds.features.FeaturesDict({
      'rgb': tfds.features.Image(shape=(r, r, 3), dtype=np.uint8, encoding_format='png'),
      'depth': tfds.features.Tensor(shape=(r, r), dtype=np.float32, encoding=zlib),
      'normal': tfds.features.Tensor(shape=(r, r, 3), dtype=np.float32, encoding=zlib),
      'segmentation': tfds.features.Tensor(shape=(r, r), dtype=np.uint8, encoding=zlib),
      'label': tfds.features.ClassLabel(names=list(scenes.SCENE_CLASSES)),
      'intrinsics': tfds.features.Tensor(shape=(3, 3), dtype=np.float32),
      'seed': tfds.features.Scalar(dtype=np.int64),
  })


def _png(rgb: np.ndarray) -> io.BytesIO:
  buf = io.BytesIO()
  PIL.Image.fromarray(rgb).save(buf, format='PNG')
  buf.seek(0)
  return buf


def render_example(seed: int, resolution: int) -> dict[str, Any]:
  """One record as the builder writes it (module level so worker processes can pickle it).

  The PNG is encoded here with PIL, so the work spreads over the render workers
  and the writer never needs TensorFlow's image ops.
  """
  out = scenes.render_scene(seed, resolution)
  rgb = np.asarray(out['rgb'])
  if rgb.shape != (resolution, resolution, 3) or rgb.dtype != np.uint8:
    raise ValueError(f'render_scene(seed={seed}, resolution={resolution}) returned rgb '
                     f'{rgb.dtype}{rgb.shape}; expected uint8{(resolution, resolution, 3)}.')
  return dict(rgb=_png(rgb), depth=out['depth'], normal=out['normal'],
              segmentation=out['segmentation'], label=int(out['label']),
              intrinsics=out['intrinsics'], seed=np.int64(seed))


def _render_args(args: tuple[int, int]) -> dict[str, Any]:
  return render_example(*args)


def rendered_examples(render: Callable[[Any], dict[str, Any]], args: Sequence[Any], *,
                      pool: multiprocessing.pool.Pool | None, desc: str, show_progress: bool
                      ) -> Iterator[tuple[int, dict[str, Any]]]:
  """(i, render(args[i])) for every i in order: what a rendering builder's
  `_generate_examples` yields.

  With `pool`, the renders run in its processes (`render` must then be a module-level
  function, to be pickled), ordered as `args`; without, here. A tqdm bar named `desc`
  counts them if `show_progress`.
  """
  if pool is not None:
    examples = pool.imap(render, args, chunksize=16)  # ordered
  else:
    examples = (render(a) for a in args)
  with tqdm.tqdm(total=len(args), desc=desc, unit='img', disable=not show_progress) as bar:
    for index, example in enumerate(examples):
      bar.update()
      yield index, example


class RenderedSplits:
  """The splits of a builder whose records are rendered, one per seed (no download).

  Mixed into a GeneratorBasedBuilder (before it) whose config has `split_sizes()`;
  the builder says what to render with `_render_jobs`. `prepare` sets the pool.
  """

  # Set by `prepare`: a pool of rendering processes (None = render here) and the progress bar.
  render_pool: multiprocessing.pool.Pool | None = None
  show_progress: bool = False

  def _render_jobs(self, split: str, num: int
                   ) -> tuple[Callable[[Any], dict[str, Any]], list[Any]]:
    """(a module-level render function, its argument for each of the `num` records)."""
    raise NotImplementedError

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download: every record is rendered
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.split_sizes().items()}

  def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict[str, Any]]]:
    render, args = self._render_jobs(split, num)  # here: at the first record, not before
    yield from rendered_examples(render, args, pool=self.render_pool,
                                 desc=f'{self.builder_config.name} {split}',
                                 show_progress=self.show_progress)


class MmgenScenes(RenderedSplits, tfds.core.GeneratorBasedBuilder):
  """Procedural 3D scenes with RGB, depth, normals, segmentation and a scene class."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_CONFIG_NAME = 'res32_small'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            'Procedural 3D scenes rendered with exact ground truth: rgb (uint8), metric '
            'z-depth (float32, > 0), camera-frame unit normals (float32, OpenCV axes), '
            'semantic segmentation ids (uint8, classes in scenes.SEMANTIC_CLASSES; the colour '
            'map is derived with data.palettes), the scene class, the 3x3 intrinsics and the '
            'render seed (train seeds 0.., validation seeds 1e9..).'),
        features=features(self.builder_config.resolution),
        supervised_keys=None,
        disable_shuffling=True,  # record i of a split is the i-th seed of that split
    )

  def _render_jobs(self, split: str, num: int):
    return _render_args, [(seed_for(split, i), self.builder_config.resolution)
                          for i in range(num)]


def get_config(name: str) -> ScenesConfig:
  """A registered config by name, or a custom `res{R}_n{train}_{val}` one."""
  for c in BUILDER_CONFIGS:
    if c.name == name:
      return c
  parts = name.split('_')
  try:
    if len(parts) == 3 and parts[0].startswith('res') and parts[1].startswith('n'):
      return custom_config(int(parts[0][3:]), int(parts[1][1:]), int(parts[2]))
  except ValueError as e:
    raise ValueError(f'builder config {name!r}: {e}') from e
  raise ValueError(f'unknown builder config {name!r}; use one of '
                   f'{[c.name for c in BUILDER_CONFIGS]} or res{{R}}_n{{train}}_{{val}}.')


def make_builder(config: str | ScenesConfig, data_dir: str | None) -> MmgenScenes:
  """The builder of `config` (a name or a ScenesConfig) under `data_dir` (None: TFDS default)."""
  config = get_config(config) if isinstance(config, str) else config
  return instantiate(MmgenScenes, config, data_dir)


def instantiate(cls: type[B], config: tfds.core.BuilderConfig, data_dir: str | None) -> B:
  """The builder `cls` of `config` under `data_dir` (None: TFDS default), ArrayRecord files."""
  # TFDS wants registered configs by name (a pickled copy of the object, as Grain's
  # worker processes receive it, would not be the registered one) and custom ones as objects.
  registered = config.name in {c.name for c in cls.BUILDER_CONFIGS}
  data_dir = None if data_dir is None else os.fspath(data_dir)
  return cls(config=config.name if registered else config, data_dir=data_dir,
             file_format=FILE_FORMAT)


def build(config: str | ScenesConfig, data_dir: str, *, render_workers: int = 0,
          show_progress: bool = False) -> MmgenScenes:
  """Renders and writes `config` under `data_dir` (reused if already built); no Beam needed."""
  return prepare(make_builder(config, data_dir), render_workers=render_workers,
                 show_progress=show_progress)


def prepare(builder: B, *, render_workers: int, show_progress: bool) -> B:
  """Writes the records of `builder` (a RenderedSplits one), rendered by `render_workers`
  processes (0: in this one); returns it."""
  builder.show_progress = show_progress
  with contextlib.ExitStack() as stack:
    if render_workers > 0 and not builder.is_prepared():
      # spawn: forking a process that may have loaded TensorFlow is unsafe.
      pool = multiprocessing.get_context('spawn').Pool(render_workers)
      builder.render_pool = stack.enter_context(pool)
    builder.download_and_prepare(
        file_format=FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  builder.render_pool = None
  return builder
