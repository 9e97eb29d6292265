r"""The latent cache: SD-VAE posterior moments of a split, computed once, read by training.

    python -m mmgen_jax.data.latent_cache --config=configs/tiny_cpu.py:latent --out=DIR \
        --config.codec.weights=VAE_DIR [--split=train] [--shard_size=1024] [--batch_size=N]

reads `split` of the configured TFDS dataset through the pipeline's own
`decode_record` + `normalise` (every modality in the [-1, 1] encoding the model
trains on; no augmentation), encodes every image modality with the VAE of
`config.codec` (a 1-channel map replicated to 3 channels, `codec.to_vae_input`)
on all of this process's devices (the batch split over them), and writes
ArrayRecord shards. Training reads them when `config.data.latent_cache=DIR`
(`pipeline.make_dataset`, train only): the step draws the latents from the
moments itself (`codec.wrap_loss`), so no VAE runs in the training loop.

DIR holds
  manifest.json                         identity, shard list, fields; written atomically
  <split>-<k>-of-<K>.array_record       shard k: source records [k·S, (k+1)·S)
  <split>-<k>-of-<K>.array_record.json  shard k's record count and skipped records

One record per source record (in index order; skipped bad records leave no
record), ArrayRecord `group_size:1`, each record in this file's format
(`serialize`; deterministic, no pickle):

    b'MMLC' | uint32 LE header length n | n bytes of UTF-8 JSON header | payload
    header  {"fields": [[name, dtype, shape, offset, nbytes], ...]}
    payload the arrays' C-order little-endian bytes at their offsets

and the fields
  <image modality>_moments  (h, w, 2·latent) [mean | logvar]
  label                     int32 () the class condition (config.data.class_field)
  <class modality>          int32 () each class modality
  index                     int32 () the record's index in its split (provenance)
  repa_features             (T, z) the `config.data.repa_encoder`'s tokens, or the records'
                            own `repa_features` when no encoder is configured; only
                            with config.objective.repa_coeff > 0 (else neither the
                            encoder runs nor the records' tokens are read)

(floats in config.data.latent_cache_dtype). Training with repa_coeff = 0 leaves a
cache's repa_features unread: they never reach a batch or a device.

Evaluation needs pixels (the RGB condition, the depth / normal / segment truth), so
it keeps reading the TFDS split; the cache holds only what training reads.

Precision: 'float32' (default) stores the VAE's float32 output exactly. 'float16'
halves the size (ImageNet-256 with DINOv2-B tokens: 0.92 MB a record in float32,
of which 0.79 MB are the tokens, so 1.18 TB for 1.28M images), but it rounds
each value by up to 2^-11 ≈ 4.9e-4 of itself: compare that on the means with
the posterior's own std exp(logvar / 2) for your VAE before choosing it. Either
way the batch holds float32.

Resuming: each shard is written under a temporary name, renamed when complete,
then its `.json` is written (atomically); a restarted job keeps every shard that
has both, deletes partial files and redoes their shards. The manifest names what
determines the contents (data and the TFDS dataset's version, modalities'
encodings, the VAE's weights by SHA-256 and its `codec.precision`, dtype, REPA
encoder, shard size); a job or a training run whose config or dataset differs is
refused, naming each difference. Several processes split the shards
(shard k is written by process k mod P); process 0 completes the manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import struct
import time
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from mmgen_jax import codec as codec_lib
from mmgen_jax import modalities as modalities_lib
from mmgen_jax.data import atomic_io

FORMAT = 'mmgen_latent_cache/1'
MANIFEST = 'manifest.json'
MAGIC = b'MMLC'
DTYPES = ('float32', 'float16')
WRITER_OPTIONS = 'group_size:1'  # one record per chunk: cheap random access for Grain
INDEX = 'index'
LABEL = 'label'


class CacheMismatchError(ValueError):
  """A latent cache written for another config (or incomplete, or damaged)."""


# ---- the record format ---------------------------------------------------------------


def serialize(example: Mapping[str, np.ndarray]) -> bytes:
  """Arrays -> bytes (module docstring); the same arrays always give the same bytes."""
  fields, chunks, offset = [], [], 0
  for name in sorted(example):
    x = np.asarray(example[name])  # tobytes() is C order whatever the layout
    if x.dtype.kind not in 'biuf':
      raise TypeError(f'field {name!r}: dtype {x.dtype} is not storable (bool, int, float).')
    x = x.astype(x.dtype.newbyteorder('<'), copy=False)
    data = x.tobytes()
    fields.append([name, x.dtype.str, list(x.shape), offset, len(data)])
    chunks.append(data)
    offset += len(data)
  header = json.dumps({'fields': fields}, separators=(',', ':')).encode()
  return MAGIC + struct.pack('<I', len(header)) + header + b''.join(chunks)


def deserialize(data: bytes) -> dict[str, np.ndarray]:
  """bytes -> arrays; raises ValueError naming what is wrong with damaged bytes."""
  data = bytes(data)
  if data[:4] != MAGIC:
    raise ValueError(f'not a latent cache record (starts {data[:4]!r}, expected {MAGIC!r}).')
  if len(data) < 8:
    raise ValueError(f'record of {len(data)} bytes is shorter than its 8-byte prefix.')
  (n,) = struct.unpack('<I', data[4:8])
  try:
    header = json.loads(data[8:8 + n])
  except ValueError as e:
    raise ValueError(f'unreadable record header: {e}') from None
  payload = memoryview(data)[8 + n:]
  out = {}
  for name, dtype, shape, offset, nbytes in header['fields']:
    if offset + nbytes > len(payload):
      raise ValueError(f'field {name!r} needs bytes [{offset}, {offset + nbytes}) of a '
                       f'{len(payload)}-byte payload (truncated record).')
    out[name] = np.frombuffer(payload[offset:offset + nbytes], np.dtype(dtype)).reshape(shape)
  return out


# ---- REPA encoders: images in [-1, 1] -> (B, T, z) tokens ---------------------------------

RepaEncoder = Callable[[Mapping[str, jax.Array]], jax.Array]
_REPA_ENCODERS: dict[str, Callable[[ml_collections.ConfigDict], RepaEncoder]] = {}


def register_repa_encoder(name: str):
  """Decorator: `factory(config) -> encode(images)` under `config.data.repa_encoder=name`.

  `encode` takes the batch's normalised images ({modality: (B, H, W, C)} in
  [-1, 1], sharded over the batch) and returns float (B, T, config.model.repa_z_dim)
  tokens, T = the model's token grid.
  """
  def register(factory):
    if name in _REPA_ENCODERS:
      raise ValueError(f'REPA encoder {name!r} is already registered.')
    _REPA_ENCODERS[name] = factory
    return factory
  return register


def repa_encoders() -> list[str]:
  return sorted(_REPA_ENCODERS)


def make_repa_encoder(config: ml_collections.ConfigDict) -> RepaEncoder | None:
  name = config.data.repa_encoder
  if not name:
    return None
  if name not in _REPA_ENCODERS:
    raise ValueError(f'config.data.repa_encoder={name!r} is not registered; registered: '
                     f'{repa_encoders()} (latent_cache.register_repa_encoder).')
  return _REPA_ENCODERS[name](config)


def wants_repa(config: ml_collections.ConfigDict) -> bool:
  """Whether REPA tokens are read at all (the REPA loss is on)."""
  return float(config.objective.repa_coeff) > 0


def token_grid(config: ml_collections.ConfigDict) -> int:
  """Tokens per side of the configured model."""
  down = codec_lib.DOWNSAMPLE if config.codec.name == 'sd_vae' else 1
  return int(config.data.resolution) // down // int(config.model.patch_size)


@register_repa_encoder('pooled_rgb_test')
def _pooled_rgb_test(config: ml_collections.ConfigDict) -> RepaEncoder:
  """A stand-in for tests and plumbing: the first image modality average-pooled to the
  token grid, projected to repa_z_dim by a fixed random matrix (seed 0). Not a
  representation worth aligning to."""
  side, z = token_grid(config), int(config.model.repa_z_dim)
  first = modalities_lib.images(modalities_lib.from_config(config.modalities))[0]
  res = int(config.data.resolution)
  if side < 1 or res % side:
    raise ValueError(f'pooled_rgb_test: resolution {res} does not pool to a {side}×{side} grid.')
  proj = np.random.default_rng(0).standard_normal((first.channels, z)).astype(np.float32)

  @jax.jit
  def encode(images):
    x = images[first.name]
    b, h, w, c = x.shape
    pooled = x.reshape(b, side, h // side, side, w // side, c).mean(axis=(2, 4))
    return pooled.reshape(b, side * side, c) @ proj

  return encode


@register_repa_encoder('dinov2')
def _dinov2(config: ml_collections.ConfigDict) -> RepaEncoder:
  """DINOv2 read from the transformers directory config.data.repa_encoder_weights: its
  normalised patch tokens of the first image modality (models/dinov2.py)."""
  from mmgen_jax.models import dinov2  # pylint: disable=g-import-not-at-top
  path = config.data.repa_encoder_weights
  if not path:
    raise FileNotFoundError("config.data.repa_encoder='dinov2' needs config.data."
                            'repa_encoder_weights: a local transformers Dinov2Model directory '
                            '(e.g. facebook/dinov2-base: config.json + model.safetensors).')
  model = dinov2.load_transformers_dir(path, antialias_positions=True)  # as MMGen's tokens
  if model.cfg.hidden_size != int(config.model.repa_z_dim):
    raise ValueError(f'{path}: DINOv2 tokens of width {model.cfg.hidden_size}; '
                     f'config.model.repa_z_dim is {config.model.repa_z_dim}.')
  encode = dinov2.repa_encoder(model, token_grid(config))
  first = modalities_lib.images(modalities_lib.from_config(config.modalities))[0]
  return lambda images: encode(images[first.name])


# ---- identity: what the cache's contents depend on -----------------------------------------


@functools.lru_cache(maxsize=8)
def _sha256_files(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
  del stamps  # part of the cache key only: a rewritten file is hashed again
  h = hashlib.sha256()
  for path in paths:
    h.update(os.path.basename(path).encode() + b'\0')
    with open(path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 22), b''):
        h.update(block)
  return h.hexdigest()


def vae_fingerprint(weights: str) -> str:
  """SHA-256 over the VAE's config.json and weight files (a directory or a .safetensors)."""
  weights = os.fspath(weights or '')
  if not weights:
    raise FileNotFoundError('config.codec.weights is empty; set it to the diffusers '
                            'AutoencoderKL directory (config.json + safetensors) of the VAE.')
  if os.path.isdir(weights):
    paths = sorted(p for p in glob.glob(os.path.join(weights, '*'))
                   if p.endswith(('.json', '.safetensors', '.bin')))
  elif os.path.isfile(weights):
    config_file = os.path.join(os.path.dirname(weights), 'config.json')
    paths = [weights] + ([config_file] if os.path.isfile(config_file) else [])
  else:
    raise FileNotFoundError(f'config.codec.weights={weights!r} is neither a directory nor a '
                            'file; the latent cache names the VAE by its weights.')
  if not paths:
    raise FileNotFoundError(f'config.codec.weights={weights!r} holds no config.json or weights.')
  stamps = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
  return _sha256_files(tuple(paths), stamps)


def dataset_version(config: ml_collections.ConfigDict) -> str:
  """The version of the TFDS dataset config.data names: the one the pipeline reads."""
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  d = config.data
  try:
    return str(pipeline.make_builder(config).version)
  except Exception as e:  # pylint: disable=broad-except  (named below)
    raise FileNotFoundError(
        f'config.data.name={d.name!r} (builder_config={d.builder_config!r}, data_dir='
        f'{d.data_dir!r}): no TFDS builder to read the dataset version from, which the latent '
        f'cache records: {e}') from None


def repa_fingerprint(config: ml_collections.ConfigDict) -> str:
  """SHA-256 over config.data.repa_encoder_weights (a directory's config and weight files,
  or one file); '' when the encoder has none."""
  path = os.fspath(config.data.get('repa_encoder_weights') or '')
  if not path:
    return ''
  if os.path.isdir(path):
    paths = sorted(p for p in glob.glob(os.path.join(path, '*'))
                   if p.endswith(('.json', '.safetensors', '.bin')))
  elif os.path.isfile(path):
    paths = [path]
  else:
    raise FileNotFoundError(f'config.data.repa_encoder_weights={path!r} is neither a directory '
                            'nor a file.')
  stamps = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
  return _sha256_files(tuple(paths), stamps)


def identity(config: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """Everything the cached values depend on (not loss weights, batch size, paths)."""
  d = config.data
  mods = modalities_lib.from_config(config.modalities)
  keep = ('slot', 'kind', 'encoding', 'channels', 'field', 'palette', 'color_seed')
  return {
      'format': FORMAT,
      'split': split,
      'data': {**{k: d[k] for k in ('name', 'builder_config', 'resolution', 'class_field',
                                    'num_classes')},
               'version': dataset_version(config)},  # another build may hold other labels
      'modalities': {m.name: {k: getattr(m, k) for k in keep} for m in mods},
      'codec': {'name': config.codec.name, 'latent_channels': int(config.codec.latent_channels),
                'vae_sha256': vae_fingerprint(config.codec.weights),
                # one bf16 pass ('default' on TPUs) and 'highest' give other moments
                'precision': str(config.codec.precision)},
      'dtype': d.latent_cache_dtype,
      'repa_encoder': d.repa_encoder,
      'repa_encoder_sha256': repa_fingerprint(config),
  }


def differences(written: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
  """'key: cache has X, config has Y' for every leaf that differs."""
  return atomic_io.differences(written, wanted,
                               '{key}: the cache has {written}, the config has {wanted}')


# ---- the manifest ----------------------------------------------------------------------


def shard_name(split: str, k: int, num_shards: int) -> str:
  return f'{split}-{k:05d}-of-{num_shards:05d}.array_record'


def read_manifest(directory: str) -> dict[str, Any] | None:
  return atomic_io.read_json(os.path.join(directory, MANIFEST))


def check_identity(manifest: Mapping[str, Any], wanted: Mapping[str, Any], directory: str,
                   what: str) -> None:
  diff = differences(manifest.get('identity', {}), wanted)
  if diff:
    raise CacheMismatchError(
        f'the latent cache {directory} was written for another config ({what}):\n  - '
        + '\n  - '.join(diff) + '\nWrite a new cache (another --out) for this config, or '
        'point config.data.latent_cache at the one that matches.')


# ---- the job ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Progress:
  total: int
  done: int = 0
  start: float = dataclasses.field(default_factory=time.perf_counter)
  last_log: float = 0.0

  def add(self, n: int, force: bool = False) -> None:
    self.done += n
    now = time.perf_counter()
    if force or now - self.last_log > 30.0:
      self.last_log = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float('inf')
      logging.info('latent cache: %d/%d records, %.1f images/s, ETA %.0f s.', self.done,
                   self.total, rate, eta)


def _local_mesh() -> jax.sharding.Mesh:
  """This process's devices: every shard is encoded by one process, no collectives."""
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  return parallel.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}),
                            jax.local_devices())


class _Encoder:
  """Normalised image batches -> moments (and REPA tokens) on this process's devices."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.mesh = mesh
    self.codec = codec_lib.from_config(config, mesh)
    if self.codec.is_identity:
      raise ValueError("the latent cache needs config.codec.name='sd_vae' (it stores VAE "
                       f'moments); got {config.codec.name!r}.')
    self.repa = make_repa_encoder(config) if wants_repa(config) else None
    self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))

  def __call__(self, images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = {k: jax.device_put(v, self.sharding) for k, v in images.items()}
    with jax.set_mesh(self.mesh):
      out = {k: v for k, v in self.codec.add_moments(x).items() if k.endswith('_moments')}
      if self.repa is not None:
        out[modalities_lib.REPA_FEATURES] = self.repa(x)
    return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}


def _load(i: int, *, source, mods, split: str, class_field: str, num_classes: int,
          resolution: int, skip: bool, record_repa: bool):
  """Record i -> (i, normalised example, None), or (i, None, reason) in skip mode.

  record_repa: decode the record's own repa_features (else they are left unread).
  """
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    try:
      record = source[i]
    except Exception as e:  # pylint: disable=broad-except  (named per record)
      raise pipeline.BadRecordError(split, i, '<record>', f'cannot be read: {e!r}') from None
    if not record_repa and modalities_lib.REPA_FEATURES in record:
      record = {k: v for k, v in record.items() if k != modalities_lib.REPA_FEATURES}
    raw = pipeline.decode_record(record, mods, split=split, index=i, class_field=class_field,
                                 num_classes=num_classes, resolution=resolution)
    return i, pipeline.normalise(raw, mods), None
  except pipeline.BadRecordError as e:
    if not skip:
      raise
    logging.warning('latent cache: skipped %s', e.where)
    return i, None, e.where


def _examples(config, source, split: str, indices: range, skip: bool):
  """`_load` over `indices` in order, decoded by config.data.read_threads threads."""
  import grain  # pylint: disable=g-import-not-at-top
  d = config.data
  mods = modalities_lib.from_config(config.modalities)
  load = functools.partial(_load, source=source, mods=mods, split=split,
                           class_field=d.class_field, num_classes=d.num_classes,
                           resolution=d.resolution, skip=skip,
                           # an encoder's tokens replace the records' own
                           record_repa=wants_repa(config) and not d.repa_encoder)
  ds = grain.MapDataset.range(indices.start, indices.stop).map(load)
  read = grain.ReadOptions(num_threads=max(1, d.read_threads),
                           prefetch_buffer_size=max(1, d.read_buffer_size))
  return iter(ds.to_iter_dataset(read))


def _record(example: Mapping[str, Any], encoded: Mapping[str, np.ndarray], row: int,
            mods: Sequence[modalities_lib.Modality], dtype: str, split: str, skip: bool):
  """One record's arrays, or the reason it is bad (non-finite moments or features)."""
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  out = {INDEX: np.int32(example[INDEX]), LABEL: np.int32(example[LABEL])}
  for m in mods:
    if not m.is_image:
      out[m.name] = np.int32(example[m.name])
  arrays = {key: values[row] for key, values in encoded.items()}
  if modalities_lib.REPA_FEATURES not in arrays and modalities_lib.REPA_FEATURES in example:
    arrays[modalities_lib.REPA_FEATURES] = example[modalities_lib.REPA_FEATURES]
  for key, x in arrays.items():
    stored = np.asarray(x).astype(dtype)
    if not np.isfinite(stored).all():
      what = ('non-finite' if not np.isfinite(x).all()
              else f'beyond the range of {dtype} (max |x| = {np.abs(x).max():.4g})')
      e = pipeline.BadRecordError(split, int(example[INDEX]), key,
                                  f'{(~np.isfinite(stored)).sum()} values {what}')
      if not skip:
        raise e
      return None, e.where
    out[key] = stored
  return out, None


def _write_shard(config, source, split: str, k: int, num_shards: int, shard_size: int,
                 num_records: int, out_dir: str, encoder: _Encoder, batch_size: int,
                 progress: _Progress) -> dict[str, Any]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  d = config.data
  skip = d.on_bad_record == 'skip'
  mods = modalities_lib.from_config(config.modalities)
  image_names = [m.name for m in modalities_lib.images(mods)]
  indices = range(k * shard_size, min((k + 1) * shard_size, num_records))
  name = shard_name(split, k, num_shards)
  final = os.path.join(out_dir, name)
  tmp = f'{final}.tmp-{os.getpid()}'
  writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  written, skipped, fields = 0, [], {}
  pending: list[dict[str, Any]] = []

  def flush():
    nonlocal written
    if not pending:
      return
    n = len(pending)
    # Padded to a full batch with copies of the first: one compiled shape per job.
    batch = {name: np.stack([pending[j if j < n else 0][name] for j in range(batch_size)])
             for name in image_names}
    encoded = encoder(batch)
    for row, example in enumerate(pending):
      rec, why = _record(example, encoded, row, mods, d.latent_cache_dtype, split, skip)
      if rec is None:
        skipped.append({'index': int(example[INDEX]), 'where': why})
        continue
      for key, x in rec.items():
        fields.setdefault(key, {'dtype': str(x.dtype), 'shape': list(x.shape)})
      writer.write(serialize(rec))
      written += 1
    progress.add(n)
    pending.clear()

  try:
    for i, example, why in _examples(config, source, split, indices, skip):
      if example is None:
        skipped.append({'index': i, 'where': why})
        progress.add(1)
        continue
      pending.append(example)
      if len(pending) == batch_size:
        flush()
    flush()
  finally:
    writer.close()
  os.replace(tmp, final)
  info = {'file': name, 'first_index': indices.start, 'source_records': len(indices),
          'records': written, 'skipped': skipped, 'fields': fields}
  atomic_io.write_json(final + '.json', info)
  progress.add(0, force=True)
  return info


def _finished(out_dir: str, name: str) -> dict[str, Any] | None:
  path = os.path.join(out_dir, name)
  if not os.path.exists(path):
    return None
  return atomic_io.read_json(path + '.json')


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def build(config: ml_collections.ConfigDict, out_dir: str, *, split: str | None = None,
          shard_size: int = 1024, batch_size: int | None = None, max_shards: int | None = None,
          source: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any] | None:
  """Writes (or completes) the latent cache of `split` in `out_dir`; returns the manifest.

  batch_size: records encoded at once by this process (default: its share of
  config.data.global_batch_size, rounded up to a multiple of its devices).
  max_shards: stop after writing that many shards (returns None: unfinished; the
  same call resumes). source: overrides the TFDS source (tests).
  """
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  d = config.data
  split = split or d.train_split
  if d.latent_cache_dtype not in DTYPES:
    raise ValueError(f'config.data.latent_cache_dtype={d.latent_cache_dtype!r} is not one of '
                     f'{list(DTYPES)}.')
  if d.on_bad_record not in ('raise', 'skip'):
    raise ValueError(f"config.data.on_bad_record={d.on_bad_record!r}: use 'raise' or 'skip'.")
  if shard_size < 1:
    raise ValueError(f'--shard_size={shard_size} must be >= 1.')
  if max_shards is not None and jax.process_count() > 1:
    # A process that stops early would leave the others waiting at the final barrier.
    raise ValueError(f'--max_shards={max_shards} works in one process only; this job runs in '
                     f'{jax.process_count()}.')
  if config.codec.name != 'sd_vae':
    raise ValueError("the latent cache needs config.codec.name='sd_vae' (it stores VAE "
                     f'moments); got {config.codec.name!r}.')
  if d.repa_encoder and not wants_repa(config):
    logging.warning('latent cache: config.data.repa_encoder=%r is not run: '
                    'config.objective.repa_coeff=0, so no repa_features are cached.',
                    d.repa_encoder)
  source = pipeline.make_source(config, split) if source is None else source
  num_records = len(source)
  num_shards = math.ceil(num_records / shard_size)
  wanted = identity(config, split)
  layout = {'num_source_records': num_records, 'shard_size': shard_size,
            'num_shards': num_shards}
  os.makedirs(out_dir, exist_ok=True)

  manifest = read_manifest(out_dir)
  if manifest is not None:
    check_identity(manifest, wanted, out_dir, f'resuming into --out={out_dir}')
    diff = differences(manifest.get('layout', {}), layout)
    if diff:
      raise CacheMismatchError(f'the latent cache {out_dir} has another shard layout:\n  - '
                               + '\n  - '.join(diff) + '\nUse the same --shard_size (and '
                               'dataset) to resume, or another --out.')
    if manifest.get('complete'):
      logging.info('latent cache %s is complete (%d records).', out_dir, manifest['num_records'])
      return manifest
  elif jax.process_index() == 0:
    atomic_io.write_json(os.path.join(out_dir, MANIFEST),
                       {'identity': wanted, 'layout': layout, 'complete': False})
  _barrier('mmgen_latent_cache_started')

  p, num_p = jax.process_index(), jax.process_count()
  names = [shard_name(split, k, num_shards) for k in range(num_shards)]
  mine = [k for k in range(num_shards) if k % num_p == p]
  for k in mine:  # partial files of an interrupted run: their shards are redone
    for stale in glob.glob(os.path.join(out_dir, names[k]) + '*.tmp-*'):
      logging.info('latent cache: removing the partial %s', stale)
      os.remove(stale)
  todo = [k for k in mine if _finished(out_dir, names[k]) is None]
  logging.info('latent cache %s: %d records of %s in %d shards; this process writes %d '
               '(%d already done).', out_dir, num_records, split, num_shards, len(todo),
               len(mine) - len(todo))

  if todo:
    mesh = _local_mesh()
    devices = mesh.devices.size
    if batch_size is None:
      batch_size = max(1, int(d.global_batch_size) // num_p)
    batch_size = devices * math.ceil(batch_size / devices)
    encoder = _Encoder(config, mesh)
    total = sum(min((k + 1) * shard_size, num_records) - k * shard_size for k in todo)
    progress = _Progress(total)
    for n, k in enumerate(todo):
      if max_shards is not None and n >= max_shards:
        logging.warning('latent cache: stopping after %d shard(s) (max_shards); run again to '
                        'finish.', max_shards)
        return None
      _write_shard(config, source, split, k, num_shards, shard_size, num_records, out_dir,
                   encoder, batch_size, progress)

  _barrier('mmgen_latent_cache_written')
  if p != 0:
    return None
  shards = [_finished(out_dir, name) for name in names]
  missing = [name for name, s in zip(names, shards) if s is None]
  if missing:
    raise RuntimeError(f'latent cache {out_dir}: shards {missing} are not finished although '
                       'every process is done; run the job again.')
  fields = {}
  for s in shards:
    fields.update(s['fields'])
  skipped = [x for s in shards for x in s['skipped']]
  manifest = {'identity': wanted, 'layout': layout, 'complete': True,
              'num_records': sum(s['records'] for s in shards), 'fields': fields,
              'skipped': skipped, 'shards': [{k: s[k] for k in ('file', 'first_index',
                                                                'source_records', 'records')}
                                             for s in shards]}
  atomic_io.write_json(os.path.join(out_dir, MANIFEST), manifest)
  if skipped:
    logging.warning('latent cache: %d bad records skipped, e.g. %s', len(skipped),
                    skipped[0]['where'])
  logging.info('latent cache %s complete: %d records in %d shards.', out_dir,
               manifest['num_records'], num_shards)
  return manifest


# ---- reading (the training pipeline) ---------------------------------------------------------


class Reader:
  """A complete cache checked against the config: its shards, fields and record names."""

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    d = config.data
    self.directory = os.fspath(d.latent_cache)
    manifest = read_manifest(self.directory)
    if manifest is None:
      raise FileNotFoundError(
          f'config.data.latent_cache={self.directory!r} has no {MANIFEST}; write the cache with '
          f'`python -m mmgen_jax.data.latent_cache --config=... --out={self.directory}`.')
    check_identity(manifest, identity(config, split), self.directory,
                   'config.data.latent_cache')
    if not manifest.get('complete'):
      raise CacheMismatchError(f'the latent cache {self.directory} is unfinished (its job was '
                               'interrupted); run the same latent_cache command again to finish.')
    self.manifest = manifest
    # Records the cache job skipped never reach training: say so once, with the first.
    self.num_skipped = len(manifest.get('skipped') or ())
    if self.num_skipped:
      logging.warning('latent cache %s: %d source records were skipped when it was written '
                      '(bad records; first: %s); training reads the rest.', self.directory,
                      self.num_skipped, manifest['skipped'][0])
    self.fields = {k: (np.dtype(v['dtype']), tuple(v['shape']))
                   for k, v in manifest['fields'].items()}
    mods = modalities_lib.from_config(config.modalities)
    need = [codec_lib.moments_field(m.name) for m in modalities_lib.images(mods)]
    need += [m.name for m in mods if not m.is_image] + [LABEL, INDEX]
    if wants_repa(config):
      need.append(modalities_lib.REPA_FEATURES)
    else:  # left in the records: never checked, converted, batched or placed on a device
      self.fields.pop(modalities_lib.REPA_FEATURES, None)
    missing = [k for k in need if k not in self.fields]
    if missing:
      why = (' (a cache written with config.objective.repa_coeff=0 holds none)'
             if modalities_lib.REPA_FEATURES in missing else '')
      raise CacheMismatchError(f'the latent cache {self.directory} lacks fields {missing}{why} '
                               f'(it holds {sorted(self.fields)}).')
    repa = self.fields.get(modalities_lib.REPA_FEATURES)
    want = (token_grid(config) ** 2, int(config.model.repa_z_dim))
    if repa is not None and repa[1] != want:
      raise CacheMismatchError(
          f'the latent cache {self.directory} holds repa_features of shape {repa[1]}; the '
          f'model takes (tokens, config.model.repa_z_dim) = {want}.')
    self.paths = [os.path.join(self.directory, s['file']) for s in manifest['shards']
                  if s['records']]
    self.ends = np.cumsum([s['records'] for s in manifest['shards'] if s['records']])
    for path in self.paths:
      if not os.path.exists(path):
        raise FileNotFoundError(f'latent cache shard {path} is missing (listed in {MANIFEST}).')

  def source(self):
    import grain  # pylint: disable=g-import-not-at-top
    if not self.paths:
      raise ValueError(f'the latent cache {self.directory} holds no records.')
    return grain.sources.ArrayRecordDataSource(self.paths)

  def where(self, position: int) -> str:
    """The shard file and record of a cache position (for error messages)."""
    k = int(np.searchsorted(self.ends, position, side='right'))
    first = int(self.ends[k - 1]) if k else 0
    return f'{os.path.basename(self.paths[k])} record {position - first}'


def parse_stage(item: tuple[int, Any, bool], *, fields: Mapping[str, tuple[np.dtype, tuple]],
                split: str, shards: Any, skip: bool):
  """(position, bytes, valid) -> a training example; a damaged record is named.

  Moments become float32; the example holds the manifest's fields only.
  """
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  position, data, _ = item

  source_index = None

  def bad(field: str, problem: str) -> pipeline.BadRecordError:
    if source_index is not None:
      problem = f'{problem} (source record {split}[{source_index}])'
    return pipeline.BadRecordError(
        f'latent cache {shards.directory}: {shards.where(position)}, position', position,
        field, problem)
  try:
    if isinstance(data, pipeline.BadRecordError):
      raise bad('<record>', data.problem)
    try:
      example = deserialize(data)
    except (ValueError, KeyError, TypeError) as e:
      raise bad('<record>', str(e)) from None
    if INDEX in example and example[INDEX].shape == ():
      source_index = int(example[INDEX])
    out = {}
    for key, (dtype, shape) in fields.items():
      if key not in example:
        raise bad(key, f'missing (the record has {sorted(example)})')
      x = example[key]
      if x.dtype != dtype or x.shape != shape:
        raise bad(key, f'{x.dtype}{list(x.shape)}; the manifest says {dtype}{list(shape)}')
      if x.dtype.kind == 'f':
        if not np.isfinite(x).all():
          raise bad(key, f'{(~np.isfinite(x)).sum()} non-finite values')
        x = x.astype(np.float32)
      out[key] = x
    return out
  except pipeline.BadRecordError as e:
    if not skip:
      raise
    return pipeline.Skipped(e.where)


# ---- the command line ---------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _OUT.value:
    raise app.UsageError('--out is required (the cache directory).')
  parallel.initialize_distributed()
  try:
    build(_CONFIG.value, _OUT.value, split=_SPLIT.value or None, shard_size=_SHARD_SIZE.value,
          batch_size=_BATCH_SIZE.value, max_shards=_MAX_SHARDS.value)
  except (CacheMismatchError, FileNotFoundError) as e:  # a request to fix, not a crash
    raise SystemExit(f'latent_cache: {e}') from e


if __name__ == '__main__':
  # Flags only here: the training pipeline imports this module beside main.py's flags.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                            lock_config=True)
  _OUT = flags.DEFINE_string('out', None, 'The cache directory (created; resumed if present).')
  _SPLIT = flags.DEFINE_string('split', '',
                               'The split to encode (default config.data.train_split).')
  _SHARD_SIZE = flags.DEFINE_integer('shard_size', 1024, 'Source records per shard.')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Records encoded at once per process '
                                     '(default: its share of config.data.global_batch_size).')
  _MAX_SHARDS = flags.DEFINE_integer('max_shards', None, 'Stop after writing this many shards '
                                     '(the same command resumes).')
  flags.mark_flag_as_required('config')
  app.run(main)
