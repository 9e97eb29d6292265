"""The generation-metrics job on a small random DiT: shards, resume, reference cache, user
statistics, the feature path checked against the real images, two processes."""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen_jax import generation_eval as ge
from mmgen_jax import metrics
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax.data import pipeline
from tests.conftest import SCENES_TEST_BUILD
from tests import multiprocess
from tests.generation_eval_process import NUM_SAMPLES, SHARD, gen_config, make_parts

def _config(data_dir, **gen):
  return gen_config(data_dir, SCENES_TEST_BUILD, **gen)


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:4])


@pytest.fixture(scope='module')
def parts(scenes_data_dir, mesh):
  """The random DiT and an extractor (stand-in Inception, untrained scenes networks)."""
  return make_parts(_config(scenes_data_dir), mesh)


@pytest.fixture(scope='module')
def full_run(scenes_data_dir, mesh, parts, tmp_path_factory):
  """One uninterrupted run: (workdir, scores)."""
  workdir = str(tmp_path_factory.mktemp('full'))
  model, extractor = parts
  scores = ge.evaluate_generation(_config(scenes_data_dir), workdir, model, 7, mesh,
                                  extractor=extractor)
  return workdir, scores


def test_scores_are_finite_and_every_shard_is_written(full_run):
  workdir, scores = full_run
  images = ('rgb', 'depth', 'normal', 'segmentation')
  want = ['eval/gen/fid', 'eval/gen/is_mean', 'eval/gen/is_std', 'eval/gen/precision',
          'eval/gen/recall', *(f'eval/gen/scenes_fd/{m}' for m in images),
          *(f'eval/gen/class_acc/{m}' for m in images)]
  for k in want:
    assert np.isfinite(scores[k]), k
  assert all(0 <= scores[f'eval/gen/class_acc/{m}'] <= 1 for m in images)
  assert scores['eval/gen/num_samples'] == NUM_SAMPLES
  assert scores['eval/gen/reference_num'] == 8  # the validation records
  assert scores['eval/gen/fid'] > 0 and scores['eval/gen/is_mean'] >= 1.0
  assert 0 <= scores['eval/gen/precision'] <= 1 and 0 <= scores['eval/gen/recall'] <= 1
  d = ge.shard_dir(workdir, 7)
  assert sorted(os.listdir(d)) == ['shard_00000.npz', 'shard_00001.npz']
  shard = ge.read_npz(d / 'shard_00001.npz')
  assert shard[ge.POOL3].shape == (SHARD, 32) and shard['scenes/depth'].shape == (SHARD, 16)
  # Classes cycle over the samples: 8..15 mod 4.
  np.testing.assert_array_equal(shard['label'], np.arange(8, 16) % 4)


def test_an_interrupted_run_resumes_to_the_same_scores(scenes_data_dir, mesh, parts, full_run,
                                                       tmp_path):
  model, extractor = parts
  config = _config(scenes_data_dir)
  workdir = str(tmp_path)
  assert ge.evaluate_generation(config, workdir, model, 7, mesh, extractor=extractor,
                                max_new_shards=1) == {}
  d = ge.shard_dir(workdir, 7)
  assert sorted(os.listdir(d)) == ['shard_00000.npz']
  first = (d / 'shard_00000.npz').read_bytes()
  mtime = os.stat(d / 'shard_00000.npz').st_mtime_ns

  drawn = []
  real_make_sampler = ge.make_sampler

  def counting_sampler(*args):
    draw = real_make_sampler(*args)
    return lambda index: drawn.append(index) or draw(index)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ge, 'make_sampler', counting_sampler)
    scores = ge.evaluate_generation(config, workdir, model, 7, mesh, extractor=extractor)
  assert drawn == [1]  # only the second shard's batch is sampled
  assert (d / 'shard_00000.npz').read_bytes() == first
  assert os.stat(d / 'shard_00000.npz').st_mtime_ns == mtime
  assert scores == full_run[1]


def test_a_shard_of_other_settings_is_redone(scenes_data_dir, mesh, parts, full_run, tmp_path):
  model, extractor = parts
  workdir = str(tmp_path)
  guided = _config(scenes_data_dir)
  guided.sample.cfg_scale = 2.0
  ge.evaluate_generation(guided, workdir, model, 7, mesh, extractor=extractor, max_new_shards=1)
  scores = ge.evaluate_generation(_config(scenes_data_dir), workdir, model, 7, mesh,
                                  extractor=extractor)
  assert scores == full_run[1]


def test_the_reference_is_cached_and_reused(scenes_data_dir, mesh, parts, full_run,
                                           monkeypatch):
  workdir, scores = full_run
  model, extractor = parts
  ref_dir = os.path.join(workdir, 'eval', 'gen_reference')
  names = sorted(os.listdir(ref_dir))
  assert len(names) == 2  # one per network, keyed by data, split, count and weights
  assert names[0].startswith(f'mmgen_scenes_{SCENES_TEST_BUILD}_validation_all_inception_')
  assert names[1].startswith(f'mmgen_scenes_{SCENES_TEST_BUILD}_validation_all_scenes_')

  def no_recompute(*args, **kwargs):
    raise AssertionError('the cached reference should have been used')

  monkeypatch.setattr(ge, 'real_features', no_recompute)
  again = ge.evaluate_generation(_config(scenes_data_dir), workdir, model, 7, mesh,
                                 extractor=extractor)
  assert again == scores


def test_a_user_statistics_file_in_pytorch_fid_format_is_read(scenes_data_dir, mesh, parts,
                                                              full_run, tmp_path):
  workdir, _ = full_run
  model, extractor = parts
  rng = np.random.default_rng(3)
  f = rng.normal(size=(40, 32))
  mu, sigma = f.mean(0), np.cov(f, rowvar=False)
  path = tmp_path / 'fid_stats.npz'
  np.savez(path, mu=mu, sigma=sigma)  # pytorch-fid's --save-stats layout
  config = _config(scenes_data_dir, reference_stats=str(path))
  scores = ge.evaluate_generation(config, workdir, model, 7, mesh, extractor=extractor)
  gen = np.concatenate([ge.read_npz(ge.shard_dir(workdir, 7) / f'shard_0000{i}.npz')[ge.POOL3]
                        for i in range(2)])
  want = metrics.frechet_distance(*metrics.feature_statistics(gen), mu, sigma)
  assert scores['eval/gen/fid'] == pytest.approx(want, rel=1e-9)
  assert 'eval/gen/precision' not in scores  # statistics only: no reference features
  assert scores['eval/gen/scenes_fd/rgb'] == full_run[1]['eval/gen/scenes_fd/rgb']


def _validation(config):
  batches = list(pipeline.make_iterator(config, 'validation', train=False,
                                        process_index=0, process_count=1))
  mods = modalities_lib.images(modalities_lib.from_config(config.modalities))
  return {m.name: np.concatenate([b[m.name][b['valid']] for b in batches]) for m in mods}, mods


def test_real_images_are_a_fixed_point_of_the_data_format(scenes_data_dir):
  real, mods = _validation(_config(scenes_data_dir))
  for m in mods:
    np.testing.assert_allclose(np.asarray(ge.to_data_format(jnp.asarray(real[m.name]), m)),
                               real[m.name], atol=2e-6, err_msg=m.name)


def test_real_images_through_the_sample_path_score_zero(scenes_data_dir, mesh, parts, tmp_path):
  """The validation images handed in as 'samples': every FD against the validation
  reference is ~0, so the two feature paths agree (order, trimming, formats)."""
  _, extractor = parts
  config = _config(scenes_data_dir, num_samples=8, batch=4, shard_size=4)
  real, _ = _validation(config)
  sharding = parallel.batch_sharding(mesh, config.sharding_rules)

  def draw(index):
    return {k: jax.device_put(v[index * 4:(index + 1) * 4], sharding) for k, v in real.items()}

  generated = ge.generate_features(config, str(tmp_path), 0, draw, extractor)
  reference = ge.load_reference(config, str(tmp_path), extractor, mesh)
  scores = ge.score(generated, reference, config)
  assert scores['eval/gen/fid'] == pytest.approx(0.0, abs=1e-6)
  for m in ('rgb', 'depth', 'normal', 'segmentation'):
    assert scores[f'eval/gen/scenes_fd/{m}'] == pytest.approx(0.0, abs=1e-6), m
  assert scores['eval/gen/precision'] == 1.0 and scores['eval/gen/recall'] == 1.0
  # A changed set is told apart: the RGB channels reversed.
  flipped = dict(generated)
  shuffled = {k: v[..., ::-1] if k == 'rgb' else v for k, v in real.items()}
  flipped.update({k: np.asarray(v) for k, v in extractor.fn(
      {k: jax.device_put(v, sharding) for k, v in shuffled.items()}).items()
                  if k in ('scenes/rgb', ge.POOL3, ge.LOGITS)})
  changed = ge.score(flipped, reference, config)
  assert changed['eval/gen/scenes_fd/rgb'] > 1e-3 and changed['eval/gen/fid'] > 1e-3


def test_evaluate_writes_the_generation_scores_beside_the_rgb_to_x_ones(
    scenes_data_dir, mesh, parts, full_run, tmp_path, monkeypatch):
  import json  # pylint: disable=g-import-not-at-top
  from mmgen_jax import evaluate  # pylint: disable=g-import-not-at-top
  model, extractor = parts
  monkeypatch.setattr(evaluate, 'restore_for_inference', lambda c, w: (model, 7, mesh))
  monkeypatch.setattr(evaluate, 'evaluate_predictor', lambda c, p, m: {'eval/num_examples': 8.0})
  monkeypatch.setattr(evaluate, 'sampler_predictor', lambda c, model, m: None)
  monkeypatch.setattr(ge, 'make_extractor', lambda *a, **k: extractor)
  results = evaluate.evaluate(_config(scenes_data_dir), str(tmp_path))
  written = json.loads((tmp_path / 'eval' / 'step_000007.json').read_text())
  assert written == {'step': 7, **results}
  assert results == {'eval/num_examples': 8.0, **full_run[1]}


def test_class_accuracy_counts_samples_read_as_their_requested_class(scenes_data_dir):
  label = ge.sample_classes(0, 8, 4)
  generated = {'label': label, f'{ge.SCENES_CLASS}/rgb': label,
               f'{ge.SCENES_CLASS}/depth': np.where(label == 1, 0, label)}  # class 1 missed
  reference = ge.Reference({}, {}, 0, 'none')
  scores = ge.score(generated, reference, _config(scenes_data_dir))
  assert scores == {'eval/gen/class_acc/rgb': 1.0, 'eval/gen/class_acc/depth': 0.75}


def test_the_feature_networks_run_sharded_over_the_batch(scenes_data_dir, mesh):
  """Host images in: the stand-in Inception's state replicated on the mesh's 4 devices,
  each device computing 2 of the 8 rows, the values those of the network unsharded."""
  from tests.generation_eval_process import TinyInception  # pylint: disable=g-import-not-at-top
  config = _config(scenes_data_dir, features='inception')
  net = TinyInception()
  extractor = ge.make_extractor(config, '', mesh, inception_model=net)
  for leaf in jax.tree.leaves(extractor.states['inception']):
    assert leaf.sharding.is_fully_replicated and leaf.sharding.device_set == set(mesh.devices.flat)
  mods = modalities_lib.images(modalities_lib.from_config(config.modalities))
  rng = np.random.default_rng(0)
  images = {m.name: rng.uniform(-1, 1, (8, 32, 32, m.channels)).astype(np.float32) for m in mods}
  out = extractor.fn(images)
  batch = parallel.batch_sharding(mesh, config.sharding_rules)
  for key, v in out.items():
    assert v.sharding.is_equivalent_to(batch, v.ndim), key
    assert [s.data.shape[0] for s in v.addressable_shards] == [2] * 4, key
  rgb = ge.to_data_format(jnp.asarray(images['rgb']), mods[0])
  feats, logits = net.features_and_logits((rgb + 1.0) / 2.0)
  np.testing.assert_allclose(np.asarray(out[ge.POOL3]), feats, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[ge.LOGITS]), logits, rtol=1e-5, atol=1e-4)


def test_bad_sizes_are_refused(scenes_data_dir, mesh):
  with pytest.raises(ValueError, match='shard_size=12 must be a positive multiple'):
    ge.check_sizes(_config(scenes_data_dir, shard_size=12), mesh)
  with pytest.raises(ValueError, match='batch=6 must be a positive multiple of the 4 ways'):
    ge.check_sizes(_config(scenes_data_dir, batch=6, shard_size=12), mesh)
  with pytest.raises(ValueError, match="features='fid'"):
    ge.requested_nets(_config(scenes_data_dir, features='fid'))


@pytest.mark.slow
def test_the_fid_inception_architecture_from_a_weights_file(scenes_data_dir, mesh, parts,
                                                            tmp_path):
  """The real network (random weights written in the .pth key layout) read from
  eval.gen.inception_weights: 2048-d pool3, 1008 logits, finite scores."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import inception  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'fid_inception_random.safetensors'
  random_net = inception.FIDInceptionV3(rngs=nnx.Rngs(0))
  save_file({k: np.ascontiguousarray(v) for k, v in inception.to_pytorch_fid(random_net).items()},
            str(path))
  model, _ = parts
  config = _config(scenes_data_dir, features='inception', num_samples=8,
                      inception_weights=str(path))  # one batch: the 299 px forward is slow
  workdir = str(tmp_path / 'work')
  scores = ge.evaluate_generation(config, workdir, model, 7, mesh)
  for k in ('fid', 'is_mean', 'precision', 'recall'):
    assert np.isfinite(scores[f'eval/gen/{k}']), k
  shard = ge.read_npz(ge.shard_dir(workdir, 7) / 'shard_00000.npz')
  assert shard[ge.POOL3].shape == (SHARD, 2048) and shard[ge.LOGITS].shape == (SHARD, 1008)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_stop_resume_and_score_like_one(scenes_data_dir, full_run, tmp_path):
  """2 processes x 2 devices on one shared workdir: stopped after a shard, resumed, the
  scores of one process with 4 devices, on both processes."""
  script = os.path.join(os.path.dirname(__file__), 'generation_eval_process.py')
  workdir = tmp_path / 'work'
  reports = multiprocess.run_workers(script, scenes_data_dir, SCENES_TEST_BUILD, str(workdir),
                                     out_dir=tmp_path)
  assert [r['process_index'] for r in reports] == [0, 1]
  for r in reports:
    assert r['first'] == {} and r['shards_after_stop'] == ['shard_00000.npz']
  assert reports[0]['scores'] == reports[1]['scores']
  assert reports[0]['scores'] == pytest.approx(full_run[1], rel=1e-5)


def test_the_scenes_network_trains_saves_and_loads(scenes_data_dir, tmp_path):
  from mmgen_jax.models import scenes_features  # pylint: disable=g-import-not-at-top
  config = _config(scenes_data_dir)
  config.eval.gen.scenes_net.num_steps, config.eval.gen.scenes_net.batch_size = 2, 8
  trained = scenes_features.train(config, str(tmp_path))
  loaded, _ = scenes_features.load(str(tmp_path), config)
  want = nnx.state(trained, nnx.Param)
  got = nnx.state(loaded, nnx.Param)
  for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got), strict=True):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                  err_msg=str(path))
