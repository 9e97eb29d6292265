"""Turning modality arrays into pictures: colour maps, sample grids, PNG files.

Pure numpy; PIL only writes the file and draws row labels. Display conversions saturate values
outside the displayable range (generated samples overshoot [-1, 1] a little);
that is the only clipping, and it never touches data used for training or
metrics.
"""

from __future__ import annotations

import os

from etils import epath
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmgen_jax.data import palettes

# Viridis (perceptually uniform) at ten evenly spaced points; linear in between.
_VIRIDIS = np.array([
    [0x44, 0x01, 0x54], [0x48, 0x28, 0x78], [0x3e, 0x4a, 0x89], [0x31, 0x68, 0x8e],
    [0x26, 0x82, 0x8e], [0x1f, 0x9e, 0x89], [0x35, 0xb7, 0x79], [0x6e, 0xce, 0x58],
    [0xb5, 0xde, 0x2b], [0xfd, 0xe7, 0x25]], np.float32)


def _unit_to_uint8(x: np.ndarray) -> np.ndarray:
  """[0, 1] -> uint8, saturating outside (display only)."""
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def colormap(t: np.ndarray) -> np.ndarray:
  """Viridis: t in [0, 1] (...) -> uint8 (..., 3); 0 is dark purple, 1 is yellow."""
  t = np.clip(np.asarray(t, np.float32), 0.0, 1.0) * (len(_VIRIDIS) - 1)
  lo = np.minimum(np.floor(t).astype(np.int32), len(_VIRIDIS) - 2)
  frac = (t - lo)[..., None]
  rgb = _VIRIDIS[lo] * (1.0 - frac) + _VIRIDIS[lo + 1] * frac
  return np.round(rgb).astype(np.uint8)


def depth_to_rgb(depth: np.ndarray, vmin: float | None = None,
                 vmax: float | None = None) -> np.ndarray:
  """Depth (..., H, W) or (..., H, W, 1) -> uint8 (..., H, W, 3); near is bright.

  vmin/vmax default to the finite min/max of the whole array (call per image, or
  pass them, to compare images on one scale). Non-finite depth shows as black.
  """
  depth = np.asarray(depth, np.float32)
  if depth.ndim >= 3 and depth.shape[-1] == 1:
    depth = depth[..., 0]
  if depth.ndim < 2:
    raise ValueError(f'depth must be (..., H, W) or (..., H, W, 1); got shape {depth.shape}.')
  finite = np.isfinite(depth)
  if vmin is None or vmax is None:
    if not finite.any():
      raise ValueError('depth has no finite values and no vmin/vmax were given.')
    vmin = float(depth[finite].min()) if vmin is None else vmin
    vmax = float(depth[finite].max()) if vmax is None else vmax
  span = vmax - vmin if vmax > vmin else 1.0
  rgb = colormap((vmax - np.where(finite, depth, vmax)) / span)
  rgb[~finite] = 0
  return rgb


def normal_to_rgb(normal: np.ndarray) -> np.ndarray:
  """Normals (..., 3) in [-1, 1] -> uint8 via (n + 1) / 2."""
  normal = np.asarray(normal, np.float32)
  if normal.shape[-1:] != (3,):
    raise ValueError(f'normals must end in 3 channels; got shape {normal.shape}.')
  return _unit_to_uint8((normal + 1.0) / 2.0)


def segmentation_to_rgb(ids: np.ndarray, palette: str | np.ndarray = 'scenes') -> np.ndarray:
  """Integer ids (...) -> uint8 (..., 3) palette colours."""
  return palettes.colorize(ids, palette)


def modality_to_rgb(array: np.ndarray, encoding: str, palette: str | np.ndarray = 'scenes'
                    ) -> np.ndarray:
  """A model-space array (..., H, W, C) in [-1, 1] -> uint8 (..., H, W, 3) for display.

  encoding is a `modalities.ENCODINGS` image encoding: 'rgb', 'depth' (-1 near,
  +1 far, shown with `depth_to_rgb` on the fixed range [-1, 1]), 'normal', or
  'segmentation' (already a colour map: shown as is). `palette` is accepted for
  symmetry with the modality spec; segmentation colour maps need no decoding.
  """
  del palette  # the colour map is displayed as generated
  array = np.asarray(array, np.float32)
  if encoding in ('stablenormal_rgb', 'random_colors'):  # 8-bit RGB maps: shown as stored
    encoding = 'rgb'
  if encoding == 'disparity_minmax':  # +1 is near: shown on the depth colours, near bright
    return depth_to_rgb(-array.mean(axis=-1), vmin=-1.0, vmax=1.0)
  if encoding in ('rgb', 'segmentation', 'normal'):
    if array.shape[-1:] != (3,):
      raise ValueError(f'a {encoding!r} array must end in 3 channels; got shape {array.shape}.')
    return _unit_to_uint8((array + 1.0) / 2.0)
  if encoding == 'depth':
    return depth_to_rgb(array, vmin=-1.0, vmax=1.0)
  raise ValueError(f'cannot display encoding {encoding!r}; expected one of '
                   f"'rgb', 'depth', 'normal', 'segmentation'.")


def make_grid(rows: dict[str, np.ndarray], pad: int = 2, pad_value: int = 255,
              scale: int = 1, labels: bool = False) -> np.ndarray:
  """One row per modality (in dict order), one column per sample: uint8 (H', W', 3).

  Every row is uint8 (N, H, W, 3) with the same N, H and W. Tiles are enlarged
  `scale` times (nearest neighbour, so pixels stay visible at 32×32), then
  separated and framed by `pad` pixels of `pad_value`. With `labels`, a margin on
  the left names each row (the dict key).
  """
  if not rows:
    raise ValueError('make_grid needs at least one row.')
  if int(scale) != scale or scale < 1:
    raise ValueError(f'make_grid scale must be a positive integer; got {scale!r}.')
  shapes = {name: np.shape(x) for name, x in rows.items()}
  first_name, first = next(iter(shapes.items()))
  for name, x in rows.items():
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'grid row {name!r} must be uint8 (N, H, W, 3); got {x.dtype} {x.shape}.')
    if x.shape != first:
      raise ValueError(f'grid row {name!r} has shape {x.shape} but row {first_name!r} has '
                       f'{first}; all rows must match.')
  n, h, w = first[0], first[1] * scale, first[2] * scale
  grid = np.full((pad + len(rows) * (h + pad), pad + n * (w + pad), 3), pad_value, np.uint8)
  for r, x in enumerate(rows.values()):
    x = np.asarray(x).repeat(scale, axis=1).repeat(scale, axis=2)
    for c in range(n):
      top, left = pad + r * (h + pad), pad + c * (w + pad)
      grid[top:top + h, left:left + w] = x[c]
  if labels:
    grid = _label_rows(grid, list(rows), row_height=h, pad=pad, pad_value=pad_value)
  return grid


def _label_rows(grid: np.ndarray, names: list[str], row_height: int, pad: int,
                pad_value: int) -> np.ndarray:
  """Prepends a margin with each row's name, vertically centred on its row."""
  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  width = pad + max(int(np.ceil(measure.textlength(name, font=font))) for name in names) + 4
  margin = Image.new('RGB', (width, grid.shape[0]), (pad_value,) * 3)
  draw = ImageDraw.Draw(margin)
  ink = (0, 0, 0) if pad_value >= 128 else (255, 255, 255)
  for r, name in enumerate(names):
    top, _, _, bottom = draw.textbbox((0, 0), name, font=font)
    y = pad + r * (row_height + pad) + (row_height - (bottom - top)) // 2 - top
    draw.text((pad + 2, y), name, fill=ink, font=font)
  return np.concatenate([np.asarray(margin, np.uint8), grid], axis=1)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes a uint8 (H, W, 3) or (H, W) image, creating the parent directory.

  The path may be local or on any file system etils.epath knows (gs://...).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3
                                                               and image.shape[-1] != 3):
    raise ValueError(f'save_png expects uint8 (H, W, 3) or (H, W); got {image.dtype} '
                     f'{image.shape}.')
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(image).save(f, format='PNG')
