"""TFDS builder `mmgen_prompts`: the procedural scenes with multimodal prompts (ArrayRecord).

Every record holds the scene fields of `mmgen_scenes` (rgb, depth, normal,
segmentation, label, intrinsics, seed) rendered by `scenes.render_scene`, plus
the prompt fields of `prompts.record_fields` (keys, shapes and dtypes in
prompts.record_specs: the text fields hold the prompt of each of the three kinds,
which the pipeline picks from per config.prompt.kind_probs; the grammar is in the
prompts module docstring) and the seed's own prompt as text (`caption`, for
people; the pipeline reads the tokens). L (max_tokens), R
(entity_tokens) and S (entity_size) are fixed per builder config.

Seeds as in `mmgen_scenes` (tfds_scenes.seed_for): train 0.., validation 10**9..,
so validation prompts describe scenes, and show entity views, that training
never saw. Record i of a split is its i-th seed (no write-time shuffling).

    python -m mmgen_jax.data.build --dataset=mmgen_prompts --config=res32_small --data_dir=...

and `tfds.data_source('mmgen_prompts/res32_small', data_dir=...)`; importing this
module registers the builder. A pipeline reads it with
`config.data.name = 'mmgen_prompts'`, `config.data.builder_config = 'res32_small'`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mmgen_jax.data import prompts
from mmgen_jax.data import scenes
from mmgen_jax.data import tfds_scenes

NAME = 'mmgen_prompts'
FILE_FORMAT = tfds_scenes.FILE_FORMAT


@dataclasses.dataclass
class PromptsConfig(tfds_scenes.ScenesConfig):
  """Resolution, split sizes (as mmgen_scenes) and the prompt sizes L, R, S."""
  max_tokens: int = 48
  entity_tokens: int = 4
  entity_size: int = 32


def custom_config(resolution: int, train_size: int, val_size: int, *, max_tokens: int = 48,
                  entity_tokens: int = 4, entity_size: int = 32) -> PromptsConfig:
  """A config of any size, named `res{R}_n{train}_{val}` (+ `_L{L}_R{R}_S{S}` if not default)."""
  tfds_scenes.custom_config(resolution, train_size, val_size)   # the same checks
  name = f'res{resolution}_n{train_size}_{val_size}'
  if (max_tokens, entity_tokens, entity_size) != (48, 4, 32):
    name += f'_L{max_tokens}_R{entity_tokens}_S{entity_size}'
  return PromptsConfig(name=name, resolution=resolution, train_size=train_size,
                       val_size=val_size, max_tokens=max_tokens, entity_tokens=entity_tokens,
                       entity_size=entity_size,
                       description=f'{resolution}x{resolution}, {train_size} train / {val_size} '
                                   f'validation; L={max_tokens}, R={entity_tokens}, '
                                   f'S={entity_size}.')


BUILDER_CONFIGS = [
    PromptsConfig(name='res32_small', resolution=32, train_size=2_000, val_size=200,
                  description='32x32, 2,000 train / 200 validation; L=48, R=4, S=32.'),
    PromptsConfig(name='res32', resolution=32, train_size=20_000, val_size=1_000,
                  description='32x32, 20,000 train / 1,000 validation; L=48, R=4, S=32.'),
]


def features(c: PromptsConfig) -> tfds.features.FeaturesDict:
  zlib = tfds.features.Encoding.ZLIB
  specs = prompts.record_specs(c.max_tokens, c.resolution, c.entity_size)
  feats = dict(tfds_scenes.features(c.resolution))
  for key, (shape, dtype) in specs.items():
    encoding = zlib if len(shape) >= 3 else tfds.features.Encoding.NONE  # masks, images
    feats[key] = (tfds.features.Scalar(dtype=dtype) if shape == () else
                  tfds.features.Tensor(shape=shape, dtype=dtype, encoding=encoding))
  feats['caption'] = tfds.features.Text()
  return tfds.features.FeaturesDict(feats)


def render_example(seed: int, r: int, max_tokens: int, entity_tokens: int, entity_size: int
                   ) -> dict[str, Any]:
  """One record as the builder writes it (module level: render workers pickle it)."""
  out = scenes.render_scene(seed, r, with_instances=True)
  record = dict(rgb=tfds_scenes._png(out['rgb']),  # pylint: disable=protected-access
                depth=out['depth'], normal=out['normal'], segmentation=out['segmentation'],
                label=int(out['label']), intrinsics=out['intrinsics'], seed=np.int64(seed))
  fields = prompts.record_fields(seed, r, max_tokens=max_tokens, entity_tokens=entity_tokens,
                                 entity_size=entity_size, instance=out['instance'])
  fields, problems = prompts.stored_fields(fields, max_tokens=max_tokens,
                                           entity_tokens=entity_tokens,
                                           entity_size=entity_size, resolution=r)
  if problems:
    raise ValueError(f'scene {seed}: prompt fields break the contract: {problems}')
  record.update(fields)
  j = int(fields['drawn_kind'])
  record['caption'] = ' '.join(prompts.decode(fields['prompt_tokens'][j],
                                              fields['prompt_mask'][j]))
  return record


def _render_args(args: tuple[int, int, int, int, int]) -> dict[str, Any]:
  return render_example(*args)


class MmgenPrompts(tfds_scenes.RenderedSplits, tfds.core.GeneratorBasedBuilder):
  """Procedural scenes with captions, entity images, masks and spans."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_CONFIG_NAME = 'res32_small'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=('mmgen_scenes records plus multimodal prompts: word tokens from '
                     'mmgen_jax.data.prompts.VOCAB with <ent> slots for images of the '
                     'objects rendered alone, per-object masks, phrase spans, shape and '
                     'colour ids (see mmgen_jax/data/prompts.py).'),
        features=features(self.builder_config),
        supervised_keys=None,
        disable_shuffling=True,
    )

  def _render_jobs(self, split: str, num: int):
    c = self.builder_config
    return _render_args, [(tfds_scenes.seed_for(split, i), c.resolution, c.max_tokens,
                           c.entity_tokens, c.entity_size) for i in range(num)]


def get_config(name: str) -> PromptsConfig:
  """A registered config by name, or a custom `res{R}_n{train}_{val}[_L{L}_R{R}_S{S}]` one."""
  for c in BUILDER_CONFIGS:
    if c.name == name:
      return c
  parts = name.split('_')
  try:
    if len(parts) in (3, 6) and parts[0].startswith('res') and parts[1].startswith('n'):
      sizes = {}
      if len(parts) == 6:
        if not (parts[3][:1], parts[4][:1], parts[5][:1]) == ('L', 'R', 'S'):
          raise ValueError('expected _L{L}_R{R}_S{S} after the split sizes')
        sizes = dict(max_tokens=int(parts[3][1:]), entity_tokens=int(parts[4][1:]),
                     entity_size=int(parts[5][1:]))
      return custom_config(int(parts[0][3:]), int(parts[1][1:]), int(parts[2]), **sizes)
  except ValueError as e:
    raise ValueError(f'{NAME} builder config {name!r}: {e}') from e
  raise ValueError(f'unknown {NAME} builder config {name!r}; use one of '
                   f'{[c.name for c in BUILDER_CONFIGS]} or res{{R}}_n{{train}}_{{val}}'
                   '[_L{L}_R{R}_S{S}].')


def make_builder(config: str | PromptsConfig, data_dir: str | None) -> MmgenPrompts:
  """The builder of `config` (a name or a PromptsConfig) under `data_dir` (None: TFDS default)."""
  config = get_config(config) if isinstance(config, str) else config
  return tfds_scenes.instantiate(MmgenPrompts, config, data_dir)


def build(config: str | PromptsConfig, data_dir: str, *, render_workers: int = 0,
          show_progress: bool = False) -> MmgenPrompts:
  """Renders and writes `config` under `data_dir` (reused if already built)."""
  return tfds_scenes.prepare(make_builder(config, data_dir), render_workers=render_workers,
                             show_progress=show_progress)
