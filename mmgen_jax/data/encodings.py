"""MMGen's released data conventions as modality encodings (pure numpy).

The released ImageNet checkpoint was trained on pseudo-labels stored as 8-bit
images by MMGen's preprocessing (jiepengwang/MMGen, data/preprocess_*.py) and
read back by data/mmgen_dataset.py as RGB in [-1, 1]:

* 'disparity_minmax' (data/preprocess_depth.py): Depth Anything V2's relative
  disparity (large = near), min-max normalised per image to [0, 1] (a constant
  map becomes 0), `round(· × 255)` as uint8, saved as a grey PNG and
  replicated to 3 channels by `convert('RGB')` before the VAE (here the sd_vae
  codec replicates a 1-channel map). In [-1, 1] near is +1 (bright). A metric depth record is first inverted (disparity = 1/depth).
* 'stablenormal_rgb' (data/preprocess_normal.py with StableNormal's hubconf.py):
  StableNormal predicts unit normals in Marigold's camera frame, x right, y up,
  z towards the viewer (diffusers' `visualize_normals`: "default direction is
  right / top / facing the observer"), and stores `uint8((clip(n, -1, 1) + 1) /
  2 × 255)` (truncation) with channels (R, G, B) = (x, y, z). This project's
  frame is OpenCV's, x right, y down, z forward (away from the camera), so
  the two differ by the sign of y and z: n_stablenormal = n_opencv × (1, −1, −1),
  and the map is its own inverse.
* 'random_colors' (data/preprocess_mask.py): class-agnostic Semantic-SAM
  masks, each painted a uniform random uint8 colour and the uncovered
  background another random colour, from `np.random.default_rng(seed)` per
  image. Here segment id k of a record gets the k-th colour of a table drawn
  from `default_rng([seed, record index])`, so the colours are the same for a
  record in every epoch and under every crop. Unlike MMGen the table keeps
  every two colours at least MIN_COLOR_DISTANCE apart (MMGen's i.i.d. draws
  may coincide), so that a colour map decodes back to its segments exactly.

Decoding a generated colour map back to segments (`ids_from_colors`) clusters
its colours: the modes of a coarse colour histogram are the candidate colours,
modes closer than `merge_distance` are one colour, and every pixel takes the
nearest colour (two refinement passes, k-means style). Segments are colours,
not connected regions: a segment split by an occluder stays one segment, as in
the masks MMGen trains on.

Each encoding also accepts the 8-bit image MMGen's preprocessing stores (a
uint8 record is taken as already encoded), so records can be built from its
PNGs directly.
"""

from __future__ import annotations

import numpy as np

# encoding -> the raw array family the pipeline's checks and augmentation treat it as.
FAMILY = {
    'rgb': 'rgb',
    'depth': 'depth', 'disparity_minmax': 'depth',
    'normal': 'normal', 'stablenormal_rgb': 'normal',
    'segmentation': 'segmentation', 'random_colors': 'segmentation',
}

# OpenCV camera frame (x right, y down, z forward) <-> StableNormal / Marigold
# (x right, y up, z towards the viewer).
OPENCV_TO_STABLENORMAL = np.array([1.0, -1.0, -1.0], np.float32)

MAX_SEGMENTS = 256          # colour table size: segment ids of a record lie in [0, 256)
MIN_COLOR_DISTANCE = 16.0   # in uint8 RGB units; >= the diagonal of a decoding bin (7·√3)


def family(encoding: str) -> str:
  if encoding not in FAMILY:
    raise KeyError(f'encoding {encoding!r} has no raw family; known: {sorted(FAMILY)}.')
  return FAMILY[encoding]


def unit_normals(x: np.ndarray) -> np.ndarray:
  """(H, W, 3) normals scaled to unit length, float32.

  Raises ValueError naming how many pixels are zero-length or not finite and
  where the first is; rendered normals pass unchanged, pseudo-labels may drift.
  """
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=-1)
  broken = ~np.isfinite(norm) | (norm < 1e-6)
  if broken.any():
    i, j = np.argwhere(broken)[0]
    raise ValueError(f'zero-length or non-finite normal at {int(broken.sum())} pixel(s) (first '
                     f'at row {i}, col {j}: {x[i, j].tolist()})')
  return x / norm[..., None]


def to_model_space(u8: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], as ToTensor + Normalize(0.5, 0.5) does."""
  return np.asarray(u8, np.float32) / 127.5 - 1.0


# ---- depth: 8-bit min-max disparity -------------------------------------------------

def disparity_minmax_u8(disparity: np.ndarray) -> np.ndarray:
  """Relative disparity (H, W) -> uint8 (H, W): per-image min-max to [0, 1], round(· × 255).

  A constant map (range <= 1e-8, MMGen's threshold) becomes 0.
  """
  d = np.asarray(disparity, np.float64)
  lo, scale = float(d.min()), float(d.max() - d.min())
  unit = np.zeros_like(d) if scale <= 1e-8 else (d - lo) / scale
  return np.round(unit * 255.0).astype(np.uint8)


def depth_to_disparity(depth: np.ndarray) -> np.ndarray:
  """Metric depth -> disparity 1/depth; every depth must be > 0."""
  depth = np.asarray(depth, np.float64)
  if depth.size and not depth.min() > 0:
    raise ValueError(f'depth must be > 0 everywhere to invert it; min is {depth.min()}.')
  return 1.0 / depth


def encode_disparity_minmax(raw: np.ndarray, channels: int = 1) -> np.ndarray:
  """A depth record (float metric depth, or MMGen's uint8 disparity) -> (H, W, channels) in [-1, 1]."""
  raw = np.asarray(raw)
  u8 = raw if raw.dtype == np.uint8 else disparity_minmax_u8(depth_to_disparity(raw))
  return np.repeat(to_model_space(u8)[..., None], channels, axis=-1)


def decode_disparity(x: np.ndarray) -> np.ndarray:
  """(..., H, W, C) model array -> (..., H, W) relative disparity in [0, 1] (mean over channels)."""
  return (np.asarray(x, np.float64).mean(axis=-1) + 1.0) / 2.0


# ---- normals: StableNormal RGB ------------------------------------------------------

def opencv_to_stablenormal(n: np.ndarray) -> np.ndarray:
  """Flip y and z; the same function maps StableNormal's frame back to OpenCV's."""
  return np.asarray(n, np.float32) * OPENCV_TO_STABLENORMAL


stablenormal_to_opencv = opencv_to_stablenormal


def stablenormal_rgb_u8(n_stablenormal: np.ndarray) -> np.ndarray:
  """Normals in StableNormal's frame -> uint8 RGB as its hubconf stores them.

  StableNormal truncates (`astype(np.uint8)`); the 1e-4 keeps a decoded uint8
  value from landing a round-off below its own level.
  """
  v = (np.clip(np.asarray(n_stablenormal, np.float64), -1.0, 1.0) + 1.0) / 2.0 * 255.0
  return np.floor(v + 1e-4).astype(np.uint8)


def encode_stablenormal_rgb(n_opencv: np.ndarray) -> np.ndarray:
  """OpenCV-frame normals (H, W, 3) -> (H, W, 3) in [-1, 1]: StableNormal's 8-bit RGB."""
  return to_model_space(stablenormal_rgb_u8(opencv_to_stablenormal(n_opencv)))


def decode_stablenormal_rgb(x: np.ndarray) -> np.ndarray:
  """(..., 3) StableNormal RGB in [-1, 1] (or uint8) -> OpenCV-frame unit normals (float32).

  A zero vector stays zero (it scores as 180° in metrics.normal_angles_deg).
  """
  x = np.asarray(x)
  n = to_model_space(x) if x.dtype == np.uint8 else x.astype(np.float32)
  n = stablenormal_to_opencv(n)
  norm = np.linalg.norm(n, axis=-1, keepdims=True)
  return np.where(norm > 1e-12, n / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


# ---- segmentation: random colours ---------------------------------------------------

def color_table(seed: int, index: int, num_colors: int,
                min_distance: float = MIN_COLOR_DISTANCE) -> np.ndarray:
  """(num_colors, 3) uint8 colours of record `index`: uniform, pairwise >= min_distance apart.

  Colour k depends only on (seed, index, k): colours are drawn in order and a
  draw too close to an earlier colour is redrawn.
  """
  if not 0 <= num_colors <= MAX_SEGMENTS:
    raise ValueError(f'{num_colors} segments; random colours support at most {MAX_SEGMENTS}.')
  rng = np.random.default_rng([int(seed), int(index)])
  table = np.empty((num_colors, 3), np.int64)
  k = draws = 0
  while k < num_colors:
    candidates = rng.integers(0, 256, size=(64, 3))
    for c in candidates:
      draws += 1
      if k == num_colors:
        break
      if k == 0 or np.min(np.sum((table[:k] - c) ** 2, axis=1)) >= min_distance ** 2:
        table[k] = c
        k += 1
    if draws > 1000 * MAX_SEGMENTS:
      raise RuntimeError(f'could not place {num_colors} colours {min_distance} apart.')
  return table.astype(np.uint8)


def random_colors(ids: np.ndarray, seed: int, index: int) -> np.ndarray:
  """Segment ids (H, W) in [0, 256) -> uint8 (H, W, 3), a random colour per id.

  Id 0 is the background (pixels no mask covers) in MMGen-style records; it
  gets a random colour like every other segment.
  """
  ids = np.asarray(ids)
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f'segment ids must be integers; got dtype {ids.dtype}.')
  if ids.size and (ids.min() < 0 or ids.max() >= MAX_SEGMENTS):
    raise ValueError(f'segment ids span [{ids.min()}, {ids.max()}]; random colours need '
                     f'[0, {MAX_SEGMENTS}).')
  return color_table(seed, index, int(ids.max()) + 1 if ids.size else 0)[ids]


def ids_from_exact_colors(rgb: np.ndarray) -> np.ndarray:
  """An exact colour map (H, W, 3) uint8 (e.g. MMGen's mask PNG) -> int32 ids, one per colour.

  Ids follow the colours' packed 24-bit values in increasing order.
  """
  rgb = np.asarray(rgb)
  if rgb.dtype != np.uint8 or rgb.shape[-1:] != (3,):
    raise ValueError(f'expected a uint8 (..., 3) colour map; got {rgb.dtype} {rgb.shape}.')
  packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
  _, inverse = np.unique(packed.ravel(), return_inverse=True)
  return inverse.reshape(packed.shape).astype(np.int32)


def ids_from_colors(colors: np.ndarray, *, bin_size: int = 8, merge_distance: float = 12.0,
                    min_fraction: float = 0.002, max_segments: int = MAX_SEGMENTS,
                    refine_steps: int = 2) -> np.ndarray:
  """A generated colour map (H, W, 3) -> int32 segment ids (H, W) by clustering its colours.

  `colors` is uint8 or model space [-1, 1]. Colours are binned (bin_size per
  channel); bins holding at least max(1, min_fraction × H·W) pixels are
  candidates, fullest first, each at the mean colour of its pixels; a
  candidate within merge_distance of an accepted colour joins it. Every pixel
  then takes the nearest accepted colour, and each of `refine_steps` passes moves every
  colour to the mean of its pixels, merges colours that came within
  merge_distance (noise splits a segment into a few nearby modes; they
  converge) and reassigns. Ids are numbered heaviest colour first. An exact
  colour map whose colours are MIN_COLOR_DISTANCE apart decodes to its segments
  exactly (segments below the pixel threshold excepted). Noise spreads a small
  segment over several bins, each below the threshold: at 3.8 levels of noise
  per channel, 16-pixel segments of a 32×32 map start to be lost.
  """
  colors = np.asarray(colors)
  if colors.ndim != 3 or colors.shape[-1] != 3:
    raise ValueError(f'expected one (H, W, 3) colour map; got shape {colors.shape}.')
  h, w, _ = colors.shape
  x = (colors.astype(np.float64) if colors.dtype == np.uint8
       else (colors.astype(np.float64) + 1.0) * 127.5).reshape(-1, 3)
  levels = 256 // bin_size + 1
  q = np.clip(np.floor(x / bin_size), 0, levels - 1).astype(np.int64)
  bins = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
  counts = np.bincount(bins, minlength=levels ** 3)
  sums = np.stack([np.bincount(bins, weights=x[:, c], minlength=levels ** 3) for c in range(3)], 1)
  min_count = max(1, int(np.ceil(min_fraction * h * w)))
  order = np.argsort(-counts, kind='stable')
  order = order[counts[order] >= min_count]
  if not order.size:  # every bin below the threshold: take the fullest
    order = np.argsort(-counts, kind='stable')[:1]
  c = _merge_close(np.stack([sums[b] / counts[b] for b in order]), counts[order],
                   merge_distance, max_segments)
  for _ in range(refine_steps):
    assign = _nearest_centre(x, c)
    n = np.bincount(assign, minlength=len(c))
    means = np.stack([np.bincount(assign, weights=x[:, ch], minlength=len(c)) for ch in range(3)],
                     1) / np.maximum(n, 1)[:, None]
    keep = n > 0
    c = _merge_close(means[keep], n[keep], merge_distance, max_segments)
  return _nearest_centre(x, c).reshape(h, w).astype(np.int32)


def _nearest_centre(x: np.ndarray, c: np.ndarray) -> np.ndarray:
  d = (x ** 2).sum(1)[:, None] - 2.0 * x @ c.T + (c ** 2).sum(1)[None, :]
  return np.argmin(d, axis=1)


def _merge_close(centres: np.ndarray, weights: np.ndarray, distance: float,
                 limit: int) -> np.ndarray:
  """The centres, heaviest first, leaving out any within `distance` of a heavier kept one."""
  kept: list[np.ndarray] = []
  for i in np.argsort(-weights, kind='stable'):
    if all(np.sum((centres[i] - k) ** 2) > distance ** 2 for k in kept):
      kept.append(centres[i])
      if len(kept) == limit:
        break
  return np.stack(kept)
