r"""Every task of the model on a user's own files: `--mode=sample --task=...`.

  python -m mmgen_jax.main --mode=sample --config=CONFIG --workdir=WORKDIR \
      --task=rgb_to_x --input='photos/*.png' --out=OUT [--ensemble=8] [--seed=0]
  python -m mmgen_jax.main --mode=sample --config=configs/imagenet256_xl2.py \
      --config.sample.checkpoint=xl2.safetensors --config.codec.weights=sd-vae-ft-mse/ \
      --task=rgb_to_x --input='photos/*.jpg' --out=OUT

Tasks (MMGen's decoupled timesteps: a slot held at t_cond is the condition):

  joint              class -> every image modality (--class_id, --num_samples)
  rgb_to_x           understanding: the RGB input held, the other modalities sampled
  <modality>_to_x    conditional generation: that input held (depth, normal, ...)
  rgb_to_rgb         RGB -> predicted <via> (default depth) -> a new RGB sampled from it

Inputs (PNG, JPEG or .npy, any size): rgb H×W×3 (uint8, or float in [0, 1]);
depth H×W (a .npy float map or a one-channel PNG; non-finite or <= 0 is
invalid); normal H×W×3 unit camera-frame vectors (.npy, or a PNG holding
(n + 1) / 2); segmentation H×W integer ids (.npy) or a PNG in the palette's
colours. Aspect: the whole image is resized to the model's square (a 4:3
photo is squeezed horizontally) and every output is resized back to the
input's H×W, so every pixel gets a prediction.

Outputs in OUT/<input stem>/ (joint: OUT/sample_XXX/): <modality>.png and
<modality>.npy per image modality, grid.png, scene.ply, and with --ensemble
<modality>_spread.{png,npy}. A given modality is written as read (the file's
own values at its own size). Predicted depth is relative (affine-invariant,
as the model is trained): its [-1, 1] (near to far) is mapped onto
`depth_range` (default 1..10) in depth.npy and scene.ply.

Weights: the workdir's latest checkpoint, or converted weights
(`--config.sample.checkpoint=xl2.safetensors`, written by
`python -m mmgen_jax.models.convert`; no --workdir needed then).

Latent models (config.codec.name='sd_vae', e.g. the released MMGen XL/2 with
`--config.codec.weights=sd-vae-ft-mse/`): the condition is encoded by the VAE
as its posterior mean × scale (deterministic; MMGen's exp_sample.py draws from
the posterior), the sampled latents are decoded, then read as below at the
model's resolution and resized to the input's H×W.

MMGen's 8-bit encodings (data/encodings.py) are converted at the boundary, so
the files are the same as above: disparity_minmax predictions are relative
disparity (1 near, 0 far) and depth.npy holds its inverse mapped onto
`depth_range` (disparity 1 -> near, 0 -> far; 1/depth affine in disparity);
an 8-bit grey PNG input is MMGen's stored disparity (near bright), any other
depth input is depth. stablenormal_rgb is StableNormal's frame (y up, z to
the viewer) inside the model; normal files are in OpenCV's frame either way.
random_colors: colours are clustered into segment ids (numbered largest
first) and segmentation.png paints each id a random colour; an input is .npy
ids or a PNG with one colour per segment; --ensemble writes the first draw
(segments of different draws do not correspond).

Sampling is sharded over the batch axes of the config's mesh; on several
processes every process reads the inputs and process 0 writes the outputs. Every row's
noise comes from (seed, stage, input index, ensemble member) alone, so a seed
gives the same result on any device count and batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np
from PIL import Image

from mmgen_jax import codec as codec_lib
from mmgen_jax import metrics as metrics_lib
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax import visualize
from mmgen_jax.data import encodings
from mmgen_jax.data import palettes

Modality = modalities_lib.Modality
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
INPUT_SUFFIXES = IMAGE_SUFFIXES + ('.npy',)
DEFAULT_FOV_DEG = 60.0         # horizontal field of view when neither --fov nor the dataset says
DEFAULT_DEPTH_RANGE = (1.0, 10.0)
SUPPORTED_ENCODINGS = ('rgb', 'depth', 'normal', 'segmentation',
                       # MMGen's 8-bit encodings (data/encodings.py), converted in and out:
                       'disparity_minmax', 'stablenormal_rgb', 'random_colors')


class InferenceError(ValueError):
  """A problem with the user's request or files, stated in one line."""


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  condition: str | None        # the held modality (None: joint generation)
  via: str | None = None       # rgb_to_rgb's intermediate modality
  understanding: bool = False  # the first (RGB) modality given, the others predicted


@dataclasses.dataclass(frozen=True)
class Options:
  """What the command line asks for (see mmgen_jax/main.py for the flags)."""
  task: str
  inputs: str = ''             # a glob of input files ('' for joint)
  out: str = ''
  ensemble: int = 1
  class_id: int | None = None
  num_samples: int | None = None
  seed: int | None = None      # None: config.seed
  fov: float | None = None     # horizontal, degrees; None: the dataset's camera or 60
  via: str = 'depth'
  depth_range: tuple[float, float] = DEFAULT_DEPTH_RANGE


@dataclasses.dataclass
class Result:
  """One input (or joint sample): model-space arrays and what is written."""
  stem: str
  model: dict[str, np.ndarray]       # modality -> (res, res, C) in model space
  outputs: dict[str, np.ndarray]     # name -> raw array at the input's H×W (see write_result)
  spread: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # at H×W
  members: dict[str, np.ndarray] | None = None  # ensemble members, model space (K, res, res, C)


# ---- tasks ------------------------------------------------------------------------------


def _images(config) -> tuple[Modality, ...]:
  return modalities_lib.images(modalities_lib.from_config(config.modalities))


def task_names(config) -> list[str]:
  images = _images(config)
  names = ['joint'] + [f'{m.name}_to_x' for m in images]
  if images[0].encoding == 'rgb' and len(images) > 1:
    names.append(f'{images[0].name}_to_{images[0].name}')
  return names


def parse_task(config, name: str, via: str = 'depth') -> Task:
  """The task called `name` on this config's modalities, or InferenceError."""
  images = _images(config)
  first = images[0]
  known = task_names(config)
  if name == 'joint':
    return Task('joint', None)
  if name.endswith('_to_x'):
    cond = name[:-len('_to_x')]
    if cond not in [m.name for m in images]:
      raise InferenceError(f'--task={name}: the model has no image modality {cond!r} '
                           f'(it has {[m.name for m in images]}); tasks: {", ".join(known)}.')
    if len(images) < 2:
      raise InferenceError(f'--task={name}: the model has only {cond!r}; nothing to predict.')
    return Task(name, cond, understanding=(cond == first.name and first.encoding == 'rgb'))
  if name == f'{first.name}_to_{first.name}' and name in known:
    others = [m.name for m in images[1:]]
    if via not in others:
      raise InferenceError(f'--via={via}: the model has no image modality {via!r} to go through; '
                           f'choose from {others}.')
    return Task(name, first.name, via=via)
  raise InferenceError(f'--task={name} is not a task of this model; tasks: {", ".join(known)}.')


# ---- reading inputs ---------------------------------------------------------------------


def _load(path: str) -> np.ndarray:
  """The file as an array: .npy as stored, images as decoded (uint8 or 16/32-bit)."""
  try:
    if path.lower().endswith('.npy'):
      return np.load(path, allow_pickle=False)
    with Image.open(path) as im:
      im.load()
      if im.mode == 'P':
        im = im.convert('RGBA' if 'transparency' in im.info else 'RGB')
      return np.asarray(im)
  except Exception as e:  # PIL and numpy raise many kinds; the message names the file
    what = 'a .npy array' if path.lower().endswith('.npy') else 'an image'
    raise InferenceError(f'{path}: cannot read it as {what} ({type(e).__name__}: {e}).') from e


def _channels(x: np.ndarray) -> int:
  return 1 if x.ndim == 2 else x.shape[-1]


def family(m: Modality) -> str:
  """'rgb' | 'depth' | 'normal' | 'segmentation': what the files of `m` hold."""
  return encodings.family(m.encoding)


def disparity_to_depth(disparity: np.ndarray, depth_range: tuple[float, float]) -> np.ndarray:
  """Relative disparity (1 near, 0 far) -> depth on depth_range, 1/depth affine in it.

  1 -> near, 0 -> far; below 0 lies beyond far, and at or below
  -(1/far) / (1/near - 1/far) (far beyond the decoded range) the depth is +inf (invalid).
  """
  near, far = depth_range
  inv = 1.0 / far + np.asarray(disparity, np.float64) * (1.0 / near - 1.0 / far)
  return np.where(inv > 0, 1.0 / np.where(inv > 0, inv, 1.0), np.inf).astype(np.float32)


def read_input(path: str, m: Modality,
               depth_range: tuple[float, float] = DEFAULT_DEPTH_RANGE) -> np.ndarray:
  """The file at `path` as modality `m`'s raw array (see module docstring), or InferenceError.

  rgb float32 (H, W, 3) in [0, 1]; depth float32 (H, W) (invalid pixels kept as
  given); normal float32 (H, W, 3) unit, OpenCV frame; segmentation int32 (H, W).
  MMGen's encodings read the same files, except: a disparity_minmax model takes
  an 8-bit grey PNG as MMGen's stored disparity (near bright), read as depth on
  `depth_range`; a random_colors model takes a colour PNG as one segment per
  exact colour (ids 0..255), and .npy ids in [0, 256).
  """
  x = _load(path)
  npy = path.lower().endswith('.npy')
  fam = family(m)
  if m.encoding == 'disparity_minmax' and not npy and x.dtype == np.uint8:
    if x.ndim == 3 and x.shape[-1] == 3 and np.array_equal(x[..., :1], x[..., 1:2]) and \
        np.array_equal(x[..., :1], x[..., 2:]):
      x = x[..., 0]  # MMGen's convert('RGB') copy of the grey map
    if x.ndim == 3 and x.shape[-1] == 1:
      x = x[..., 0]
    if x.ndim != 2:
      raise InferenceError(f'{path}: shape {x.shape}; an 8-bit disparity image must be grey '
                           '(H×W).')
    return disparity_to_depth(x.astype(np.float64) / 255.0, depth_range)
  want = {'rgb': 3, 'depth': 1, 'normal': 3, 'segmentation': 1 if npy else 3}[fam]
  if x.ndim == 3 and x.shape[-1] == 1 and want == 1:
    x = x[..., 0]
  if x.ndim not in (2, 3) or _channels(x) != want or min(x.shape[:2]) < 1:
    what = {'rgb': 'an RGB image (H×W×3)', 'depth': 'a depth map (H×W, one channel)',
            'normal': 'normals (H×W×3)',
            'segmentation': 'ids (H×W integers)' if npy else 'a palette colour image (H×W×3)'}
    raise InferenceError(f'{path}: shape {x.shape} ({_channels(x) if x.ndim in (2, 3) else "?"} '
                         f'channel(s)); the {m.name!r} input must be {what[fam]}.')
  if fam == 'rgb':
    if x.dtype == np.uint8:
      return x.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
      raise InferenceError(f'{path}: rgb of dtype {x.dtype}; expected uint8 or float in [0, 1].')
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
      raise InferenceError(f'{path}: float rgb must lie in [0, 1]; got [{np.nanmin(x):.4g}, '
                           f'{np.nanmax(x):.4g}] (non-finite: {int((~np.isfinite(x)).sum())}).')
    return x
  if fam == 'depth':
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
      raise InferenceError(f'{path}: depth of dtype {x.dtype}; expected numbers.')
    x = x.astype(np.float32)
    if not valid_depth(x).any():
      raise InferenceError(f'{path}: no valid depth pixel (finite and > 0).')
    return x
  if fam == 'normal':
    if not npy:  # (n + 1) / 2 stored at the image's bit depth
      if not np.issubdtype(x.dtype, np.integer):
        raise InferenceError(f'{path}: a normal image of dtype {x.dtype}; expected 8 or 16 bits.')
      x = x.astype(np.float32) / np.float32(np.iinfo(x.dtype).max / 2.0) - 1.0
    try:
      return encodings.unit_normals(x)
    except ValueError as e:
      raise InferenceError(f'{path}: {e}.') from None
  # segmentation
  if m.encoding == 'random_colors':
    num_ids = encodings.MAX_SEGMENTS
    if not npy:
      if x.dtype != np.uint8:
        raise InferenceError(f'{path}: a segment colour image of dtype {x.dtype}; expected 8 bits.')
      x = encodings.ids_from_exact_colors(x)
      if x.max() >= num_ids:
        raise InferenceError(f'{path}: {x.max() + 1} distinct colours; random colours hold at '
                             f'most {num_ids} segments.')
      return x
  else:
    num_ids = len(palettes.get(m.palette))
  if not npy:
    return palettes.ids_from_colors(x.astype(np.uint8) if x.dtype == np.uint8 else x, m.palette)
  if not np.issubdtype(x.dtype, np.integer):
    raise InferenceError(f'{path}: segmentation of dtype {x.dtype}; expected integer ids.')
  if x.min() < 0 or x.max() >= num_ids:
    raise InferenceError(f'{path}: segmentation ids span [{x.min()}, {x.max()}]; '
                         + (f'random colours take ids 0..{num_ids - 1}.'
                            if m.encoding == 'random_colors' else
                            f'palette {m.palette!r} has ids 0..{num_ids - 1}.'))
  return x.astype(np.int32)


def valid_depth(depth: np.ndarray) -> np.ndarray:
  return np.isfinite(depth) & (depth > 0)


def _valid_at_model_resolution(depth: np.ndarray, m) -> np.ndarray:
  """The valid pixels of a resized depth map; none left is the user's error, said so."""
  valid = valid_depth(depth)
  if not valid.any():
    raise InferenceError(f'the {m.name!r} map has no valid pixel (finite and > 0) at the '
                         'model resolution.')
  return valid


# ---- resizing and model space -----------------------------------------------------------


def _resize_plane(x: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
  """One float32 (H, W) plane to hw; PIL's bilinear filter widens when shrinking (antialiased)."""
  if x.shape == hw:
    return x.astype(np.float32, copy=True)
  mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
  img = Image.fromarray(np.ascontiguousarray(x, np.float32), mode='F')
  return np.asarray(img.resize((hw[1], hw[0]), resample=mode), np.float32)


def resize(raw: np.ndarray, hw: tuple[int, int], encoding: str, *, smooth_depth: bool = False
           ) -> np.ndarray:
  """A raw map to (H, W) = hw, the filter chosen per encoding family (`family`).

  rgb and normals bilinear (normals renormalised, nearest where neighbours
  cancel), segmentation nearest (ids never blend), depth nearest on the way in
  (a blend of foreground and background is a surface that does not exist) or
  bilinear for predictions on the way out (`smooth_depth`).
  """
  hw = tuple(int(v) for v in hw)
  if raw.shape[:2] == hw:
    return raw.copy()  # the identity, bit for bit (no renormalisation either)
  if encoding == 'segmentation':
    return _resize_plane(raw.astype(np.float32), hw, True).astype(np.int32)
  if encoding == 'depth':
    return _resize_plane(raw, hw, not smooth_depth)
  planes = [_resize_plane(raw[..., c], hw, False) for c in range(raw.shape[-1])]
  out = np.stack(planes, -1)
  if encoding == 'normal':
    norm = np.linalg.norm(out, axis=-1, keepdims=True)
    near = np.stack([_resize_plane(raw[..., c], hw, True) for c in range(3)], -1)
    out = np.where(norm > 1e-3, out / np.maximum(norm, 1e-3), near)
  return out.astype(np.float32)


def encode(raw: np.ndarray, m: Modality) -> np.ndarray:
  """A raw map at model resolution -> model space (H, W, C), as the data pipeline encodes it.

  Depth is affine-normalised per image over its valid pixels (min -> -1, max ->
  +1, a constant map -> 0); invalid pixels are shown as the farthest (+1,
  where the scenes put the sky).
  """
  if m.encoding == 'rgb':
    return (raw.astype(np.float32) * np.float32(2.0) - np.float32(1.0))
  if m.encoding == 'depth':
    d = raw.astype(np.float32)
    valid = _valid_at_model_resolution(d, m)
    lo, hi = float(d[valid].min()), float(d[valid].max())
    x = 2.0 * (d - lo) / (hi - lo) - 1.0 if hi > lo else np.zeros_like(d)
    return np.where(valid, x, np.float32(1.0)).astype(np.float32)[..., None]
  if m.encoding == 'normal':
    return raw.astype(np.float32)
  if m.encoding == 'segmentation':
    return palettes.colorize(raw, m.palette).astype(np.float32) / np.float32(127.5) - 1.0
  # MMGen's 8-bit encodings, quantised as its preprocessing stores them (data/encodings.py).
  if m.encoding == 'disparity_minmax':
    d = raw.astype(np.float64)
    valid = _valid_at_model_resolution(d, m)
    disparity = np.where(valid, 1.0 / np.where(valid, d, 1.0), 0.0)
    # Invalid pixels are shown as the farthest, as for 'depth'.
    disparity = np.where(valid, disparity, disparity[valid].min())
    u8 = encodings.disparity_minmax_u8(disparity)
    return np.repeat(encodings.to_model_space(u8)[..., None], m.channels, axis=-1)
  if m.encoding == 'stablenormal_rgb':
    return encodings.encode_stablenormal_rgb(raw)
  if m.encoding == 'random_colors':
    # Record index 0: a file's colours do not depend on the other inputs.
    return encodings.to_model_space(encodings.random_colors(raw, m.color_seed, 0))
  raise InferenceError(f'modality {m.name!r} has encoding {m.encoding!r}, which has no image form.')


def decode(x: np.ndarray, m: Modality, depth_range: tuple[float, float]) -> np.ndarray:
  """Model space (H, W, C) -> a raw map at the same size (the inverse of `encode`).

  rgb is saturated to [0, 1] (samples overshoot a little); depth, known only up
  to scale and shift, maps -1..1 onto depth_range (values beyond stay beyond:
  nothing is clipped); normals are made unit length; colours become the
  nearest palette ids. MMGen's encodings: disparity_minmax is relative
  disparity (1 near, 0 far) whose inverse is mapped onto depth_range
  (`disparity_to_depth`); stablenormal_rgb is turned from StableNormal's frame
  into OpenCV's; random_colors are clustered into segment ids
  (encodings.ids_from_colors, numbered largest first).
  """
  x = np.asarray(x, np.float32)
  if m.encoding == 'rgb':
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)
  if m.encoding == 'depth':
    near, far = depth_range
    return (near + (x[..., 0] + 1.0) / 2.0 * (far - near)).astype(np.float32)
  if m.encoding == 'normal':
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)
  if m.encoding == 'segmentation':
    return palettes.ids_from_colors(x, m.palette)
  if m.encoding == 'disparity_minmax':  # relative disparity, near = 1, inverted onto depth_range
    return disparity_to_depth(encodings.decode_disparity(x), depth_range)
  if m.encoding == 'stablenormal_rgb':  # StableNormal's frame back to OpenCV's
    return encodings.decode_stablenormal_rgb(x)
  if m.encoding == 'random_colors':     # colours clustered into segments
    return encodings.ids_from_colors(x)
  raise InferenceError(f'modality {m.name!r} has encoding {m.encoding!r}, which has no image form.')


def to_model(raw: np.ndarray, m: Modality, resolution: int) -> np.ndarray:
  return encode(resize(raw, (resolution, resolution), family(m)), m)


def to_output(x: np.ndarray, m: Modality, hw: tuple[int, int],
              depth_range: tuple[float, float]) -> np.ndarray:
  return resize(decode(x, m, depth_range), hw, family(m), smooth_depth=True)


# ---- ensembles --------------------------------------------------------------------------


def aggregate(members: Mapping[str, np.ndarray], images: Sequence[Modality]
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """K samples per modality (K, H, W, C) in model space -> (aggregate, spread) per modality.

  depth: each member after the first aligned to the first by least-squares
  scale and shift, then the per-pixel median; spread = their standard
  deviation (model units). normal: the normalised mean of the unit members;
  spread = mean angle (degrees) between the members and it. segmentation: the
  per-pixel majority id (ties to the lower id); spread = 1 - the majority's
  share. Other modalities (the held condition) pass as member 0. One member is
  returned as it is (spread 0), so an ensemble of one is the single sample.
  MMGen's encodings: disparity_minmax as depth (disparity is also known up to
  scale and shift), stablenormal_rgb as normals (its frame differs by a
  rotation, which commutes with the mean); random_colors has no vote (the
  colours of different draws do not correspond): member 0, no spread.
  """
  agg, spread = {}, {}
  for m in images:
    x = np.asarray(members[m.name], np.float32)
    k = x.shape[0]
    voted = family(m) in ('depth', 'normal', 'segmentation') and m.encoding != 'random_colors'
    if k == 1 or not voted:
      agg[m.name] = x[0]
      if voted:
        spread[m.name] = np.zeros(x.shape[1:3], np.float32)
      continue
    if family(m) == 'depth':
      d = x.mean(axis=-1, dtype=np.float64)  # one channel, or a grey map replicated
      reference = np.broadcast_to(d[:1], d[1:].shape)
      aligned = np.concatenate([d[:1], metrics_lib.align_depth_least_squares(d[1:], reference)])
      agg[m.name] = np.repeat(np.median(aligned, axis=0).astype(np.float32)[..., None],
                              x.shape[-1], axis=-1)
      spread[m.name] = aligned.std(axis=0).astype(np.float32)
    elif family(m) == 'normal':
      unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
      mean = unit.mean(axis=0)
      mean = mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
      agg[m.name] = mean.astype(np.float32)
      angles = metrics_lib.normal_angles_deg(unit, np.broadcast_to(mean, unit.shape))
      spread[m.name] = angles.mean(axis=0).astype(np.float32)
    elif m.encoding == 'segmentation':
      ids = palettes.ids_from_colors(x, m.palette)                       # (K, H, W)
      num = len(palettes.get(m.palette))
      counts = (ids[..., None] == np.arange(num)).sum(axis=0)             # (H, W, num)
      majority = counts.argmax(-1)
      agg[m.name] = palettes.colorize(majority, m.palette).astype(np.float32) / 127.5 - 1.0
      spread[m.name] = (1.0 - counts.max(-1) / k).astype(np.float32)
    else:
      agg[m.name] = x[0]
  return agg, spread


# ---- sampling on the mesh -----------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(3, 4))
def _draw_noise(stage_key, index, member, shape, num_step_draws):
  """Per row, the start noise and the SDE's step noise from (stage key, index, member) alone.

  lax.map runs the same per-row program whatever the batch, so a row's noise
  does not depend on the batch it is drawn in.
  """
  from mmgen_jax.diffusion import paths  # pylint: disable=g-import-not-at-top

  def one(im):
    key = jax.random.fold_in(jax.random.fold_in(stage_key, im[0]), im[1])
    initial = paths.normal(jax.random.fold_in(key, 0), shape)
    if not num_step_draws:
      return initial, None
    steps = jax.lax.map(lambda s: paths.normal(jax.random.fold_in(key, s + 1), shape),
                        jax.numpy.arange(num_step_draws))
    return initial, steps

  initial, steps = jax.lax.map(one, jax.numpy.stack([index, member], -1))
  return initial, (None if steps is None else jax.numpy.swapaxes(steps, 0, 1))


@functools.lru_cache(maxsize=32)
def _sample_fn(mods: tuple[Modality, ...], num_classes: int, cond_name: str | None,
               settings: tuple[tuple[str, Any], ...], channels: tuple[int, ...]):
  """The jitted sampler of one task and setting (cached: a jit per call would recompile)."""
  from mmgen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top

  def run(model, y, cond, initial, steps):
    condition = None if cond_name is None else {cond_name: cond}
    return samplers.sample(model, None, mods=mods, shape=initial.shape[:3], y=y,
                           num_classes=num_classes, condition=condition, channels=channels,
                           noise=samplers.Noise(initial, steps), **dict(settings))
  return jax.jit(run)


class Sampler:
  """Samples rows (condition, class, noise id) in fixed-size chunks on the config's mesh.

  With a latent codec (config.codec.name='sd_vae') the model samples latents:
  `encode` turns pixel conditions into latents (the posterior mean × scale,
  deterministic: MMGen's exp_sample.py draws from the posterior instead) and
  `__call__` decodes its samples back to pixels. The VAE runs on one device,
  one image at a time, so a row's pixels do not depend on the device count or
  on the other rows.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh,
               seed: int):
    from mmgen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
    self.config, self.model, self.mesh = config, model, mesh
    self.mods = modalities_lib.from_config(config.modalities)
    self.images = modalities_lib.images(self.mods)
    self.codec = codec_lib.from_config(config)  # unplaced: the default device
    self.channels = tuple(int(c) for c in self.codec.model_channels())
    self.side = int(config.data.resolution) // self.codec.downsample
    self.resolution = int(config.data.resolution)
    self.num_classes = int(config.data.num_classes)
    self.settings = samplers.settings_from_config(config)
    self.key = jax.random.key(int(seed), impl=config.train.rng_impl)
    self.sharding = parallel.batch_sharding(mesh, config.sharding_rules)
    self.ways = int(np.prod([mesh.shape[a] for a in _axes(self.sharding.spec)]))

  def _fn(self, cond_name: str | None, guided: bool):
    settings = dict(self.settings, cfg_scale=self.settings['cfg_scale'] if guided else 1.0)
    return _sample_fn(self.mods, self.num_classes, cond_name, tuple(sorted(settings.items())),
                      self.channels)

  def encode(self, name: str, pixels: np.ndarray) -> np.ndarray:
    """(rows, res, res, C) pixel-space conditions -> model space (latents: one row at a time)."""
    if self.codec.is_identity:
      return pixels
    return np.concatenate([np.asarray(self.codec.encode_mean({name: pixels[i:i + 1]})[name])
                           for i in range(len(pixels))])

  def decode(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{modality: (rows, ...)} model space -> pixel space (latents: one row at a time)."""
    if self.codec.is_identity:
      return dict(arrays)
    rows = len(next(iter(arrays.values())))
    out = [self.codec.decode({k: v[i:i + 1] for k, v in arrays.items()}) for i in range(rows)]
    return {k: np.concatenate([np.asarray(o[k]) for o in out]) for k in arrays}

  def chunk_size(self, rows: int) -> int:
    """config.sample.num_images rows per call (fewer if fewer rows), rounded up to a multiple
    of the ways the batch is split."""
    want = max(1, min(int(self.config.sample.num_images), rows))
    return -(-want // self.ways) * self.ways

  def __call__(self, *, stage: int, index: np.ndarray, member: np.ndarray, y: np.ndarray,
               cond_name: str | None = None, cond: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
    """{modality: (rows, res, res, C)} pixel space for the given rows; `cond` in model space
    (`encode`); padding is added and dropped here."""
    rows = len(index)
    b = self.chunk_size(rows)
    null = y == self.num_classes
    if null.any() and not null.all():
      raise ValueError('a call samples either every row with a class or none.')
    fn = self._fn(cond_name, guided=not null.all())
    shape = (self.side, self.side, sum(self.channels))
    s = self.settings
    step_draws = s['num_steps'] - 1 if s['method'] == 'euler_maruyama' else 0
    stage_key = jax.random.fold_in(self.key, stage)
    steps_sharding = NamedSharding(self.mesh, PartitionSpec(None, *self.sharding.spec))
    out: dict[str, list[np.ndarray]] = {m.name: [] for m in self.images}
    for start in range(0, rows, b):
      take = np.arange(start, min(start + b, rows))
      pad = b - len(take)
      rows_idx = np.concatenate([take, np.full(pad, take[-1])])     # padding repeats a row
      idx = np.concatenate([index[take], rows + 1 + np.arange(pad)]).astype(np.int32)
      mem = np.concatenate([member[take], np.zeros(pad, member.dtype)]).astype(np.int32)
      initial, steps = _draw_noise(stage_key, idx, mem, shape, step_draws)
      initial = np.asarray(initial)
      args = [self._put(y[rows_idx].astype(np.int32), self.sharding),
              None if cond is None else self._put(cond[rows_idx].astype(np.float32), self.sharding),
              self._put(initial, self.sharding),
              None if steps is None else self._put(np.asarray(steps), steps_sharding)]
      with jax.set_mesh(self.mesh):
        result = fn(self.model, *args)
      for m in self.images:
        out[m.name].append(parallel.to_host(result[m.name])[:len(take)])
    return self.decode({k: np.concatenate(v) for k, v in out.items()})

  @staticmethod
  def _put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The same full array on every process -> one global array with `sharding`."""
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def _axes(spec: PartitionSpec) -> tuple[str, ...]:
  first = spec[0] if len(spec) else None
  return (first,) if isinstance(first, str) else tuple(first or ())


# ---- checking a request ------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
  if config.objective.name != 'decoupled':
    raise InferenceError(f'--task needs a model trained with the decoupled objective; '
                         f'config.objective.name={config.objective.name!r}.')
  for m in _images(config):
    if m.encoding not in SUPPORTED_ENCODINGS:
      raise InferenceError(f'--task reads and writes the encodings {list(SUPPORTED_ENCODINGS)}; '
                           f'modality {m.name!r} has {m.encoding!r}.')
  if config.codec.name == 'sd_vae' and not config.codec.weights:
    raise InferenceError('a latent model (config.codec.name=\'sd_vae\') needs its VAE: '
                         '--config.codec.weights=<the sd-vae-ft-mse directory or .safetensors>.')


def input_files(pattern: str) -> list[str]:
  """The sorted files `pattern` matches (a glob, or one path), or InferenceError."""
  if not pattern:
    raise InferenceError('--input is needed for this task (a file or a glob such as '
                         '\'photos/*.png\').')
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise InferenceError(f'--input={pattern!r} matches no file.')
  bad = [p for p in paths if not p.lower().endswith(INPUT_SUFFIXES)]
  if bad:
    raise InferenceError(f'--input: {bad[0]} is not a {"/".join(INPUT_SUFFIXES)} file.')
  stems: dict[str, str] = {}
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    if stem in stems:
      raise InferenceError(f'--input: {stems[stem]} and {p} would both write to OUT/{stem}/.')
    stems[stem] = p
  return paths


def check(config: ml_collections.ConfigDict, opts: Options) -> tuple[Task, list[str]]:
  """(task, input files) for a valid request; InferenceError naming the first problem.

  Everything is checked before a checkpoint is read.
  """
  check_config(config)
  task = parse_task(config, opts.task, opts.via)
  num_classes = int(config.data.num_classes)
  s = config.sample
  if int(s.num_steps) < 1:
    raise InferenceError(f'--config.sample.num_steps={s.num_steps} must be >= 1.')
  if float(s.cfg_scale) < 1.0:
    raise InferenceError(f'--config.sample.cfg_scale={s.cfg_scale} must be >= 1 (1 = no guidance).')
  for k in ('guidance_low', 'guidance_high', 't_cond'):
    if not 0.0 <= float(s[k]) <= 1.0:
      raise InferenceError(f'--config.sample.{k}={s[k]} must be in [0, 1].')
  if float(s.guidance_low) > float(s.guidance_high):
    raise InferenceError(f'--config.sample.guidance_low={s.guidance_low} exceeds '
                         f'guidance_high={s.guidance_high}.')
  if opts.class_id is not None and not 0 <= opts.class_id < num_classes:
    raise InferenceError(f'--class_id={opts.class_id} is outside [0, {num_classes - 1}] '
                         f'(config.data.num_classes={num_classes}).')
  if opts.ensemble < 1:
    raise InferenceError(f'--ensemble={opts.ensemble} must be >= 1.')
  if opts.ensemble > 1 and not task.understanding:
    first = _images(config)[0].name
    raise InferenceError(f'--ensemble={opts.ensemble} applies to understanding '
                         f'(--task={first}_to_x), not --task={task.name}.')
  if opts.fov is not None and not 0.0 < opts.fov < 180.0:
    raise InferenceError(f'--fov={opts.fov} must be in (0, 180) degrees.')
  near, far = opts.depth_range
  if not 0.0 < near < far:
    raise InferenceError(f'--depth_range={near},{far} must satisfy 0 < near < far.')
  if not opts.out:
    raise InferenceError('--out is needed: the directory the results are written to.')
  if task.condition is None:
    if opts.inputs:
      raise InferenceError('--task=joint generates from a class; it reads no --input.')
    if opts.num_samples is not None and opts.num_samples < 1:
      raise InferenceError(f'--num_samples={opts.num_samples} must be >= 1.')
    return task, []
  if opts.num_samples is not None:
    raise InferenceError(f'--num_samples applies to --task=joint; --task={task.name} writes one '
                         'result per input (use another --seed for another draw).')
  return task, input_files(opts.inputs)


def camera_fov(config: ml_collections.ConfigDict, fov: float | None) -> float:
  """--fov, else the procedural scenes' camera, else DEFAULT_FOV_DEG."""
  if fov is not None:
    return float(fov)
  if config.data.name == 'mmgen_scenes':
    from mmgen_jax.data import scenes  # pylint: disable=g-import-not-at-top
    return float(scenes.FOV_DEG)
  return DEFAULT_FOV_DEG


# ---- running a task ------------------------------------------------------------------------


def run_task(config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh,
             opts: Options) -> list[Result]:
  """Runs the request on a restored model; returns one Result per input or sample."""
  task, files = check(config, opts)
  seed = int(config.seed if opts.seed is None else opts.seed)
  sampler = Sampler(config, model, mesh, seed)
  images, res = sampler.images, sampler.resolution
  by_name = {m.name: m for m in images}
  num_classes = sampler.num_classes
  depth_range = tuple(float(v) for v in opts.depth_range)

  def outputs(model_arrays, hw, given=None):
    given = given or {}
    return {m.name: given[m.name] if m.name in given else
            to_output(model_arrays[m.name], m, hw, depth_range) for m in images}

  if task.condition is None:
    n = int(opts.num_samples or config.sample.num_images)
    y = (np.full(n, opts.class_id) if opts.class_id is not None
         else np.arange(n) % num_classes).astype(np.int32)
    got = sampler(stage=0, index=np.arange(n), member=np.zeros(n, np.int32), y=y)
    return [Result(f'sample_{i:03d}', {k: v[i] for k, v in got.items()},
                   outputs({k: v[i] for k, v in got.items()}, (res, res)))
            for i in range(n)]

  cond_m = by_name[task.condition]
  raws = [read_input(p, cond_m, depth_range) for p in files]
  conds = sampler.encode(cond_m.name, np.stack([to_model(r, cond_m, res) for r in raws]))
  n, k = len(files), int(opts.ensemble)
  cls = num_classes if opts.class_id is None else int(opts.class_id)
  index, member = np.repeat(np.arange(n), k), np.tile(np.arange(k), n)
  got = sampler(stage=0, index=index, member=member, y=np.full(n * k, cls, np.int32),
                cond_name=cond_m.name, cond=np.repeat(conds, k, axis=0))
  stems = [os.path.splitext(os.path.basename(p))[0] for p in files]
  results = []
  if task.via is None:
    for i in range(n):
      members = {name: v[i * k:(i + 1) * k] for name, v in got.items()}
      agg, spread = aggregate(members, images)
      hw = raws[i].shape[:2]
      r = Result(stems[i], agg, outputs(agg, hw, {cond_m.name: raws[i]}),
                 members=members if k > 1 else None)
      if k > 1:
        r.spread = {name: _spread_output(s, by_name[name], hw, depth_range)
                    for name, s in spread.items()}
      results.append(r)
    return results

  # rgb_to_rgb: the predicted `via` map, re-encoded as the data pipeline encodes a
  # condition, holds the geometry while a new RGB (and the rest) is sampled.
  via_m = by_name[task.via]
  via = sampler.encode(via_m.name, np.stack(
      [encode(decode(got[via_m.name][i], via_m, depth_range), via_m) for i in range(n)]))
  got2 = sampler(stage=1, index=np.arange(n), member=np.zeros(n, np.int32),
                 y=np.full(n, cls, np.int32), cond_name=via_m.name, cond=via)
  for i in range(n):
    arrays = {name: v[i] for name, v in got2.items()}
    out = {f'input_{cond_m.name}': raws[i], **outputs(arrays, raws[i].shape[:2])}
    results.append(Result(stems[i], arrays, out))
  return results


def _spread_output(s: np.ndarray, m: Modality, hw, depth_range) -> np.ndarray:
  """A spread map at the output size, in the units of the output (depth: depth_range's;
  disparity_minmax: relative disparity, 0..1)."""
  if m.encoding == 'depth':
    s = s * np.float32((depth_range[1] - depth_range[0]) / 2.0)
  elif m.encoding == 'disparity_minmax':
    s = s * np.float32(0.5)
  return _resize_plane(s, tuple(hw), False)


# ---- writing ---------------------------------------------------------------------------------


def to_picture(raw: np.ndarray, m: Modality) -> np.ndarray:
  """A raw output map as uint8 (H, W, 3)."""
  if m.encoding == 'rgb':
    return np.round(np.clip(raw, 0.0, 1.0) * 255.0).astype(np.uint8)
  if family(m) == 'depth':
    return visualize.depth_to_rgb(np.where(valid_depth(raw), raw, np.nan))
  if family(m) == 'normal':
    return visualize.normal_to_rgb(raw)
  if m.encoding == 'random_colors':  # a random colour per segment id
    return encodings.random_colors(raw, m.color_seed, 0)
  return visualize.segmentation_to_rgb(raw, m.palette)


def spread_picture(s: np.ndarray) -> np.ndarray:
  """Viridis from 0 (dark) to the map's maximum (yellow)."""
  top = float(s.max()) if s.size else 0.0
  return visualize.colormap(s / top if top > 0 else np.zeros_like(s))


def intrinsics(hw: tuple[int, int], fov_deg: float) -> np.ndarray:
  """Pinhole K for an (H, W) image: horizontal fov, square pixels, centres at integer (u, v)."""
  h, w = hw
  f = w / (2.0 * np.tan(np.radians(fov_deg) / 2.0))
  return np.array([[f, 0.0, (w - 1) / 2.0], [0.0, f, (h - 1) / 2.0], [0.0, 0.0, 1.0]])


def point_cloud(rgb: np.ndarray, depth: np.ndarray, normal: np.ndarray | None,
                fov_deg: float) -> np.ndarray:
  """One point per valid pixel (finite depth > 0), camera frame (OpenCV: x right, y down,
  z forward), as a structured array with x y z [nx ny nz] red green blue."""
  k = intrinsics(depth.shape, fov_deg)
  valid = valid_depth(depth)
  i, j = np.nonzero(valid)
  z = depth[valid].astype(np.float64)
  fields = [('x', '<f4'), ('y', '<f4'), ('z', '<f4')]
  if normal is not None:
    fields += [('nx', '<f4'), ('ny', '<f4'), ('nz', '<f4')]
  fields += [('red', 'u1'), ('green', 'u1'), ('blue', 'u1')]
  pts = np.empty(len(z), fields)
  pts['x'] = (j - k[0, 2]) * z / k[0, 0]
  pts['y'] = (i - k[1, 2]) * z / k[1, 1]
  pts['z'] = z
  if normal is not None:
    n = normal[valid]
    pts['nx'], pts['ny'], pts['nz'] = n[:, 0], n[:, 1], n[:, 2]
  c = np.round(np.clip(rgb[valid], 0.0, 1.0) * 255.0).astype(np.uint8)
  pts['red'], pts['green'], pts['blue'] = c[:, 0], c[:, 1], c[:, 2]
  return pts


_PLY_TYPES = {'<f4': 'float', 'u1': 'uchar'}


def write_ply(path: str, points: np.ndarray) -> None:
  """Binary little-endian PLY with one `vertex` element."""
  header = ['ply', 'format binary_little_endian 1.0', 'comment mmgen_jax scene, camera frame '
            '(x right, y down, z forward)', f'element vertex {len(points)}']
  header += [f'property {_PLY_TYPES[points.dtype[name].str.lstrip("|")]} {name}'
             for name in points.dtype.names]
  header.append('end_header')
  with open(path, 'wb') as f:
    f.write(('\n'.join(header) + '\n').encode('ascii'))
    f.write(points.tobytes())


def read_ply(path: str) -> np.ndarray:
  """The vertices of a PLY written by `write_ply`."""
  with open(path, 'rb') as f:
    data = f.read()
  end = data.index(b'end_header\n') + len(b'end_header\n')
  lines = data[:end].decode('ascii').splitlines()
  types = {v: k for k, v in _PLY_TYPES.items()}
  fields = [(ln.split()[2], types[ln.split()[1]]) for ln in lines if ln.startswith('property')]
  count = int(next(ln for ln in lines if ln.startswith('element vertex')).split()[2])
  return np.frombuffer(data[end:], np.dtype(fields), count=count)


def write_result(out_dir: str, r: Result, images: Sequence[Modality], fov_deg: float) -> str:
  """Writes one result's files into out_dir/<stem>/; returns that directory."""
  d = os.path.join(out_dir, r.stem)
  os.makedirs(d, exist_ok=True)
  by_name = {m.name: m for m in images}
  pictures = []
  for name, raw in r.outputs.items():
    m = by_name.get(name.removeprefix('input_'))
    np.save(os.path.join(d, f'{name}.npy'), raw)
    pic = to_picture(raw, m)
    visualize.save_png(os.path.join(d, f'{name}.png'), pic)
    pictures.append(pic)
  for name, s in r.spread.items():
    np.save(os.path.join(d, f'{name}_spread.npy'), s)
    visualize.save_png(os.path.join(d, f'{name}_spread.png'), spread_picture(s))
  visualize.save_png(os.path.join(d, 'grid.png'), visualize.make_grid({'': np.stack(pictures)}))
  rgb = next((r.outputs[m.name] for m in images if family(m) == 'rgb'), None)
  depth = next((r.outputs[m.name] for m in images if family(m) == 'depth'), None)
  normal = next((r.outputs[m.name] for m in images if family(m) == 'normal'), None)
  if rgb is not None and depth is not None:
    write_ply(os.path.join(d, 'scene.ply'), point_cloud(rgb, depth, normal, fov_deg))
  return d


def run(config: ml_collections.ConfigDict, workdir: str, opts: Options) -> list[str]:
  """The command: check, restore the checkpoint, sample, write; returns the directories written."""
  from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
  check(config, opts)  # before the (slow) restore
  try:
    model, step, mesh = evaluate.restore_for_inference(config, workdir)
  except ValueError as e:
    if not config.sample.checkpoint:
      raise
    raise InferenceError(str(e)) from e  # converted weights that do not fit the config
  results = run_task(config, model, mesh, opts)
  written = []
  if jax.process_index() == 0:
    fov = camera_fov(config, opts.fov)
    images = _images(config)
    written = [write_result(opts.out, r, images, fov) for r in results]
    source = (config.sample.checkpoint if config.sample.checkpoint
              else f'checkpoint step {step}')
    print(f'{opts.task}: {len(written)} result(s) from {source} in {opts.out}')
  return written
