"""The mmgen_scenes TFDS builder: ArrayRecord files, read back with tfds.data_source."""

import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmgen_jax import config_schema
from mmgen_jax.data import pipeline
from mmgen_jax.data import scenes
from mmgen_jax.data import tfds_scenes

from tests.conftest import SCENES_TEST_BUILD as CONFIG


@pytest.fixture(scope='session')
def data_dir(scenes_data_dir):
  return scenes_data_dir


def _source(data_dir, split, **kwargs):
  return tfds.data_source(f'mmgen_scenes/{CONFIG}', split=split, data_dir=data_dir,
                          download=False, **kwargs)


def test_writes_array_record_and_data_source_reads_it_back(data_dir):
  builder = tfds_scenes.make_builder(CONFIG, data_dir)
  assert builder.is_prepared()
  files = sorted(os.listdir(builder.data_dir))
  assert any(f.startswith('mmgen_scenes-train.array_record-') for f in files), files
  assert any(f.startswith('mmgen_scenes-validation.array_record-') for f in files), files
  assert not any('tfrecord' in f for f in files), files

  train, val = _source(data_dir, 'train'), _source(data_dir, 'validation')
  assert type(train).__name__ == 'ArrayRecordDataSource'
  assert (len(train), len(val)) == (24, 8)
  r = train[5]
  assert r['rgb'].shape == (32, 32, 3) and r['rgb'].dtype == np.uint8
  assert r['depth'].shape == (32, 32) and r['depth'].dtype == np.float32
  assert r['normal'].shape == (32, 32, 3) and r['normal'].dtype == np.float32
  assert r['segmentation'].shape == (32, 32) and r['segmentation'].dtype == np.uint8
  assert r['intrinsics'].shape == (3, 3)
  assert 0 <= r['label'] < len(scenes.SCENE_CLASSES)
  names = builder.info.features['label'].names
  assert tuple(names) == scenes.SCENE_CLASSES


def test_records_are_the_rendered_scenes_of_their_seed(data_dir):
  """Record i of a split holds seed offset + i, stored losslessly."""
  for split, n in (('train', 24), ('validation', 8)):
    src = _source(data_dir, split)
    for i in (0, n - 1):
      r = src[i]
      assert r['seed'] == tfds_scenes.seed_for(split, i)
      ref = scenes.render_scene(int(r['seed']), 32)
      for key in ('rgb', 'depth', 'normal', 'segmentation', 'intrinsics'):
        np.testing.assert_array_equal(r[key], ref[key], err_msg=f'{split}[{i}] {key}')
      assert r['label'] == ref['label']


def test_train_and_validation_seeds_are_disjoint(data_dir):
  train = {int(r['seed']) for r in _source(data_dir, 'train')}
  val = {int(r['seed']) for r in _source(data_dir, 'validation')}
  assert len(train) == 24 and len(val) == 8
  assert not train & val
  # The scheme keeps them apart for every split size the configs can ask for.
  largest = max(c.train_size for c in tfds_scenes.BUILDER_CONFIGS)
  assert tfds_scenes.seed_for('train', largest - 1) < tfds_scenes.seed_for('validation', 0)


def test_registered_configs_and_custom_names():
  names = {c.name for c in tfds_scenes.BUILDER_CONFIGS}
  assert {'res32_small', 'res32', 'res64', 'res128', 'res256'} <= names
  small = tfds_scenes.get_config('res32_small')
  assert (small.resolution, small.train_size, small.val_size) == (32, 2000, 200)
  c = tfds_scenes.get_config('res64_n100_10')
  assert (c.resolution, c.train_size, c.val_size) == (64, 100, 10)
  with pytest.raises(ValueError, match='res48'):
    tfds_scenes.get_config('res48_n10_2')
  with pytest.raises(ValueError, match='unknown builder config'):
    tfds_scenes.get_config('huge')


def test_builders_and_sources_survive_pickling(data_dir, tmp_path):
  """Grain's worker processes receive the data source, and so its builder, pickled."""
  for name in ('res32_small', CONFIG):
    builder = pickle.loads(pickle.dumps(tfds_scenes.make_builder(name, tmp_path)))
    assert builder.builder_config.name == name
  config = config_schema.base_config()
  config.data.builder_config = CONFIG
  config.data.data_dir = data_dir
  src = pickle.loads(pickle.dumps(pipeline.make_source(config, 'train')))
  assert type(src).__name__ == 'ArrayRecordDataSource'
  assert src[3]['seed'] == 3


def test_make_source_skips_png_decoding_and_explains_a_missing_build(data_dir, tmp_path):
  config = config_schema.base_config()
  config.data.builder_config = CONFIG
  config.data.data_dir = data_dir
  src = pipeline.make_source(config, 'validation')
  assert len(src) == 8
  assert isinstance(src[0]['rgb'], bytes)  # decoded (and checked) by the pipeline
  config.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='python -m mmgen_jax.data.build --config='):
    pipeline.make_source(config, 'train')


def _square(x):
  return {'x': x * x}


def test_rendered_examples_in_order_serially_and_in_a_pool():
  """(i, render(args[i])) for every i, alike with and without a pool of workers."""
  import multiprocessing.pool  # pylint: disable=g-import-not-at-top
  args = list(range(40))  # more than one imap chunk (16)
  want = [(i, {'x': i * i}) for i in args]
  serial = tfds_scenes.rendered_examples(_square, args, pool=None, desc='t', show_progress=False)
  assert list(serial) == want
  with multiprocessing.pool.ThreadPool(2) as pool:  # the same imap as the process pool
    pooled = tfds_scenes.rendered_examples(_square, args, pool=pool, desc='t',
                                           show_progress=True)
    assert list(pooled) == want


def test_written_records_are_the_serialized_render_of_their_seed(data_dir):
  """Each stored record is, field for field, features.serialize_example(render_example(seed)).

  The records are written through rendered_examples; one out of place or dropped fails here.
  """
  import glob  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  builder = tfds_scenes.make_builder(CONFIG, data_dir)
  for split, n in (('train', 24), ('validation', 8)):
    raw = []
    for f in sorted(glob.glob(os.path.join(builder.data_dir, f'*-{split}.array_record-*'))):
      reader = array_record_module.ArrayRecordReader(f)
      raw += reader.read_all()
      reader.close()
    assert len(raw) == n
    for i in (0, 1, n - 1):
      want = builder.info.features.serialize_example(
          tfds_scenes.render_example(tfds_scenes.seed_for(split, i), 32))
      # Parsed: the map order of a serialized Example differs between processes.
      parse = tf_example_pb2.Example.FromString
      assert parse(raw[i]) == parse(want), (split, i)
