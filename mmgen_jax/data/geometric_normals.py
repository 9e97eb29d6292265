"""Surface normals from a depth map and pinhole intrinsics (pure numpy, no weights).

Every pixel is back-projected, P(u, v) = z · K⁻¹ (u, v, 1), and its normal is
the cross product of the two image-axis tangents, oriented towards the camera
(OpenCV frame: x right, y down, z forward, so a wall facing the camera has
n ≈ (0, 0, −1), as the procedural scenes store it). Each tangent is the
one-sided difference (forward or backward) whose depth changes least, so a
pixel on the edge of an object takes its tangents from its own surface rather
than across the occlusion boundary.

Depth experts (Depth Anything, DPT, this project's RGB → depth) give relative
*disparity*: inverse depth up to an unknown scale a > 0 and shift b,
d = a / z + b. A global scale of z scales the point cloud and leaves every
normal unchanged, so `a` does not matter; `b` does (it bends planes). With
nothing in one image to fix it, `depth_from_relative_disparity` takes the
disparity min-max normalised to t ∈ [0, 1] and assumes the farthest pixel lies
`far_near_ratio` times as far as the nearest: 1/z ∝ t + 1/(r − 1), so z runs
from 1 (t = 1) to r (t = 0). A disparity with no shift (1/metric depth, say)
should be inverted directly instead (`affine_invariant=False` in labelers).
The error this assumption costs is measured in tests/test_labelers.py against
the scenes' exact normals.
"""

from __future__ import annotations

import numpy as np

DEFAULT_FOV_DEG = 60.0        # horizontal field of view when a record has no intrinsics
DEFAULT_FAR_NEAR_RATIO = 10.0  # assumed z_far / z_near of an affine-invariant disparity map


def intrinsics_from_fov(hw: tuple[int, int], fov_deg: float = DEFAULT_FOV_DEG) -> np.ndarray:
  """Pinhole K (float32) for an (H, W) image: horizontal fov, square pixels, centred."""
  h, w = hw
  if not 0.0 < fov_deg < 180.0:
    raise ValueError(f'fov_deg={fov_deg} must lie in (0, 180).')
  f = w / (2.0 * np.tan(np.radians(fov_deg) / 2.0))
  return np.array([[f, 0.0, (w - 1) / 2.0], [0.0, f, (h - 1) / 2.0], [0.0, 0.0, 1.0]], np.float32)


def backproject(depth: np.ndarray, k: np.ndarray) -> np.ndarray:
  """(H, W) z-depth and (3, 3) K -> (H, W, 3) camera-frame points (float64)."""
  depth = np.asarray(depth, np.float64)
  if depth.ndim != 2:
    raise ValueError(f'depth must be (H, W); got shape {depth.shape}.')
  k = np.asarray(k, np.float64)
  if k.shape != (3, 3):
    raise ValueError(f'intrinsics must be (3, 3); got shape {k.shape}.')
  h, w = depth.shape
  v, u = np.mgrid[0:h, 0:w].astype(np.float64)
  x = (u - k[0, 2] - k[0, 1] * (v - k[1, 2]) / k[1, 1]) / k[0, 0]
  y = (v - k[1, 2]) / k[1, 1]
  return np.stack([x * depth, y * depth, depth], axis=-1)


def _tangent(p: np.ndarray, axis: int) -> np.ndarray:
  """Per-pixel tangent along `axis` (0 rows, 1 columns): the one-sided difference whose
  |Δz| is smaller (the only one at the border); zero for a one-pixel-wide axis."""
  n = p.shape[axis]
  t = np.zeros_like(p)
  if n < 2:
    return t
  diff = np.diff(p, axis=axis)  # diff[i] = p[i + 1] - p[i]
  fwd = np.concatenate([diff, np.take(diff, [-1], axis=axis)], axis=axis)   # p[i+1]-p[i]
  bwd = np.concatenate([np.take(diff, [0], axis=axis), diff], axis=axis)    # p[i]-p[i-1]
  return np.where(np.abs(fwd[..., 2:]) <= np.abs(bwd[..., 2:]), fwd, bwd)


def normals_from_depth(depth: np.ndarray, k: np.ndarray) -> np.ndarray:
  """(H, W) positive finite z-depth, (3, 3) K -> (H, W, 3) float32 unit normals (OpenCV frame),
  facing the camera. A pixel whose tangents are parallel gets (0, 0, −1)."""
  depth = np.asarray(depth)
  bad = ~np.isfinite(depth) | (depth <= 0)
  if bad.any():
    i, j = np.argwhere(bad)[0]
    raise ValueError(f'depth must be finite and > 0 everywhere; {int(bad.sum())} pixel(s) are not '
                     f'(first at row {i}, col {j}: {depth[i, j]}).')
  p = backproject(depth, k)
  n = np.cross(_tangent(p, 0), _tangent(p, 1))  # rows (y down) × columns (x right): towards camera
  flip = np.sum(n * p, axis=-1) > 0             # facing away from the camera: turn it round
  n = np.where(flip[..., None], -n, n)
  norm = np.linalg.norm(n, axis=-1, keepdims=True)
  facing = np.array([0.0, 0.0, -1.0])
  n = np.where(norm > 1e-12, n / np.maximum(norm, 1e-12), facing)
  return n.astype(np.float32)


def depth_from_relative_disparity(disparity: np.ndarray,
                                  far_near_ratio: float = DEFAULT_FAR_NEAR_RATIO) -> np.ndarray:
  """Affine-invariant disparity (H, W; large = near) -> z-depth in [1, far_near_ratio].

  See the module docstring for the assumption; a constant map becomes depth 1.
  """
  if not far_near_ratio > 1.0:
    raise ValueError(f'far_near_ratio={far_near_ratio} must be > 1.')
  d = np.asarray(disparity, np.float64)
  if not np.isfinite(d).all():
    raise ValueError(f'disparity has {int((~np.isfinite(d)).sum())} non-finite pixel(s).')
  lo, span = float(d.min()), float(d.max() - d.min())
  t = np.ones_like(d) if span <= 1e-12 else (d - lo) / span
  shift = 1.0 / (far_near_ratio - 1.0)
  return (1.0 + shift) / (t + shift)


def normals_from_disparity(disparity: np.ndarray, k: np.ndarray, *, affine_invariant: bool = True,
                           far_near_ratio: float = DEFAULT_FAR_NEAR_RATIO) -> np.ndarray:
  """Normals from disparity: affine-invariant (unknown shift: `depth_from_relative_disparity`)
  or known up to scale only (z ∝ 1 / disparity; every value must then be > 0)."""
  if affine_invariant:
    depth = depth_from_relative_disparity(disparity, far_near_ratio)
  else:
    d = np.asarray(disparity, np.float64)
    if not (np.isfinite(d).all() and d.min() > 0):
      raise ValueError('a disparity with no shift must be finite and > 0 everywhere to invert it; '
                       f'its range is [{np.nanmin(d)}, {np.nanmax(d)}].')
    depth = 1.0 / d
  return normals_from_depth(depth, k)
