r"""Pseudo-label plain images into a TFDS ArrayRecord dataset in MMGen's conventions.

  python -m mmgen_jax.data.label_images --input=DIR_or_tfds:NAME[/CONFIG] --out=DATA_DIR \
      [--name=mmgen_labelled] [--split=train] [--resolution=256] \
      [--depth=transformers:DIR | mmgen:WORKDIR_or_.safetensors --mmgen_config=CONFIG.py | record] \
      [--normals=geometric | marigold:DIR] [--segmentation=felzenszwalb | sam:DIR] \
      [--shard_size=1000] [--batch_size=8] [--process_index=p --process_count=P | --jax_distributed]

Inputs: a folder of images (PNG, JPEG, BMP, WebP, TIFF; searched recursively, in
sorted order). If every image lies in a first-level subfolder, the subfolders
are the classes (sorted names, label = position); a flat folder gives every
image label 0 of the single class 'unlabelled'. Or a TFDS dataset
`tfds:NAME[/CONFIG]` (e.g. `tfds:imagenet2012` after its manual download;
`--input_data_dir`, `--image_field=image`, `--label_field=label`): its
`--split`, its class names, and its `intrinsics` if the records have them.

Every image is resized (its shorter side to `--resolution`, box-halved first
while it is twice as large, then bicubic) and centre-cropped, as ADM and MMGen
prepare ImageNet; the experts (data/labelers.py) label the crop. Images that
cannot be decoded, whose shorter side is below `--min_side` (default
resolution / 2), or that are greyscale (one channel, or three equal channels:
`--greyscale=skip`, the default; `keep` labels them) are not written: each is
logged with its path and reason, counted in the summary and listed in the
shard's state file.

Output: DATA_DIR/NAME/1.0.0/, a TFDS dataset (`tfds.builder(NAME,
data_dir=DATA_DIR).as_data_source(split)`), one split per run (run again with
another --split to add one), records in the encodings of
configs/imagenet256_xl2.py (data/encodings.py):

  image         PNG uint8 (R, R, 3)  the centre crop
  depth         PNG uint8 (R, R, 1)  'disparity_minmax': relative disparity min-max to 0..255
  normal        PNG uint8 (R, R, 3)  'stablenormal_rgb': StableNormal's frame and bytes
  segmentation  PNG uint8 (R, R, 3)  'random_colors': one random colour per segment, another
                                     for the background (colour table of (--color_seed, input
                                     index); colours at least 16 levels apart, so a map
                                     decodes back to its segments exactly)
  label         ClassLabel           the class (above)
  intrinsics    float32 (3, 3)       the camera the normals were computed with, at R
  source        Text                 the input's path (relative to --input) or TFDS id
  provenance    Text                 JSON: each expert's name, weights path, SHA-256, versions

so `config.data.name=NAME`, `config.data.builder_config=''`,
`config.data.data_dir=DATA_DIR` (and `config.data.num_classes`) point
training and the latent cache at it.

At scale: shard k holds inputs [k·S, (k+1)·S) (S = --shard_size), written by
process k mod P. A shard is written under a temporary name, renamed when
complete, then its state (`labelling/<split>-<k>.json`) is written; a restarted
job skips finished shards and redoes the rest, and since every image's labels
depend on the image and its input index alone, it writes the same records as an
uninterrupted run. `labelling/<split>.json` names what the records depend on
(inputs, resolution, experts and their weights' SHA-256, options); a run whose
settings differ is refused, naming each difference. The TFDS metadata are
written once every shard of the split is done (by the process that finishes
last, or by process 0 after a barrier with --jax_distributed). Progress
(images/s, ETA) is logged every --log_every_s seconds; a summary with the counts
and each expert's images/s ends the run.

The mmgen depth expert samples on every device of its process: with several
processes, launch them independently (--process_index/--process_count), not
with --jax_distributed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging as std_logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
import PIL.Image

from mmgen_jax.data import atomic_io
from mmgen_jax.data import encodings
from mmgen_jax.data import geometric_normals
from mmgen_jax.data import labelers

VERSION = '1.0.0'                   # the TFDS version of the written dataset
FORMAT = 'mmgen_labelled/1'         # this module's record layout and state files
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff', '.gif')
FILE_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
STATE_DIR = 'labelling'
FLAT_CLASS = 'unlabelled'
SKIP_REASONS = ('unreadable', 'tiny', 'greyscale')


@dataclasses.dataclass
class Options:
  input: str
  out: str
  name: str = 'mmgen_labelled'
  split: str = 'train'
  resolution: int = 256
  shard_size: int = 1000
  batch_size: int = 8
  min_side: int | None = None         # None: resolution // 2
  greyscale: str = 'skip'             # 'skip' | 'keep'
  color_seed: int = 0
  input_data_dir: str | None = None   # TFDS inputs
  image_field: str = 'image'
  label_field: str = 'label'
  process_index: int = 0
  process_count: int = 1
  max_shards: int | None = None       # stop after writing this many shards (a partial run)
  log_every_s: float = 30.0
  read_threads: int = 4


class LabellingError(ValueError):
  """A bad request, or a previous run in --out with other settings."""


# ---- inputs ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
  """One input as read, before any check."""
  image: np.ndarray | PIL.Image.Image
  label: int
  intrinsics: np.ndarray | None = None
  depth: np.ndarray | None = None
  name: str | None = None                # a TFDS record's own file name, if it has one


@dataclasses.dataclass
class Item:
  index: int
  source: str
  label: int
  rgb: np.ndarray | None = None          # uint8 (R, R, 3), the crop
  intrinsics: np.ndarray | None = None   # (3, 3) at the crop
  depth: np.ndarray | None = None        # (R, R) the record's own depth, if asked
  problem: str | None = None             # one of SKIP_REASONS
  detail: str = ''


class FolderInput:
  """Image files under a directory; first-level subfolders are the classes (see the module
  docstring)."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise LabellingError(f'--input={root!r} is not a directory (nor tfds:NAME).')
    self.root = root
    files, self.ignored = [], []
    for dirpath, dirnames, names in os.walk(root, followlinks=True):
      dirnames.sort()
      for n in names:
        rel = os.path.relpath(os.path.join(dirpath, n), root)
        (files if n.lower().endswith(IMAGE_SUFFIXES) else self.ignored).append(rel)
    self.files = sorted(files)
    if not self.files:
      raise LabellingError(f'--input={root!r} holds no image files ({", ".join(IMAGE_SUFFIXES)}).')
    top = [f for f in self.files if os.sep not in f]
    if top and len(top) < len(self.files):
      raise LabellingError(f'--input={root!r} mixes images at its top level ({top[0]!r}, ...) with '
                           'images in subfolders: put every image in a class subfolder, or none.')
    if top:
      self.class_names = [FLAT_CLASS]
      self.labels = [0] * len(self.files)
    else:
      self.class_names = sorted({f.split(os.sep, 1)[0] for f in self.files})
      ids = {c: i for i, c in enumerate(self.class_names)}
      self.labels = [ids[f.split(os.sep, 1)[0]] for f in self.files]
    self.has_intrinsics = False
    self.fingerprint = hashlib.sha256('\n'.join(self.files).encode()).hexdigest()
    self.description = f'folder {os.path.abspath(root)}'

  def __len__(self) -> int:
    return len(self.files)

  def source(self, i: int) -> str:
    return self.files[i]

  def load(self, i: int) -> Loaded:
    with PIL.Image.open(os.path.join(self.root, self.files[i])) as im:
      im.load()
      return Loaded(im.copy(), self.labels[i])


class TfdsInput:
  """One split of a TFDS dataset, read by index."""

  def __init__(self, name: str, split: str, data_dir: str | None, image_field: str,
               label_field: str, depth_field: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from mmgen_jax.data import tfds_scenes  # pylint: disable=g-import-not-at-top
    base, _, config = name.partition('/')
    if base == tfds_scenes.NAME:  # knows the custom res{R}_n{train}_{val} configs
      builder = tfds_scenes.make_builder(config or 'res32_small', data_dir)
    else:
      builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      raise LabellingError(f'--input=tfds:{name}: not prepared under {builder.data_dir_root} '
                           '(download and prepare it first; e.g. imagenet2012 needs its manual '
                           'download).')
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:  # no random access
      raise LabellingError(
          f'--input=tfds:{name} is stored as {builder.info.file_format.value}; reading by index '
          f'needs array_record: prepare it again with `tfds build {base} --file_format='
          'array_record`.')
    if split not in builder.info.splits:
      raise LabellingError(f'--input=tfds:{name} has no split {split!r}; splits: '
                           f'{list(builder.info.splits)}.')
    feats = builder.info.features
    for what, field in (('--image_field', image_field), ('--label_field', label_field)):
      if field not in feats:
        raise LabellingError(f'{what}={field!r}: tfds:{name} has fields {sorted(feats)}.')
    if depth_field and depth_field not in feats:
      raise LabellingError(f'--depth=record:{depth_field}: tfds:{name} has fields {sorted(feats)}.')
    label = feats[label_field]
    if not isinstance(label, tfds.features.ClassLabel):
      raise LabellingError(f'--label_field={label_field!r} of tfds:{name} is not a ClassLabel.')
    self.class_names = list(label.names)
    self.source_ds = builder.as_data_source(split=split)
    self.name, self.split = name, split
    self.image_field, self.label_field, self.depth_field = image_field, label_field, depth_field
    self.has_intrinsics = 'intrinsics' in feats
    self.ignored: list[str] = []
    self.fingerprint = f'tfds:{name}:{builder.version}:{split}:{len(self.source_ds)}'
    self.description = f'tfds:{name} {builder.version} split {split} in {builder.data_dir}'

  def __len__(self) -> int:
    return len(self.source_ds)

  def source(self, i: int) -> str:
    return f'tfds:{self.name}/{self.split}[{i}]'

  def load(self, i: int) -> Loaded:
    r = self.source_ds[i]
    name = r.get('file_name')
    return Loaded(np.asarray(r[self.image_field]), int(r[self.label_field]),
                  np.asarray(r['intrinsics'], np.float32) if self.has_intrinsics else None,
                  np.asarray(r[self.depth_field], np.float32) if self.depth_field else None,
                  name.decode() if isinstance(name, bytes) else name)


def open_input(opts: Options, depth_field: str | None):
  if opts.input.startswith('tfds:'):
    return TfdsInput(opts.input[5:], opts.split, opts.input_data_dir, opts.image_field,
                     opts.label_field, depth_field)
  if depth_field:
    raise LabellingError('--depth=record reads the depth of TFDS records; a folder of images has '
                         'none (choose a depth expert).')
  return FolderInput(opts.input)


# ---- one image: checks and the centre crop ----------------------------------------------------


GREY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')


def as_rgb(image: np.ndarray | PIL.Image.Image) -> tuple[np.ndarray | None, str]:
  """(uint8 (H, W, 3), '') or (None, reason detail). Palette, RGBA, CMYK and YCbCr images are
  converted (alpha dropped); greyscale is reported as such."""
  if isinstance(image, PIL.Image.Image):
    if image.mode in GREY_MODES:
      return None, f'greyscale: one-channel image (mode {image.mode})'
    if image.mode != 'RGB':
      image = image.convert('RGBA' if image.mode == 'P' and 'transparency' in image.info
                            else 'RGB').convert('RGB')
    x = np.asarray(image)
  else:
    x = np.asarray(image)
    if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 2)):
      return None, f'greyscale: one-channel image (shape {x.shape})'
    if x.ndim != 3 or x.shape[-1] not in (3, 4):
      return None, f'unreadable: array of shape {x.shape}, not (H, W, 3)'
    if x.dtype != np.uint8:
      return None, f'unreadable: {x.dtype} pixels, not uint8'
    x = x[..., :3]
  if np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2]):
    return None, 'greyscale: three equal channels'
  return np.ascontiguousarray(x), ''


def centre_crop(rgb: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray, tuple]:
  """(crop uint8 (R, R, 3), 3×3 map of pixel coordinates original -> crop, (new_w, new_h, left,
  top)). The shorter side goes to R (box-halving while >= 2R, then bicubic), then the centre."""
  im = PIL.Image.fromarray(rgb)
  w0, h0 = im.size
  while min(im.size) >= 2 * resolution:
    im = im.resize((im.size[0] // 2, im.size[1] // 2), resample=PIL.Image.Resampling.BOX)
  scale = resolution / min(im.size)
  size = tuple(max(resolution, round(s * scale)) for s in im.size)
  im = im.resize(size, resample=PIL.Image.Resampling.BICUBIC)
  w, h = im.size
  left, top = (w - resolution) // 2, (h - resolution) // 2
  crop = np.asarray(im)[top:top + resolution, left:left + resolution]
  sx, sy = w / w0, h / h0  # pixel centres: u' = (u + 0.5)·s − 0.5 − offset
  m = np.array([[sx, 0.0, 0.5 * sx - 0.5 - left], [0.0, sy, 0.5 * sy - 0.5 - top],
                [0.0, 0.0, 1.0]])
  return np.ascontiguousarray(crop), m, (w, h, left, top)


def crop_depth(depth: np.ndarray, geometry: tuple, resolution: int) -> np.ndarray:
  """The record's depth through the same crop (nearest: no blending across edges)."""
  w, h, left, top = geometry
  d = depth[..., 0] if depth.ndim == 3 else depth
  im = PIL.Image.fromarray(np.ascontiguousarray(d, np.float32), mode='F')
  d = np.asarray(im.resize((w, h), resample=PIL.Image.Resampling.NEAREST), np.float32)
  return d[top:top + resolution, left:left + resolution]


def read_item(inp, i: int, opts: Options, min_side: int) -> Item:
  """Input i, checked and cropped; a problem is recorded on the item, never raised."""
  item = Item(index=i, source=inp.source(i), label=0)
  try:
    loaded = inp.load(i)
  except Exception as e:  # pylint: disable=broad-except  (any decoder error: named and counted)
    item.problem, item.detail = 'unreadable', f'{type(e).__name__}: {e}'
    return item
  image, k, depth, item.label = loaded.image, loaded.intrinsics, loaded.depth, loaded.label
  if loaded.name:
    item.source += f' {loaded.name}'
  rgb, why = as_rgb(image)
  if rgb is None and why.startswith('greyscale') and opts.greyscale == 'keep':
    if isinstance(image, PIL.Image.Image):  # 8-bit grey only: converting 16-bit would clip
      image = image.convert('L') if image.mode in ('1', 'L', 'LA') else np.asarray(image)
    g = np.asarray(image)
    g = g[..., 0] if g.ndim == 3 else g
    if g.dtype == np.uint8:
      rgb, why = np.repeat(g[..., None], 3, -1), ''
    else:
      why = f'unreadable: {g.dtype} greyscale pixels (8-bit greyscale is kept, not this)'
  if rgb is None:
    item.problem, _, item.detail = why.partition(': ')
    return item
  if min(rgb.shape[:2]) < min_side:
    item.problem = 'tiny'
    item.detail = f'{rgb.shape[1]}x{rgb.shape[0]} px, below --min_side={min_side}'
    return item
  item.rgb, m, geometry = centre_crop(rgb, opts.resolution)
  if k is not None:
    item.intrinsics = (m @ np.asarray(k, np.float64)).astype(np.float32)
  if depth is not None:
    item.depth = crop_depth(depth, geometry, opts.resolution)
  return item


# ---- records -----------------------------------------------------------------------------------


def features(resolution: int, class_names: Sequence[str]):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  r = resolution
  png = dict(dtype=np.uint8, encoding_format='png')
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(r, r, 3), **png),
      'depth': tfds.features.Image(shape=(r, r, 1), **png),
      'normal': tfds.features.Image(shape=(r, r, 3), **png),
      'segmentation': tfds.features.Image(shape=(r, r, 3), **png),
      'label': tfds.features.ClassLabel(names=list(class_names)),
      'intrinsics': tfds.features.Tensor(shape=(3, 3), dtype=np.float32),
      'source': tfds.features.Text(),
      'provenance': tfds.features.Text(),
  })


def encode_labels(disparity: np.ndarray, normal: np.ndarray, segment_ids: np.ndarray,
                  color_seed: int, index: int) -> dict[str, np.ndarray]:
  """Expert outputs -> the uint8 maps MMGen's preprocessing stores (data/encodings.py)."""
  if not np.isfinite(disparity).all():
    raise ValueError(f'{int((~np.isfinite(disparity)).sum())} non-finite disparity values')
  n = encodings.unit_normals(normal)
  return {'depth': encodings.disparity_minmax_u8(disparity)[..., None],
          'normal': encodings.stablenormal_rgb_u8(encodings.opencv_to_stablenormal(n)),
          'segmentation': encodings.random_colors(segment_ids, color_seed, index)}


def _png(x: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buf, format='PNG')
  return buf.getvalue()


def _check_name_is_free(name: str) -> None:
  """The pipeline opens `config.data.name` with tfds.builder, which prefers a registered builder
  of that name (ours or TFDS's catalogue) to the folder written here: refuse such a name."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top,unused-import
  try:
    tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return
  raise LabellingError(
      f'--name={name!r} is a registered TFDS builder, which the pipeline would open instead of '
      f'the labelled records: choose another name (e.g. {name + "_labelled"!r}).')


# ---- state files -------------------------------------------------------------------------------


def dataset_dir(opts: Options) -> str:
  return os.path.join(opts.out, opts.name, VERSION)


def _state_dir(opts: Options) -> str:
  return os.path.join(dataset_dir(opts), STATE_DIR)


def shard_file(opts: Options, k: int, num_shards: int) -> str:
  return f'{opts.name}-{opts.split}.array_record-{k:05d}-of-{num_shards:05d}'


def _shard_state(opts: Options, k: int) -> str:
  return os.path.join(_state_dir(opts), f'{opts.split}-{k:05d}.json')


def differences(written: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
  return atomic_io.differences(written, wanted, '{key}: {written} in the output, {wanted} now')


# ---- the run -----------------------------------------------------------------------------------


class Progress:
  """Images/s and ETA of this process's share, logged every `every_s` seconds."""

  def __init__(self, total: int, every_s: float, clock: Callable[[], float] = time.monotonic):
    self.total, self.every_s, self.clock = total, every_s, clock
    self.done = 0
    self.start = self.last = clock()

  def add(self, n: int, force: bool = False) -> None:
    self.done += n
    now = self.clock()
    if force or now - self.last >= self.every_s:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float('inf')
      logging.info('labelled %d/%d inputs of this process (%.1f%%), %.2f images/s, ETA %s',
                   self.done, self.total, 100.0 * self.done / max(self.total, 1), rate,
                   _hms(eta))


def _hms(s: float) -> str:
  if not np.isfinite(s):
    return '?'
  s = int(round(s))
  return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


@dataclasses.dataclass
class Summary:
  inputs: int = 0
  written: int = 0
  skipped: dict[str, int] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
  shards_written: int = 0
  shards_already_done: int = 0
  shards_of_other_processes: int = 0
  segments_merged_or_dropped: int = 0
  expert_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  expert_images: dict[str, int] = dataclasses.field(default_factory=dict)
  seconds: float = 0.0
  complete: bool = False
  ignored_files: int = 0

  def log(self) -> None:
    rates = {k: f'{self.expert_images[k] / max(s, 1e-9):.2f}'
             for k, s in self.expert_seconds.items()}
    logging.info('summary: %d inputs of this process, %d records written, skipped %s; shards: %d '
                 'written, %d done before, %d left to other processes; %d segments merged or '
                 'dropped (over %d per image); %d non-image files ignored; images/s per expert '
                 '%s; %.1f s; split complete: %s', self.inputs, self.written, self.skipped,
                 self.shards_written, self.shards_already_done, self.shards_of_other_processes,
                 self.segments_merged_or_dropped, labelers.MAX_SEGMENTS, self.ignored_files,
                 rates, self.seconds, self.complete)


def _timed(summary: Summary, name: str, fn, n: int):
  t = time.perf_counter()
  out = fn()
  summary.expert_seconds[name] = summary.expert_seconds.get(name, 0.0) + time.perf_counter() - t
  summary.expert_images[name] = summary.expert_images.get(name, 0) + n
  return out


def _label_batch(items: list[Item], experts: Mapping[str, Any], opts: Options,
                 provenance: str, summary: Summary) -> list[bytes]:
  batch = labelers.Batch(
      images=np.stack([it.rgb for it in items]),
      index=np.array([it.index for it in items], np.int64),
      intrinsics=(np.stack([it.intrinsics for it in items])
                  if all(it.intrinsics is not None for it in items) else None),
      record_depth=(np.stack([it.depth for it in items])
                    if all(it.depth is not None for it in items) else None))
  n = len(items)
  depth = _timed(summary, 'depth', lambda: experts['depth'](batch), n)
  normal = _timed(summary, 'normal', lambda: experts['normal'](batch, depth), n)
  segments = _timed(summary, 'segmentation', lambda: experts['segmentation'](batch), n)
  ks = (batch.intrinsics if batch.intrinsics is not None else
        np.repeat(geometric_normals.intrinsics_from_fov(
            batch.images.shape[1:3], getattr(experts['normal'], 'fov_deg',
                                             geometric_normals.DEFAULT_FOV_DEG))[None], n, 0))
  records = []
  feats = experts['_features']
  for i, it in enumerate(items):
    seg = segments[i]
    summary.segments_merged_or_dropped += seg.dropped
    try:
      maps = encode_labels(depth.disparity[i], normal[i], seg.ids, opts.color_seed, it.index)
    except ValueError as e:
      raise labelers.ExpertError(f'{it.source}: the experts\' output cannot be stored: {e}') from e
    records.append(feats.serialize_example({
        'image': _png(it.rgb), 'depth': _png(maps['depth']), 'normal': _png(maps['normal']),
        'segmentation': _png(maps['segmentation']), 'label': int(it.label),
        'intrinsics': ks[i].astype(np.float32), 'source': it.source, 'provenance': provenance}))
  return records


def _write_shard(inp, k: int, num_shards: int, experts: Mapping[str, Any], opts: Options,
                 min_side: int, provenance: str, summary: Summary, progress: Progress,
                 pool: concurrent.futures.Executor) -> None:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  start, stop = k * opts.shard_size, min((k + 1) * opts.shard_size, len(inp))
  final = os.path.join(dataset_dir(opts), shard_file(opts, k, num_shards))
  tmp = os.path.join(_state_dir(opts), shard_file(opts, k, num_shards) + '.partial')
  for stale in (final, tmp):  # a shard with no state file was not finished: redo it
    if os.path.exists(stale):
      os.remove(stale)
  t0 = time.perf_counter()
  writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
  skipped, count = [], 0
  chunks = [range(s, min(s + opts.batch_size, stop)) for s in range(start, stop, opts.batch_size)]
  pending = collections.deque()
  def submit(c):
    pending.append([pool.submit(read_item, inp, i, opts, min_side) for i in c])
  for c in chunks[:2]:  # decode one batch ahead of the experts
    submit(c)
  for j in range(len(chunks)):
    items = [f.result() for f in pending.popleft()]
    if j + 2 < len(chunks):
      submit(chunks[j + 2])
    good = []
    for it in items:
      if it.problem is None:
        good.append(it)
        continue
      summary.skipped[it.problem] += 1
      skipped.append({'index': it.index, 'source': it.source, 'reason': it.problem,
                      'detail': it.detail})
      logging.warning('skipped input %d %s: %s (%s)', it.index, it.source, it.problem, it.detail)
    if good:
      for record in _label_batch(good, experts, opts, provenance, summary):
        writer.write(record)
      count += len(good)
    progress.add(len(items))
  writer.close()
  os.replace(tmp, final)
  summary.written += count
  atomic_io.write_json(_shard_state(opts, k), {
      'format': FORMAT, 'shard': k, 'inputs': [start, stop], 'count': count,
      'num_bytes': os.path.getsize(final), 'skipped': skipped,
      'seconds': round(time.perf_counter() - t0, 3)})


def identity(opts: Options, inp, experts: Mapping[str, Any], num_shards: int) -> dict[str, Any]:
  """What the records of the split depend on (a resumed run must match it)."""
  return {'format': FORMAT, 'input': inp.fingerprint, 'num_inputs': len(inp),
          'class_names': list(inp.class_names), 'resolution': opts.resolution,
          'shard_size': opts.shard_size, 'num_shards': num_shards,
          'min_side': opts.min_side, 'greyscale': opts.greyscale, 'color_seed': opts.color_seed,
          'experts': labelers.provenance_of({k: v for k, v in experts.items()
                                             if not k.startswith('_')})}


def _finished_shards(opts: Options, num_shards: int) -> dict[int, dict[str, Any]]:
  done = {}
  for k in range(num_shards):
    state = atomic_io.read_json(_shard_state(opts, k))
    final = os.path.join(dataset_dir(opts), shard_file(opts, k, num_shards))
    if state is not None and os.path.exists(final):
      done[k] = state
  return done


def write_metadata(opts: Options) -> list[str]:
  """TFDS metadata for every complete split in the dataset dir; returns their names."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = dataset_dir(opts)
  split_infos, names, ident = [], [], None
  for f in sorted(os.listdir(_state_dir(opts))):
    if f.endswith('.json') and '-' not in f:
      split = f[:-len('.json')]
      ident_s = atomic_io.read_json(os.path.join(_state_dir(opts), f))
      n = int(ident_s['num_shards'])
      done = _finished_shards(dataclasses.replace(opts, split=split), n)
      if len(done) < n:
        continue
      if ident is not None and (ident['class_names'] != ident_s['class_names']
                                or ident['resolution'] != ident_s['resolution']):
        raise LabellingError(f'split {split!r} in {root} has other classes or resolution than '
                             f'split {names[0]!r}: one dataset needs one label set and size.')
      ident = ident or ident_s
      names.append(split)
      split_infos.append(tfds.core.SplitInfo(
          name=split, shard_lengths=[int(done[k]['count']) for k in range(n)],
          num_bytes=sum(int(done[k]['num_bytes']) for k in range(n)),
          filename_template=tfds.core.ShardedFileTemplate(
              data_dir=root, template=FILE_TEMPLATE, dataset_name=opts.name,
              split=split, filetype_suffix='array_record')))
  if not split_infos:
    return []
  tfds.folder_dataset.write_metadata(
      data_dir=root, features=features(ident['resolution'], ident['class_names']),
      split_infos=split_infos, filename_template=FILE_TEMPLATE, check_data=False,
      description=('Images pseudo-labelled by mmgen_jax.data.label_images in MMGen\'s encodings '
                   '(disparity_minmax depth, stablenormal_rgb normals, random_colors segments); '
                   f'experts of split {names[0]!r}: ' + json.dumps(ident['experts'])))
  return names


def run(opts: Options, experts: Mapping[str, Any], *, barrier: Callable[[], None] | None = None
        ) -> Summary:
  """Labels this process's shards of opts.input (see the module docstring); returns the summary.

  `experts`: {'depth', 'normal', 'segmentation'} from labelers.make_*. `barrier`
  (jax.distributed) waits for every process before process 0 writes the metadata.
  """
  t_start = time.perf_counter()
  if opts.resolution < 8:
    raise LabellingError(f'--resolution={opts.resolution} must be >= 8.')
  if opts.shard_size < 1 or opts.batch_size < 1:
    raise LabellingError(f'--shard_size={opts.shard_size} and --batch_size={opts.batch_size} must '
                         'be >= 1.')
  if opts.greyscale not in ('skip', 'keep'):
    raise LabellingError(f'--greyscale={opts.greyscale!r}: choose skip or keep.')
  if not 0 <= opts.process_index < opts.process_count:
    raise LabellingError(f'--process_index={opts.process_index} must lie in '
                         f'[0, --process_count={opts.process_count}).')
  missing = {'depth', 'normal', 'segmentation'} - set(experts)
  if missing:
    raise LabellingError(f'experts missing: {sorted(missing)}.')
  _check_name_is_free(opts.name)
  if opts.min_side is None:
    opts = dataclasses.replace(opts, min_side=opts.resolution // 2)
  record_depth = isinstance(experts['depth'], labelers.RecordDepth)
  depth_field = experts['depth'].field if record_depth else None
  inp = open_input(opts, depth_field)
  num_shards = -(-len(inp) // opts.shard_size)
  experts = dict(experts, _features=features(opts.resolution, inp.class_names))
  os.makedirs(_state_dir(opts), exist_ok=True)

  ident = identity(opts, inp, experts, num_shards)
  ident_path = os.path.join(_state_dir(opts), f'{opts.split}.json')
  written = atomic_io.read_json(ident_path)
  if written is not None:
    diff = differences(written, ident)
    if diff:
      raise LabellingError(f'{dataset_dir(opts)} split {opts.split!r} was labelled with other '
                           'settings (use another --out, --name or --split, or delete it):\n  '
                           + '\n  '.join(diff))
  else:
    atomic_io.write_json(ident_path, ident)
  provenance = json.dumps({'experts': ident['experts'], 'labeller': FORMAT}, sort_keys=True)

  mine = [k for k in range(num_shards) if k % opts.process_count == opts.process_index]
  done = _finished_shards(opts, num_shards)
  todo = [k for k in mine if k not in done]
  summary = Summary(shards_already_done=len(mine) - len(todo),
                    shards_of_other_processes=num_shards - len(mine),
                    ignored_files=len(inp.ignored))
  if opts.max_shards is not None:
    todo = todo[:opts.max_shards]
  summary.inputs = sum(min((k + 1) * opts.shard_size, len(inp)) - k * opts.shard_size for k in todo)
  logging.info('%s -> %s split %s: %d inputs, %d shards of %d; process %d/%d: %d shards to '
               'label, %d done before; experts %s', inp.description, dataset_dir(opts),
               opts.split, len(inp), num_shards, opts.shard_size, opts.process_index,
               opts.process_count, len(todo), summary.shards_already_done,
               {k: v['expert'] for k, v in ident['experts'].items()})
  if inp.ignored:
    logging.warning('%d non-image files ignored under %s (first: %s)', len(inp.ignored),
                    opts.input, inp.ignored[0])
  progress = Progress(summary.inputs, opts.log_every_s)
  with concurrent.futures.ThreadPoolExecutor(max(1, opts.read_threads)) as pool:
    for k in todo:
      _write_shard(inp, k, num_shards, experts, opts, opts.min_side, provenance, summary,
                   progress, pool)
      summary.shards_written += 1
  progress.add(0, force=True)

  if barrier is not None:
    barrier()
  finished = len(_finished_shards(opts, num_shards))
  summary.complete = finished == num_shards
  if summary.complete and (barrier is None or opts.process_index == 0):
    write_metadata(opts)
  elif not summary.complete:
    logging.info('split %s: %d of %d shards done; the process that finishes the last one '
                 'writes the TFDS metadata.', opts.split, finished, num_shards)
  summary.seconds = time.perf_counter() - t_start
  summary.log()
  return summary


def summary_counts(opts: Options) -> dict[str, Any]:
  """Counts over every finished shard of the split (all processes): written, skipped by reason."""
  ident = atomic_io.read_json(os.path.join(_state_dir(opts), f'{opts.split}.json'))
  if ident is None:
    raise LabellingError(f'no labelling of split {opts.split!r} in {dataset_dir(opts)}.')
  done = _finished_shards(opts, int(ident['num_shards']))
  skipped = collections.Counter(s['reason'] for d in done.values() for s in d['skipped'])
  return {'shards_done': len(done), 'num_shards': int(ident['num_shards']),
          'written': sum(int(d['count']) for d in done.values()),
          'skipped': {r: skipped.get(r, 0) for r in SKIP_REASONS},
          'skipped_sources': sorted((s['source'], s['reason']) for d in done.values()
                                    for s in d['skipped'])}


# ---- command line ------------------------------------------------------------------------------


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  f = flags
  f.DEFINE_string('input', None, 'A folder of images, or tfds:NAME[/CONFIG].', required=True)
  f.DEFINE_string('out', None, 'The TFDS data_dir to write NAME/1.0.0/ into.', required=True)
  f.DEFINE_string('name', 'mmgen_labelled', 'Dataset name (config.data.name).')
  f.DEFINE_string('split', 'train', 'The split to read (TFDS) and write.')
  f.DEFINE_integer('resolution', 256, 'Side of the square records.')
  f.DEFINE_string('depth', None,
                  'transformers:DIR | mmgen:WORKDIR_or_.safetensors | record[:FIELD]',
                  required=True)
  f.DEFINE_string('normals', 'geometric', 'geometric | marigold:DIR')
  f.DEFINE_string('segmentation', 'felzenszwalb', 'felzenszwalb | sam:DIR')
  config_flags.DEFINE_config_file('mmgen_config', None, 'The config of the --depth=mmgen model '
                                  '(with --mmgen_config.a.b=value overrides).', lock_config=False)
  f.DEFINE_float('fov', geometric_normals.DEFAULT_FOV_DEG,
                 'Horizontal field of view (degrees) for geometric normals of records without '
                 'intrinsics.')
  f.DEFINE_float('far_near_ratio', geometric_normals.DEFAULT_FAR_NEAR_RATIO,
                 'Assumed z_far / z_near of affine-invariant disparity (geometric normals).')
  f.DEFINE_integer('marigold_steps', None, 'Denoising steps of Marigold (None: its default).')
  f.DEFINE_string('device', 'cpu', 'torch device of the torch experts.')
  f.DEFINE_integer('shard_size', 1000, 'Inputs per output shard (the unit of resuming).')
  f.DEFINE_integer('batch_size', 8, 'Images per expert call.')
  f.DEFINE_integer('min_side', None, 'Shorter sides below this are skipped (default R/2).')
  f.DEFINE_enum('greyscale', 'skip', ['skip', 'keep'], 'Greyscale images: skip (counted) or keep.')
  f.DEFINE_integer('color_seed', 0, 'Seed of the random segment colours.')
  f.DEFINE_integer('seed', 0, 'Seed of sampling experts (mmgen).')
  f.DEFINE_string('input_data_dir', None, 'data_dir of a tfds: input.')
  f.DEFINE_string('image_field', 'image', 'Image field of a tfds: input.')
  f.DEFINE_string('label_field', 'label', 'ClassLabel field of a tfds: input.')
  f.DEFINE_integer('process_index', 0, 'This process (without --jax_distributed).')
  f.DEFINE_integer('process_count', 1, 'Number of processes (without --jax_distributed).')
  f.DEFINE_bool('jax_distributed', False, 'Take the process index and count from the JAX '
                'multi-process job (parallel.initialize_distributed: a pod, SLURM, or '
                '$MMGEN_COORDINATOR / $MMGEN_NUM_PROCESSES / $MMGEN_PROCESS_ID).')
  f.DEFINE_integer('max_shards', None, 'Stop after this many shards (the rest on a rerun).')
  f.DEFINE_float('log_every_s', 30.0, 'Seconds between progress lines.')


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  barrier = None
  index, count = f.process_index, f.process_count
  if f.jax_distributed:
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if f.depth.startswith('mmgen:'):
      raise app.UsageError('--depth=mmgen samples on every device of its process: launch the '
                           'processes with --process_index/--process_count instead of '
                           '--jax_distributed.')
    from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize_distributed()  # flags-free: $MMGEN_COORDINATOR..., SLURM, TPU VMs
    index, count = jax.process_index(), jax.process_count()
    barrier = lambda: multihost_utils.sync_global_devices('label_images_done')
  try:
    experts = {
        'depth': labelers.make_depth(f.depth, mmgen_config=f.mmgen_config, seed=f.seed,
                                     device=f.device),
        'normal': labelers.make_normals(f.normals, fov_deg=f.fov, far_near_ratio=f.far_near_ratio,
                                        num_inference_steps=f.marigold_steps, device=f.device),
        'segmentation': labelers.make_segmentation(f.segmentation, device=f.device)}
    opts = Options(input=f.input, out=f.out, name=f.name, split=f.split, resolution=f.resolution,
                   shard_size=f.shard_size, batch_size=f.batch_size, min_side=f.min_side,
                   greyscale=f.greyscale, color_seed=f.color_seed, input_data_dir=f.input_data_dir,
                   image_field=f.image_field, label_field=f.label_field, process_index=index,
                   process_count=count, max_shards=f.max_shards, log_every_s=f.log_every_s)
    summary = run(opts, experts, barrier=barrier)
  except (LabellingError, labelers.ExpertError) as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps({'dataset': dataset_dir(opts), 'split': opts.split,
                    'process': opts.process_index, **dataclasses.asdict(summary)}), flush=True)


if __name__ == '__main__':
  _define_flags()
  std_logging.getLogger('absl').setLevel(std_logging.INFO)
  app.run(main)
