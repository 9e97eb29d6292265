"""Procedural scenes: the embedded default dataset, ray cast with exact labels.

Each scene is a few primitives (sphere, box, cylinder, cone) resting on a
ground plane, optionally in front of a back wall, lit by one directional light
plus ambient, with cast shadows. Everything is drawn from
`np.random.default_rng(seed)` before any pixel is traced, so a seed names the
same scene at every resolution and the same seed always gives the same bytes.

Conventions
-----------
* World frame: x right, y forward (horizontal), z up; the ground is z = 0 and
  the camera sits at (0, 0, height), pitched down about its x axis.
* Camera frame: OpenCV, x right, y down, z forward. `depth` is the z-depth
  (distance along the optical axis, not the ray length) and `normal` holds unit
  normals in this frame, always facing the camera (n . view_ray < 0). A
  horizontal image flip therefore negates normal x.
* Intrinsics: pixel (row i, column j) has its centre at (u, v) = (j, i), so a
  camera point (X, Y, Z) lands on u = fx X / Z + cx, v = fy Y / Z + cy with
  cx = cy = (resolution - 1) / 2 and fx = fy = resolution / (2 tan(FOV / 2)).
  Back-projection is X = (j - cx) Z / fx, Y = (i - cy) Z / fy.
* Far clip: anything beyond z-depth FAR_DEPTH (and rays that hit nothing) is
  'sky': semantic id 0, depth exactly FAR_DEPTH, normal (0, 0, -1) (facing the
  camera along the optical axis, which is also the normal a constant-depth
  map back-projects to). Because the camera has no roll, the far clip meets
  the ground in a horizontal line: the horizon. Depth is always finite.
* Scene label: the shape of the object with the largest visible area, counted
  at LABEL_RESOLUTION whatever the output resolution, so the label of a seed
  never depends on the resolution it is rendered at.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SEMANTIC_CLASSES: tuple[str, ...] = ('sky', 'ground', 'wall', 'sphere', 'box', 'cylinder', 'cone')
SCENE_CLASSES: tuple[str, ...] = ('sphere', 'box', 'cylinder', 'cone')
RESOLUTIONS: tuple[int, ...] = (32, 64, 128, 256)

FAR_DEPTH = 12.0        # z-depth of the far clip plane (world units ~ metres)
FOV_DEG = 50.0          # horizontal = vertical field of view (square images)
LABEL_RESOLUTION = 64   # resolution at which visible areas decide the scene label

# Instance ids (internal, exposed with `with_instances=True`): objects are 3 + k.
SKY, GROUND, WALL = 0, 1, 2
_FIRST_OBJECT = 3
_SHAPE_ID = {s: SEMANTIC_CLASSES.index(s) for s in SCENE_CLASSES}

_EPS = 1e-6
_SHADOW_OFFSET = 1e-4   # lifts shadow-ray origins off their surface (no self-shadow acne)


# ---- scene description --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Primitive:
  shape: str              # one of SCENE_CLASSES
  x: float                # ground position of the base centre
  y: float
  radius: float           # sphere / cylinder / cone radius; box: half extent along its local x
  height: float           # vertical extent (sphere: 2 radius)
  depth: float = 0.0      # box: half extent along its local y
  yaw: float = 0.0        # box: rotation about the vertical axis
  albedo: tuple[float, float, float] = (0.5, 0.5, 0.5)  # linear RGB

  @property
  def footprint(self) -> float:
    """Radius of a vertical cylinder enclosing the primitive (for placement)."""
    return float(np.hypot(self.radius, self.depth)) if self.shape == 'box' else self.radius


@dataclasses.dataclass(frozen=True)
class Scene:
  cam_height: float
  pitch: float            # radians, camera looking down
  wall_y: float | None    # back wall plane y = wall_y, or no wall
  light: np.ndarray       # unit vector towards the light (world)
  ambient: float
  ground_albedo: tuple[float, float, float]
  wall_albedo: tuple[float, float, float]
  checker: float          # relative brightness change of the ground checker
  objects: tuple[Primitive, ...]


def intrinsics(resolution: int) -> np.ndarray:
  """The (3, 3) float32 pinhole intrinsics at `resolution` (see module docstring)."""
  f = resolution / (2.0 * np.tan(np.radians(FOV_DEG) / 2.0))
  c = (resolution - 1) / 2.0
  return np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]], np.float32)


def camera_rotation(pitch: float) -> np.ndarray:
  """World -> camera rotation; its rows are the camera axes in world coordinates."""
  s, c = np.sin(pitch), np.cos(pitch)
  return np.array([[1.0, 0.0, 0.0],    # x right
                   [0.0, -s, -c],      # y down (tilted with the pitch)
                   [0.0, c, -s]])      # z forward, looking down by `pitch`


def _srgb_to_linear(c) -> tuple[float, float, float]:
  return tuple(float(v) for v in np.asarray(c) ** 2.2)


def _random_colour(rng: np.random.Generator, sat: tuple[float, float],
                   val: tuple[float, float]) -> tuple[float, float, float]:
  """A linear-RGB albedo from a random hue with saturation and value in the given ranges."""
  h, s, v = rng.uniform(0.0, 1.0), rng.uniform(*sat), rng.uniform(*val)
  k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0     # HSV -> RGB, vectorised over channels
  rgb = v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
  return _srgb_to_linear(rgb)


def _random_primitive(rng: np.random.Generator, x: float, y: float) -> Primitive:
  shape = SCENE_CLASSES[rng.integers(len(SCENE_CLASSES))]
  albedo = _random_colour(rng, sat=(0.55, 0.9), val=(0.6, 0.95))
  if shape == 'sphere':
    r = rng.uniform(0.4, 0.7)
    return Primitive('sphere', x, y, r, 2 * r, albedo=albedo)
  if shape == 'box':
    return Primitive('box', x, y, rng.uniform(0.3, 0.55), rng.uniform(0.5, 1.2),
                     depth=rng.uniform(0.3, 0.55), yaw=rng.uniform(0.0, np.pi / 2),
                     albedo=albedo)
  if shape == 'cylinder':
    return Primitive('cylinder', x, y, rng.uniform(0.3, 0.55), rng.uniform(0.6, 1.4),
                     albedo=albedo)
  return Primitive('cone', x, y, rng.uniform(0.4, 0.7), rng.uniform(0.9, 1.7), albedo=albedo)


def _in_view(p: Primitive, cam_height: float, rot: np.ndarray, margin: float = 1.02) -> bool:
  """Whether the primitive's bounding box projects inside the image (normalised coords)."""
  fr = p.footprint
  corners = np.array([[p.x + sx * fr, p.y + sy * fr, z] for sx in (-1, 1) for sy in (-1, 1)
                      for z in (0.0, p.height)])
  cam = (corners - np.array([0.0, 0.0, cam_height])) @ rot.T
  if np.any(cam[:, 2] <= 0.5):
    return False
  uv = cam[:, :2] / cam[:, 2:] / np.tan(np.radians(FOV_DEG) / 2.0)
  return bool(np.all(np.abs(uv) <= margin)) and bool(np.all(cam[:, 2] < FAR_DEPTH))


def sample_scene(rng: np.random.Generator) -> Scene:
  """Draws one scene; the number of draws does not depend on any resolution."""
  cam_height = rng.uniform(2.0, 2.6)
  pitch = np.radians(rng.uniform(24.0, 32.0))
  wall_y = rng.uniform(7.0, 10.0) if rng.uniform() < 0.5 else None
  # Light from the camera's side of the wall (y component <= 0) and from above, so
  # neither the wall nor the ground can shadow anything: only objects cast shadows.
  elevation = np.radians(rng.uniform(35.0, 65.0))
  azimuth = np.radians(rng.uniform(25.0, 80.0)) * rng.choice([-1.0, 1.0])
  light = np.array([np.cos(elevation) * np.sin(azimuth), -np.cos(elevation) * np.cos(azimuth),
                    np.sin(elevation)])
  ambient = rng.uniform(0.25, 0.4)
  ground_albedo = _random_colour(rng, sat=(0.0, 0.25), val=(0.55, 0.8))
  wall_albedo = _random_colour(rng, sat=(0.05, 0.35), val=(0.6, 0.9))
  checker = rng.uniform(0.06, 0.15)

  rot = camera_rotation(pitch)
  far_y = 8.0 if wall_y is None else min(8.0, wall_y - 1.2)
  num_objects = int(rng.integers(1, 5))
  objects: list[Primitive] = []
  for _ in range(num_objects):
    for _ in range(30):   # rejection sampling: in view, not touching the others
      y = rng.uniform(3.2, far_y)
      half_width = (y * np.cos(pitch) + cam_height * np.sin(pitch)) * np.tan(
          np.radians(FOV_DEG) / 2.0)
      p = _random_primitive(rng, rng.uniform(-half_width, half_width), y)
      if p.y + p.footprint > far_y + 0.8:
        continue
      if not _in_view(p, cam_height, rot):
        continue
      if all(np.hypot(p.x - q.x, p.y - q.y) > p.footprint + q.footprint + 0.1 for q in objects):
        objects.append(p)
        break
  if not objects:   # every draw rejected (rare): one sphere in the middle of the view
    objects.append(Primitive('sphere', 0.0, 5.0, 0.6, 1.2,
                             albedo=_random_colour(rng, (0.55, 0.9), (0.6, 0.95))))
  return Scene(cam_height, pitch, wall_y, light, ambient, ground_albedo, wall_albedo, checker,
               tuple(objects))


# ---- ray-primitive intersection -------------------------------------------------------------------
# Each function takes ray origins o (N, 3) and directions d (N, 3), world frame, and returns the
# nearest hit distance t > eps along d (inf on a miss) and the outward world normal there (N, 3).
# Directions need not be unit length: t is measured in units of |d|.

def _nearest(ts: list[np.ndarray], normals: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  ts = np.stack(ts)
  k = np.argmin(ts, axis=0)
  idx = np.arange(ts.shape[1])
  return ts[k, idx], np.stack(normals)[k, idx]


def _valid(t: np.ndarray, ok: np.ndarray) -> np.ndarray:
  return np.where(ok & (t > _EPS), t, np.inf)


def _quadratic_roots(a, b, c) -> tuple[np.ndarray, np.ndarray]:
  """Roots of a t^2 + 2 b t + c = 0 (nan where none), a may be ~0."""
  disc = b * b - a * c
  s = np.sqrt(np.where(disc >= 0, disc, np.nan))
  linear = np.abs(a) < 1e-12
  safe_a = np.where(linear, 1.0, a)
  t1 = np.where(linear, -c / (2 * np.where(b == 0, np.nan, b)), (-b - s) / safe_a)
  t2 = np.where(linear, np.nan, (-b + s) / safe_a)
  return t1, t2


def _local(p: Primitive, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rays in the primitive's frame: base centre at the origin, rotated by -yaw."""
  o = o - np.array([p.x, p.y, 0.0])
  if p.yaw:
    c, s = np.cos(p.yaw), np.sin(p.yaw)
    rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    o, d = o @ rot.T, d @ rot.T
  return o, d


def _to_world(p: Primitive, n: np.ndarray) -> np.ndarray:
  if p.yaw:
    c, s = np.cos(p.yaw), np.sin(p.yaw)
    n = n @ np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
  return n


def _sphere(p: Primitive, o, d):
  oc = o - np.array([p.x, p.y, p.radius])
  t1, t2 = _quadratic_roots(np.sum(d * d, -1), np.sum(oc * d, -1),
                            np.sum(oc * oc, -1) - p.radius ** 2)
  t = np.where(t1 > _EPS, t1, np.where(t2 > _EPS, t2, np.inf))
  t = np.where(np.isnan(t), np.inf, t)
  hit = oc + np.where(np.isfinite(t), t, 0.0)[:, None] * d
  return t, hit / p.radius


def _box(p: Primitive, o, d):
  o, d = _local(p, o, d)
  half = np.array([p.radius, p.depth, p.height / 2])
  o = o - np.array([0.0, 0.0, p.height / 2])
  with np.errstate(divide='ignore', invalid='ignore'):
    inv = 1.0 / d
    t_lo, t_hi = (-half - o) * inv, (half - o) * inv
  t_near = np.nanmax(np.minimum(t_lo, t_hi), axis=-1)
  t_far = np.nanmin(np.maximum(t_lo, t_hi), axis=-1)
  ok = t_far >= np.maximum(t_near, _EPS)
  t = np.where(ok, np.where(t_near > _EPS, t_near, t_far), np.inf)
  hit = (o + np.where(ok, t, 0.0)[:, None] * d) / half
  axis = np.argmax(np.abs(hit), axis=-1)
  n = np.zeros_like(hit)
  n[np.arange(len(n)), axis] = np.sign(hit[np.arange(len(n)), axis])
  return t, _to_world(p, n)


def _cylinder(p: Primitive, o, d):
  o, d = _local(p, o, d)
  r, h = p.radius, p.height
  t1, t2 = _quadratic_roots(d[:, 0] ** 2 + d[:, 1] ** 2, o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1],
                            o[:, 0] ** 2 + o[:, 1] ** 2 - r * r)
  ts, ns = [], []
  for t in (t1, t2):
    z = o[:, 2] + t * d[:, 2]
    ts.append(_valid(t, (z >= 0) & (z <= h)))
    q = o + np.nan_to_num(t)[:, None] * d
    ns.append(np.stack([q[:, 0] / r, q[:, 1] / r, np.zeros_like(t)], -1))
  with np.errstate(divide='ignore', invalid='ignore'):
    for plane, nz in ((h, 1.0), (0.0, -1.0)):
      t = (plane - o[:, 2]) / d[:, 2]
      q = o + np.nan_to_num(t, posinf=0.0, neginf=0.0)[:, None] * d
      ts.append(_valid(t, q[:, 0] ** 2 + q[:, 1] ** 2 <= r * r))
      ns.append(np.broadcast_to(np.array([0.0, 0.0, nz]), o.shape))
  return _nearest(ts, ns)


def _cone(p: Primitive, o, d):
  o, d = _local(p, o, d)
  r, h = p.radius, p.height
  k2 = (r / h) ** 2
  w = h - o[:, 2]
  t1, t2 = _quadratic_roots(d[:, 0] ** 2 + d[:, 1] ** 2 - k2 * d[:, 2] ** 2,
                            o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1] + k2 * w * d[:, 2],
                            o[:, 0] ** 2 + o[:, 1] ** 2 - k2 * w * w)
  ts, ns = [], []
  for t in (t1, t2):
    q = o + np.nan_to_num(t)[:, None] * d
    ts.append(_valid(t, (q[:, 2] >= 0) & (q[:, 2] <= h)))
    # gradient of x^2 + y^2 - k^2 (h - z)^2, halved
    ns.append(np.stack([q[:, 0], q[:, 1], k2 * (h - q[:, 2])], -1))
  with np.errstate(divide='ignore', invalid='ignore'):
    t = -o[:, 2] / d[:, 2]
    q = o + np.nan_to_num(t, posinf=0.0, neginf=0.0)[:, None] * d
    ts.append(_valid(t, q[:, 0] ** 2 + q[:, 1] ** 2 <= r * r))
    ns.append(np.broadcast_to(np.array([0.0, 0.0, -1.0]), o.shape))
  t, n = _nearest(ts, ns)
  return t, _to_world(p, n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12))


_INTERSECT = {'sphere': _sphere, 'box': _box, 'cylinder': _cylinder, 'cone': _cone}


def _plane(o, d, axis: int, offset: float, normal: np.ndarray):
  with np.errstate(divide='ignore', invalid='ignore'):
    t = (offset - o[:, axis]) / d[:, axis]
  t = _valid(t, np.isfinite(t))
  return t, np.broadcast_to(normal, o.shape)


def _trace(scene: Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Nearest hit over the whole scene: (t, world normal, instance id)."""
  ts, ns = [np.full(len(d), np.inf)], [np.zeros_like(d)]       # SKY: nothing hit
  ts_n = _plane(o, d, 2, 0.0, np.array([0.0, 0.0, 1.0]))       # GROUND
  ts.append(ts_n[0]), ns.append(ts_n[1])
  if scene.wall_y is not None:
    tw, nw = _plane(o, d, 1, scene.wall_y, np.array([0.0, -1.0, 0.0]))
  else:
    tw, nw = np.full(len(d), np.inf), np.zeros_like(d)
  ts.append(tw), ns.append(nw)                                 # WALL
  for p in scene.objects:
    t, n = _INTERSECT[p.shape](p, o, d)
    ts.append(t), ns.append(n)
  ts = np.stack(ts)
  inst = np.argmin(ts[1:], axis=0) + 1
  idx = np.arange(len(d))
  t = ts[inst, idx]
  inst = np.where(np.isfinite(t), inst, SKY)
  return t, np.stack(ns)[inst, idx], inst


def _shadowed(scene: Scene, points: np.ndarray) -> np.ndarray:
  """Whether each point's ray towards the light hits an object (the only possible occluders)."""
  d = np.broadcast_to(scene.light, points.shape)
  blocked = np.zeros(len(points), bool)
  for p in scene.objects:
    blocked |= np.isfinite(_INTERSECT[p.shape](p, points, d)[0])
  return blocked


# ---- rendering ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _camera_rays(resolution: int) -> np.ndarray:
  """Camera-frame ray directions (H*W, 3) with unit z, so the hit distance is the z-depth."""
  k = intrinsics(resolution).astype(np.float64)
  ii, jj = np.meshgrid(np.arange(resolution), np.arange(resolution), indexing='ij')
  rays = np.stack([(jj - k[0, 2]) / k[0, 0], (ii - k[1, 2]) / k[1, 1],
                   np.ones_like(jj, np.float64)], -1)
  rays = rays.reshape(-1, 3)
  rays.setflags(write=False)
  return rays


def _primary(scene: Scene, resolution: int):
  """Primary rays: (z-depth clipped to FAR_DEPTH, world normal, instance id), flat arrays."""
  rot = camera_rotation(scene.pitch)
  d = _camera_rays(resolution) @ rot               # camera -> world: R^T d
  o = np.broadcast_to(np.array([0.0, 0.0, scene.cam_height]), d.shape)
  t, n, inst = _trace(scene, o, d)
  inst = np.where(t > FAR_DEPTH, SKY, inst)
  return o, d, t, n, inst, rot


def _label(scene: Scene, inst: np.ndarray) -> int:
  areas = np.bincount(inst, minlength=_FIRST_OBJECT + len(scene.objects))[_FIRST_OBJECT:]
  return SCENE_CLASSES.index(scene.objects[int(np.argmax(areas))].shape)


def _shade(scene: Scene, o, d, t, n, inst) -> np.ndarray:
  """Linear-light Lambertian shading with shadows and a ground checker, then sRGB-ish gamma."""
  hit = inst != SKY
  albedo = np.zeros_like(d)
  albedo[inst == GROUND] = scene.ground_albedo
  albedo[inst == WALL] = scene.wall_albedo
  for k, p in enumerate(scene.objects):
    albedo[inst == _FIRST_OBJECT + k] = p.albedo
  points = o + np.where(hit, t, 0.0)[:, None] * d
  ground = inst == GROUND
  tile = (np.floor(points[ground, 0]) + np.floor(points[ground, 1])) % 2
  albedo[ground] *= (1.0 + scene.checker * (2 * tile - 1))[:, None]

  lit = np.zeros(len(d), bool)
  cos = np.clip(n[hit] @ scene.light, 0.0, None)
  facing = cos > 0  # surfaces turned away are dark anyway: skip their shadow rays
  idx = np.flatnonzero(hit)[facing]
  lit[idx] = ~_shadowed(scene, points[idx] + n[idx] * _SHADOW_OFFSET)
  radiance = np.zeros(len(d))
  radiance[hit] = scene.ambient + (1.0 - scene.ambient) * cos * lit[hit]
  colour = albedo * radiance[:, None]

  # Sky: brighter towards the horizon (ray elevation), independent of the far clip.
  elev = d[~hit, 2] / np.linalg.norm(d[~hit], axis=-1)
  horizon, zenith = np.array([0.80, 0.86, 0.95]), np.array([0.30, 0.50, 0.85])
  colour[~hit] = horizon + np.clip(elev * 3.0, 0.0, 1.0)[:, None] * (zenith - horizon)
  return np.round(np.clip(colour, 0.0, 1.0) ** (1 / 2.2) * 255.0).astype(np.uint8)


def render_scene(seed: int, resolution: int, *, with_instances: bool = False
                 ) -> dict[str, np.ndarray]:
  """Renders scene `seed` at `resolution`² (see the module docstring for conventions).

  Returns rgb uint8 (H, W, 3), depth float32 (H, W), normal float32 (H, W, 3),
  segmentation uint8 (H, W) (ids into SEMANTIC_CLASSES), label int64 () (index
  into SCENE_CLASSES) and intrinsics float32 (3, 3); with `with_instances`
  also instance uint8 (H, W) (0 sky, 1 ground, 2 wall, 3 + k object k).
  """
  if int(resolution) != resolution or resolution < 1:
    raise ValueError(f'resolution must be a positive integer; got {resolution!r}.')
  resolution = int(resolution)
  scene = sample_scene(np.random.default_rng(seed))
  o, d, t, n_world, inst, rot = _primary(scene, resolution)

  sky = inst == SKY
  depth = np.where(sky, FAR_DEPTH, t)
  normal = n_world @ rot.T                         # world -> camera: R n
  normal[sky] = (0.0, 0.0, -1.0)
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  view = _camera_rays(resolution)
  normal *= np.where(np.sum(normal * view, -1) > 0, -1.0, 1.0)[:, None]

  semantic = np.array([0, 1, 2] + [_SHAPE_ID[p.shape] for p in scene.objects], np.uint8)[inst]
  if resolution == LABEL_RESOLUTION:
    label = _label(scene, inst)
  else:
    label = _label(scene, _primary(scene, LABEL_RESOLUTION)[4])

  shape = (resolution, resolution)
  out = {
      'rgb': _shade(scene, o, d, t, n_world, inst).reshape(*shape, 3),
      'depth': depth.astype(np.float32).reshape(shape),
      'normal': normal.astype(np.float32).reshape(*shape, 3),
      'segmentation': semantic.reshape(shape),
      'label': np.array(label, np.int64),
      'intrinsics': intrinsics(resolution),
  }
  if with_instances:
    out['instance'] = inst.astype(np.uint8).reshape(shape)
  return out
