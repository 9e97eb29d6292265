r"""Expert pseudo-labellers: depth, surface normals and segments for plain RGB images.

Every expert is one small object chosen by a spec string (`make_depth`,
`make_normals`, `make_segmentation`; the flags of data/label_images.py):

  depth         'transformers:DIR'   a transformers depth-estimation model (Depth Anything
                                     V1/V2, DPT, ...: AutoModelForDepthEstimation) saved in DIR
                'mmgen:WEIGHTS'      RGB -> depth of an mmgen_jax model: WEIGHTS is a workdir
                                     (its latest checkpoint) or a converted .safetensors, with
                                     the model's config given separately; JAX only, no torch
                'record[:FIELD]'     the input record's own depth (default field 'depth'), for
                                     TFDS datasets that carry metric depth (mmgen_scenes, ...)
  normals       'geometric'          from the depth map and the camera (geometric_normals.py)
                'marigold:DIR'       diffusers' MarigoldNormalsPipeline saved in DIR
  segmentation  'felzenszwalb'       scikit-image's graph segmentation: no weights
                'sam:DIR'            transformers' automatic mask generation
                                     (pipeline('mask-generation')) with a SAM model in DIR

Weights are read from local directories only (`local_files_only=True`):
nothing is downloaded. torch, transformers and diffusers are imported only by
the experts that need them (`pip install -e .[labelers]`); the others run on
the core install, so 'mmgen' + 'geometric' + 'felzenszwalb' label images
without torch.

What experts return (one batch of B uint8 (B, R, R, 3) images at a time):

  depth         float32 (B, R, R) relative disparity (large = near); `affine_invariant`
                says whether it is known up to scale and shift (Depth Anything, DPT,
                mmgen) or up to scale only (1 / metric depth)
  normals       float32 (B, R, R, 3) unit normals, OpenCV camera frame (x right, y down,
                z forward), facing the camera
  segmentation  a list of B segment-id maps int32 (R, R): 0 is the background (no mask),
                masks painted largest first so smaller ones stay on top (`paint_masks`)

Each expert has a `provenance` dict (expert, weights path, SHA-256 of the
weight files, library version) written beside every record it labels.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
from typing import Any, Mapping, Sequence

import numpy as np

from mmgen_jax.data import encodings
from mmgen_jax.data import geometric_normals

MAX_SEGMENTS = encodings.MAX_SEGMENTS  # ids 0..255, background included
WEIGHT_SUFFIXES = ('.json', '.safetensors', '.bin', '.pt', '.pth', '.msgpack', '.txt', '.model')


class ExpertError(ValueError):
  """A bad expert spec, a missing weights directory or a missing library, said in one line."""


@dataclasses.dataclass
class Batch:
  """What the experts see: B images at the output resolution, and what their records carry."""
  images: np.ndarray                      # uint8 (B, R, R, 3)
  index: np.ndarray                       # int64 (B,) position of each image in the input list
  intrinsics: np.ndarray | None = None    # float32 (B, 3, 3) if every record carries them
  record_depth: np.ndarray | None = None  # float32 (B, R, R) the records' own depth, if asked


@dataclasses.dataclass
class DepthResult:
  disparity: np.ndarray   # float32 (B, R, R), large = near
  affine_invariant: bool  # True: unknown scale and shift; False: unknown scale only


# ---- provenance ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sha256_tree(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
  del stamps  # in the cache key only: a rewritten file is hashed again
  h = hashlib.sha256()
  for path, rel in paths:
    h.update(rel.encode() + b'\0')
    with open(path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 22), b''):
        h.update(block)
  return h.hexdigest()


def weights_sha256(path: str) -> str:
  """SHA-256 over a weights file, or over every weight/config file under a directory
  (relative names included, in sorted order)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    files = [(path, os.path.basename(path))]
  elif os.path.isdir(path):
    files = sorted((os.path.join(root, name), os.path.relpath(os.path.join(root, name), path))
                   for root, _, names in os.walk(path) for name in names
                   if name.endswith(WEIGHT_SUFFIXES) or root != path)
  else:
    raise ExpertError(f'weights {path!r}: no such file or directory.')
  if not files:
    raise ExpertError(f'weights directory {path!r} holds no weight or config files '
                      f'({", ".join(WEIGHT_SUFFIXES)}).')
  stamps = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p, _ in files)
  return _sha256_tree(tuple(files), stamps)


def _version(package: str) -> str:
  try:
    return f'{package} {importlib.metadata.version(package)}'
  except importlib.metadata.PackageNotFoundError:
    return f'{package} (not installed)'


def _provenance(expert: str, weights: str = '', *packages: str) -> dict[str, str]:
  return {'expert': expert, 'weights': os.path.abspath(weights) if weights else '',
          'sha256': weights_sha256(weights) if weights else '',
          'version': ', '.join(_version(p) for p in ('mmgen_jax',) + packages)}


def _import(module: str, expert: str):
  try:
    return __import__(module, fromlist=['_'])
  except ImportError as e:
    raise ExpertError(f'the {expert!r} expert needs {module.split(".")[0]} ({e}); install the '
                      "labelers extra: pip install -e '.[labelers]'.") from e


def _local_dir(path: str, expert: str) -> str:
  if not path or not os.path.isdir(path):
    raise ExpertError(f'{expert}: {path!r} is not a local directory (weights are read from a '
                      'directory written by save_pretrained; nothing is downloaded).')
  return path


def _resize_planes(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """(B, h, w) float maps -> (B, H, W), bilinear (PIL 'F' mode, antialiased when shrinking)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if x.shape[1:] == hw:
    return x.astype(np.float32)
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(p, np.float32), mode='F')
                              .resize((hw[1], hw[0]), Image.Resampling.BILINEAR), np.float32)
                   for p in x])


# ---- depth -------------------------------------------------------------------------------------


class RecordDepth:
  """The input record's own depth field (metric z-depth > 0): exact, no weights."""

  affine_invariant = False

  def __init__(self, field: str = 'depth'):
    self.field = field
    self.provenance = _provenance(f'record:{field}')

  def __call__(self, batch: Batch) -> DepthResult:
    if batch.record_depth is None:
      raise ExpertError(f'depth=record:{self.field}: the input records have no {self.field!r} '
                        'field (use a depth expert instead).')
    d = batch.record_depth.astype(np.float64)
    if not (np.isfinite(d).all() and d.min() > 0):
      raise ExpertError(f'record field {self.field!r} holds depth outside (0, inf): '
                        f'[{np.nanmin(d)}, {np.nanmax(d)}].')
    return DepthResult((1.0 / d).astype(np.float32), affine_invariant=False)


# Models whose `predicted_depth` is metric depth; every other depth-estimation model
# (Depth Anything, DPT, ...) predicts relative inverse depth.
METRIC_DEPTH_MODELS = ('zoedepth', 'glpn', 'depth_pro')


class TransformersDepth:
  """AutoModelForDepthEstimation + AutoImageProcessor from a local directory."""

  def __init__(self, path: str, device: str = 'cpu'):
    _local_dir(path, 'depth=transformers')
    transformers = _import('transformers', 'transformers depth')
    self.torch = _import('torch', 'transformers depth')
    self.processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    self.model = transformers.AutoModelForDepthEstimation.from_pretrained(
        path, local_files_only=True).to(device).eval()
    self.device = device
    self.metric = self.model.config.model_type in METRIC_DEPTH_MODELS
    self.affine_invariant = not self.metric
    self.provenance = _provenance(f'transformers:{self.model.config.model_type}', path,
                                  'transformers', 'torch')

  def __call__(self, batch: Batch) -> DepthResult:
    torch = self.torch
    inputs = self.processor(images=list(batch.images), return_tensors='pt').to(self.device)
    with torch.inference_mode():
      pred = self.model(**inputs).predicted_depth  # (B, h, w) at the processor's size
    pred = pred.float().cpu().numpy()
    if pred.ndim == 4:  # some heads keep a channel axis
      pred = pred[:, 0]
    out = _resize_planes(pred, batch.images.shape[1:3])
    if self.metric:
      out = 1.0 / np.maximum(out, 1e-6)
    return DepthResult(out.astype(np.float32), affine_invariant=self.affine_invariant)


class MmgenDepth:
  """RGB -> depth with an mmgen_jax model (inference.py's Sampler; JAX only).

  `config` is the model's ml_collections config; `weights` a workdir (its latest
  checkpoint) or a converted .safetensors. The depth modality's sample, clipped
  to [-1, 1], is read as relative depth (`inference.decode` onto depth_range,
  inverted), so the result is affine-invariant disparity. The noise of image i comes from
  (seed, i) alone: the same image gets the same labels in any batch.
  """

  affine_invariant = True

  def __init__(self, config: Any, weights: str, seed: int = 0):
    from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
    from mmgen_jax import inference  # pylint: disable=g-import-not-at-top
    from mmgen_jax import modalities  # pylint: disable=g-import-not-at-top
    if not weights or not os.path.exists(weights):
      raise ExpertError(f'depth=mmgen:{weights}: no such workdir or .safetensors file.')
    config = config.copy_and_resolve_references()
    workdir = None
    if os.path.isdir(weights):
      workdir, config.sample.checkpoint = weights, ''
    else:
      config.sample.checkpoint = weights
    self.inference = inference
    images = modalities.images(modalities.from_config(config.modalities))
    self.rgb = images[0]
    depth = [m for m in images if encodings.family(m.encoding) == 'depth']
    if encodings.family(self.rgb.encoding) != 'rgb' or not depth:
      raise ExpertError(f'depth=mmgen: the model predicts {[m.name for m in images]}; it needs an '
                        'rgb modality first and a depth modality.')
    self.depth = depth[0]
    model, _, mesh = evaluate.restore_for_inference(config, workdir)
    self.sampler = inference.Sampler(config, model, mesh, seed)
    # A workdir is named by its latest checkpoint's files (not its logs, which keep changing).
    self.provenance = _provenance(f'mmgen:{config.model.get("name", "dit")}',
                                  _latest_step_dir(weights) if workdir else weights, 'jax')
    self.provenance['config'] = (f'{config.data.name}/{config.data.builder_config} '
                                 f'res {config.data.resolution}, {config.sample.method} '
                                 f'{config.sample.num_steps} steps, seed {seed}')

  def __call__(self, batch: Batch) -> DepthResult:
    inf, s = self.inference, self.sampler
    pixels = np.stack([inf.to_model(im.astype(np.float32) / np.float32(255.0), self.rgb,
                                    s.resolution) for im in batch.images])
    n = len(pixels)
    # Rows padded to a multiple of the sampler's chunk (repeating the last image, whose
    # noise index is its own), so every call has one shape and compiles once.
    chunk = s.chunk_size(int(s.config.sample.num_images))
    take = np.concatenate([np.arange(n), np.full(-n % chunk, n - 1)])
    got = s(stage=0, index=np.asarray(batch.index)[take], member=np.zeros(len(take), np.int32),
            y=np.full(len(take), s.num_classes, np.int32), cond_name=self.rgb.name,
            cond=s.encode(self.rgb.name, pixels[take]))
    # Samples overshoot [-1, 1] a little; clipped to it, as a saved image would be, so
    # decoded depth stays within depth_range (finite, > 0) and one outlier cannot
    # squeeze the rest of the map in the per-image min-max.
    depth = np.stack([inf.decode(np.clip(x, -1.0, 1.0), self.depth, inf.DEFAULT_DEPTH_RANGE)
                      for x in got[self.depth.name][:n]])
    disparity = 1.0 / depth
    return DepthResult(_resize_planes(disparity, batch.images.shape[1:3]), affine_invariant=True)


def _latest_step_dir(workdir: str) -> str:
  root = os.path.join(workdir, 'checkpoints')
  steps = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
  if not steps:
    raise ExpertError(f'depth=mmgen:{workdir}: no checkpoint under {root}.')
  return os.path.join(root, str(max(steps)))


# ---- normals -----------------------------------------------------------------------------------


class GeometricNormals:
  """Normals of the depth expert's map (geometric_normals.py): the records' intrinsics if they
  carry them, else a pinhole of `fov_deg`; affine-invariant disparity is read with
  `far_near_ratio` (see geometric_normals' docstring)."""

  needs_depth = True

  def __init__(self, fov_deg: float = geometric_normals.DEFAULT_FOV_DEG,
               far_near_ratio: float = geometric_normals.DEFAULT_FAR_NEAR_RATIO):
    geometric_normals.intrinsics_from_fov((2, 2), fov_deg)  # checks the range
    if not far_near_ratio > 1.0:
      raise ExpertError(f'far_near_ratio={far_near_ratio} must be > 1.')
    self.fov_deg, self.far_near_ratio = float(fov_deg), float(far_near_ratio)
    self.provenance = _provenance('geometric')
    self.provenance['config'] = (f'fov {self.fov_deg} deg if no intrinsics, '
                                 f'far/near {far_near_ratio}')

  def intrinsics(self, batch: Batch) -> np.ndarray:
    if batch.intrinsics is not None:
      return batch.intrinsics.astype(np.float32)
    k = geometric_normals.intrinsics_from_fov(batch.images.shape[1:3], self.fov_deg)
    return np.repeat(k[None], len(batch.images), axis=0)

  def __call__(self, batch: Batch, depth: DepthResult) -> np.ndarray:
    ks = self.intrinsics(batch)
    return np.stack([geometric_normals.normals_from_disparity(
        d, k, affine_invariant=depth.affine_invariant, far_near_ratio=self.far_near_ratio)
                     for d, k in zip(depth.disparity, ks)])


class MarigoldNormals:
  """diffusers' MarigoldNormalsPipeline from a local directory. Its normals are in Marigold's
  frame (x right, y up, z to the viewer), turned into OpenCV's here. Image i's noise is
  seeded with its input index, so a batch does not change any image's labels."""

  needs_depth = False

  def __init__(self, path: str, num_inference_steps: int | None = None, device: str = 'cpu'):
    _local_dir(path, 'normals=marigold')
    diffusers = _import('diffusers', 'marigold normals')
    self.torch = _import('torch', 'marigold normals')
    self.pipe = diffusers.MarigoldNormalsPipeline.from_pretrained(path, local_files_only=True)
    self.pipe = self.pipe.to(device)
    self.pipe.set_progress_bar_config(disable=True)
    self.device, self.steps = device, num_inference_steps
    self.provenance = _provenance('marigold_normals', path, 'diffusers', 'torch')

  def __call__(self, batch: Batch, depth: DepthResult | None = None) -> np.ndarray:
    del depth
    torch = self.torch
    images = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255.0
    generators = [torch.Generator(device='cpu').manual_seed(int(i)) for i in batch.index]
    out = self.pipe(images, num_inference_steps=self.steps, ensemble_size=1,
                    processing_resolution=0, output_type='np', generator=generators,
                    batch_size=len(images))
    n = np.asarray(out.prediction, np.float32).reshape(batch.images.shape)
    n = encodings.stablenormal_to_opencv(n)  # Marigold's frame is StableNormal's
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    return np.where(norm > 1e-6, n / np.maximum(norm, 1e-6), [0.0, 0.0, -1.0]).astype(np.float32)


# ---- segmentation ------------------------------------------------------------------------------


@dataclasses.dataclass
class Segments:
  ids: np.ndarray      # int32 (H, W): 0 background, 1.. masks (largest first)
  dropped: int = 0     # masks (or regions) left out: more than MAX_SEGMENTS - 1
  dropped_pixels: int = 0


def paint_masks(masks: Sequence[np.ndarray], hw: tuple[int, int]) -> Segments:
  """Boolean masks -> segment ids as MMGen renders them: largest mask first, each smaller one
  painted over it, uncovered pixels the background (0). Ids are renumbered 1.. in painting
  order over the masks that stay visible; masks beyond MAX_SEGMENTS - 1 (the smallest) are
  left out and counted."""
  ids = np.zeros(hw, np.int32)
  masks = [np.asarray(m, bool) for m in masks]
  for m in masks:
    if m.shape != tuple(hw):
      raise ValueError(f'mask of shape {m.shape}; expected {tuple(hw)}.')
  order = sorted(range(len(masks)), key=lambda i: (-int(masks[i].sum()), i))
  kept, dropped = order[:MAX_SEGMENTS - 1], order[MAX_SEGMENTS - 1:]
  for k, i in enumerate(kept, start=1):
    ids[masks[i]] = k
  dropped_pixels = int(sum(masks[i].sum() for i in dropped))
  # Renumber: masks hidden under smaller ones vanish; with no uncovered pixel the largest
  # visible mask becomes id 0.
  _, ids = np.unique(ids, return_inverse=True)
  return Segments(ids.reshape(hw).astype(np.int32), len(dropped), dropped_pixels)


def regions_to_segments(labels: np.ndarray) -> Segments:
  """A partition (H, W) of integer region labels -> ids numbered by area (largest 0). Beyond
  MAX_SEGMENTS regions, each pixel of a smaller region joins the nearest kept region
  (counted in `dropped`)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top  (jax's dependency)
  labels = np.asarray(labels)
  _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  inverse = inverse.reshape(labels.shape)
  rank = np.empty(len(counts), np.int64)
  rank[np.argsort(-counts, kind='stable')] = np.arange(len(counts))
  ids = rank[inverse]
  dropped = max(0, len(counts) - MAX_SEGMENTS)
  dropped_pixels = 0
  if dropped:
    small = ids >= MAX_SEGMENTS
    dropped_pixels = int(small.sum())
    _, (ri, ci) = ndimage.distance_transform_edt(small, return_indices=True)
    ids = ids[ri, ci]
  return Segments(ids.astype(np.int32), dropped, dropped_pixels)


class FelzenszwalbSegmentation:
  """scikit-image's Felzenszwalb-Huttenlocher graph segmentation (no weights). `scale` is
  per 256 px of image side (so a 64 px and a 512 px image get comparable regions), and
  regions smaller than `min_fraction` of the image are merged into a neighbour."""

  def __init__(self, scale: float = 300.0, sigma: float = 0.8, min_fraction: float = 0.002):
    self.segmentation = _import('skimage.segmentation', 'felzenszwalb')
    self.scale, self.sigma, self.min_fraction = float(scale), float(sigma), float(min_fraction)
    self.provenance = _provenance('felzenszwalb', '', 'scikit-image')
    self.provenance['config'] = f'scale {scale}/256 px, sigma {sigma}, min {min_fraction} of area'

  def __call__(self, batch: Batch) -> list[Segments]:
    out = []
    for im in batch.images:
      h, w = im.shape[:2]
      labels = self.segmentation.felzenszwalb(
          im, scale=self.scale * max(h, w) / 256.0, sigma=self.sigma,
          min_size=max(1, int(self.min_fraction * h * w)), channel_axis=-1)
      out.append(regions_to_segments(labels))
    return out


class SamSegmentation:
  """transformers' automatic mask generation (pipeline('mask-generation')) with a SAM model
  from a local directory; masks are painted by `paint_masks`."""

  def __init__(self, path: str, points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
               device: str = 'cpu', **kwargs: Any):
    _local_dir(path, 'segmentation=sam')
    transformers = _import('transformers', 'sam segmentation')
    _import('torch', 'sam segmentation')
    self.generator = transformers.pipeline('mask-generation', model=path, device=device,
                                           local_files_only=True)
    self.kwargs = dict(points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
                       **kwargs)
    self.provenance = _provenance(f'sam:{self.generator.model.config.model_type}', path,
                                  'transformers', 'torch')

  def __call__(self, batch: Batch) -> list[Segments]:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    out = []
    for im in batch.images:
      result = self.generator(Image.fromarray(im), **self.kwargs)
      masks = [np.asarray(m, bool) for m in result['masks']]
      out.append(paint_masks(masks, im.shape[:2]))
    return out


# ---- choosing experts --------------------------------------------------------------------------


def _split(spec: str, what: str, kinds: Sequence[str]) -> tuple[str, str]:
  kind, _, arg = (spec or '').partition(':')
  if kind not in kinds:
    shown = [k if k in ('geometric', 'felzenszwalb') else f'{k}:...' for k in kinds]
    raise ExpertError(f'--{what}={spec!r}: unknown expert {kind!r}; choose one of {shown}.')
  return kind, arg


DEPTH_KINDS = ('transformers', 'mmgen', 'record')
NORMAL_KINDS = ('geometric', 'marigold')
SEGMENTATION_KINDS = ('felzenszwalb', 'sam')


def make_depth(spec: str, *, mmgen_config: Any = None, seed: int = 0, device: str = 'cpu'):
  kind, arg = _split(spec, 'depth', DEPTH_KINDS)
  if kind == 'transformers':
    return TransformersDepth(arg, device=device)
  if kind == 'record':
    return RecordDepth(arg or 'depth')
  if mmgen_config is None:
    raise ExpertError('--depth=mmgen:... needs the model\'s config: --mmgen_config=CONFIG.py '
                      '(with the overrides the model was trained with).')
  return MmgenDepth(mmgen_config, arg, seed=seed)


def make_normals(spec: str, *, fov_deg: float = geometric_normals.DEFAULT_FOV_DEG,
                 far_near_ratio: float = geometric_normals.DEFAULT_FAR_NEAR_RATIO,
                 num_inference_steps: int | None = None, device: str = 'cpu'):
  kind, arg = _split(spec, 'normals', NORMAL_KINDS)
  if kind == 'geometric':
    if arg:
      raise ExpertError(f'--normals={spec!r}: geometric normals take no argument.')
    return GeometricNormals(fov_deg, far_near_ratio)
  return MarigoldNormals(arg, num_inference_steps, device=device)


def make_segmentation(spec: str, *, device: str = 'cpu', **kwargs: Any):
  kind, arg = _split(spec, 'segmentation', SEGMENTATION_KINDS)
  if kind == 'felzenszwalb':
    if arg:
      raise ExpertError(f'--segmentation={spec!r}: felzenszwalb takes no argument.')
    return FelzenszwalbSegmentation(**kwargs)
  return SamSegmentation(arg, device=device)


def provenance_of(experts: Mapping[str, Any]) -> dict[str, dict[str, str]]:
  return {name: dict(e.provenance) for name, e in experts.items()}

