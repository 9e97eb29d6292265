"""Generation metrics: class -> joint samples -> features -> FID, IS, precision/recall, scenes FD.

The job draws `config.eval.gen.num_samples` class-conditional JOINT samples
(sample i has class i mod num_classes, so the classes are balanced) with the
configured sampler and guidance (`config.sample.*`), `eval.gen.batch` at a
time as one global batch over the mesh (every device of every process samples
its part), decodes latents with the codec, and passes each batch through the
feature networks of `eval.gen.features` while it is still on the devices:

  inception  pytorch-fid's FID Inception-v3 on RGB (`eval.gen.inception_weights`,
             '' = skipped with a logged reason): pool3 (2048) and logits (1008)
             -> eval/gen/fid, eval/gen/is_mean, eval/gen/is_std,
                eval/gen/precision, eval/gen/recall (k = eval.gen.pr_k)
  scenes     the project's scenes feature network, one per image modality
             (models/scenes_features.py, trained on first use)
             -> eval/gen/scenes_fd/<modality>, and eval/gen/class_acc/<modality>:
                how often its label head reads the requested class off the sample
                (its own validation accuracy, in its config.json, is the ceiling)

Before any network sees them, samples are put in the form the dataset stores
(`to_data_format`): RGB clipped to [-1, 1] and rounded to 8 bits, as a saved
image would be (the fraction of values outside [-1, 1] is reported as
eval/gen/rgb_out_of_range_frac, nothing is clipped unseen); depth min-max
normalised per image, as the pipeline does; normals made unit length;
segmentation colours snapped to the nearest palette colour. Real images go
through the same function (a no-op on them up to float rounding).

Resumable: the features of every `eval.gen.shard_size` samples are written to
`<workdir>/eval/gen_features/<step>/shard_XXXXX.npz` (a temporary file, then a
rename), with a fingerprint of everything they depend on (sampler settings,
seed, batch, feature network weights). A restarted job loads the finished
shards whose fingerprint matches and samples only the rest; a sample's noise
depends only on the seed and its batch, so the scores are those of an
uninterrupted run.

Reference statistics: the real images of `eval.gen.reference_split` (up to
`eval.gen.reference_num`) through the same feature path, computed once and
cached in `<workdir>/eval/gen_reference/` (one .npz per dataset, split, count
and feature network fingerprint, holding the features for precision/recall),
or for FID a user file (`eval.gen.reference_stats`: pytorch-fid's or the ADM
evaluator's .npz, read by metrics.load_statistics; precision/recall then need
reference features the file does not hold, and are skipped with a logged
reason).

Several processes: the workdir must be shared (as Orbax checkpoints need);
process 0 writes, the others read after a barrier; every process ends with
every feature and computes the same scores.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmgen_jax import codec as codec_lib
from mmgen_jax import metrics as metrics_lib
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax.data import atomic_io
from mmgen_jax.data import palettes

FEATURE_NETS = ('inception', 'scenes')
POOL3, LOGITS = 'inception/pool3', 'inception/logits'
SCENES_CLASS = 'scenes_class'  # the scenes network's predicted class per sample and modality
SHARD_FORMAT = 2  # bumped when a shard's contents change: older shards are redone
Images = Mapping[str, jax.Array]


def scenes_key(name: str) -> str:
  return f'scenes/{name}'


# ---- samples in the dataset's form ----------------------------------------------------------


def to_data_format(x: jax.Array, m: modalities_lib.Modality) -> jax.Array:
  """A model-space image of modality `m` as the dataset stores it (see the module docstring)."""
  x = x.astype(jnp.float32)
  if m.encoding == 'depth':
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, 2.0 * (x - lo) / jnp.where(span > 0, span, 1.0) - 1.0, 0.0)
  if m.encoding == 'normal':
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  if m.encoding == 'segmentation':
    colours = jnp.asarray(palettes.get(m.palette), jnp.float32) / 127.5 - 1.0  # (K, 3)
    d = jnp.sum((x[..., None, :] - colours) ** 2, axis=-1)
    return colours[jnp.argmin(d, axis=-1)]
  # RGB and MMGen's 8-bit encodings: an 8-bit image file.
  return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


# ---- feature networks --------------------------------------------------------------------


@dataclasses.dataclass
class Extractor:
  """Feature networks on the mesh: images (model space, global) -> {key: (N, D) global}.

  The networks' states are replicated over the mesh; fn splits each image batch over
  the mesh's batch axes (config.sharding_rules) and returns features split the same way.
  """
  fn: Callable[[Images], dict[str, jax.Array]]
  keys: tuple[str, ...]
  fingerprints: dict[str, str]  # net -> weights fingerprint (keys the caches)
  skipped: dict[str, str]       # net -> why it is not computed
  states: dict[str, Any] = dataclasses.field(default_factory=dict)  # net -> placed state


def _rgb_modality(mods) -> modalities_lib.Modality:
  images = modalities_lib.images(mods)
  rgb = [m for m in images if m.encoding == 'rgb']
  return rgb[0] if rgb else images[0]


def _file_hash(path: str) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()[:12]


def requested_nets(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  nets = tuple(n.strip() for n in str(config.eval.gen.features).split(',') if n.strip())
  bad = [n for n in nets if n not in FEATURE_NETS]
  if bad or not nets:
    raise ValueError(f'config.eval.gen.features={config.eval.gen.features!r}: expected a comma '
                     f'list of {list(FEATURE_NETS)}.')
  return nets


def load_inception(path: str):
  from mmgen_jax.models import inception  # pylint: disable=g-import-not-at-top
  if str(path).endswith('.pth'):
    return inception.load_pytorch_fid_pth(path)
  return inception.load_safetensors(path)


def make_extractor(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh, *,
                   inception_model: Any = None, scenes_model: Any = None) -> Extractor:
  """The networks of `eval.gen.features`, replicated on the mesh; models may be injected."""
  mods = modalities_lib.from_config(config.modalities)
  images = modalities_lib.images(mods)
  rgb = _rgb_modality(mods)
  nets: dict[str, Any] = {}
  fingerprints, skipped = {}, {}
  for net in requested_nets(config):
    if net == 'inception':
      path = str(config.eval.gen.inception_weights)
      if inception_model is not None:
        nets[net], fingerprints[net] = inception_model, _state_hash(inception_model)
      elif not path:
        skipped[net] = ('config.eval.gen.inception_weights is empty (no FID Inception weights: '
                        'convert pt_inception-2015-12-05-6726825d.pth with python -m '
                        'mmgen_jax.models.inception)')
      else:
        nets[net], fingerprints[net] = load_inception(path), _file_hash(path)
    else:
      from mmgen_jax.models import scenes_features  # pylint: disable=g-import-not-at-top
      if scenes_model is not None:
        nets[net], fingerprints[net] = scenes_model, _state_hash(scenes_model)
      else:
        nets[net], fingerprints[net] = scenes_features.load_or_train(config, workdir)
  for net, why in skipped.items():
    logging.warning('generation metrics: %s features skipped: %s.', net, why)

  keys = []
  if 'inception' in nets:
    keys += [POOL3, LOGITS]
  if 'scenes' in nets:
    keys += [scenes_key(m.name) for m in images]
  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.batch_sharding(mesh, config.sharding_rules)
  graphs, states = {}, {}
  for net, model in nets.items():
    graphs[net], state = nnx.split(model)
    states[net] = jax.device_put(state, replicated)
  by_name = {m.name: m for m in images}

  # Every device runs the networks on its part of the batch (out: per-sample rows).
  @functools.partial(jax.jit, in_shardings=(replicated, batch_sharding),
                     out_shardings=batch_sharding)
  def extract(states, batch):
    out = {}
    data = {k: to_data_format(v, by_name[k]) for k, v in batch.items()}
    if 'inception' in states:
      model = nnx.merge(graphs['inception'], states['inception'])
      feats, logits = model.features_and_logits((data[rgb.name] + 1.0) / 2.0)
      out[POOL3], out[LOGITS] = feats, logits
    if 'scenes' in states:
      model = nnx.merge(graphs['scenes'], states['scenes'])
      feats, classes = model.features_and_classes(data)
      out.update({scenes_key(k): v for k, v in feats.items()})
      out.update({f'{SCENES_CLASS}/{k}': v for k, v in classes.items()})
    out['rgb_out_of_range'] = jnp.mean(jnp.abs(batch[rgb.name]) > 1.0, axis=(1, 2, 3))
    return out

  def fn(batch: Images) -> dict[str, jax.Array]:
    # Host arrays and arrays placed otherwise are moved to the batch sharding first.
    batch = jax.device_put({m.name: batch[m.name] for m in images}, batch_sharding)
    with jax.set_mesh(mesh):
      return extract(states, batch)

  return Extractor(fn, tuple(keys), fingerprints, skipped, states)


def _state_hash(model) -> str:
  h = hashlib.sha256()
  for path, v in nnx.to_flat_state(nnx.state(model)):
    h.update('/'.join(map(str, path)).encode())
    h.update(np.ascontiguousarray(np.asarray(v.get_value(), np.float32)).tobytes())
  return h.hexdigest()[:12]


# ---- small I/O helpers -------------------------------------------------------------------


def _agree(flag: bool) -> bool:
  """Process 0's answer, on every process (so all take the same branch of a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def write_npz(path: epath.Path, arrays: Mapping[str, np.ndarray]) -> None:
  """The whole .npz to a temporary name, then renamed: a reader never sees half a file."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_io.write_bytes(path, buf.getvalue())


def read_npz(path: epath.Path) -> dict[str, np.ndarray]:
  with path.open('rb') as f, np.load(f, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _gather(x: jax.Array) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---- generated features, shard by shard ---------------------------------------------------


def _fingerprint(config: ml_collections.ConfigDict, extractor: Extractor, step: int) -> str:
  from mmgen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  g = config.eval.gen
  return json.dumps({'format': SHARD_FORMAT, 'step': int(step), 'seed': int(config.seed),
                     'rng_impl': config.train.rng_impl, 'batch': int(g.batch),
                     'shard_size': int(g.shard_size), 'codec': config.codec.name,
                     'sample': samplers.settings_from_config(config),
                     'features': extractor.fingerprints}, sort_keys=True)


def check_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  g = config.eval.gen
  ways = parallel.batch_ways(mesh, config.sharding_rules)
  if int(g.batch) < 1 or int(g.batch) % ways:
    raise ValueError(f'config.eval.gen.batch={g.batch} must be a positive multiple of the '
                     f'{ways} ways the batch is split over the mesh.')
  if int(g.shard_size) < 1 or int(g.shard_size) % int(g.batch):
    raise ValueError(f'config.eval.gen.shard_size={g.shard_size} must be a positive multiple '
                     f'of config.eval.gen.batch={g.batch}.')
  if int(g.num_samples) < 2:
    raise ValueError(f'config.eval.gen.num_samples={g.num_samples}: need at least 2 samples '
                     'for feature statistics.')


def sample_classes(first: int, count: int, num_classes: int) -> np.ndarray:
  """The class of samples first ... first + count − 1: i mod num_classes (balanced)."""
  return ((first + np.arange(count)) % num_classes).astype(np.int32)


def make_sampler(config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh,
                 codec: codec_lib.Codec) -> Callable[[int], dict[str, jax.Array]]:
  """batch index -> {image modality: (batch, H, W, C) pixels in model space, global}.

  Batch b holds samples b·batch ... (b+1)·batch − 1 with classes i mod num_classes; its
  noise comes from (config.seed, b) alone.
  """
  from mmgen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  mods = modalities_lib.from_config(config.modalities)
  num_classes, b = int(config.data.num_classes), int(config.eval.gen.batch)
  sharding = parallel.batch_sharding(mesh, config.sharding_rules)
  settings = samplers.settings_from_config(config)
  shape = codec.model_shape(b, int(config.data.resolution))
  sample = jax.jit(lambda m, key, y: samplers.sample(
      m, key, mods=mods, shape=shape, channels=codec.model_channels(), y=y,
      num_classes=num_classes, **settings), out_shardings=sharding)
  key = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.train.rng_impl), 5)

  def draw(index: int) -> dict[str, jax.Array]:
    classes = sample_classes(index * b, b, num_classes)
    y = jax.make_array_from_callback(classes.shape, sharding, lambda i: classes[i])
    with jax.set_mesh(mesh):
      return codec.decode(sample(model, jax.random.fold_in(key, index), y))

  return draw


def shard_dir(workdir: str, step: int) -> epath.Path:
  return epath.Path(workdir) / 'eval' / 'gen_features' / f'{step:06d}'


def generate_features(config: ml_collections.ConfigDict, workdir: str, step: int,
                      draw: Callable[[int], Images], extractor: Extractor, *,
                      max_new_shards: int | None = None) -> dict[str, np.ndarray] | None:
  """{feature key: (num_samples, D)}, plus 'label' and 'rgb_out_of_range', over all shards.

  Finished shards with a matching fingerprint are read, not recomputed.
  max_new_shards: stop (returning None) after computing this many shards (a time budget).
  """
  g = config.eval.gen
  n, size, b = int(g.num_samples), int(g.shard_size), int(g.batch)
  fingerprint = _fingerprint(config, extractor, step)
  out_dir = shard_dir(workdir, step)
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
  num_shards = -(-n // size)
  shards, new, start, done_images = [], 0, time.time(), 0
  for s in range(num_shards):
    path = out_dir / f'shard_{s:05d}.npz'
    count = min(size, n - s * size)
    old = None
    if _agree(jax.process_index() == 0 and path.exists()):
      old = read_npz(path)
      if str(old.get('fingerprint')) != fingerprint or len(old['label']) != count:
        logging.warning('generation metrics: %s was computed with other settings: redone.', path)
        old = None
    if old is not None:
      shards.append(old)
      continue
    if max_new_shards is not None and new >= max_new_shards:
      logging.info('generation metrics: stopped after %d new shards (%d of %d done).', new, s,
                   num_shards)
      return None
    parts: dict[str, list[np.ndarray]] = {}
    first = s * size // b
    for index in range(first, first + -(-count // b)):
      feats = extractor.fn(draw(index))
      for k, v in feats.items():
        parts.setdefault(k, []).append(_gather(v))
      done_images += b
      rate = done_images / (time.time() - start)
      remaining = n - s * size - min(count, (index - first + 1) * b)
      logging.info('generation metrics: shard %d/%d, %d/%d samples, %.2f images/s, ETA %.0f s',
                   s + 1, num_shards, s * size + min(count, (index - first + 1) * b), n, rate,
                   remaining / rate)
    shard = {k: np.concatenate(v)[:count] for k, v in parts.items()}
    shard['label'] = sample_classes(s * size, count, int(config.data.num_classes))
    shard['fingerprint'] = np.asarray(fingerprint)
    if jax.process_index() == 0:
      write_npz(path, shard)
    _barrier(f'gen shard {s}')
    shards.append(shard)
    new += 1
  return {k: np.concatenate([sh[k] for sh in shards]) for k in shards[0] if k != 'fingerprint'}


# ---- reference features --------------------------------------------------------------------


def real_features(config: ml_collections.ConfigDict, split: str, limit: int,
                  extractor: Extractor, mesh: jax.sharding.Mesh,
                  keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Feature `keys` (default: all) of the real images of `split` (up to `limit`, 0 = all)."""
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  rules = parallel.rules_dict(config.sharding_rules)
  it = pipeline.make_iterator(config, split, train=False)
  parts: dict[str, list[np.ndarray]] = {}
  seen, start = 0, time.time()
  for batch in it:
    if limit and seen >= limit:
      break
    if not np.any(multihost_utils.process_allgather(np.asarray(batch['valid']))):
      break  # every process has run out of records (decided on the global batch)
    g = pipeline.to_global_batch(batch, mesh, rules)
    feats = extractor.fn(g)
    valid = _gather(g['valid'])
    for k in extractor.keys if keys is None else keys:
      parts.setdefault(k, []).append(_gather(feats[k])[valid])
    seen += int(valid.sum())
    logging.log_every_n_seconds(logging.INFO, 'generation metrics: reference %s, %d images, '
                                '%.1f images/s', 30, split, seen, seen / (time.time() - start))
  if seen == 0:
    raise ValueError(f'generation metrics: split {split!r} yielded no images for the reference.')
  out = {k: np.concatenate(v) for k, v in parts.items()}
  return {k: v[:limit] if limit else v for k, v in out.items()}


@dataclasses.dataclass
class Reference:
  """Per feature key: statistics, and the features where known (precision/recall)."""
  stats: dict[str, tuple[np.ndarray, np.ndarray]]
  features: dict[str, np.ndarray]
  num_images: int
  source: str


def reference_path(config: ml_collections.ConfigDict, workdir: str, net: str,
                   fingerprint: str) -> epath.Path:
  g = config.eval.gen
  num = int(g.reference_num) or 'all'
  name = (f'{config.data.name}_{config.data.builder_config}_{g.reference_split}_{num}_{net}_'
          f'{fingerprint}.npz')
  return epath.Path(workdir) / 'eval' / 'gen_reference' / name


def load_reference(config: ml_collections.ConfigDict, workdir: str, extractor: Extractor,
                   mesh: jax.sharding.Mesh) -> Reference:
  """Cached real features per network, computed once; or the user's FID statistics."""
  g = config.eval.gen
  stats, features, sources, num = {}, {}, [], 0
  user = str(g.reference_stats)
  for net in extractor.fingerprints:
    # Reference logits serve no score (IS is of the samples alone): not kept.
    keys = [k for k in extractor.keys if k.startswith(f'{net}/') and k != LOGITS]
    if net == 'inception' and user:
      stats[POOL3] = metrics_lib.load_statistics(user)
      sources.append(f'inception: {user}')
      continue
    path = reference_path(config, workdir, net, extractor.fingerprints[net])
    if _agree(jax.process_index() == 0 and path.exists()):
      cached = read_npz(path)
      sources.append(f'{net}: {path} (cached)')
    else:
      logging.info('generation metrics: reference features of %s for %s -> %s',
                   g.reference_split, net, path)
      cached = real_features(config, str(g.reference_split), int(g.reference_num), extractor,
                             mesh, keys)
      if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(path, cached)
      _barrier(f'gen reference {net}')
      sources.append(f'{net}: {path} (computed)')
    for k in keys:
      features[k] = cached[k]
      stats[k] = metrics_lib.feature_statistics(cached[k])
      num = len(cached[k])
  return Reference(stats, features, num, '; '.join(sources))


# ---- scores ------------------------------------------------------------------------------


def score(generated: Mapping[str, np.ndarray], reference: Reference,
          config: ml_collections.ConfigDict) -> dict[str, float]:
  """eval/gen/* from the generated features and the reference (pure)."""
  g = config.eval.gen
  out: dict[str, float] = {}
  if POOL3 in generated:
    gen = generated[POOL3]
    if POOL3 in reference.stats:
      out['eval/gen/fid'] = metrics_lib.frechet_distance(
          *metrics_lib.feature_statistics(gen), *reference.stats[POOL3])
    splits = min(int(g.is_splits), len(gen))
    if splits < int(g.is_splits):
      logging.warning('generation metrics: %d samples: Inception Score over %d splits, not %d.',
                      len(gen), splits, int(g.is_splits))
    out['eval/gen/is_mean'], out['eval/gen/is_std'] = metrics_lib.inception_score(
        generated[LOGITS], splits, inputs='logits')
    if POOL3 in reference.features:
      out['eval/gen/precision'], out['eval/gen/recall'] = metrics_lib.precision_recall(
          reference.features[POOL3], gen, k=int(g.pr_k))
    else:
      logging.warning('generation metrics: precision/recall skipped: the reference (%s) holds '
                      'statistics, not features.', reference.source)
  for k, v in generated.items():
    if k.startswith('scenes/'):
      out[f'eval/gen/scenes_fd/{k.split("/", 1)[1]}'] = metrics_lib.frechet_distance(
          *metrics_lib.feature_statistics(v), *reference.stats[k])
    if k.startswith(f'{SCENES_CLASS}/'):  # does the sample show the class it was asked for?
      out[f'eval/gen/class_acc/{k.split("/", 1)[1]}'] = float(np.mean(v == generated['label']))
  return out


def evaluate_generation(config: ml_collections.ConfigDict, workdir: str, model: Any, step: int,
                        mesh: jax.sharding.Mesh, *, extractor: Extractor | None = None,
                        max_new_shards: int | None = None) -> dict[str, float]:
  """The whole job: samples, features (resumable), reference, scores; {} when stopped early."""
  from mmgen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  check_sizes(config, mesh)
  extractor = extractor or make_extractor(config, workdir, mesh)
  if not extractor.keys:
    logging.warning('generation metrics: no feature network available (%s): nothing scored.',
                    extractor.skipped)
    return {}
  codec = codec_lib.from_config(config, mesh)
  draw = make_sampler(config, model, mesh, codec)
  generated = generate_features(config, workdir, step, draw, extractor,
                                max_new_shards=max_new_shards)
  if generated is None:
    return {}
  reference = load_reference(config, workdir, extractor, mesh)
  settings = samplers.settings_from_config(config)
  results = {'eval/gen/num_samples': float(len(generated['label'])),
             'eval/gen/reference_num': float(reference.num_images),
             'eval/gen/cfg_scale': settings['cfg_scale'],
             'eval/gen/num_steps': float(settings['num_steps']),
             'eval/gen/rgb_out_of_range_frac': float(np.mean(generated['rgb_out_of_range'])),
             **score(generated, reference, config)}
  logging.info('generation metrics (reference %s): %s', reference.source,
               {k: round(v, 4) for k, v in results.items()})
  return results
