"""The imagenet2012_mmgen builder on a generated class-folder tree with MMGen's pseudo-label
PNGs and DINO HDF5 files: records, crops, left-out images named, read by the pipeline."""

import importlib.util
import os

import h5py
import numpy as np
import PIL.Image
import pytest

from mmgen_jax.data import pipeline
from mmgen_jax.data import tfds_imagenet_mmgen as tim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'res32_z8'  # 32 px crops, (32/16)² = 4 tokens of 8
TOKENS, DIM = 4, 8
# (split dir, class, file, width, height); sorted per split as the builder lists them.
IMAGES = [('train', 'n01', 'a.JPEG', 48, 40), ('train', 'n01', 'b.png', 70, 64),
          ('train', 'n02', 'c.png', 40, 56), ('train', 'n02', 'd.jpg', 36, 32),
          ('train', 'n02', 'e.png', 40, 40), ('train', 'n02', 'f.png', 40, 40),
          ('val', 'n02', 'g.png', 40, 48)]
NO_NORMAL, BROKEN_DEPTH = 'n02/e.png', 'n02/f.png'


def _tokens(rel):
  return np.full((TOKENS, DIM), sum(map(ord, rel)), np.float32) + np.arange(DIM, dtype=np.float32)


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  """MMGen's dataset/ layout: rgb, depth, normal, mask and h5/dino (module docstring)."""
  root = tmp_path_factory.mktemp('dataset')
  rng = np.random.default_rng(0)
  dino = {}
  for split, cls, name, w, h in IMAGES:
    rel = f'{cls}/{name}'
    png = f'{cls}/{os.path.splitext(name)[0]}.png'
    for kind in ('rgb', 'depth', 'normal', 'mask'):
      (root / kind / split / cls).mkdir(parents=True, exist_ok=True)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if name.endswith('.jpg'):  # a grey JPEG, as some ImageNet files are
      PIL.Image.fromarray(rgb[..., 0]).save(root / 'rgb' / split / rel, format='JPEG')
    else:
      PIL.Image.fromarray(rgb).save(root / 'rgb' / split / rel,
                                    format='JPEG' if name.endswith('JPEG') else 'PNG')
    depth = root / 'depth' / split / png
    if rel == BROKEN_DEPTH:
      depth.write_bytes(b'\x89PNG not really')
    else:
      PIL.Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(depth)
    if rel != NO_NORMAL:
      PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
          root / 'normal' / split / png)
    # Segments in 3 random colours and a background colour, as preprocess_mask.py paints them.
    colours = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    segments = (np.arange(w)[None, :] * 4 // w + np.zeros((h, 1), int)) % 4
    PIL.Image.fromarray(colours[segments]).save(root / 'mask' / split / png)
    dino.setdefault(split, {})[png] = _tokens(rel)
  (root / 'h5' / 'dino').mkdir(parents=True)
  for split, file in (('train', 'rgb.h5'), ('val', 'rgb_val.h5')):
    with h5py.File(root / 'h5' / 'dino' / file, 'w') as f:
      for key, z in dino[split].items():
        f.create_dataset(key, data=z)  # `class/stem.png`: a group per class, as MMGen writes
  return root


@pytest.fixture(scope='module')
def built(tree, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  tim.build(str(tree), str(data_dir), CONFIG)
  return str(data_dir)


def test_records_hold_the_documented_features_cropped_as_mmgen(tree, built):
  builder = tim.make_builder(CONFIG, built)  # read back from disk
  assert sorted(builder.info.features) == ['depth', 'image', 'label', 'normal',
                                           'repa_features', 'segmentation']
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 4, 'validation': 1}
  assert builder.info.metadata['classes'] == ['n01', 'n02']
  records = list(builder.as_data_source('train'))
  assert [int(r['label']) for r in records] == [0, 0, 1, 1]
  first = records[0]  # n01/a.JPEG, 48×40: no halving, bicubic to 38×32, columns 3..34
  with PIL.Image.open(tree / 'rgb' / 'train' / 'n01' / 'a.JPEG') as im:
    want = np.asarray(im.convert('RGB').resize((38, 32), PIL.Image.BICUBIC))[:, 3:35]
  np.testing.assert_array_equal(first['image'], want)
  assert first['depth'].shape == (32, 32, 1) and first['depth'].dtype == np.uint8
  np.testing.assert_array_equal(first['repa_features'], _tokens('n01/a.JPEG'))
  with PIL.Image.open(tree / 'mask' / 'train' / 'n01' / 'a.png') as im:
    source_colours = {tuple(c) for c in np.asarray(im).reshape(-1, 3)}
  crop_colours = {tuple(c) for c in first['segmentation'].reshape(-1, 3)}
  assert crop_colours == source_colours  # nearest neighbours: no blended colours
  # b.png, 70×64 >= 2·32: box-halved to 35×32 first (as ADM's crop does).
  with PIL.Image.open(tree / 'rgb' / 'train' / 'n01' / 'b.png') as im:
    want = np.asarray(im.resize((35, 32), PIL.Image.BOX).resize((35, 32), PIL.Image.BICUBIC))
  np.testing.assert_array_equal(records[1]['image'], want[:, 1:33])


def test_images_with_missing_or_unreadable_labels_are_left_out_and_named(tree, built,
                                                                         tmp_path):
  skipped = tim.make_builder(CONFIG, built).info.metadata['skipped']
  assert skipped['validation'] == []
  assert [s['image'] for s in skipped['train']] == [NO_NORMAL, BROKEN_DEPTH]
  [normal], [depth] = skipped['train'][0]['problems'], skipped['train'][1]['problems']
  assert normal.startswith('normal ') and normal.endswith('normal/train/n02/e.png: missing')
  assert depth.startswith('depth ') and 'depth/train/n02/f.png: unreadable' in depth
  with pytest.raises(ValueError, match=r'train image n02/e.png: normal .*e.png: missing'):
    tim.build(str(tree), str(tmp_path), CONFIG, strict=True)


def test_the_pipeline_reads_a_batch_with_the_imagenet_encodings(tree, built, tmp_path):
  spec = importlib.util.spec_from_file_location(
      'imagenet256_xl2', os.path.join(REPO, 'configs', 'imagenet256_xl2.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.builder_config, config.data.data_dir = CONFIG, built
  config.data.resolution, config.data.global_batch_size = 32, 4
  config.data.worker_count = 0
  config.model.repa_z_dim = DIM
  batch = next(pipeline.make_iterator(config, 'train', train=False))
  assert batch['rgb'].shape == (4, 32, 32, 3) and batch['depth'].shape == (4, 32, 32, 1)
  assert batch['normal'].shape == (4, 32, 32, 3) and batch['segmentation'].shape == (4, 32, 32, 3)
  assert batch['segmentation_ids'].max() == 3  # four colours -> four segments
  np.testing.assert_array_equal(batch['label'], [0, 0, 1, 1])
  assert 'repa_features' not in batch  # evaluation leaves them unread; training reads them:
  train = next(pipeline.make_iterator(config, 'train', train=True))
  row = int(np.flatnonzero(train['index'] == 0)[0])
  np.testing.assert_array_equal(train['repa_features'][row], _tokens('n01/a.JPEG'))
  for k in ('rgb', 'depth', 'normal', 'segmentation'):
    assert batch[k].min() >= -1 and batch[k].max() <= 1, k
  assert batch['valid'].all()
  config.data.data_dir = str(tmp_path)  # not built there: the error says how to build it
  with pytest.raises(FileNotFoundError,
                     match=r'python -m mmgen_jax.data.tfds_imagenet_mmgen --manual_dir='):
    pipeline.make_source(config, 'train')


def test_config_names():
  assert tim.config_from_name('res256').repa_tokens == 256
  c = tim.config_from_name('res64_norepa')
  assert (c.resolution, c.repa_tokens) == (64, 0)
  assert 'repa_features' not in tim.features(c)
  with pytest.raises(ValueError, match='multiple of 16'):
    tim.config_from_name('res40')
