"""The one declarative list of modalities; everything else derives from it.

A config lists each modality once under `config.modalities.<name>`:

    rgb = dict(slot=0, kind='image', encoding='rgb', loss_weight=1.0)

`slot` fixes the order (ConfigDict sorts its keys, and the order matters: the
MMGen model concatenates image modalities on channels in slot order, and task
index m+1 means "image modality m is the condition"). `kind` is 'image' (a map
in [-1, 1], NHWC) or 'class' (an int32 label). `encoding` names how the raw
record field becomes the model array (see ENCODINGS). The dataset features,
codec, patch embedding, heads, loss weights, sampler slots and metrics all read
this list, so adding a modality is one config entry plus its data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

# encoding -> (kind, channels in pixel space). For 'label' the channel count is
# the number of classes and comes from the spec (`num_classes`).
ENCODINGS: dict[str, tuple[str, int]] = {
    'rgb': ('image', 3),           # uint8 H×W×3 -> [-1, 1]
    'depth': ('image', 1),         # float32 H×W metric depth -> per-image affine [-1, 1]
    'normal': ('image', 3),        # float32 H×W×3 unit camera-frame normals, already in [-1, 1]
    'segmentation': ('image', 3),  # uint8 H×W ids -> palette colour map in [-1, 1]
    'label': ('class', 0),         # int scene class -> int32
    # MMGen's released conventions (data/encodings.py says where each comes from):
    'disparity_minmax': ('image', 1),  # depth -> 8-bit per-image min-max disparity, near = +1
    'stablenormal_rgb': ('image', 3),  # OpenCV normals -> StableNormal's 8-bit RGB (y up, z to viewer)
    'random_colors': ('image', 3),     # segment ids -> a random colour per segment and record
}

# The optional batch field of frozen-encoder features per token (REPA), (B, T, z):
# read from records that have it and passed through by the pipeline.
REPA_FEATURES = 'repa_features'

# Encodings whose pixel channel count a spec may set with `channels`: a grey map
# kept replicated to RGB in pixel space (the sd_vae codec replicates a 1-channel
# map itself).
VARIABLE_CHANNELS: dict[str, tuple[int, ...]] = {'disparity_minmax': (1, 3)}

_SPEC_KEYS = ('slot', 'kind', 'encoding', 'loss_weight', 'field', 'palette', 'num_classes',
              'channels', 'color_seed')


@dataclasses.dataclass(frozen=True)
class Modality:
  """One modality, as the rest of the code sees it."""
  name: str
  slot: int
  kind: str            # 'image' | 'class'
  encoding: str        # a key of ENCODINGS
  channels: int        # pixel-space channels (image) or number of classes (class)
  loss_weight: float
  field: str           # record field it is read from
  palette: str = ''    # segmentation palette name (see data.palettes)
  color_seed: int = 0  # 'random_colors': colours drawn from (color_seed, record index)

  @property
  def is_image(self) -> bool:
    return self.kind == 'image'


def spec(slot: int, encoding: str, loss_weight: float = 1.0, **extra: Any) -> dict[str, Any]:
  """A config entry for one modality (use inside configs)."""
  kind, _ = ENCODINGS[encoding]
  return dict(slot=slot, kind=kind, encoding=encoding, loss_weight=loss_weight, **extra)


def from_config(modalities_cfg: Mapping[str, Mapping[str, Any]]) -> tuple[Modality, ...]:
  """Validates `config.modalities` and returns the modalities in slot order."""
  if not modalities_cfg:
    raise ValueError('config.modalities is empty: list at least one modality.')
  out = []
  for name, raw in dict(modalities_cfg).items():
    raw = dict(raw)
    unknown = sorted(set(raw) - set(_SPEC_KEYS))
    if unknown:
      raise ValueError(f'config.modalities.{name}: unknown key(s) {unknown}; '
                       f'valid keys are {list(_SPEC_KEYS)}.')
    encoding = raw.get('encoding', name)
    if encoding not in ENCODINGS:
      raise ValueError(f'config.modalities.{name}.encoding={encoding!r} is not one of '
                       f'{sorted(ENCODINGS)}.')
    kind, channels = ENCODINGS[encoding]
    if raw.get('kind', kind) != kind:
      raise ValueError(f'config.modalities.{name}.kind={raw["kind"]!r} but encoding '
                       f'{encoding!r} is a {kind!r} modality.')
    if kind == 'class':
      channels = int(raw.get('num_classes', 0))
      if channels < 2:
        raise ValueError(f'config.modalities.{name}: a class modality needs num_classes >= 2, '
                         f'got {raw.get("num_classes")!r}.')
    if 'channels' in raw:
      allowed = VARIABLE_CHANNELS.get(encoding, (channels,))
      if int(raw['channels']) not in allowed:
        raise ValueError(f'config.modalities.{name}.channels={raw["channels"]} is not allowed for '
                         f'encoding {encoding!r}; allowed: {list(allowed)}.')
      channels = int(raw['channels'])
    if 'color_seed' in raw and encoding != 'random_colors':
      raise ValueError(f'config.modalities.{name}.color_seed is only read by the '
                       f"'random_colors' encoding, not {encoding!r}.")
    if 'slot' not in raw:
      raise ValueError(f'config.modalities.{name}: missing "slot" (its position in the model).')
    weight = float(raw.get('loss_weight', 1.0))
    if weight < 0:
      raise ValueError(f'config.modalities.{name}.loss_weight={weight} must be >= 0.')
    palette = raw.get('palette', 'scenes' if encoding == 'segmentation' else '')
    out.append(Modality(name=name, slot=int(raw['slot']), kind=kind, encoding=encoding,
                        channels=channels, loss_weight=weight, field=raw.get('field', name),
                        palette=palette, color_seed=int(raw.get('color_seed', 0))))
  out.sort(key=lambda m: m.slot)
  slots = [m.slot for m in out]
  if slots != list(range(len(out))):
    raise ValueError('config.modalities: slots must be 0..N-1, each used once; got '
                     + ', '.join(f'{m.name}={m.slot}' for m in out) + '.')
  return tuple(out)


def images(mods: Iterable[Modality]) -> tuple[Modality, ...]:
  """Image modalities in slot order: the model's channel blocks and task indices."""
  return tuple(m for m in mods if m.is_image)


def classes(mods: Iterable[Modality]) -> tuple[Modality, ...]:
  return tuple(m for m in mods if not m.is_image)


def by_name(mods: Sequence[Modality], name: str) -> Modality:
  for m in mods:
    if m.name == name:
      return m
  raise KeyError(f'no modality named {name!r}; configured: {[m.name for m in mods]}.')


def task_index(mods: Sequence[Modality], condition: str | None) -> int:
  """MMGen task index: 0 = joint generation, m+1 = image modality m is the condition."""
  if condition is None:
    return 0
  names = [m.name for m in images(mods)]
  if condition not in names:
    raise KeyError(f'condition {condition!r} is not an image modality; choose from {names}.')
  return names.index(condition) + 1
