"""Turning modality arrays into pictures: colour maps, sample grids, PNG files.

Pure numpy; PIL only writes the file and draws text (row labels, `flow_panel`).
Display conversions saturate values outside the displayable range (generated
samples overshoot [-1, 1] a little);
that is the only clipping, and it never touches data used for training or
metrics.
"""

from __future__ import annotations

import os
from typing import Sequence

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
              scale: int = 1, labels: bool = False, unscaled: Sequence[str] = ()) -> np.ndarray:
  """One row per modality (in dict order), one column per sample: uint8 (H', W', 3).

  Every row is uint8 (N, H, W, 3) with the same N, H and W. Tiles are enlarged
  `scale` times (nearest neighbour, so pixels stay visible at 32×32), then
  separated and framed by `pad` pixels of `pad_value`. With `labels`, a margin on
  the left names each row (the dict key). Rows named in `unscaled` are panels
  already at display size (e.g. a rendered prompt): drawn as they are, of any
  height, but as wide as the enlarged tiles.
  """
  if not rows:
    raise ValueError('make_grid needs at least one row.')
  if int(scale) != scale or scale < 1:
    raise ValueError(f'make_grid scale must be a positive integer; got {scale!r}.')
  unknown = sorted(set(unscaled) - set(rows))
  if unknown:
    raise ValueError(f'make_grid unscaled={unknown} names no row; rows are {list(rows)}.')
  for name, x in rows.items():
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'grid row {name!r} must be uint8 (N, H, W, 3); got {x.dtype} {x.shape}.')
  tiles = {name: np.shape(x) for name, x in rows.items() if name not in unscaled}
  if tiles:  # the tile rows match exactly; panels match their count and displayed width
    first_name, first = next(iter(tiles.items()))
    n, w = first[0], first[2] * scale
  else:
    first_name, first = next(iter(rows.items()))[0], np.shape(next(iter(rows.values())))
    n, w = first[0], first[2]
  for name, x in rows.items():
    shape = np.shape(x)
    if name in unscaled:
      if shape[0] != n or shape[2] != w:
        raise ValueError(f'grid panel {name!r} has shape {shape}; it needs {n} panels of width '
                         f'{w} (row {first_name!r} of {first} enlarged {scale}×).')
    elif shape != first:
      raise ValueError(f'grid row {name!r} has shape {shape} but row {first_name!r} has '
                       f'{first}; all rows must match.')
  heights = [np.shape(x)[1] * (1 if name in unscaled else scale) for name, x in rows.items()]
  grid = np.full((pad + sum(h + pad for h in heights), pad + n * (w + pad), 3), pad_value,
                 np.uint8)
  top = pad
  for (name, x), h in zip(rows.items(), heights):
    x = np.asarray(x)
    if name not in unscaled:
      x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    for c in range(n):
      left = pad + c * (w + pad)
      grid[top:top + h, left:left + w] = x[c]
    top += h + pad
  if labels:
    grid = _label_rows(grid, list(rows), heights, pad=pad, pad_value=pad_value)
  return grid


def _label_rows(grid: np.ndarray, names: list[str], heights: list[int], pad: int,
                pad_value: int) -> np.ndarray:
  """Prepends a margin with each row's name, vertically centred on its row."""
  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  width = pad + max(int(np.ceil(measure.textlength(name, font=font))) for name in names) + 4
  margin = Image.new('RGB', (width, grid.shape[0]), (pad_value,) * 3)
  draw = ImageDraw.Draw(margin)
  ink = (0, 0, 0) if pad_value >= 128 else (255, 255, 255)
  row_top = pad
  for name, h in zip(names, heights):
    top, _, _, bottom = draw.textbbox((0, 0), name, font=font)
    draw.text((pad + 2, row_top + (h - (bottom - top)) // 2 - top), name, fill=ink, font=font)
    row_top += h + pad
  return np.concatenate([np.asarray(margin, np.uint8), grid], axis=1)


# Punctuation that joins the word before it without a space.
_GLUED = (',', '.', ';', ':', '!', '?')


def flow_panel(items: Sequence[str | np.ndarray], width: int, *, thumb: int = 32,
               margin: int = 2, line_gap: int = 2, pad_value: int = 255) -> np.ndarray:
  """Words and images set left to right, wrapped at `width`: uint8 (H, width, 3).

  items: words (str; ',' and '.' join the word before them without a space) and
  uint8 (h, w, 3) images, which stand in a line like words, enlarged or reduced
  (nearest neighbour) to `thumb` pixels high (narrower where a line is narrower)
  inside a 1-pixel grey frame. A line is as high as its tallest item; a word
  wider than a line is split over lines, so nothing is cut off.
  """
  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  avail = width - 2 * margin
  if avail < 8:
    raise ValueError(f'flow_panel width={width} leaves no room for text (margin {margin}).')
  text_h = measure.textbbox((0, 0), 'Ag|', font=font)[3]
  space = max(3, int(round(measure.textlength(' ', font=font))))
  # Units are set without a space inside (a word or image and the punctuation after it)
  # and wrap as a whole; a unit wider than a line is split into its parts.
  units: list[list[tuple[str | Image.Image, int]]] = []
  for item in items:
    if isinstance(item, str):
      pieces, rest = [], item
      while rest:  # the longest head that fits a line, at least one character
        k = len(rest)
        while k > 1 and measure.textlength(rest[:k], font=font) > avail:
          k -= 1
        pieces.append((rest[:k], int(np.ceil(measure.textlength(rest[:k], font=font)))))
        rest = rest[k:]
      if item in _GLUED and units:
        units[-1] += pieces
      else:
        units += [[p] for p in pieces]
    else:
      image = np.asarray(item)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'flow_panel images must be uint8 (h, w, 3); got {image.dtype} '
                         f'{image.shape}.')
      h, w = image.shape[:2]
      side = min(thumb, avail - 2)
      size = (max(1, round(w * side / h)), side) if w <= h else (side, max(1, round(h * side / w)))
      framed = Image.new('RGB', (size[0] + 2, size[1] + 2), (150, 150, 150))
      framed.paste(Image.fromarray(image).resize(size, Image.NEAREST), (1, 1))
      units.append([(framed, framed.width)])
  units = [part for u in units for part in ([u] if sum(w for _, w in u) <= avail
                                             else [[p] for p in u])]

  lines: list[list[tuple[int, str | Image.Image]]] = [[]]  # (x, word or framed image)
  x = 0
  for unit in units:
    width_u = sum(w for _, w in unit)
    gap = space if lines[-1] else 0
    if lines[-1] and x + gap + width_u > avail:  # the next line
      lines.append([])
      x, gap = 0, 0
    x += gap
    for thing, w in unit:
      lines[-1].append((x, thing))
      x += w

  heights = [max([text_h] + [t.height for _, t in line if not isinstance(t, str)])
             for line in lines]
  panel = Image.new('RGB', (width, 2 * margin + sum(heights) + line_gap * (len(lines) - 1)),
                    (pad_value,) * 3)
  draw = ImageDraw.Draw(panel)
  ink = (0, 0, 0) if pad_value >= 128 else (255, 255, 255)
  top = margin
  for line, h in zip(lines, heights):
    for left, thing in line:
      if isinstance(thing, str):
        draw.text((margin + left, top + (h - text_h) // 2), thing, fill=ink, font=font)
      else:
        panel.paste(thing, (margin + left, top + (h - thing.height) // 2))
    top += h + line_gap
  return np.asarray(panel, np.uint8)


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
