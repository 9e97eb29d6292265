"""Segmentation palettes: semantic ids <-> colour maps.

A segmentation map enters the model as a colour image in [-1, 1] (one palette
colour per id) and leaves it the same way; `ids_from_colors` decodes a
generated colour map back to ids by the nearest palette colour. Palettes are
therefore chosen far apart in RGB so that decoding tolerates generation noise.
"""

from __future__ import annotations

import numpy as np

from mmgen_jax.data import scenes

# One colour per `scenes.SEMANTIC_CLASSES` entry, in that order. Corners of the
# RGB cube plus mid grey: every pair is at least 220 apart (of 441 possible).
_SCENES = {
    'sky': (0, 0, 0),
    'ground': (128, 128, 128),
    'wall': (255, 255, 255),
    'sphere': (255, 0, 0),
    'box': (0, 255, 0),
    'cylinder': (0, 0, 255),
    'cone': (255, 255, 0),
}
assert tuple(_SCENES) == scenes.SEMANTIC_CLASSES, 'palette must follow SEMANTIC_CLASSES'

PALETTES: dict[str, np.ndarray] = {
    'scenes': np.array(list(_SCENES.values()), np.uint8),
}


def get(name: str) -> np.ndarray:
  """The (num_classes, 3) uint8 palette called `name`."""
  if name not in PALETTES:
    raise KeyError(f'unknown palette {name!r}; available palettes: {sorted(PALETTES)}.')
  return PALETTES[name]


def _as_palette(palette: str | np.ndarray) -> np.ndarray:
  """Accepts a palette name or an explicit (K, 3) uint8 array (e.g. random colours)."""
  if isinstance(palette, str):
    return get(palette)
  palette = np.asarray(palette)
  if palette.ndim != 2 or palette.shape[1] != 3 or palette.dtype != np.uint8:
    raise ValueError(f'a palette array must be uint8 of shape (K, 3); got {palette.dtype} '
                     f'{palette.shape}.')
  return palette


def colorize(ids: np.ndarray, name: str | np.ndarray = 'scenes') -> np.ndarray:
  """Integer ids (...) -> uint8 colours (..., 3)."""
  palette = _as_palette(name)
  ids = np.asarray(ids)
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f'segmentation ids must be integers; got dtype {ids.dtype}.')
  if ids.size and (ids.min() < 0 or ids.max() >= len(palette)):
    raise ValueError(f'segmentation ids must lie in [0, {len(palette) - 1}] for palette '
                     f'{name if isinstance(name, str) else "<array>"!r}; got min id '
                     f'{ids.min()}, max id {ids.max()}.')
  return palette[ids]


def ids_from_colors(colors: np.ndarray, name: str | np.ndarray = 'scenes') -> np.ndarray:
  """Colour map (..., 3) -> int32 ids (...) by the nearest palette colour.

  `colors` is either uint8 in [0, 255] or floating point in model space [-1, 1]
  (values a little outside, as generated samples have, still decode to the
  nearest colour).
  """
  palette = _as_palette(name).astype(np.float32)
  colors = np.asarray(colors)
  if colors.shape[-1:] != (3,):
    raise ValueError(f'colour map must end in 3 channels; got shape {colors.shape}.')
  if colors.dtype == np.uint8:
    rgb = colors.astype(np.float32)
  elif np.issubdtype(colors.dtype, np.floating):
    rgb = (colors.astype(np.float32) + 1.0) * 127.5
  else:
    raise TypeError(f'colour map must be uint8 in [0, 255] or float in [-1, 1]; got dtype '
                    f'{colors.dtype}.')
  # |c - p|^2 = |c|^2 - 2 c.p + |p|^2; |c|^2 is the same for every p.
  scores = rgb @ palette.T * -2.0 + np.sum(palette ** 2, axis=-1)
  return np.argmin(scores, axis=-1).astype(np.int32)
