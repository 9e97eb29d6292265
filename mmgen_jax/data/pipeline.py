"""Grain input pipeline: TFDS ArrayRecord records -> per-process numpy batches -> global jax.Arrays.

    source (tfds.data_source)            record i of the split, tagged with i
    -> shard by process                  strided: process p reads records p, p + P, ...
    -> shuffle(seed) -> repeat           train only; reshuffled every epoch
    -> decode                            checked raw arrays (decode_record)
    -> augment                           train only; per-record RNG from (seed, position)
    -> normalise                         model arrays per Modality.encoding (normalise)
    -> to_iter_dataset -> full batches   bad records skipped (and counted) before batching
    -> mp_prefetch(worker_count)         0 = in-process
    -> count skipped records             in the main process (PipelineStats)

With `config.data.latent_cache` set, the train split is read from that cache
(data/latent_cache.py): the same sharding, shuffling, batching and iterator
state, but its records replace decode -> augment -> normalise (augmentation is
refused) and a batch holds `<image modality>_moments` float32 (B, h, w, 2·latent),
`label`, the class modalities, `index` and `repa_features` if cached (and wanted, below).

A batch is a dict of numpy arrays with the per-process batch size leading:

    <image modality>       float32 (B, H, W, C) in [-1, 1]
    <depth modality>_raw   float32 (B, H, W, 1) the depth before normalisation (evaluation;
                           NaN for a record holding 8-bit disparity, which has no depth)
    <normal modality>_raw  float32 (B, H, W, 3) OpenCV-frame unit normals ('stablenormal_rgb')
    <seg. modality>_ids    int32 (B, H, W) semantic / segment ids (evaluation)
    <class modality>       int32 (B,)
    label                  int32 (B,) the class condition, from config.data.class_field
    intrinsics             float32 (B, 3, 3) updated for crop/flip (if the records have them)
    repa_features          float32 (B, T, z) frozen-encoder tokens: training batches only, if
                           the records have them and config.objective.repa_coeff > 0 (else,
                           and always in evaluation, left unread)
    index                  int32 (B,) record index in its split (provenance)
    valid                  bool (B,) evaluation only: False marks padding (see make_dataset)
    prompt_tokens, ...     prompt records only (data/prompts.py, field_specs): the prompt of
                           one kind per config.prompt.kind_probs; flips swap left and right

The pipeline is deterministic for a given seed, process count and worker
count, and its iterator state (`get_state`/`set_state`) resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import threading
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
import grain
import jax
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax.data import encodings
from mmgen_jax.data import palettes
from mmgen_jax.data import prompts
from mmgen_jax.data import tfds_imagenet_mmgen  # registers the imagenet2012_mmgen builder
from mmgen_jax.data import tfds_prompts  # registers the mmgen_prompts builder
from mmgen_jax.data import tfds_scenes  # also registers the mmgen_scenes builder

Modality = modalities_lib.Modality
Example = dict[str, Any]


# ---- errors and skip accounting -----------------------------------------------


class BadRecordError(ValueError):
  """A record that cannot become a training example; names where and what."""

  def __init__(self, split: str, index: int, field: str, problem: str):
    self.split, self.index, self.field, self.problem = split, index, field, problem
    self.where = f'{split}[{index}], field {field!r}: {problem}'
    super().__init__(f'bad record {self.where} '
                     "(set config.data.on_bad_record='skip' to skip such records).")

  def __reduce__(self):  # crosses process boundaries (Grain workers) intact
    return BadRecordError, (self.split, self.index, self.field, self.problem)


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Stands in for a bad record in skip mode, until the batcher counts it."""
  reason: str


_SKIPPED_KEY = '_skipped'  # batch entry carrying the skip reasons to the main process
_MAX_SKIPS_PER_BATCH = 1000


class PipelineStats:
  """Counts the records skipped by a pipeline (config.data.on_bad_record='skip').

  Every skip is logged as a warning naming the record, the totals every
  `log_every` batches while there are skips, and `log()` at the end of a run.
  """

  def __init__(self, name: str = 'data', log_every: int = 1000):
    self.name = name
    self.log_every = log_every
    self.batches = 0
    self.skipped = 0
    self.reasons: list[str] = []  # the first few, for the summary
    self._lock = threading.Lock()

  def consume(self, batch: Example) -> Example:
    """Pops the skip reasons from a batch and counts them (runs in the main process)."""
    reasons = batch.pop(_SKIPPED_KEY, ())
    with self._lock:
      self.batches += 1
      self.skipped += len(reasons)
      self.reasons.extend(reasons[:max(0, 10 - len(self.reasons))])
    for r in reasons:
      logging.warning('%s: skipped %s (%d skipped so far).', self.name, r, self.skipped)
    if self.skipped and self.batches % self.log_every == 0:
      self.log()
    return batch

  def state(self) -> dict[str, Any]:
    """The counts, for the iterator's checkpoint (JSON-serialisable)."""
    with self._lock:
      return {'batches': self.batches, 'skipped': self.skipped, 'reasons': list(self.reasons)}

  def restore(self, state: Mapping[str, Any]) -> None:
    with self._lock:
      self.batches, self.skipped = int(state['batches']), int(state['skipped'])
      self.reasons = list(state['reasons'])

  def summary(self) -> str:
    first = f'; first: {self.reasons[0]}' if self.reasons else ''
    return (f'{self.name}: {self.batches} batches, {self.skipped} bad records skipped'
            f'{first}')

  def log(self) -> None:
    (logging.warning if self.skipped else logging.info)(self.summary())


# ---- source and sharding --------------------------------------------------------


def make_builder(config: Any) -> tfds.core.DatasetBuilder:
  """The TFDS builder of config.data (name, builder_config, data_dir); it may be unbuilt."""
  d = config.data
  data_dir = d.data_dir or None
  if d.name == tfds_scenes.NAME:  # also knows the custom res{R}_n{train}_{val} configs
    return tfds_scenes.make_builder(d.builder_config, data_dir)
  if d.name == tfds_prompts.NAME:  # likewise
    return tfds_prompts.make_builder(d.builder_config, data_dir)
  return tfds.builder(f'{d.name}/{d.builder_config}' if d.builder_config else d.name,
                      data_dir=data_dir)


def make_source(config: Any, split: str) -> Sequence[Mapping[str, Any]]:
  """The random-access TFDS data source of `split` (images left PNG-encoded).

  Image features are not decoded by TFDS so that `decode_record` can name a
  record whose PNG is corrupt instead of failing inside TFDS.
  """
  d = config.data
  name = f'{d.name}/{d.builder_config}'
  builder = make_builder(config)
  if not builder.is_prepared():
    cli = ('mmgen_jax.data.tfds_imagenet_mmgen --manual_dir=<MMGen dataset/ tree>'
           if d.name == tfds_imagenet_mmgen.NAME else 'mmgen_jax.data.build')
    raise FileNotFoundError(
        f'dataset {name} is not built under {builder.data_dir_root}; build it with '
        f'`python -m {cli} --config={builder.builder_config.name}'
        f'{" --data_dir=" + d.data_dir if d.data_dir else ""}` (config.data.name / '
        'builder_config / data_dir).')
  if split not in builder.info.splits:
    raise KeyError(f'dataset {name} has no split {split!r}; splits: {list(builder.info.splits)}.')
  decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
              if isinstance(f, tfds.features.Image)}
  return builder.as_data_source(split=split, decoders=decoders)


def shard_indices(num_records: int, process_index: int, process_count: int) -> range:
  """Record indices read by one process: strided, disjoint, union = the whole split."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must lie in [0, {process_count}).')
  return range(process_index, num_records, process_count)


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'config.data.global_batch_size={global_batch_size} is not divisible by '
                     f'the {process_count} processes.')
  return global_batch_size // process_count


class _IndexedSource:
  """(index, record) pairs; a record the source cannot read becomes a BadRecordError.

  Fields in `drop` leave the record before anything decodes or copies them.
  """

  def __init__(self, source: Sequence[Mapping[str, Any]], split: str,
               drop: Sequence[str] = ()):
    self._source, self._split, self._drop = source, split, tuple(drop)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[int, Any, bool]:
    try:
      record = self._source[index]
    except Exception as e:  # pylint: disable=broad-except  (reported per record below)
      record = BadRecordError(self._split, index, '<record>', f'cannot be read: {e!r}')
    else:
      if self._drop and any(k in record for k in self._drop):
        record = {k: v for k, v in record.items() if k not in self._drop}
    return index, record, True  # True: a real record (False marks evaluation padding)

  def __repr__(self) -> str:
    return f'_IndexedSource({self._source!r}, split={self._split!r})'


def _as_padding(item: tuple[int, Any, bool]) -> tuple[int, Any, bool]:
  return item[0], item[1], False


# ---- decode: record -> checked raw arrays ----------------------------------------


def _decode_image(value: Any, bad) -> np.ndarray:
  if isinstance(value, (bytes, np.bytes_)):
    try:
      with PIL.Image.open(io.BytesIO(value)) as im:
        return np.asarray(im)  # no mode conversion: a grey or RGBA image fails the shape check
    except Exception as e:  # pylint: disable=broad-except
      raise bad(f'undecodable image ({len(value)} bytes): {e}') from None
  return np.asarray(value)


def _check_shape(x: np.ndarray, shape: tuple[int, ...], bad) -> np.ndarray:
  if x.shape == shape + (1,) and len(shape) == 2:
    x = x[..., 0]
  if x.shape != shape:
    raise bad(f'wrong shape {x.shape}; expected {shape}')
  return x


def _class_id(value: Any, num_classes: int, bad) -> int:
  x = np.asarray(value)
  if x.shape != () or not np.issubdtype(x.dtype, np.integer):
    raise bad(f'expected an integer class id, got {x.dtype} of shape {x.shape}')
  if not 0 <= int(x) < num_classes:
    raise bad(f'label {int(x)} out of range [0, {num_classes})')
  return int(x)


def decode_record(record: Mapping[str, Any], mods: Sequence[Modality], *, split: str,
                  index: int, class_field: str = 'label', num_classes: int = 0,
                  resolution: int | None = None,
                  prompt_sizes: Mapping[str, int] | None = None) -> Example:
  """Checks one record and returns its raw arrays, keyed by modality name.

  rgb uint8 (H, W, 3) (decoded here if PNG bytes), depth float32 (H, W),
  normal float32 (H, W, 3) unit length, segmentation int32 ids (H, W),
  class modalities int; plus `label` (from `class_field`), `index`,
  `intrinsics` and `repa_features` (if present). MMGen's 8-bit encodings
  (data/encodings.py) also take the uint8 image its preprocessing stores: a
  'disparity_minmax' uint8 (H, W) map is kept as is, a 'stablenormal_rgb' uint8
  (H, W, 3) map becomes OpenCV-frame normals (not renormalised, so it encodes
  back to the same bytes), a 'random_colors' uint8 (H, W, 3) colour map becomes
  one id per colour. Raises BadRecordError naming split, index and
  field for: a missing field, an undecodable image, a wrong shape or dtype,
  non-finite depth, a zero-length or non-finite normal, a segmentation id
  outside the palette, a label out of range. A record with prompt fields
  (data/prompts.py) also gives them, checked against the contract and
  `prompt_sizes` (max_tokens, entity_tokens, entity_size; from config.prompt);
  a scenes record keeps its prompt of every kind for _prompt_kind_stage.
  """
  out: Example = {'index': index}
  hw = None if resolution is None else (resolution, resolution)

  def getter(field: str):
    def bad(problem: str) -> BadRecordError:
      return BadRecordError(split, index, field, problem)
    if field not in record:
      raise bad(f'missing (the record has {sorted(record)})')
    return record[field], bad

  for m in mods:
    value, bad = getter(m.field)
    if not m.is_image:
      out[m.name] = _class_id(value, m.channels, bad)
      continue
    x = _decode_image(value, bad)  # PNG bytes of any map are decoded; arrays pass through
    if hw is None:
      hw = x.shape[:2]
    kind = encodings.family(m.encoding)
    if m.encoding == 'disparity_minmax' and x.dtype == np.uint8:
      x = _check_shape(x, hw, bad)  # MMGen's stored 8-bit disparity
    elif m.encoding == 'stablenormal_rgb' and x.dtype == np.uint8:
      x = encodings.stablenormal_to_opencv(encodings.to_model_space(_check_shape(x, hw + (3,), bad)))
    elif m.encoding == 'random_colors' and x.dtype == np.uint8 and x.shape[2:] == (3,):
      x = encodings.ids_from_exact_colors(_check_shape(x, hw + (3,), bad))
      if x.max() >= encodings.MAX_SEGMENTS:
        raise bad(f'{x.max() + 1} distinct colours; random colours hold at most '
                  f'{encodings.MAX_SEGMENTS} segments')
    elif kind == 'rgb':
      x = _check_shape(x, hw + (3,), bad)
      if x.dtype != np.uint8:
        raise bad(f'expected uint8 rgb, got {x.dtype}')
    elif kind == 'depth':
      x = _check_shape(x, hw, bad).astype(np.float32)
      finite = np.isfinite(x)
      if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise bad(f'non-finite depth at {(~finite).sum()} pixels (first at row {i}, col {j}: '
                  f'{x[i, j]})')
      if m.encoding == 'disparity_minmax' and not x.min() > 0:
        i, j = np.argwhere(x <= 0)[0]
        raise bad(f'depth <= 0 at {(x <= 0).sum()} pixels (first at row {i}, col {j}: '
                  f'{x[i, j]}); disparity needs positive depth')
    elif kind == 'normal':
      try:
        x = encodings.unit_normals(_check_shape(x, hw + (3,), bad))
      except ValueError as e:
        raise bad(str(e)) from None
    elif kind == 'segmentation':
      x = _check_shape(x, hw, bad)
      if not np.issubdtype(x.dtype, np.integer):
        raise bad(f'expected integer segmentation ids, got {x.dtype}')
      if m.encoding == 'random_colors':
        num_ids, what = encodings.MAX_SEGMENTS, 'random colours hold'
      else:
        num_ids, what = len(palettes.get(m.palette)), f'palette {m.palette!r} has'
      if x.min() < 0 or x.max() >= num_ids:
        raise bad(f'segmentation ids span [{x.min()}, {x.max()}] but {what} {num_ids} colours')
      x = x.astype(np.int32)
    out[m.name] = x

  value, bad = getter(class_field)
  out['label'] = _class_id(value, num_classes, bad)
  if 'intrinsics' in record:
    k = np.asarray(record['intrinsics'], np.float32)
    out['intrinsics'] = _check_shape(k, (3, 3), getter('intrinsics')[1])
  if modalities_lib.REPA_FEATURES in record:
    z, bad = getter(modalities_lib.REPA_FEATURES)
    z = np.asarray(z)
    if z.ndim != 2 or not np.issubdtype(z.dtype, np.floating):
      raise bad(f'expected float (tokens, dim) features, got {z.dtype} of shape {z.shape}')
    if not np.isfinite(z).all():
      raise bad(f'{(~np.isfinite(z)).sum()} non-finite feature values')
    out[modalities_lib.REPA_FEATURES] = z.astype(np.float32)
  if prompts.PROMPT_KEYS[0] in record:  # a multimodal prompt record (data/prompts.py)
    fields, problems = prompts.stored_fields(record, resolution=hw and hw[0],
                                             **(prompt_sizes or {}))
    if problems:
      field = problems[0].split(':')[0]
      raise BadRecordError(split, index, field if field in record else 'prompt fields',
                           '; '.join(problems))
    out.update(fields)
  return out


# ---- augment: crop/flip every map consistently -----------------------------------


def hflip(example: Example, mods: Sequence[Modality]) -> Example:
  """Mirrors every map left-right; normal x is negated and cx mirrored to match."""
  out = dict(example)
  for m in modalities_lib.images(mods):
    x = example[m.name][:, ::-1]
    if encodings.family(m.encoding) == 'normal':  # OpenCV-frame floats for every encoding
      x = x * np.array([-1.0, 1.0, 1.0], np.float32)  # mirrored scene: x -> -x
    out[m.name] = np.ascontiguousarray(x)
  if 'intrinsics' in example:
    k = example['intrinsics'].copy()
    width = _hw(example, mods)[1]
    k[0, 2] = (width - 1) - k[0, 2]  # pixel centres at integer u (OpenCV)
    out['intrinsics'] = k
  if 'prompt_tokens' in example:  # the mirrored scene's prompt: left <-> right
    out['prompt_tokens'] = prompts.hflip_tokens(example['prompt_tokens'])
    out['entity_masks'] = np.ascontiguousarray(example['entity_masks'][:, :, ::-1])
  return out


def _hw(example: Example, mods: Sequence[Modality]) -> tuple[int, int]:
  return example[modalities_lib.images(mods)[0].name].shape[:2]


def _axis_samples(start: int, length: int, out: int) -> tuple[np.ndarray, ...]:
  """Bilinear taps (lo, hi, weight of hi) and nearest taps mapping `out` pixels onto
  input pixels [start, start + length), pixel centres aligned, never reading outside."""
  centres = start + (np.arange(out) + 0.5) * (length / out) - 0.5
  centres = np.clip(centres, start, start + length - 1)
  lo = np.floor(centres).astype(np.int64)
  hi = np.minimum(lo + 1, start + length - 1)
  nearest = np.minimum(start + np.floor((np.arange(out) + 0.5) * (length / out)),
                       start + length - 1).astype(np.int64)
  return lo, hi, (centres - lo).astype(np.float32), nearest


def _bilinear(x: np.ndarray, ys, xs) -> np.ndarray:
  """Separable: interpolate rows, then columns."""
  (y0, y1, wy, _), (x0, x1, wx, _) = ys, xs
  x = x.astype(np.float32)
  wy = wy.reshape((-1,) + (1,) * (x.ndim - 1))
  rows = x[y0] + (x[y1] - x[y0]) * wy
  wx = wx.reshape((1, -1) + (1,) * (x.ndim - 2))
  return rows[:, x0] + (rows[:, x1] - rows[:, x0]) * wx


def _nearest(x: np.ndarray, ys, xs) -> np.ndarray:
  return x[ys[3]][:, xs[3]]


def crop_resize(example: Example, mods: Sequence[Modality],
                box: tuple[int, int, int, int]) -> Example:
  """Crops `box` = (top, left, height, width) and resizes it back to the full size.

  rgb: bilinear. depth: nearest (a blend of foreground and background depth is
  a surface that does not exist). normal: bilinear, then renormalised (nearest
  where neighbours cancel). segmentation: nearest, so ids are never blended.
  """
  if 'prompt_tokens' in example:
    raise ValueError('random crops are refused for prompt records: a crop could cut out an '
                     'object the prompt mentions (set config.data.augment.crop_min_scale=1.0).')
  top, left, h, w = box
  out_h, out_w = _hw(example, mods)
  ys, xs = _axis_samples(top, h, out_h), _axis_samples(left, w, out_w)
  out = dict(example)
  for m in modalities_lib.images(mods):
    x = example[m.name]
    kind = encodings.family(m.encoding)
    if kind == 'rgb':
      out[m.name] = _bilinear(x, ys, xs)
    elif kind == 'normal':
      n = _bilinear(x, ys, xs)
      norm = np.linalg.norm(n, axis=-1, keepdims=True)
      out[m.name] = np.where(norm > 1e-3, n / np.maximum(norm, 1e-3), _nearest(x, ys, xs))
    else:  # depth, segmentation
      out[m.name] = _nearest(x, ys, xs)
  if 'intrinsics' in example:
    k = example['intrinsics'].copy()
    sy, sx = out_h / h, out_w / w
    k[0, 0], k[1, 1] = k[0, 0] * sx, k[1, 1] * sy
    k[0, 2] = (k[0, 2] - left + 0.5) * sx - 0.5
    k[1, 2] = (k[1, 2] - top + 0.5) * sy - 0.5
    out['intrinsics'] = k
  return out


def augment(example: Example, rng: np.random.Generator, mods: Sequence[Modality], *,
            flip: bool, crop_min_scale: float) -> Example:
  """Random flip and crop, the same for every modality of the example."""
  # Always draw the same numbers so that turning one option off keeps the other's draws.
  u_flip, u_scale, u_top, u_left = rng.random(4)
  if crop_min_scale < 1.0:
    height, width = _hw(example, mods)
    scale = crop_min_scale + (1.0 - crop_min_scale) * u_scale
    h, w = max(1, round(scale * height)), max(1, round(scale * width))
    top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
    example = crop_resize(example, mods, (top, left, h, w))
  if flip and u_flip < 0.5:
    example = hflip(example, mods)
  return example


# ---- normalise: raw arrays -> model arrays ----------------------------------------


def normalise(example: Example, mods: Sequence[Modality]) -> Example:
  """Model arrays per Modality.encoding (see the module docstring for the keys)."""
  out: Example = {'label': np.int32(example['label']), 'index': np.int32(example['index'])}
  for m in mods:
    x = example[m.name]
    if m.encoding == 'rgb':
      out[m.name] = np.asarray(x, np.float32) / 127.5 - 1.0
    elif m.encoding == 'depth':
      d = np.asarray(x, np.float32)[..., None]
      lo, hi = float(d.min()), float(d.max())
      # A constant map carries no relative depth: it maps to 0, the middle of [-1, 1].
      out[m.name] = (2.0 * (d - lo) / (hi - lo) - 1.0 if hi > lo else np.zeros_like(d))
      out[f'{m.name}_raw'] = d
    elif m.encoding == 'normal':
      out[m.name] = np.asarray(x, np.float32)
    elif m.encoding == 'segmentation':
      out[m.name] = palettes.colorize(x, m.palette).astype(np.float32) / 127.5 - 1.0
      out[f'{m.name}_ids'] = np.asarray(x, np.int32)
    elif m.encoding == 'disparity_minmax':
      out[m.name] = encodings.encode_disparity_minmax(x, m.channels)
      # 8-bit disparity carries no depth to score against.
      out[f'{m.name}_raw'] = (np.full(x.shape + (1,), np.nan, np.float32) if x.dtype == np.uint8
                              else np.asarray(x, np.float32)[..., None])
    elif m.encoding == 'stablenormal_rgb':
      out[m.name] = encodings.encode_stablenormal_rgb(x)
      norm = np.linalg.norm(x, axis=-1, keepdims=True)
      out[f'{m.name}_raw'] = (x / np.maximum(norm, 1e-12)).astype(np.float32)
    elif m.encoding == 'random_colors':
      out[m.name] = encodings.to_model_space(
          encodings.random_colors(x, m.color_seed, int(example['index'])))
      out[f'{m.name}_ids'] = np.asarray(x, np.int32)
    else:  # class
      out[m.name] = np.int32(x)
  if 'intrinsics' in example:
    out['intrinsics'] = np.asarray(example['intrinsics'], np.float32)
  if modalities_lib.REPA_FEATURES in example:
    out[modalities_lib.REPA_FEATURES] = example[modalities_lib.REPA_FEATURES]
  if '_valid' in example:
    out['valid'] = np.bool_(example['_valid'])
  for key in prompts.PROMPT_KEYS:  # prompt records: already contract arrays
    if key in example:
      out[key] = example[key]
  return out


# ---- per-record stages (module level: Grain pickles them into worker processes) ----


def _decode_stage(item: tuple[int, Any, bool], *, mods, split, class_field, num_classes,
                  resolution, skip: bool, keep_valid: bool,
                  prompt_sizes: Mapping[str, int] | None = None) -> Example | Skipped:
  index, record, valid = item
  try:
    if isinstance(record, BadRecordError):
      raise record
    example = decode_record(record, mods, split=split, index=index, class_field=class_field,
                            num_classes=num_classes, resolution=resolution,
                            prompt_sizes=prompt_sizes)
  except BadRecordError as e:
    if not skip:
      raise
    return Skipped(e.where)
  if keep_valid:
    example['_valid'] = valid
  return example


def _augment_stage(example, rng, *, mods, flip, crop_min_scale):
  if isinstance(example, Skipped):
    return example
  return augment(example, rng, mods, flip=flip, crop_min_scale=crop_min_scale)


def _prompt_kind_stage(example, rng=None, *, probs, seed: int = 0):
  """A scenes prompt record's prompt of one kind: drawn from `probs` (by `rng` in
  training, from (seed, record index) in evaluation), or the record's own kind."""
  if isinstance(example, Skipped) or 'drawn_kind' not in example:
    return example
  kind = None
  if probs is not None:
    rng = np.random.default_rng([seed, int(example['index'])]) if rng is None else rng
    kind = int(rng.choice(3, p=probs))
  example = dict(example)
  stored = {k: example.pop(k) for k in prompts.RECORD_KEYS}
  example.update(prompts.select_kind(stored, kind))
  return example


def _normalise_stage(example, *, mods):
  return example if isinstance(example, Skipped) else normalise(example, mods)


# ---- batching: full batches of good records ---------------------------------------


class _FullBatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, evaluation: bool):
    super().__init__(parent)
    self._batch_size = batch_size
    self._evaluation = evaluation

  def __next__(self) -> Example:
    examples, reasons = [], []
    while len(examples) < self._batch_size:
      try:
        item = next(self._parent)
      except StopIteration:
        if not self._evaluation or not examples:
          raise
        break
      if isinstance(item, Skipped):
        reasons.append(item.reason)
        if self._evaluation:  # keep the slot: every process must see the same batch count
          examples.append(None)
        elif len(reasons) > _MAX_SKIPS_PER_BATCH and not examples:
          # A repeated training split that is all bad would otherwise loop forever.
          raise RuntimeError(f'{len(reasons)} bad records in a row, e.g. {reasons[0]}; '
                             'the data looks broken.')
        continue
      examples.append(item)
    if self._evaluation:
      examples = self._fill(examples, reasons)
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch[_SKIPPED_KEY] = tuple(reasons)
    return batch

  def _fill(self, examples: list[Example | None], reasons: list[str]) -> list[Example]:
    """Pads skipped slots and a short last batch with copies marked valid=False."""
    good = [e for e in examples if e is not None]
    if not good:
      raise RuntimeError('every record of an evaluation batch is bad: ' + '; '.join(reasons))
    pad = {**good[-1], 'valid': np.bool_(False)}
    examples = [pad if e is None else e for e in examples]
    return examples + [pad] * (self._batch_size - len(examples))

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def __str__(self) -> str:
    return f'FullBatchIterator(batch_size={self._batch_size})'


class _CountingIterator(grain.DatasetIterator):
  """Counts skips in the main process; the counts are part of the iterator's state,
  so a resumed run reports the totals since its start, not since the resume."""

  def __init__(self, parent: grain.DatasetIterator, stats: PipelineStats):
    super().__init__(parent)
    self.stats = stats

  def __next__(self) -> Example:
    return self.stats.consume(next(self._parent))

  def get_state(self) -> dict[str, Any]:
    return {'pipeline': self._parent.get_state(), 'stats': self.stats.state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if set(state) != {'pipeline', 'stats'}:
      # Checkpoints written before the counts were saved hold the bare position.
      logging.warning('%s: the data iterator state has no skip counts; counting from 0.',
                      self.stats.name)
      self._parent.set_state(state)
      return
    self._parent.set_state(state['pipeline'])
    self.stats.restore(state['stats'])


class _Counting(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, stats: PipelineStats):
    super().__init__(parent)
    self._stats = stats

  def __iter__(self) -> _CountingIterator:
    return _CountingIterator(self._parent.__iter__(), self._stats)


class _FullBatches(grain.IterDataset):
  """Batches `batch_size` good examples, counting the skipped ones between them.

  Training drops the records that failed (batches stay full); evaluation keeps
  their slots as padding (valid=False) and pads the last batch, so every record
  is seen once and every process yields the same number of batches.
  """

  def __init__(self, parent: grain.IterDataset, batch_size: int, evaluation: bool):
    super().__init__(parent)
    self._batch_size = batch_size
    self._evaluation = evaluation

  def __iter__(self) -> _FullBatchIterator:
    return _FullBatchIterator(self._parent.__iter__(), self._batch_size, self._evaluation)

  def __str__(self) -> str:
    return f'FullBatches(batch_size={self._batch_size}, evaluation={self._evaluation})'


# ---- the pipeline ---------------------------------------------------------------


def _prompt_sizes(config: Any) -> dict[str, int] | None:
  """config.prompt's sizes that prompt records must match (None: no config.prompt)."""
  p = config.get('prompt')
  if p is None:
    return None
  return {k: int(p[k]) for k in ('max_tokens', 'entity_tokens', 'entity_size') if k in p}


def _prompt_kind_probs(config: Any) -> tuple[float, float, float] | None:
  """config.prompt.kind_probs checked (None: each record's own kind)."""
  p = config.get('prompt')
  probs = None if p is None else p.get('kind_probs')
  if probs is None:
    return None
  probs = tuple(float(x) for x in probs)
  if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
    raise ValueError(f'config.prompt.kind_probs={probs}: expected 3 non-negative numbers '
                     'summing to 1 (text only, images without words, images with words).')
  return probs


def make_dataset(config: Any, split: str, *, train: bool, process_index: int | None = None,
                 process_count: int | None = None,
                 source: Sequence[Mapping[str, Any]] | None = None,
                 stats: PipelineStats | None = None) -> grain.IterDataset:
  """The Grain dataset of this process's batches of `split`.

  train=True: shuffled, repeated forever, augmented. train=False: every record
  of the process's shard once, in order, batches padded to full size with
  `valid` False (shards are padded to the same length, so all processes yield
  the same number of batches). `source` overrides the TFDS source (tests).
  """
  d = config.data
  mods = modalities_lib.from_config(config.modalities)
  if d.on_bad_record not in ('raise', 'skip'):
    raise ValueError(f"config.data.on_bad_record={d.on_bad_record!r}: use 'raise' or 'skip'.")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  batch_size = per_process_batch_size(d.global_batch_size, process_count)
  cache = None
  if train and d.get('latent_cache'):  # SD-VAE moments written by data/latent_cache.py
    from mmgen_jax.data import latent_cache  # pylint: disable=g-import-not-at-top
    if d.augment.hflip or d.augment.crop_min_scale < 1.0:
      raise ValueError(
          f'config.data.latent_cache={d.latent_cache!r} holds the moments of unaugmented '
          f'images, which cannot be flipped or cropped exactly: set config.data.augment.hflip='
          f'False and crop_min_scale=1.0 (got {d.augment.hflip}, {d.augment.crop_min_scale}).')
    cache = latent_cache.Reader(config, split)
    source = cache.source() if source is None else source
  source = make_source(config, split) if source is None else source

  # Frozen-encoder tokens (0.79 MB a record at ImageNet-256) serve the REPA training loss
  # alone: evaluation never reads them, so they are not decoded, batched or sent to devices.
  # (A cache's records are bytes, parsed by its own field list, which drops them at coeff 0.)
  wanted = train and (cache is not None or config.objective.repa_coeff > 0)
  drop = () if wanted else (modalities_lib.REPA_FEATURES,)
  ds = grain.MapDataset.source(_IndexedSource(source, split, drop))
  num_records = len(ds)
  shard = shard_indices(num_records, process_index, process_count)
  ds = ds[shard.start:shard.stop:shard.step]
  if not len(ds):
    raise ValueError(f'split {split!r} has {num_records} records: too few for '
                     f'{process_count} processes.')
  if train:
    ds = ds.shuffle(seed=d.shuffle_seed).repeat()
  else:  # pad to the longest shard so every process makes the same number of batches
    longest = math.ceil(num_records / process_count)
    if len(ds) < longest:
      ds = grain.MapDataset.concatenate([ds, ds[:longest - len(ds)].map(_as_padding)])

  if cache is not None:  # records are ready model inputs: no decode, augment, normalise
    ds = ds.map(functools.partial(latent_cache.parse_stage, fields=cache.fields, split=split,
                                  shards=cache, skip=d.on_bad_record == 'skip'))
  else:
    ds = ds.map(functools.partial(
        _decode_stage, mods=mods, split=split, class_field=d.class_field,
        num_classes=d.num_classes, resolution=d.get('resolution'),
        skip=d.on_bad_record == 'skip', keep_valid=not train,
        prompt_sizes=_prompt_sizes(config)))
    probs = _prompt_kind_probs(config)
    if train and probs is not None:  # a new kind every epoch
      kind_seed = np.random.SeedSequence([d.shuffle_seed, process_index, 1]).generate_state(1)
      ds = ds.random_map(functools.partial(_prompt_kind_stage, probs=probs),
                         seed=int(kind_seed[0]))
    else:
      ds = ds.map(functools.partial(_prompt_kind_stage, probs=probs, seed=d.shuffle_seed))
    if train and (d.augment.hflip or d.augment.crop_min_scale < 1.0):
      if not 0.0 < d.augment.crop_min_scale <= 1.0:
        raise ValueError(f'config.data.augment.crop_min_scale={d.augment.crop_min_scale} must '
                         'lie in (0, 1].')
      # The augmentation RNG is drawn from (seed, position in this process's stream),
      # so it does not depend on the worker count.
      aug_seed = int(np.random.SeedSequence([d.shuffle_seed, process_index]).generate_state(1)[0])
      ds = ds.random_map(functools.partial(
          _augment_stage, mods=mods, flip=bool(d.augment.hflip),
          crop_min_scale=float(d.augment.crop_min_scale)), seed=aug_seed)
    ds = ds.map(functools.partial(_normalise_stage, mods=mods))

  read = grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.read_buffer_size)
  it = _FullBatches(ds.to_iter_dataset(read), batch_size, evaluation=not train)
  if d.worker_count > 0 and not flags.FLAGS.is_parsed():
    # Grain's workers read absl flags; outside an absl app (tests, notebooks) use defaults.
    flags.FLAGS.mark_as_parsed()
  it = it.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=d.worker_count, per_worker_buffer_size=d.worker_buffer_size))
  return _Counting(it, PipelineStats(split) if stats is None else stats)


def make_iterator(config: Any, split: str, *, train: bool, process_index: int | None = None,
                  process_count: int | None = None,
                  source: Sequence[Mapping[str, Any]] | None = None,
                  stats: PipelineStats | None = None) -> grain.DatasetIterator:
  """The checkpointable Grain iterator over this process's numpy batches.

  Its `stats` (a `PipelineStats`) count the batches and skipped records.
  """
  return iter(make_dataset(config, split, train=train, process_index=process_index,
                           process_count=process_count, source=source, stats=stats))


# ---- global batches ----------------------------------------------------------------


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                    rules: Any) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays, batch axis over the 'batch' rule's axes."""
  sharding = parallel.batch_sharding(mesh, rules)
  ways = parallel.batch_ways(mesh, rules)
  axes = sharding.spec[0] if len(sharding.spec) else ()
  out = {}
  for key, x in batch.items():
    global_size = x.shape[0] * jax.process_count()
    if global_size % ways:
      raise ValueError(f'batch[{key!r}]: global batch {global_size} does not split over mesh '
                       f'axes {axes} ({ways} ways); make config.data.global_batch_size a '
                       f'multiple of {ways}.')
    out[key] = jax.make_array_from_process_local_data(sharding, x)
  return out


def global_batches(iterator: Iterator[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh,
                   rules: Any) -> Iterator[dict[str, jax.Array]]:
  """Turns the per-process numpy batches of `iterator` into global jax.Arrays."""
  for batch in iterator:
    yield to_global_batch(batch, mesh, rules)


def summarize(batch: Mapping[str, Any]) -> str:
  """One line per key: shape, dtype and value range."""
  lines = []
  for key in sorted(batch):
    x = np.asarray(batch[key])
    if x.dtype == np.bool_:
      rng = f'{x.sum()}/{x.size} true'
    else:
      rng = f'[{x.min():.4g}, {x.max():.4g}]' if x.size else 'empty'
    lines.append(f'{key:>20s}  {str(x.dtype):8s} {str(x.shape):20s} {rng}')
  return '\n'.join(lines)
