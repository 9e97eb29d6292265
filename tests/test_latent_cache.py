"""The latent cache: moments as the VAE encodes the pipeline's images, resuming, refusals,
bad records, and training from it."""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mmgen_jax import codec as codec_lib
from mmgen_jax import config_validation
from mmgen_jax.data import latent_cache
from mmgen_jax.data import pipeline
from tests.conftest import SCENES_TEST_BUILD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The SD architecture's four blocks (8× down) with 8 channels each: 32 px -> 4×4 latents.
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 8, 8],
                layers_per_block=1, norm_num_groups=4, act_fn='silu', sample_size=32,
                scaling_factor=0.18215, down_block_types=['DownEncoderBlock2D'] * 4,
                up_block_types=['UpDecoderBlock2D'] * 4)
SHARD_SIZE = 10  # 24 train records -> shards of 10, 10, 4
IMAGES = ('rgb', 'depth', 'normal', 'segmentation')


def _vae_dir(path, seed):
  from mmgen_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  autoencoder.save_diffusers_dir(autoencoder.create(TINY_VAE, seed=seed), path)
  return str(path)


@pytest.fixture(scope='module')
def vae_dir(tmp_path_factory):
  return _vae_dir(tmp_path_factory.mktemp('vae'), seed=3)


def make_config(data_dir, vae, **data):
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  config = tiny_cpu.get_config('latent')
  config.codec.weights = vae
  config.data.builder_config, config.data.data_dir = SCENES_TEST_BUILD, data_dir
  config.data.global_batch_size = 8
  config.data.augment.hflip = False
  config.data.repa_encoder = 'pooled_rgb_test'
  config.model.repa_z_dim = 16
  config.objective.repa_coeff = 0.5  # the tokens are cached for the REPA loss only
  for k, v in data.items():
    config.data[k] = v
  return config


@pytest.fixture(scope='module')
def cache_dir(scenes_data_dir, vae_dir, tmp_path_factory):
  """The train split cached in one uninterrupted run."""
  out = str(tmp_path_factory.mktemp('cache'))
  manifest = latent_cache.build(make_config(scenes_data_dir, vae_dir), out, shard_size=SHARD_SIZE)
  assert manifest['complete'] and manifest['num_records'] == 24
  return out


def _records(directory):
  reader_paths = sorted(glob.glob(os.path.join(directory, 'train-*.array_record')))
  import grain  # pylint: disable=g-import-not-at-top
  src = grain.sources.ArrayRecordDataSource(reader_paths)
  return [latent_cache.deserialize(src[i]) for i in range(len(src))]


def _sha(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


# ---- the record format -------------------------------------------------------------


def test_records_round_trip_bit_for_bit_and_name_damage():
  rng = np.random.default_rng(0)
  example = {'rgb_moments': rng.normal(size=(4, 4, 8)).astype(np.float16),
             'label': np.int32(3), 'index': np.int32(17),
             'repa_features': rng.normal(size=(16, 5)).astype(np.float32)[:, ::2]}
  data = latent_cache.serialize(example)
  back = latent_cache.deserialize(data)
  assert sorted(back) == sorted(example)
  for k, x in example.items():
    assert back[k].dtype == np.asarray(x).dtype and back[k].shape == np.shape(x), k
    np.testing.assert_array_equal(back[k], x)
  assert latent_cache.serialize(back) == data  # deterministic: a rerun writes the same bytes
  with pytest.raises(ValueError, match='truncated record'):
    latent_cache.deserialize(data[:-4])
  with pytest.raises(ValueError, match='not a latent cache record'):
    latent_cache.deserialize(b'PK\x03\x04' + data[4:])


# ---- the job -----------------------------------------------------------------------


def test_cached_moments_are_the_vae_encoding_of_the_pipeline_images(
    cache_dir, scenes_data_dir, vae_dir):
  from mmgen_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  config = make_config(scenes_data_dir, vae_dir)
  manifest = latent_cache.read_manifest(cache_dir)
  assert [s['records'] for s in manifest['shards']] == [10, 10, 4]
  assert manifest['fields']['rgb_moments'] == {'dtype': 'float32', 'shape': [4, 4, 8]}
  assert manifest['fields']['repa_features'] == {'dtype': 'float32', 'shape': [16, 16]}
  records = _records(cache_dir)
  assert [int(r['index']) for r in records] == list(range(24))

  # The pipeline's unaugmented images of records 0..7, encoded here one modality at a time.
  batch = next(pipeline.make_iterator(config, 'train', train=False))
  vae = autoencoder.load_diffusers_dir(vae_dir)
  for name in IMAGES:
    mean, logvar = vae.encode(codec_lib.to_vae_input(batch[name], 3))
    want = np.concatenate([mean, logvar], -1)
    got = np.stack([records[i][f'{name}_moments'] for i in range(8)])
    # XLA on CPU computes a batch of 8 and 8 batches of 1 up to ~4e-6 apart (measured: the
    # VAE's moments are O(1)); the cache encodes over 8 devices, one record each.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.abs(want).max() > 0.1  # not trivially zero
  np.testing.assert_array_equal([r['label'] for r in records[:8]], batch['label'])
  encoder = latent_cache.make_repa_encoder(config)
  np.testing.assert_allclose(np.stack([r['repa_features'] for r in records[:8]]),
                             encoder({'rgb': batch['rgb']}), rtol=1e-6, atol=1e-6)


def test_float16_records_are_the_float32_values_rounded(cache_dir, scenes_data_dir, vae_dir,
                                                        tmp_path):
  out = str(tmp_path / 'f16')
  config = make_config(scenes_data_dir, vae_dir, latent_cache_dtype='float16')
  manifest = latent_cache.build(config, out, shard_size=SHARD_SIZE)
  assert manifest['fields']['rgb_moments']['dtype'] == 'float16'
  for half, full in zip(_records(out), _records(cache_dir)):
    assert sorted(half) == sorted(full)
    for k, x in full.items():
      want = x.astype(np.float16) if x.dtype == np.float32 else x
      assert half[k].dtype == want.dtype, k
      np.testing.assert_array_equal(half[k], want, err_msg=k)
  config.data.latent_cache = out
  batch = next(pipeline.make_iterator(config, 'train', train=True))
  assert batch['rgb_moments'].dtype == np.float32  # the step sees float32 either way


def test_an_interrupted_job_resumes_and_writes_what_one_run_writes(
    cache_dir, scenes_data_dir, vae_dir, tmp_path):
  """The command stops after one shard; a partial shard is left; the rerun completes."""
  out = str(tmp_path / 'cache')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  cmd = _command(out, scenes_data_dir, vae_dir, '--max_shards=1')
  run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'images/s' in run.stderr and 'ETA' in run.stderr
  first = os.path.join(out, latent_cache.shard_name('train', 0, 3))
  second = os.path.join(out, latent_cache.shard_name('train', 1, 3))
  assert os.path.exists(first) and os.path.exists(first + '.json')
  assert not os.path.exists(second)
  assert latent_cache.read_manifest(out)['complete'] is False
  config = make_config(scenes_data_dir, vae_dir, latent_cache=out)
  with pytest.raises(latent_cache.CacheMismatchError, match='unfinished'):
    latent_cache.Reader(config, 'train')
  # A job killed while writing shard 1 leaves its temporary file.
  with open(f'{second}.tmp-12345', 'wb') as f:
    f.write(b'half a shard')
  stamp, digest = os.stat(first).st_mtime_ns, _sha(first)

  manifest = latent_cache.build(make_config(scenes_data_dir, vae_dir), out,
                                shard_size=SHARD_SIZE)
  assert manifest['complete']
  assert os.stat(first).st_mtime_ns == stamp and _sha(first) == digest  # not rewritten
  assert not glob.glob(os.path.join(out, '*.tmp-*'))
  names = sorted(os.listdir(cache_dir))
  assert names == sorted(os.listdir(out))
  for name in names:  # the same bytes as the uninterrupted run
    assert _sha(os.path.join(out, name)) == _sha(os.path.join(cache_dir, name)), name
  # A finished cache is left alone.
  assert latent_cache.build(make_config(scenes_data_dir, vae_dir), out,
                            shard_size=SHARD_SIZE) == manifest


def _command(out, data_dir, vae, *extra):
  return [sys.executable, '-m', 'mmgen_jax.data.latent_cache',
          f'--config={REPO}/configs/tiny_cpu.py:latent', f'--out={out}', '--split=train',
          f'--shard_size={SHARD_SIZE}', f'--config.codec.weights={vae}',
          f'--config.data.builder_config={SCENES_TEST_BUILD}', f'--config.data.data_dir={data_dir}',
          '--config.data.global_batch_size=8', '--config.data.augment.hflip=False',
          '--config.data.repa_encoder=pooled_rgb_test', '--config.model.repa_z_dim=16',
          '--config.objective.repa_coeff=0.5', *extra]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_split_the_shards(cache_dir, scenes_data_dir, vae_dir, tmp_path):
  from tests import multiprocess  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'cache')
  port = multiprocess.free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', MMGEN_COORDINATOR=f'127.0.0.1:{port}',
               MMGEN_NUM_PROCESSES='2', MMGEN_PROCESS_ID=str(i),
               XLA_FLAGS='--xla_force_host_platform_device_count=2')
    procs.append(subprocess.Popen(_command(out, scenes_data_dir, vae_dir), env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for i, p in enumerate(procs):
    assert p.returncode == 0, f'process {i}:\n{logs[i][-3000:]}'
  assert 'this process writes 2 (0 already done)' in logs[0]  # shards 0 and 2
  assert 'this process writes 1 (0 already done)' in logs[1]  # shard 1
  manifest, single = latent_cache.read_manifest(out), latent_cache.read_manifest(cache_dir)
  assert manifest['complete'] and manifest['shards'] == single['shards']
  for got, want in zip(_records(out), _records(cache_dir), strict=True):
    assert sorted(got) == sorted(want)
    for k in want:  # 2 devices × 2 records here, 8 × 1 there: within the VAE's batch noise
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_a_cache_for_another_vae_resolution_or_layout_is_refused(
    cache_dir, scenes_data_dir, vae_dir, tmp_path):
  other_vae = _vae_dir(tmp_path / 'other_vae', seed=4)
  config = make_config(scenes_data_dir, other_vae, latent_cache=cache_dir)
  with pytest.raises(latent_cache.CacheMismatchError) as e:
    pipeline.make_iterator(config, 'train', train=True)
  assert 'codec.vae_sha256' in str(e.value) and cache_dir in str(e.value)
  with pytest.raises(latent_cache.CacheMismatchError, match='codec.vae_sha256'):
    latent_cache.build(make_config(scenes_data_dir, other_vae), cache_dir, shard_size=SHARD_SIZE)

  config = make_config(scenes_data_dir, vae_dir, latent_cache=cache_dir, resolution=64)
  with pytest.raises(latent_cache.CacheMismatchError,
                     match="data.resolution: the cache has 32, the config has 64"):
    latent_cache.Reader(config, 'train')
  config = make_config(scenes_data_dir, vae_dir, latent_cache=cache_dir)
  config.modalities.depth.encoding = 'disparity_minmax'
  with pytest.raises(latent_cache.CacheMismatchError, match='modalities.depth.encoding'):
    latent_cache.Reader(config, 'train')
  with pytest.raises(latent_cache.CacheMismatchError, match='shard_size: the cache has 10'):
    latent_cache.build(make_config(scenes_data_dir, vae_dir), cache_dir, shard_size=7)
  with pytest.raises(FileNotFoundError, match='has no manifest.json'):
    latent_cache.Reader(make_config(scenes_data_dir, vae_dir, latent_cache=str(tmp_path)),
                        'train')


def test_a_cache_from_another_dataset_version_or_vae_precision_is_refused(
    cache_dir, scenes_data_dir, vae_dir, tmp_path):
  from mmgen_jax.data import tfds_scenes  # pylint: disable=g-import-not-at-top
  written = latent_cache.read_manifest(cache_dir)['identity']
  assert written['data']['version'] == str(tfds_scenes.MmgenScenes.VERSION)
  assert written['codec']['precision'] == 'highest'  # tiny_cpu's (the schema default)
  # The VAE run at another matmul precision: refused by training and by a resumed job.
  config = make_config(scenes_data_dir, vae_dir, latent_cache=cache_dir)
  config.codec.precision = 'default'
  with pytest.raises(latent_cache.CacheMismatchError,
                     match="codec.precision: the cache has 'highest', the config has 'default'"):
    pipeline.make_iterator(config, 'train', train=True)
  with pytest.raises(latent_cache.CacheMismatchError, match='codec.precision'):
    latent_cache.build(config, cache_dir, shard_size=SHARD_SIZE)
  # A cache written from another version of the dataset (its manifest says 0.9.0).
  old = tmp_path / 'old'
  old.mkdir()
  manifest = latent_cache.read_manifest(cache_dir)
  manifest['identity']['data']['version'] = '0.9.0'
  (old / latent_cache.MANIFEST).write_text(json.dumps(manifest))
  config = make_config(scenes_data_dir, vae_dir, latent_cache=str(old))
  with pytest.raises(latent_cache.CacheMismatchError,
                     match="data.version: the cache has '0.9.0', the config has '1.0.0'"):
    latent_cache.Reader(config, 'train')
  with pytest.raises(latent_cache.CacheMismatchError, match='data.version'):
    latent_cache.build(make_config(scenes_data_dir, vae_dir), str(old), shard_size=SHARD_SIZE)


def test_augmentation_and_pixel_codecs_are_refused_with_a_cache(cache_dir, scenes_data_dir,
                                                                 vae_dir):
  config = make_config(scenes_data_dir, vae_dir, latent_cache=cache_dir)
  config.data.augment.hflip = True
  with pytest.raises(ValueError, match='augment.hflip=False'):
    pipeline.make_iterator(config, 'train', train=True)
  config.codec.name = 'identity'
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(config)
  assert 'config.data.augment.hflip=False (is True)' in str(e.value)
  assert "needs config.codec.name='sd_vae'" in str(e.value)


# ---- bad records --------------------------------------------------------------------


class _Corrupt:
  """The TFDS source with record `bad`'s rgb PNG replaced by junk."""

  def __init__(self, source, bad):
    self._source, self._bad = source, bad

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    record = dict(self._source[i])
    if i == self._bad:
      record['rgb'] = b'not a png'
    return record


def test_a_bad_source_record_is_named_or_skipped_and_listed(scenes_data_dir, vae_dir, tmp_path):
  config = make_config(scenes_data_dir, vae_dir)
  source = _Corrupt(pipeline.make_source(config, 'train'), bad=13)
  with pytest.raises(pipeline.BadRecordError, match=r"train\[13\], field 'rgb': undecodable"):
    latent_cache.build(config, str(tmp_path / 'raise'), shard_size=SHARD_SIZE, source=source)
  config.data.on_bad_record = 'skip'
  manifest = latent_cache.build(config, str(tmp_path / 'skip'), shard_size=SHARD_SIZE,
                                source=source)
  assert manifest['num_records'] == 23
  assert [s['records'] for s in manifest['shards']] == [10, 9, 4]
  [skipped] = manifest['skipped']
  assert skipped['index'] == 13 and "train[13], field 'rgb': undecodable" in skipped['where']
  assert 13 not in [int(r['index']) for r in _records(str(tmp_path / 'skip'))]


def test_a_non_finite_encoding_is_named(scenes_data_dir, vae_dir, tmp_path, monkeypatch):
  encode = latent_cache._Encoder.__call__  # pylint: disable=protected-access

  def nan_in_record_2(self, images):
    out = encode(self, images)
    if 'first' not in seen:  # the first batch holds records 0..7
      seen.add('first')
      out['rgb_moments'] = out['rgb_moments'].copy()
      out['rgb_moments'][2, 0, 0, 0] = np.nan
    return out
  seen = set()
  monkeypatch.setattr(latent_cache._Encoder, '__call__',  # pylint: disable=protected-access
                      nan_in_record_2)
  config = make_config(scenes_data_dir, vae_dir)
  with pytest.raises(pipeline.BadRecordError,
                     match=r"train\[2\], field 'rgb_moments': 1 values non-finite"):
    latent_cache.build(config, str(tmp_path / 'raise'), shard_size=SHARD_SIZE)
  seen.clear()
  config.data.on_bad_record, config.data.latent_cache_dtype = 'skip', 'float16'
  manifest = latent_cache.build(config, str(tmp_path / 'skip'), shard_size=SHARD_SIZE)
  assert [x['index'] for x in manifest['skipped']] == [2] and manifest['num_records'] == 23


def test_a_damaged_cache_record_is_named(cache_dir, scenes_data_dir, vae_dir, tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(cache_dir, damaged)
  shard = os.path.join(damaged, latent_cache.shard_name('train', 1, 3))
  records = _records(cache_dir)[10:20]
  writer = array_record_module.ArrayRecordWriter(shard, latent_cache.WRITER_OPTIONS)
  for i, r in enumerate(records):
    data = latent_cache.serialize(r)
    writer.write(data[:-8] if i == 4 else data)  # record 4 of shard 1 truncated
  writer.close()
  config = make_config(scenes_data_dir, vae_dir, latent_cache=damaged)
  it = pipeline.make_iterator(config, 'train', train=True)
  with pytest.raises(pipeline.BadRecordError) as e:
    for _ in range(3):  # one epoch
      next(it)
  assert 'train-00001-of-00003.array_record record 4' in str(e.value)
  assert 'truncated record' in str(e.value)
  config.data.on_bad_record = 'skip'
  it = pipeline.make_iterator(config, 'train', train=True)
  batches = [next(it) for _ in range(3)]
  assert it.stats.skipped >= 1
  assert all(len(b['index']) == 8 for b in batches)  # full batches of good records
  assert 14 not in np.concatenate([b['index'] for b in batches]).tolist()


# ---- training from the cache ---------------------------------------------------------


def test_the_training_pipeline_reads_the_cache_and_resumes_exactly(
    cache_dir, scenes_data_dir, vae_dir):
  config = make_config(scenes_data_dir, vae_dir, latent_cache=cache_dir)
  records = {int(r['index']): r for r in _records(cache_dir)}
  it = pipeline.make_iterator(config, 'train', train=True)
  first = next(it)
  assert not set(IMAGES) & set(first)  # no pixels: moments only
  for i, index in enumerate(first['index']):
    for name in IMAGES:
      np.testing.assert_array_equal(first[f'{name}_moments'][i],
                                    records[int(index)][f'{name}_moments'])
    assert first['label'][i] == records[int(index)]['label']
  assert first['rgb_moments'].dtype == np.float32 and first['repa_features'].shape == (8, 16, 16)
  state = it.get_state()
  ahead = [next(it) for _ in range(4)]  # crosses the epoch boundary (3 batches per epoch)
  resumed = pipeline.make_iterator(config, 'train', train=True)
  resumed.set_state(state)
  for want in ahead:
    got = next(resumed)
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  epoch = np.concatenate([first['index']] + [b['index'] for b in ahead[:2]])
  assert sorted(epoch.tolist()) == list(range(24))  # every record once per epoch


def test_without_the_repa_loss_no_tokens_are_read_cached_or_batched(
    cache_dir, scenes_data_dir, vae_dir, tmp_path, monkeypatch):
  # Training from a cache that holds them: the tokens stay in the records.
  config = make_config(scenes_data_dir, vae_dir, latent_cache=cache_dir)
  config.objective.repa_coeff = 0.0
  batch = next(pipeline.make_iterator(config, 'train', train=True))
  assert 'repa_features' not in batch and batch['rgb_moments'].shape == (8, 4, 4, 8)
  # Writing a cache: the encoder is not run, the records' own tokens are not read.
  calls = []
  monkeypatch.setitem(latent_cache._REPA_ENCODERS, 'pooled_rgb_test',  # pylint: disable=protected-access
                      lambda c: calls.append(c) or (lambda images: 1 / 0))
  source = pipeline.make_source(config, 'train')
  records = [{**source[i], 'repa_features': 'unreadable'} for i in range(3)]
  with pytest.raises(pipeline.BadRecordError, match="field 'repa_features'"):
    latent_cache.build(make_config(scenes_data_dir, vae_dir, repa_encoder=''),
                       str(tmp_path / 'on'), source=records, shard_size=SHARD_SIZE)  # if read
  config.data.latent_cache = ''
  manifest = latent_cache.build(config, str(tmp_path / 'off'), source=records,
                                shard_size=SHARD_SIZE)
  assert not calls and manifest['num_records'] == 3
  assert 'repa_features' not in manifest['fields'] and 'rgb_moments' in manifest['fields']
  # A REPA run is told what the cache lacks.
  config = make_config(scenes_data_dir, vae_dir, latent_cache=str(tmp_path / 'off'))
  with pytest.raises(latent_cache.CacheMismatchError,
                     match=r"lacks fields \['repa_features'\] \(a cache written with "
                           r'config.objective.repa_coeff=0 holds none\)'):
    latent_cache.Reader(config, 'train')


@pytest.mark.slow
def test_training_tiny_cpu_latent_from_the_cache(cache_dir, scenes_data_dir, vae_dir, tmp_path):
  from mmgen_jax import train  # pylint: disable=g-import-not-at-top
  config = make_config(scenes_data_dir, vae_dir, latent_cache=cache_dir)
  config.objective.repa_coeff = 0.0  # the tiny model has no REPA projector: tokens left unread
  config.train.num_steps, config.train.log_every = 2, 1
  config.train.sample_every, config.train.checkpoint_every = 2, 1
  config.train.keep_checkpoints = 2
  config.sample.num_steps, config.sample.num_images = 2, 2
  config_validation.validate(config)
  workdir = str(tmp_path / 'work')
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 2 and np.isfinite(result['loss'])
  for name in IMAGES:
    assert np.isfinite(result[f'loss/{name}']), name
  # The checkpoint holds the cache iterator's position: step 2 resumes it after one batch.
  with open(glob.glob(os.path.join(workdir, 'checkpoints', '1', 'data', '*'))[0]) as f:
    state = json.load(f)
  it = pipeline.make_iterator(config, 'train', train=True)
  next(it)
  assert it.get_state() == state
  # The whole recipe: grids decoded by the VAE, and RGB -> X scored from the same run.
  assert sorted(os.listdir(os.path.join(workdir, 'samples'))) == [
      'step_000002_from_rgb.png', 'step_000002_joint.png']
  from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
  config.eval.num_examples = 0
  scores = evaluate.evaluate(config, workdir)
  assert scores['eval/num_examples'] > 0
  for key in ('depth/abs_rel', 'normal/mean_deg', 'segmentation/miou'):
    assert np.isfinite(scores[f'eval/{key}']), key
