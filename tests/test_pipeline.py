"""The Grain pipeline: normalisation, augmentation, determinism, state, sharding, bad records."""

import io

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import PIL.Image
import pytest

from mmgen_jax import config_schema
from mmgen_jax import modalities
from mmgen_jax import parallel
from mmgen_jax.data import palettes
from mmgen_jax.data import pipeline

from tests.conftest import SCENES_TEST_BUILD as BUILDER_CONFIG


@pytest.fixture(scope='session')
def data_dir(scenes_data_dir):
  return scenes_data_dir


def make_config(data_dir, **data):
  c = config_schema.base_config()
  c.modalities = config_schema.scenes_modalities(with_label_modality=True)
  c.data.builder_config = BUILDER_CONFIG
  c.data.data_dir = data_dir
  c.data.global_batch_size = 8
  c.data.augment.hflip = False
  c.data.augment.crop_min_scale = 1.0
  for k, v in data.items():
    if k in ('hflip', 'crop_min_scale'):
      c.data.augment[k] = v
    else:
      c.data[k] = v
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def mods():
  return modalities.from_config(config_schema.scenes_modalities(with_label_modality=True))


@pytest.fixture(scope='module')
def raw_example(data_dir, mods):
  """A decoded (raw) record with every modality, and the source record."""
  config = make_config(data_dir)
  record = pipeline.make_source(config, 'train')[7]
  ex = pipeline.decode_record(record, mods, split='train', index=7, num_classes=4, resolution=32)
  return ex


# ---- normalisation -----------------------------------------------------------------


def test_batch_keys_dtypes_and_ranges(data_dir):
  config = make_config(data_dir)
  src = pipeline.make_source(config, 'validation')
  batch = next(pipeline.make_iterator(config, 'validation', train=False))
  n = 8
  assert batch['rgb'].shape == (n, 32, 32, 3) and batch['rgb'].dtype == np.float32
  assert batch['depth'].shape == (n, 32, 32, 1) and batch['depth_raw'].shape == (n, 32, 32, 1)
  assert batch['normal'].shape == (n, 32, 32, 3)
  assert batch['segmentation'].shape == (n, 32, 32, 3)
  assert batch['segmentation_ids'].shape == (n, 32, 32)
  assert batch['segmentation_ids'].dtype == np.int32
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (n,)
  np.testing.assert_array_equal(batch['index'], np.arange(n))
  assert batch['valid'].all()
  for key in ('rgb', 'depth', 'normal', 'segmentation'):
    assert batch[key].min() >= -1.0 and batch[key].max() <= 1.0, key
  # Depth: per-image affine, min -> -1 and max -> +1; the raw metric depth is kept.
  d = batch['depth'].reshape(n, -1)
  np.testing.assert_allclose(d.min(1), -1.0)
  np.testing.assert_allclose(d.max(1), 1.0)
  for i in range(n):
    record = src[i]
    np.testing.assert_array_equal(batch['depth_raw'][i, ..., 0], record['depth'])
    np.testing.assert_array_equal(batch['segmentation_ids'][i], record['segmentation'])
    np.testing.assert_array_equal(batch['rgb'][i],
                                  np.asarray(PIL.Image.open(io.BytesIO(record['rgb'])),
                                             np.float32) / 127.5 - 1.0)
    assert batch['label'][i] == record['label'] == batch['label'][i]
  np.testing.assert_allclose(np.linalg.norm(batch['normal'], axis=-1), 1.0, atol=1e-5)
  # Segmentation colour map: exact palette colours that decode back to the ids.
  np.testing.assert_array_equal(
      palettes.ids_from_colors(batch['segmentation'], 'scenes'), batch['segmentation_ids'])


def test_constant_depth_normalises_to_zero(mods):
  ex = {'label': 1, 'index': 0, 'depth': np.full((4, 4), 3.0, np.float32),
        'rgb': np.zeros((4, 4, 3), np.uint8), 'normal': np.zeros((4, 4, 3), np.float32),
        'segmentation': np.zeros((4, 4), np.int32)}
  out = pipeline.normalise(ex, mods)
  np.testing.assert_array_equal(out['depth'], 0.0)
  np.testing.assert_array_equal(out['depth_raw'], 3.0)


# ---- augmentation ------------------------------------------------------------------


def test_hflip_mirrors_every_map_and_negates_normal_x(raw_example, mods):
  ex = raw_example
  flipped = pipeline.hflip(ex, mods)
  for key in ('rgb', 'depth', 'segmentation'):
    np.testing.assert_array_equal(flipped[key], ex[key][:, ::-1], err_msg=key)
  np.testing.assert_array_equal(flipped['normal'][..., 0], -ex['normal'][:, ::-1, 0])
  np.testing.assert_array_equal(flipped['normal'][..., 1:], ex['normal'][:, ::-1, 1:])
  assert flipped['label'] == ex['label']
  k, kf = ex['intrinsics'], flipped['intrinsics']
  assert kf[0, 2] == pytest.approx(31 - k[0, 2]) and kf[0, 0] == k[0, 0]
  # Flipped normals still face the camera along the flipped intrinsics' rays.
  i, j = np.mgrid[0:32, 0:32]
  rays = np.stack([(j - kf[0, 2]) / kf[0, 0], (i - kf[1, 2]) / kf[1, 1], np.ones((32, 32))], -1)
  assert (np.sum(flipped['normal'] * rays, -1) < 0).all()
  back = pipeline.hflip(flipped, mods)
  for key in ('rgb', 'depth', 'normal', 'segmentation', 'intrinsics'):
    np.testing.assert_array_equal(back[key], ex[key], err_msg=key)


def test_pipeline_flip_matches_the_unflipped_record(data_dir):
  """Same record through the pipeline with and without hflip: mirrored, normal x negated."""
  config = make_config(data_dir, hflip=True)
  batches = take(pipeline.make_iterator(config, 'train', train=True), 3)
  train_plain = take(pipeline.make_iterator(make_config(data_dir), 'train', train=True), 3)
  flips = 0
  for b, p in zip(batches, train_plain, strict=True):
    np.testing.assert_array_equal(b['index'], p['index'])  # same order: flips only
    for n in range(len(b['index'])):
      same = np.array_equal(b['rgb'][n], p['rgb'][n])
      if same:
        continue
      flips += 1
      np.testing.assert_array_equal(b['rgb'][n], p['rgb'][n][:, ::-1])
      np.testing.assert_array_equal(b['depth_raw'][n], p['depth_raw'][n][:, ::-1])
      np.testing.assert_array_equal(b['segmentation_ids'][n], p['segmentation_ids'][n][:, ::-1])
      np.testing.assert_array_equal(b['normal'][n][..., 0], -p['normal'][n][:, ::-1, 0])
      np.testing.assert_array_equal(b['normal'][n][..., 1:], p['normal'][n][:, ::-1, 1:])
  assert 0 < flips < 24  # about half of the 24 records


def test_crop_never_blends_segmentation_ids(raw_example, mods):
  ex = raw_example
  ids_in = set(np.unique(ex['segmentation']).tolist())
  depths_in = set(np.unique(ex['depth']).tolist())
  for box in [(0, 0, 16, 16), (5, 3, 21, 21), (10, 7, 13, 19), (0, 0, 32, 32)]:
    out = pipeline.crop_resize(ex, mods, box)
    assert out['segmentation'].shape == (32, 32) and out['rgb'].shape == (32, 32, 3)
    assert set(np.unique(out['segmentation']).tolist()) <= ids_in, box
    assert set(np.unique(out['depth']).tolist()) <= depths_in, box  # nearest: real depths only
    np.testing.assert_allclose(np.linalg.norm(out['normal'], axis=-1), 1.0, atol=1e-5)
    norm = pipeline.normalise(out, mods)
    colours = np.round((norm['segmentation'] + 1.0) * 127.5).astype(np.uint8)
    palette = {tuple(c) for c in palettes.get('scenes').tolist()}
    assert {tuple(c) for c in colours.reshape(-1, 3).tolist()} <= palette, box
    np.testing.assert_array_equal(palettes.ids_from_colors(norm['segmentation'], 'scenes'),
                                  norm['segmentation_ids'])
  full = pipeline.crop_resize(ex, mods, (0, 0, 32, 32))
  for key in ('rgb', 'depth', 'segmentation'):
    np.testing.assert_array_equal(full[key], ex[key], err_msg=key)


def test_crop_updates_intrinsics_consistently(raw_example, mods):
  top, left, h, w = 6, 4, 16, 16
  out = pipeline.crop_resize(raw_example, mods, (top, left, h, w))
  k, kc = raw_example['intrinsics'], out['intrinsics']
  # Output pixel (i, j) samples input coordinate (top + (i+.5) h/32 - .5, left + (j+.5) w/32 - .5):
  # both intrinsics must give it the same camera ray.
  for i, j in [(0, 0), (31, 31), (10, 20)]:
    y_in, x_in = top + (i + 0.5) * h / 32 - 0.5, left + (j + 0.5) * w / 32 - 0.5
    ray_in = [(x_in - k[0, 2]) / k[0, 0], (y_in - k[1, 2]) / k[1, 1]]
    ray_out = [(j - kc[0, 2]) / kc[0, 0], (i - kc[1, 2]) / kc[1, 1]]
    np.testing.assert_allclose(ray_out, ray_in, atol=1e-6)


def test_pipeline_crop_keeps_ids_exact(data_dir):
  config = make_config(data_dir, crop_min_scale=0.5, hflip=True)
  for b in take(pipeline.make_iterator(config, 'train', train=True), 3):
    np.testing.assert_array_equal(palettes.ids_from_colors(b['segmentation'], 'scenes'),
                                  b['segmentation_ids'])
    assert b['segmentation_ids'].max() < len(palettes.get('scenes'))
    d = b['depth'].reshape(len(b['depth']), -1)
    assert (d.min(1) == -1.0).all() and (d.max(1) == 1.0).all()  # normalised after the crop


# ---- determinism and state ------------------------------------------------------------


def test_same_seed_gives_identical_batches(data_dir):
  config = make_config(data_dir, crop_min_scale=0.6, hflip=True)
  a = take(pipeline.make_iterator(config, 'train', train=True), 4)  # 32 > 24: crosses an epoch
  b = take(pipeline.make_iterator(config, 'train', train=True), 4)
  for x, y in zip(a, b, strict=True):
    assert_batches_equal(x, y)
  config.data.shuffle_seed = 1
  c = take(pipeline.make_iterator(config, 'train', train=True), 1)
  assert not np.array_equal(a[0]['index'], c[0]['index'])
  epoch = np.concatenate([x['index'] for x in a])[:24]
  assert sorted(epoch.tolist()) == list(range(24))  # each record once per epoch


def test_iterator_state_resumes_exactly(data_dir):
  config = make_config(data_dir, crop_min_scale=0.6, hflip=True)
  it = pipeline.make_iterator(config, 'train', train=True)
  take(it, 2)
  state = it.get_state()
  expected = take(it, 3)
  resumed = pipeline.make_iterator(config, 'train', train=True)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 3), strict=True):
    assert_batches_equal(x, y)


# ---- evaluation and per-process batches ---------------------------------------------------


def test_evaluation_sees_every_record_once_with_padding(data_dir):
  config = make_config(data_dir, global_batch_size=6)
  seen, counts = [], []
  for p in range(2):
    batches = list(pipeline.make_iterator(config, 'validation', train=False,
                                          process_index=p, process_count=2))
    counts.append(len(batches))
    for b in batches:
      assert len(b['index']) == 3
      seen += b['index'][b['valid']].tolist()
  assert counts[0] == counts[1]
  assert sorted(seen) == list(range(8))


def test_batch_size_must_divide_over_processes(data_dir):
  with pytest.raises(ValueError, match='global_batch_size=8 is not divisible by the 3'):
    pipeline.make_dataset(make_config(data_dir), 'train', train=True, process_index=0,
                          process_count=3)


def test_shard_indices_are_disjoint_and_cover_the_split():
  shards = [set(pipeline.shard_indices(11, p, 3)) for p in range(3)]
  assert set.union(*shards) == set(range(11))
  assert sum(len(s) for s in shards) == 11


# ---- global batch sharding ---------------------------------------------------------------


def test_global_batch_is_sharded_over_data_and_fsdp(data_dir):
  assert jax.device_count() == 8
  config = make_config(data_dir, global_batch_size=8)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 2, 1
  mesh = parallel.make_mesh(config.mesh)
  it = pipeline.make_iterator(config, 'train', train=True)
  batch = next(pipeline.global_batches(it, mesh, config.sharding_rules))
  assert batch['rgb'].shape == (8, 32, 32, 3)
  assert batch['label'].shape == (8,)
  for key, x in batch.items():
    assert isinstance(x, jax.Array), key
    assert x.sharding.spec == P(('data', 'fsdp')), key
    assert len(x.sharding.device_set) == 8
    assert x.addressable_shards[0].data.shape[0] == 1, key  # one example per device
  bad = {'rgb': np.zeros((6, 2, 2, 3), np.float32)}
  with pytest.raises(ValueError, match='multiple of 8'):
    pipeline.to_global_batch(bad, mesh, config.sharding_rules)


# ---- bad records -------------------------------------------------------------------------


def _png(rgb):
  buf = io.BytesIO()
  PIL.Image.fromarray(rgb).save(buf, format='PNG')
  return buf.getvalue()


def _corrupt(record, case):
  r = dict(record)
  if case == 'undecodable image':
    r['rgb'] = b'\x89PNG not really'
    return r, 'rgb', 'undecodable image'
  if case == 'wrong shape':
    r['depth'] = r['depth'][:16]
    return r, 'depth', 'wrong shape (16, 32)'
  if case == 'non-finite depth':
    r['depth'] = r['depth'].copy()
    r['depth'][3, 4] = np.nan
    return r, 'depth', 'non-finite depth at 1 pixels'
  if case == 'zero-length normal':
    r['normal'] = r['normal'].copy()
    r['normal'][0, 0] = 0.0
    return r, 'normal', 'zero-length'
  if case == 'label out of range':
    r['label'] = 7
    return r, 'label', 'label 7 out of range [0, 4)'
  if case == 'missing modality':
    del r['normal']
    return r, 'normal', 'missing'
  if case == 'segmentation id outside the palette':
    r['segmentation'] = r['segmentation'].copy()
    r['segmentation'][1, 1] = 200
    return r, 'segmentation', 'palette'
  raise ValueError(case)


CASES = ['undecodable image', 'wrong shape', 'non-finite depth', 'zero-length normal',
         'label out of range', 'missing modality', 'segmentation id outside the palette']


@pytest.fixture(scope='module')
def records(data_dir):
  src = pipeline.make_source(make_config(data_dir), 'train')
  return [dict(src[i]) for i in range(12)]


@pytest.mark.parametrize('case', CASES)
def test_bad_record_raises_naming_split_index_and_field(records, data_dir, case):
  source = list(records)
  source[5], field, problem = _corrupt(records[5], case)
  config = make_config(data_dir, global_batch_size=4)
  it = pipeline.make_iterator(config, 'train', train=False, source=source)
  with pytest.raises(pipeline.BadRecordError) as e:
    take(it, 3)
  message = str(e.value)
  assert 'train[5]' in message and f"field '{field}'" in message and problem in message
  assert (e.value.split, e.value.index, e.value.field) == ('train', 5, field)


def _resumed(config, source, state):
  it = pipeline.make_iterator(config, 'train', train=True, source=source)
  it.set_state(state)
  return it


def test_skip_mode_counts_bad_records_and_keeps_batches_full(records, data_dir):
  source = list(records)
  bad = {2: 'undecodable image', 6: 'non-finite depth', 9: 'label out of range'}
  for i, case in bad.items():
    source[i] = _corrupt(records[i], case)[0]
  config = make_config(data_dir, global_batch_size=4, on_bad_record='skip')

  stats = pipeline.PipelineStats('train')
  it = pipeline.make_iterator(config, 'train', train=True, source=source, stats=stats)
  batches = take(it, 6)  # 24 good records: two epochs of 9 and a bit
  for b in batches:
    assert len(b['index']) == 4
    assert not set(b['index'].tolist()) & set(bad)
    assert '_skipped' not in b
  assert 6 <= stats.skipped <= 9  # all of the first two epochs' bad records, maybe a third's
  assert all(any(f'train[{i}]' in r for i in bad) for r in stats.reasons)
  assert 'bad records skipped' in stats.summary()

  # The counts are part of the iterator state: a resumed iterator carries them on.
  state = it.get_state()
  resumed = pipeline.make_iterator(config, 'train', train=True, source=source)
  resumed.set_state(state)
  assert (resumed.stats.batches, resumed.stats.skipped) == (6, stats.skipped)
  assert resumed.stats.reasons == stats.reasons
  take(resumed, 6)
  take(it, 6)
  assert resumed.stats.skipped == stats.skipped >= 12  # same stream, same totals
  # A position saved without the counts (older checkpoints) still resumes.
  legacy = pipeline.make_iterator(config, 'train', train=True, source=source)
  legacy.set_state(state['pipeline'])
  assert legacy.stats.skipped == 0
  np.testing.assert_array_equal(next(legacy)['index'], next(
      _resumed(config, source, state))['index'])

  stats = pipeline.PipelineStats('eval')
  batches = list(pipeline.make_iterator(config, 'train', train=False, source=source,
                                        stats=stats))
  assert stats.skipped == 3
  valid = np.concatenate([b['valid'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  assert len(valid) == 12 and valid.sum() == 9
  assert sorted(index[valid].tolist()) == sorted(set(range(12)) - set(bad))


def test_decode_record_accepts_arrays_and_png(records, mods):
  r = dict(records[0])
  rgb = pipeline.decode_record(r, mods, split='train', index=0, num_classes=4)['rgb']
  r['rgb'] = _png(rgb)
  again = pipeline.decode_record(r, mods, split='train', index=0, num_classes=4)['rgb']
  np.testing.assert_array_equal(rgb, again)
  r['rgb'] = rgb
  with pytest.raises(pipeline.BadRecordError, match="field 'rgb': wrong shape"):
    pipeline.decode_record(r, mods, split='train', index=0, num_classes=4, resolution=64)



def test_skip_mode_refuses_a_split_that_is_all_bad(records, data_dir):
  source = [_corrupt(r, 'label out of range')[0] for r in records]
  config = make_config(data_dir, global_batch_size=4, on_bad_record='skip')
  it = pipeline.make_iterator(config, 'train', train=True, source=source)
  with pytest.raises(RuntimeError, match="bad records in a row, e.g. train\\[.*field 'label'"):
    next(it)
