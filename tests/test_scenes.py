"""The procedural scenes: geometry checked against itself, not just shapes.

Depth, normals, segmentation and intrinsics are rendered independently (each
from the ray hits), so agreement between them is evidence the renderer is
right: normals recomputed from back-projected depth match the rendered ones,
segmentation edges sit on geometric discontinuities, ground pixels are planar.
"""

import collections

import numpy as np
import pytest

from mmgen_jax.data import scenes

SEEDS = range(12)


def _render(seed, res):
  return scenes.render_scene(seed, res, with_instances=True)


def _rays(k: np.ndarray, h: int, w: int) -> np.ndarray:
  """Camera-frame rays with unit z through every pixel centre (OpenCV intrinsics)."""
  k = k.astype(np.float64)
  ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  return np.stack([(jj - k[0, 2]) / k[0, 0], (ii - k[1, 2]) / k[1, 1], np.ones((h, w))], -1)


def _backproject(depth: np.ndarray, k: np.ndarray) -> np.ndarray:
  return _rays(k, *depth.shape) * depth.astype(np.float64)[..., None]


def _normals_from_depth(points: np.ndarray) -> np.ndarray:
  """Central-difference normals of the interior pixels, facing the camera."""
  du = points[1:-1, 2:] - points[1:-1, :-2]   # along +u (x right)
  dv = points[2:, 1:-1] - points[:-2, 1:-1]   # along +v (y down)
  n = -np.cross(du, dv)                       # x × y = +z points away: negate
  return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _smooth_interior(*id_maps: np.ndarray) -> np.ndarray:
  """Interior pixels whose whole 3x3 neighbourhood carries one id in every map."""
  h, w = id_maps[0].shape
  ok = np.ones((h - 2, w - 2), bool)
  for ids in id_maps:
    centre = ids[1:-1, 1:-1]
    for di in (0, 1, 2):
      for dj in (0, 1, 2):
        ok &= ids[di:h - 2 + di, dj:w - 2 + dj] == centre
  return ok


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.degrees(np.arccos(np.clip(np.sum(a * b, -1), -1.0, 1.0)))


# ---- API, dtypes, ranges, determinism ---------------------------------------------------------

@pytest.mark.parametrize('res', scenes.RESOLUTIONS + (1, 17))
def test_every_resolution_renders_valid_maps(res):
  out = scenes.render_scene(3, res)
  assert set(out) == {'rgb', 'depth', 'normal', 'segmentation', 'label', 'intrinsics'}
  assert out['rgb'].shape == (res, res, 3) and out['rgb'].dtype == np.uint8
  assert out['depth'].shape == (res, res) and out['depth'].dtype == np.float32
  assert out['normal'].shape == (res, res, 3) and out['normal'].dtype == np.float32
  assert out['segmentation'].shape == (res, res) and out['segmentation'].dtype == np.uint8
  assert out['label'].shape == () and out['label'].dtype == np.int64
  assert out['intrinsics'].shape == (3, 3) and out['intrinsics'].dtype == np.float32

  depth = out['depth']
  assert np.all(np.isfinite(depth)) and depth.min() > 0 and depth.max() <= scenes.FAR_DEPTH
  np.testing.assert_allclose(np.linalg.norm(out['normal'], axis=-1), 1.0, atol=1e-5)
  assert out['segmentation'].max() < len(scenes.SEMANTIC_CLASSES)
  assert 0 <= out['label'] < len(scenes.SCENE_CLASSES)
  k = out['intrinsics']
  assert k[0, 2] == k[1, 2] == pytest.approx((res - 1) / 2)
  assert k[0, 0] == pytest.approx(res / (2 * np.tan(np.radians(scenes.FOV_DEG) / 2)), rel=1e-6)


def test_normals_face_the_camera_and_sky_is_well_defined():
  for seed in SEEDS:
    out = scenes.render_scene(seed, 64)
    rays = _rays(out['intrinsics'], 64, 64)
    assert np.all(np.sum(out['normal'] * rays, -1) < 0), seed
    sky = out['segmentation'] == 0
    assert np.all(out['depth'][sky] == scenes.FAR_DEPTH)
    assert np.all(out['normal'][sky] == (0.0, 0.0, -1.0))


def test_sky_is_a_modest_fraction():
  seg = np.stack([scenes.render_scene(s, 32)['segmentation'] for s in range(40)])
  assert (seg == 0).mean() < 0.1


def test_same_seed_same_bytes_and_seeds_differ():
  a, b = scenes.render_scene(7, 64), scenes.render_scene(7, 64)
  for key in a:
    assert a[key].tobytes() == b[key].tobytes(), key
  rgbs = [scenes.render_scene(s, 32)['rgb'].tobytes() for s in range(10)]
  assert len(set(rgbs)) == 10


def test_bad_resolution_is_refused():
  with pytest.raises(ValueError, match='resolution'):
    scenes.render_scene(0, 0)


# ---- labels ----------------------------------------------------------------------------------

def test_labels_cover_every_class():
  counts = collections.Counter(int(scenes.render_scene(s, 32)['label']) for s in range(100))
  assert set(counts) == set(range(len(scenes.SCENE_CLASSES))), counts
  assert min(counts.values()) >= 10, counts   # no class starved


def test_label_is_the_largest_visible_object_and_independent_of_resolution():
  for seed in range(20):
    out = _render(seed, scenes.LABEL_RESOLUTION)
    inst, seg = out['instance'], out['segmentation']
    areas = np.bincount(inst.ravel(), minlength=256)[3:]
    biggest = np.argmax(areas) + 3
    shape = scenes.SEMANTIC_CLASSES[seg[inst == biggest][0]]
    assert scenes.SCENE_CLASSES[out['label']] == shape, seed
    for res in (32, 128):
      assert scenes.render_scene(seed, res)['label'] == out['label'], (seed, res)


# ---- geometry --------------------------------------------------------------------------------

@pytest.mark.parametrize('res', [64, 128])
def test_normals_agree_with_depth_finite_differences(res):
  """Normals rebuilt from back-projected depth match the rendered normals.

  Only on smooth interior pixels (3x3 neighbourhood with one semantic and one
  instance id), and per class, so no class hides behind the ground's many pixels.
  """
  per_class = collections.defaultdict(list)
  for seed in SEEDS:
    out = _render(seed, res)
    fd = _normals_from_depth(_backproject(out['depth'], out['intrinsics']))
    ang = _angle_deg(fd, out['normal'][1:-1, 1:-1].astype(np.float64))
    mask = _smooth_interior(out['segmentation'], out['instance'])
    seg = out['segmentation'][1:-1, 1:-1]
    for cls in range(1, len(scenes.SEMANTIC_CLASSES)):
      per_class[scenes.SEMANTIC_CLASSES[cls]].append(ang[mask & (seg == cls)])
  for name, angles in per_class.items():
    angles = np.concatenate(angles)
    assert angles.size > 100, name
    assert np.median(angles) < 3.0, (name, np.median(angles))
  everything = np.concatenate([np.concatenate(a) for a in per_class.values()])
  assert np.percentile(everything, 90) < 3.0


def test_horizontal_flip_negates_normal_x():
  out = scenes.render_scene(5, 64)
  flipped_depth = out['depth'][:, ::-1]
  flipped_normal = out['normal'][:, ::-1] * np.array([-1.0, 1.0, 1.0], np.float32)
  fd = _normals_from_depth(_backproject(flipped_depth, out['intrinsics']))
  seg = out['segmentation'][:, ::-1]
  mask = _smooth_interior(seg) & (seg[1:-1, 1:-1] != 0)
  ang = _angle_deg(fd, flipped_normal[1:-1, 1:-1].astype(np.float64))[mask]
  assert np.median(ang) < 1.0


def _neighbour_pairs(a: np.ndarray):
  """(this, next) views for vertical and horizontal neighbours."""
  yield a[1:], a[:-1]
  yield a[:, 1:], a[:, :-1]


def _plane_error(z_p, n_p, r_p, z_q, r_q):
  """Relative error of q's depth predicted by p's tangent plane (inf when the plane misses)."""
  with np.errstate(divide='ignore', invalid='ignore'):
    z_hat = z_p * np.sum(n_p * r_p, -1) / np.sum(n_p * r_q, -1)
  err = np.abs(z_q - z_hat) / z_q
  return np.where(np.isfinite(err) & (z_hat > 0), err, np.inf)


def test_segmentation_boundaries_are_geometric_discontinuities():
  """Segmentation edges and depth/normal discontinuities coincide.

  For neighbouring pixels p, q a *depth discontinuity* is a depth that neither
  pixel's tangent plane (its rendered normal through its back-projected point)
  predicts within 5%: this follows surfaces at grazing angles, where a plain
  relative jump threshold would fire, and ignores contact lines (object on the
  ground), where depth is continuous. A *crease* is a normal change > 20°.
  Then (a) wherever the semantic id changes there is a depth discontinuity or
  a crease, and (b) wherever depth is discontinuous the instance changes: one
  object occluding another or the background. The semantic id changes there
  too except where an object occludes another of its class.
  """
  id_edges, depth_edges, semantic_at_jumps = [], [], []
  for seed in range(20):
    out = _render(seed, 64)
    maps = [out['depth'].astype(np.float64), out['normal'].astype(np.float64),
            _rays(out['intrinsics'], 64, 64), out['segmentation'], out['instance']]
    for (z1, z0), (n1, n0), (r1, r0), (s1, s0), (i1, i0) in zip(
        *[_neighbour_pairs(m) for m in maps], strict=True):
      err = np.minimum(_plane_error(z0, n0, r0, z1, r1), _plane_error(z1, n1, r1, z0, r0))
      jump = err > 0.05
      crease = _angle_deg(n1, n0) > 20.0
      id_edges.append((jump | crease)[s1 != s0])
      depth_edges.append((i1 != i0)[jump])
      semantic_at_jumps.append((s1 != s0)[jump])
  id_edges, depth_edges = np.concatenate(id_edges), np.concatenate(depth_edges)
  assert id_edges.size > 1000 and depth_edges.size > 1000
  assert id_edges.mean() > 0.99, id_edges.mean()
  assert depth_edges.mean() > 0.99, depth_edges.mean()
  assert np.concatenate(semantic_at_jumps).mean() > 0.9


def test_ground_pixels_lie_on_one_plane_with_the_rendered_normal():
  for seed in SEEDS:
    out = scenes.render_scene(seed, 64)
    ground = out['segmentation'] == scenes.SEMANTIC_CLASSES.index('ground')
    points = _backproject(out['depth'], out['intrinsics'])[ground]
    centre = points.mean(0)
    _, sv, vt = np.linalg.svd(points - centre, full_matrices=False)
    normal = vt[-1] * -np.sign(vt[-1] @ centre)   # the side facing the camera
    residual = np.abs((points - centre) @ normal)
    assert residual.max() < 1e-4 * scenes.FAR_DEPTH, (seed, residual.max())
    assert sv[1] > 1.0    # a genuine 2-D spread, not a line of points
    rendered = out['normal'][ground].astype(np.float64)
    assert _angle_deg(rendered, normal).max() < 0.05, seed
    # The camera is above the ground, at the height the scenes are drawn with.
    assert 1.7 < normal @ centre * -1 < 2.5


def test_objects_rest_on_the_ground():
  """Each object's lowest back-projected point is at ground level (height 0)."""
  for seed in SEEDS:
    out = _render(seed, 128)
    points = _backproject(out['depth'], out['intrinsics'])
    ground = out['segmentation'] == 1
    gp = points[ground]
    centre = gp.mean(0)
    normal = np.linalg.svd(gp - centre, full_matrices=False)[2][-1]
    normal *= -np.sign(normal @ centre)
    height = (points - centre) @ normal
    for inst in np.unique(out['instance'][out['instance'] >= 3]):
      sel = out['instance'] == inst
      assert height[sel].min() > -1e-3            # never below the ground
      assert height[sel].max() > 0.1              # a solid, not a decal
