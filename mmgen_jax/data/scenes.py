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
* Objects on their own (multimodal prompts, data/prompts.py): `instance_map`
  gives the instance ids without shading; `render_entity(seed, k, size,
  view_seed)` draws object k alone (same shape, size and albedo) from another
  pitch, azimuth and distance, under another light, on a plain background, so a
  prompt can show the object without handing over the target's pixels. Both
  only re-read the seed's scene: render_scene's output is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

SEMANTIC_CLASSES: tuple[str, ...] = ('sky', 'ground', 'wall', 'sphere', 'box', 'cylinder', 'cone')
SCENE_CLASSES: tuple[str, ...] = ('sphere', 'box', 'cylinder', 'cone')
RESOLUTIONS: tuple[int, ...] = (32, 64, 128, 256)
MAX_OBJECTS = 4         # a scene holds 1 .. MAX_OBJECTS primitives

FAR_DEPTH = 12.0        # z-depth of the far clip plane (world units ~ metres)
FOV_DEG = 50.0          # horizontal = vertical field of view (square images)
LABEL_RESOLUTION = 64   # resolution at which visible areas decide the scene label
_TAN_HALF_FOV = float(np.tan(np.radians(FOV_DEG) / 2.0))

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


# Size ranges per shape: (radius, height, box half depth); sphere height is 2 radius.
_SIZES = {
    'sphere': ((0.4, 0.7), None, None),
    'box': ((0.3, 0.55), (0.5, 1.2), (0.3, 0.55)),
    'cylinder': ((0.3, 0.55), (0.6, 1.4), None),
    'cone': ((0.5, 0.85), (1.0, 1.7), None),
}
_CANDIDATES = 32   # placement attempts per object, drawn (and checked) as one batch
_BOX_CORNERS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (0, 1)], float)


def _place(rng: np.random.Generator, shape: str, placed: list[Primitive], cam_height: float,
           rot: np.ndarray, near_y: float, far_y: float) -> Primitive | None:
  """The first of a batch of random poses that is fully in view and clear of `placed`."""
  n = _CANDIDATES
  radius_range, height_range, depth_range = _SIZES[shape]
  radius = rng.uniform(*radius_range, n)
  height = 2 * radius if height_range is None else rng.uniform(*height_range, n)
  depth = np.zeros(n) if depth_range is None else rng.uniform(*depth_range, n)
  yaw = rng.uniform(0.0, np.pi / 2, n) if shape == 'box' else np.zeros(n)
  y = rng.uniform(near_y, far_y, n)
  half_width = (y * rot[2, 1] + cam_height * -rot[2, 2]) * _TAN_HALF_FOV
  x = rng.uniform(-1.0, 1.0, n) * half_width
  footprint = np.hypot(radius, depth)

  # Bounding box of every candidate (n, 8, 3) in the camera frame: inside the
  # frustum (2% margin) and before the far clip, so the object is fully visible.
  corners = (_BOX_CORNERS[None] * np.stack([footprint, footprint, height], -1)[:, None]
             + np.stack([x, y, np.full(n, -cam_height)], -1)[:, None])
  cam = corners @ rot.T
  z = cam[..., 2]
  ok = np.all((z > 0.5) & (z < FAR_DEPTH), -1) & np.all(
      np.abs(cam[..., :2]) <= 1.02 * _TAN_HALF_FOV * np.maximum(z, 0.5)[..., None], (-2, -1))
  ok &= y + footprint < far_y + 0.8
  for q in placed:
    ok &= np.hypot(x - q.x, y - q.y) > footprint + q.footprint + 0.1
  if not ok.any():
    return None
  i = int(np.argmax(ok))
  return Primitive(shape, float(x[i]), float(y[i]), float(radius[i]), float(height[i]),
                   depth=float(depth[i]), yaw=float(yaw[i]))


def sample_scene(rng: np.random.Generator) -> Scene:
  """Draws one scene; the draws do not depend on any resolution."""
  cam_height = rng.uniform(1.8, 2.4)
  pitch = np.radians(rng.uniform(28.0, 36.0))
  wall_y = rng.uniform(5.5, 8.5) if rng.uniform() < 0.5 else None
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
  far_y = 6.0 if wall_y is None else min(6.0, wall_y - 1.0)
  objects: list[Primitive] = []
  for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
    # The shape is drawn before the poses, so placement failures (more likely for
    # big shapes) do not skew the shape, hence label, distribution.
    shape = SCENE_CLASSES[rng.integers(len(SCENE_CLASSES))]
    p = _place(rng, shape, objects, cam_height, rot, 2.0, far_y)
    if p is not None:
      objects.append(p)
  if not objects:   # every pose rejected (rare): one sphere in the middle of the view
    objects.append(Primitive('sphere', 0.0, 3.5, 0.5, 1.0))
  objects = [dataclasses.replace(p, albedo=_random_colour(rng, (0.55, 0.9), (0.6, 0.95)))
             for p in objects]
  return Scene(cam_height, pitch, wall_y, light, ambient, ground_albedo, wall_albedo, checker,
               tuple(objects))


# ---- ray-primitive intersection ------------------------------------------------------------
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
  t = np.where(t1 > _EPS, t1, np.where(t2 > _EPS, t2, np.inf))   # nan (a miss) compares False
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


def _hits(p: Primitive, o: np.ndarray, d: np.ndarray):
  """(ray indices, t, normal) of `p`'s hits, testing only rays that meet its bounding sphere."""
  centre = np.array([p.x, p.y, p.height / 2])
  radius2 = p.footprint ** 2 + (p.height / 2) ** 2
  oc = o - centre
  b = np.einsum('ij,ij->i', oc, d)
  c = np.einsum('ij,ij->i', oc, oc) - radius2
  near = (b * b >= np.einsum('ij,ij->i', d, d) * c) & ((b < 0) | (c < 0))
  idx = np.flatnonzero(near)
  t, n = _INTERSECT[p.shape](p, o[idx], d[idx])
  hit = np.isfinite(t)
  return idx[hit], t[hit], n[hit]


def _trace(scene: Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Nearest hit over the whole scene: (t, world normal, instance id); t = inf for sky."""
  with np.errstate(divide='ignore', invalid='ignore'):
    t = np.where(d[:, 2] < 0, -o[:, 2] / d[:, 2], np.inf)      # ground z = 0
  inst = np.where(np.isfinite(t), GROUND, SKY)
  n = np.zeros_like(d)
  n[:, 2] = 1.0
  if scene.wall_y is not None:                                   # wall y = wall_y, facing -y
    with np.errstate(divide='ignore', invalid='ignore'):
      tw = np.where(d[:, 1] > 0, (scene.wall_y - o[:, 1]) / d[:, 1], np.inf)
    wall = tw < t
    t, inst = np.where(wall, tw, t), np.where(wall, WALL, inst)
    n[wall] = (0.0, -1.0, 0.0)
  for k, p in enumerate(scene.objects):
    idx, tk, nk = _hits(p, o, d)
    closer = tk < t[idx]
    idx = idx[closer]
    t[idx], n[idx], inst[idx] = tk[closer], nk[closer], _FIRST_OBJECT + k
  n[inst == SKY] = 0.0
  return t, n, inst


def _shadowed(scene: Scene, points: np.ndarray) -> np.ndarray:
  """Whether each point's ray towards the light hits an object (the only possible occluders)."""
  d = np.broadcast_to(scene.light, points.shape)
  blocked = np.zeros(len(points), bool)
  for p in scene.objects:
    blocked[_hits(p, points, d)[0]] = True
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


# Linear light -> 8-bit display values (gamma 2.2), tabulated: a lookup beats a power.
_GAMMA_STEPS = 16383
_GAMMA_LUT = np.round((np.arange(_GAMMA_STEPS + 1) / _GAMMA_STEPS) ** (1 / 2.2) * 255.0
                      ).astype(np.uint8)
_HORIZON, _ZENITH = np.array([0.80, 0.86, 0.95]), np.array([0.30, 0.50, 0.85])


def _shade(scene: Scene, o, d, t, n, inst) -> np.ndarray:
  """Lambertian shading (linear light) with cast shadows and a ground checker -> uint8 RGB."""
  hit = inst != SKY
  albedo = np.array([(0.0, 0.0, 0.0), scene.ground_albedo, scene.wall_albedo]
                    + [p.albedo for p in scene.objects])[inst]
  points = o + np.where(hit, t, 0.0)[:, None] * d
  tile = (np.floor(points[:, 0]) + np.floor(points[:, 1])) % 2
  albedo *= np.where(inst == GROUND, 1.0 + scene.checker * (2 * tile - 1), 1.0)[:, None]

  cos = np.maximum(n @ scene.light, 0.0)   # sky normals are 0 here
  idx = np.flatnonzero(cos > 0)            # surfaces turned away need no shadow ray
  cos[idx[_shadowed(scene, points[idx] + n[idx] * _SHADOW_OFFSET)]] = 0.0
  colour = albedo * (scene.ambient + (1.0 - scene.ambient) * cos)[:, None]

  # Sky: brighter towards the horizon (ray elevation), independent of the far clip.
  elev = np.clip(d[:, 2] / np.linalg.norm(d, axis=-1) * 3.0, 0.0, 1.0)
  sky = _HORIZON + elev[:, None] * (_ZENITH - _HORIZON)
  colour = np.where(hit[:, None], colour, sky)
  return _GAMMA_LUT[np.round(np.clip(colour, 0.0, 1.0) * _GAMMA_STEPS).astype(np.int32)]


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


# ---- objects on their own (multimodal prompts) -----------------------------------------------
# Nothing below changes what render_scene returns: these functions only re-read a seed's scene.

ENTITY_PITCH_DEG = (5.0, 60.0)    # the entity camera's pitch range (the scene's is 28..36)
ENTITY_FILL = (0.55, 0.85)        # bounding-sphere radius / half field of view, in angle


def instance_map(seed: int, resolution: int) -> np.ndarray:
  """Instance ids uint8 (H, W) of scene `seed`, as render_scene(with_instances=True) gives
  them (0 sky, 1 ground, 2 wall, 3 + k object k), without shading the image."""
  if int(resolution) != resolution or resolution < 1:
    raise ValueError(f'resolution must be a positive integer; got {resolution!r}.')
  scene = sample_scene(np.random.default_rng(seed))
  inst = _primary(scene, int(resolution))[4]
  return inst.astype(np.uint8).reshape(int(resolution), int(resolution))


def render_entity(seed: int, k: int, size: int, view_seed) -> np.ndarray:
  """Object k of scene `seed` alone, uint8 (size, size, 3), seen anew.

  Same shape, dimensions and albedo as in the scene, but everything else is
  drawn from `np.random.default_rng(view_seed)`: the camera's pitch
  (ENTITY_PITCH_DEG) and its azimuth around the object (visible on boxes, the
  only shape that is not round about its axis), its distance (the object spans
  ENTITY_FILL of the half field of view, centred), the light direction and
  ambient level, and a plain background of a random greyish colour (no ground,
  no shadow). So the picture tells what the object is, never where it stands
  or how it looks in the scene's light.
  """
  scene = sample_scene(np.random.default_rng(seed))
  if not 0 <= k < len(scene.objects):
    raise IndexError(f'scene {seed} has {len(scene.objects)} objects; object {k} does not exist.')
  if int(size) != size or size < 1:
    raise ValueError(f'size must be a positive integer; got {size!r}.')
  rng = np.random.default_rng(view_seed)
  pitch = np.radians(rng.uniform(*ENTITY_PITCH_DEG))
  turn = rng.uniform(0.0, 2 * np.pi)
  fill = rng.uniform(*ENTITY_FILL)
  elevation = np.radians(rng.uniform(20.0, 70.0))
  azimuth = np.radians(rng.uniform(-100.0, 100.0))   # 0: light from behind the camera
  light = np.array([np.cos(elevation) * np.sin(azimuth), -np.cos(elevation) * np.cos(azimuth),
                    np.sin(elevation)])
  ambient = rng.uniform(0.2, 0.45)
  background = np.array(_random_colour(rng, sat=(0.0, 0.2), val=(0.15, 0.95)))

  p = scene.objects[k]
  p = dataclasses.replace(p, x=0.0, y=0.0, yaw=p.yaw + turn if p.shape == 'box' else 0.0)
  rot = camera_rotation(pitch)
  reach = np.hypot(p.footprint, p.height / 2)          # bounding-sphere radius
  distance = reach / np.sin(fill * np.radians(FOV_DEG) / 2)
  origin = np.array([0.0, 0.0, p.height / 2]) - distance * rot[2]   # looking at the centre
  d = _camera_rays(int(size)) @ rot
  o = np.broadcast_to(origin, d.shape)
  idx, _, n = _hits(p, o, d)
  colour = np.broadcast_to(background, d.shape).copy()
  cos = np.maximum(n @ light, 0.0)   # a convex object: facing away is its only shadow
  colour[idx] = np.array(p.albedo) * (ambient + (1.0 - ambient) * cos)[:, None]
  rgb = _GAMMA_LUT[np.round(np.clip(colour, 0.0, 1.0) * _GAMMA_STEPS).astype(np.int32)]
  return rgb.reshape(int(size), int(size), 3)
