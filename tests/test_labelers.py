"""Expert pseudo-labelling (data/labelers.py, data/label_images.py, data/geometric_normals.py).

Geometric normals are scored against the procedural scenes' exact normals; the
labelling job is run on the scenes' TFDS split (their own depth) to check
resuming and the records' contents, and through its command line on real
photographs (scikit-image's sample images) with the JAX-only depth expert of a
one-block mmgen_jax checkpoint, then read by the Grain pipeline and trained
on for two steps. The torch experts' loading code runs on tiny randomly
initialised transformers / diffusers models saved with save_pretrained; those
tests skip when torch is not installed (the `labelers` extra).
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from mmgen_jax import metrics
from mmgen_jax.data import encodings
from mmgen_jax.data import geometric_normals as gn
from mmgen_jax.data import label_images
from mmgen_jax.data import labelers
from mmgen_jax.data import scenes
from tests.conftest import SCENES_TEST_BUILD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason='torch/transformers not installed (the '
                                 "optional 'labelers' extra: pip install -e '.[labelers]')")
needs_diffusers = pytest.mark.skipif(not (HAS_TORCH and importlib.util.find_spec('diffusers')),
                                     reason='torch/diffusers not installed (the labelers extra)')


# ---- geometric normals -------------------------------------------------------------------------


def _scored(pred_fn, seeds=range(12), res=64):
  errs = []
  for seed in seeds:
    o = scenes.render_scene(seed, res)
    errs.append(metrics.normal_angles_deg(pred_fn(o, seed), o['normal']).ravel())
  e = np.concatenate(errs)
  return float(np.median(e)), float((e < 11.25).mean())


def test_geometric_normals_from_exact_depth_match_the_scenes():
  median, within = _scored(lambda o, _: gn.normals_from_depth(o['depth'], o['intrinsics']))
  # Exact on planes; the error sits on curved objects and occlusion edges.
  assert median < 0.5 and within > 0.95, (median, within)


def test_geometric_normals_from_disparity_of_unknown_scale_and_shift():
  """Disparity a/z + b with random a, b: the scale cancels, the shift is assumed away."""
  def pred(o, seed):
    g = np.random.default_rng(seed)
    disparity = g.uniform(0.1, 10.0) / o['depth'] + g.uniform(-5.0, 5.0)
    return gn.normals_from_disparity(disparity, o['intrinsics'])
  median, within = _scored(pred)
  assert median < 10.0 and within > 0.55, (median, within)
  # Known up to scale only (no shift): exact again.
  median, within = _scored(lambda o, seed: gn.normals_from_disparity(
      (1.0 + seed) / o['depth'], o['intrinsics'], affine_invariant=False))
  assert median < 0.5 and within > 0.95, (median, within)


def test_geometric_normals_of_a_tilted_plane_and_bad_depth():
  k = gn.intrinsics_from_fov((16, 20), 60.0)
  # The plane n·P = -1 with n = (0, -sin 30°, -cos 30°) (facing the camera, tilted up).
  n = np.array([0.0, -0.5, -np.sqrt(3) / 2])
  rays = gn.backproject(np.ones((16, 20)), k)
  depth = -1.0 / (rays @ n)
  got = gn.normals_from_depth(depth, k)
  np.testing.assert_allclose(got, np.broadcast_to(n, got.shape), atol=1e-5)
  with pytest.raises(ValueError, match=r'finite and > 0.*row 2, col 3'):
    bad = depth.copy()
    bad[2, 3] = 0.0
    gn.normals_from_depth(bad, k)


# ---- segments ----------------------------------------------------------------------------------


def test_masks_are_painted_largest_first_with_a_background():
  hw = (6, 6)
  big, small, hidden = (np.zeros(hw, bool) for _ in range(3))
  big[:4] = True           # 24 px
  small[1:3, 1:3] = True   # 4 px, on top of big
  hidden[1:2, 1:2] = True  # 1 px, painted last: stays visible
  seg = labelers.paint_masks([small, big, hidden], hw)
  assert seg.ids[5, 5] == 0                    # uncovered: background
  assert seg.ids[0, 0] == 1                    # big, largest first
  assert seg.ids[2, 2] == 2 and seg.ids[1, 1] == 3
  assert seg.dropped == 0


def test_too_many_regions_are_merged_into_neighbours_and_counted():
  labels = np.arange(30 * 30).reshape(30, 30)  # one-pixel regions ...
  labels[:10] = 0                              # ... and a large one: 601 regions
  seg = labelers.regions_to_segments(labels)
  assert seg.ids.max() == labelers.MAX_SEGMENTS - 1
  assert (seg.dropped, seg.dropped_pixels) == (601 - 256, 601 - 256)
  assert (seg.ids[:10] == 0).all()
  # Every merged pixel took the id of a kept neighbour: a row-10 pixel has kept ones beside it.
  kept = labels.ravel()[np.argsort(labels.ravel())][:256]
  assert np.isin(seg.ids, np.arange(256)).all() and len(kept) == 256


# ---- the labelling job on the scenes (their own depth) -----------------------------------------


def _scenes_opts(data_dir, out, **kw):
  return label_images.Options(input=f'tfds:mmgen_scenes/{SCENES_TEST_BUILD}',
                              input_data_dir=data_dir, image_field='rgb', out=str(out),
                              name='scenes_labelled', resolution=32, shard_size=10, batch_size=4,
                              log_every_s=0.0, **kw)


def _experts():
  return {'depth': labelers.make_depth('record'), 'normal': labelers.make_normals('geometric'),
          'segmentation': labelers.make_segmentation('felzenszwalb')}


def _records(out, name, split='train'):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  src = tfds.builder(name, data_dir=str(out)).as_data_source(split)
  return [src[i] for i in range(len(src))]


def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def scenes_labelled(scenes_data_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp('labelled')
  summary = label_images.run(_scenes_opts(scenes_data_dir, out), _experts())
  return out, summary


def test_scene_records_carry_the_official_encodings_of_their_own_truth(scenes_labelled,
                                                                         scenes_data_dir):
  out, summary = scenes_labelled
  assert summary.complete and summary.written == 24 and summary.shards_written == 3
  records = _records(out, 'scenes_labelled')
  assert len(records) == 24
  for i in (0, 13, 23):
    r, truth = records[i], scenes.render_scene(i, 32)
    np.testing.assert_array_equal(r['image'], truth['rgb'])
    np.testing.assert_array_equal(r['depth'][..., 0],
                                  encodings.disparity_minmax_u8(1.0 / truth['depth']))
    normal = encodings.decode_stablenormal_rgb(r['normal'])
    err = metrics.normal_angles_deg(normal, truth['normal'])
    assert np.median(err) < 1.5 and (err < 11.25).mean() > 0.9  # 8-bit, 32 px
    np.testing.assert_allclose(r['intrinsics'], truth['intrinsics'], atol=1e-4)
    ids = encodings.ids_from_exact_colors(r['segmentation'])
    assert 2 <= ids.max() + 1 <= labelers.MAX_SEGMENTS
    assert r['label'] == truth['label']
    assert r['source'] == f'tfds:mmgen_scenes/{SCENES_TEST_BUILD}/train[{i}]'.encode()
    prov = json.loads(r['provenance'])
    assert prov['experts']['depth']['expert'] == 'record:depth'
    assert prov['experts']['segmentation']['expert'] == 'felzenszwalb'


def test_a_resumed_run_writes_the_records_of_an_uninterrupted_one(scenes_labelled,
                                                                   scenes_data_dir, tmp_path):
  out, _ = scenes_labelled
  want = _records(out, 'scenes_labelled')
  experts = _experts()
  opts = _scenes_opts(scenes_data_dir, tmp_path)
  # A crash in the middle of shard 1 (after shard 0 is done), leaving a partial file behind.
  seg = experts['segmentation']
  def crashing(batch):
    if (batch.index >= 14).any():
      raise RuntimeError('killed')
    return seg(batch)
  crashing.provenance = seg.provenance  # the same expert, as far as the records go
  with pytest.raises(RuntimeError, match='killed'):
    label_images.run(opts, dict(experts, segmentation=crashing))
  state = os.path.join(label_images.dataset_dir(opts), label_images.STATE_DIR)
  assert os.path.exists(os.path.join(state, label_images.shard_file(opts, 1, 3) + '.partial'))
  assert not os.path.exists(os.path.join(label_images.dataset_dir(opts), 'dataset_info.json'))
  # Two more runs, one shard each (--max_shards), then nothing left to do.
  first = label_images.run(dataclasses.replace(opts, max_shards=1), experts)
  assert (first.shards_already_done, first.shards_written, first.complete) == (1, 1, False)
  second = label_images.run(opts, experts)
  assert (second.shards_already_done, second.shards_written, second.complete) == (2, 1, True)
  got = _records(tmp_path, 'scenes_labelled')
  assert len(got) == len(want)
  for a, b in zip(got, want):
    _assert_same(a, b)
  # Another setting is refused, naming it.
  with pytest.raises(label_images.LabellingError, match=r'color_seed: 0 in the output, 1 now'):
    label_images.run(dataclasses.replace(opts, color_seed=1), experts)


def test_two_processes_split_the_shards_and_the_last_writes_the_metadata(scenes_labelled,
                                                                          scenes_data_dir,
                                                                          tmp_path):
  out, _ = scenes_labelled
  experts = _experts()
  a = label_images.run(_scenes_opts(scenes_data_dir, tmp_path, process_index=1, process_count=2),
                       experts)
  assert (a.shards_written, a.shards_of_other_processes, a.complete) == (1, 2, False)
  b = label_images.run(_scenes_opts(scenes_data_dir, tmp_path, process_index=0, process_count=2),
                       experts)
  assert (b.shards_written, b.complete) == (2, True)
  for a, b in zip(_records(tmp_path, 'scenes_labelled'), _records(out, 'scenes_labelled'),
                  strict=True):
    _assert_same(a, b)


def _mmgen_config(name, data_dir, num_classes, variant=None):
  """tiny_cpu with MMGen's record conventions (configs/imagenet256_xl2.py's modalities) reading
  a labelled dataset: the config change the labelled data needs."""
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  from mmgen_jax import modalities  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = tiny_cpu.get_config(variant)
  config.modalities = ml_collections.ConfigDict(dict(
      rgb=modalities.spec(0, 'rgb', 1.0, field='image'),
      depth=modalities.spec(1, 'disparity_minmax', 0.2),
      normal=modalities.spec(2, 'stablenormal_rgb', 0.1),
      segmentation=modalities.spec(3, 'random_colors', 0.1, color_seed=0)))
  config.data.name, config.data.builder_config, config.data.data_dir = name, '', str(data_dir)
  config.data.num_classes, config.data.global_batch_size = num_classes, 8
  return config


def test_the_latent_cache_encodes_the_labelled_records(scenes_labelled, tmp_path):
  from mmgen_jax.data import latent_cache  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  from tests.test_latent_cache import TINY_VAE  # pylint: disable=g-import-not-at-top
  out, _ = scenes_labelled
  vae = tmp_path / 'vae'
  autoencoder.save_diffusers_dir(autoencoder.create(TINY_VAE, seed=3), vae)
  config = _mmgen_config('scenes_labelled', out, len(scenes.SCENE_CLASSES), 'latent')
  config.codec.weights = str(vae)
  manifest = latent_cache.build(config, str(tmp_path / 'cache'), shard_size=10)
  assert manifest['num_records'] == 24
  assert sorted(manifest['fields']) == ['depth_moments', 'index', 'label', 'normal_moments',
                                        'rgb_moments', 'segmentation_moments']


# ---- inputs ------------------------------------------------------------------------------------


def test_greyscale_tiny_and_broken_inputs_are_named_and_counted(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
  files = {'ok.png': rgb, 'grey.png': rgb[..., 0], 'grey3.jpg': np.repeat(rgb[..., :1], 3, -1),
           'tiny.png': rgb[:10, :10], 'rgba.png': np.concatenate([rgb, rgb[..., :1]], -1)}
  for name, x in files.items():
    PIL.Image.fromarray(x).save(tmp_path / name, quality=100) if name.endswith('.jpg') else \
        PIL.Image.fromarray(x).save(tmp_path / name)
  (tmp_path / 'broken.jpg').write_bytes(b'not a jpeg')
  inp = label_images.FolderInput(str(tmp_path))
  assert inp.class_names == [label_images.FLAT_CLASS]
  opts = label_images.Options(input=str(tmp_path), out='', resolution=32)
  got = {inp.source(i): label_images.read_item(inp, i, opts, 16) for i in range(len(inp))}
  assert {k: v.problem for k, v in got.items()} == {
      'broken.jpg': 'unreadable', 'grey.png': 'greyscale', 'grey3.jpg': 'greyscale',
      'ok.png': None, 'rgba.png': None, 'tiny.png': 'tiny'}
  assert got['ok.png'].rgb.shape == (32, 32, 3)
  keep = label_images.read_item(inp, inp.files.index('grey.png'),
                                dataclasses.replace(opts, greyscale='keep'), 16)
  assert keep.problem is None and keep.rgb.shape == (32, 32, 3)


def test_centre_crop_maps_the_camera_with_the_pixels():
  """A point's pixel coordinates go through the crop as its intrinsics do."""
  rgb = np.zeros((300, 451, 3), np.uint8)
  crop, m, _ = label_images.centre_crop(rgb, 64)
  assert crop.shape == (64, 64, 3)
  # The image centre stays the crop's centre; the scale is the shorter side's.
  np.testing.assert_allclose(m @ [225.0, 149.5, 1.0], [31.5, 31.5, 1.0], atol=0.2)
  np.testing.assert_allclose(m[0, 0], 64 / 300, rtol=0.02)


# ---- the command line on photographs, then training --------------------------------------------


def _tiny_model_weights(path):
  """A one-block DiT (tiny_cpu's modalities at 32 px) as converted .safetensors, its weights
  perturbed so that its output depends on its input (adaLN-Zero starts as a constant map)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mmgen_jax import train  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import convert  # pylint: disable=g-import-not-at-top
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  config = tiny_cpu.get_config()
  for k, v in MODEL_OVERRIDES.items():
    section, leaf = k.split('.')
    config[section][leaf] = v
  with jax.default_device(jax.devices()[0]):
    model = train.default_parts(config).model_fn(nnx.Rngs(0))
  g = np.random.default_rng(0)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda x: x + 0.05 * g.standard_normal(x.shape).astype(np.float32), params))
  convert.save_params(str(path), model)
  return str(path)


MODEL_OVERRIDES = {'model.depth': 1, 'model.hidden_size': 64, 'model.num_heads': 2,
                   'model.patch_size': 4, 'sample.num_steps': 2, 'sample.num_images': 4,
}
PHOTOS = {'animals': ('chelsea', 'astronaut'), 'things': ('coffee', 'rocket', 'camera')}


def _photos(root):
  skdata = pytest.importorskip('skimage.data', reason='scikit-image gives the photographs')
  for cls, names in PHOTOS.items():
    os.makedirs(root / cls)
    for n in names:
      PIL.Image.fromarray(getattr(skdata, n)()).save(root / cls / f'{n}.png')
  (root / 'things' / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
  PIL.Image.fromarray(skdata.astronaut()[:12, :12]).save(root / 'animals' / 'tiny.png')
  (root / 'things' / 'notes.txt').write_text('not an image')
  return str(root)


@pytest.mark.slow
def test_the_command_labels_photographs_and_training_reads_them(tmp_path):
  photos = _photos(tmp_path / 'photos')
  weights = _tiny_model_weights(tmp_path / 'dit.safetensors')
  out = tmp_path / 'tfds'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'mmgen_jax.data.label_images', f'--input={photos}', f'--out={out}',
         '--name=photos_mmgen', '--resolution=32', '--shard_size=3', '--batch_size=2',
         f'--depth=mmgen:{weights}', f'--mmgen_config={REPO}/configs/tiny_cpu.py',
         *[f'--mmgen_config.{k}={v}' for k, v in MODEL_OVERRIDES.items()],
         '--normals=geometric', '--segmentation=felzenszwalb']
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary['written'] == 4 and summary['complete']
  assert summary['skipped'] == {'unreadable': 1, 'tiny': 1, 'greyscale': 1}
  assert summary['ignored_files'] == 1
  for name in ('broken.jpg', 'tiny.png', 'camera.png'):  # each named in the log
    assert name in proc.stderr, name
  assert 'images/s' in proc.stderr and 'ETA' in proc.stderr

  # Read by the pipeline with a config change only: MMGen's encodings, field 'image'.
  from mmgen_jax import train  # pylint: disable=g-import-not-at-top
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _mmgen_config('photos_mmgen', out, 2)
  config.data.eval_split = 'train'  # one split was labelled
  for k, v in MODEL_OVERRIDES.items():
    section, leaf = k.split('.')
    config[section][leaf] = v
  batch = next(pipeline.make_iterator(config, 'train', train=True))  # 4 records, repeated
  assert batch['rgb'].shape == (8, 32, 32, 3) and batch['depth'].shape == (8, 32, 32, 1)
  labels = dict(zip(batch['index'].tolist(), batch['label'].tolist()))
  assert labels == {0: 0, 1: 0, 2: 1, 3: 1}  # astronaut, chelsea; coffee, rocket
  for name in ('depth', 'normal', 'segmentation'):
    assert batch[name].min() >= -1.0 and batch[name].max() <= 1.0 and batch[name].std() > 0.05
  config.train.num_steps, config.train.log_every = 2, 1
  config.train.sample_every = config.train.checkpoint_every = 1000
  result = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert result['step'] == 2 and np.isfinite(result['loss'])
  for name in ('rgb', 'depth', 'normal', 'segmentation'):
    assert np.isfinite(result[f'loss/{name}']), name


# ---- torch experts on tiny random models -------------------------------------------------------


def _rgb_batch(n=2, res=32):
  g = np.random.default_rng(0)
  return labelers.Batch(images=g.integers(0, 256, (n, res, res, 3), np.uint8),
                        index=np.arange(n, dtype=np.int64))


@needs_torch
def test_transformers_depth_loads_a_saved_model_and_returns_disparity(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = transformers.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                               intermediate_size=37, image_size=32, patch_size=8,
                               backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8],
                               fusion_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5],
                               head_in_index=-1)
  transformers.DPTForDepthEstimation(cfg).save_pretrained(tmp_path / 'dpt')
  transformers.DPTImageProcessor(size={'height': 32, 'width': 32}).save_pretrained(tmp_path / 'dpt')
  backbone = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                       intermediate_size=37, image_size=28, patch_size=14,
                                       out_features=['stage1', 'stage2', 'stage3', 'stage4'],
                                       reshape_hidden_states=False)
  transformers.DepthAnythingForDepthEstimation(transformers.DepthAnythingConfig(
      backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
      neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, head_hidden_size=8)
  ).save_pretrained(tmp_path / 'da')
  transformers.DPTImageProcessor(size={'height': 28, 'width': 28}).save_pretrained(tmp_path / 'da')
  for name, kind in (('dpt', 'dpt'), ('da', 'depth_anything')):
    expert = labelers.make_depth(f'transformers:{tmp_path / name}')
    out = expert(_rgb_batch())
    assert out.disparity.shape == (2, 32, 32) and np.isfinite(out.disparity).all()
    assert out.affine_invariant and expert.provenance['expert'] == f'transformers:{kind}'
    assert len(expert.provenance['sha256']) == 64
  with pytest.raises(labelers.ExpertError, match='not a local directory'):
    labelers.make_depth(f'transformers:{tmp_path / "absent"}')


@needs_torch
def test_sam_masks_are_painted(tmp_path):
  pytest.importorskip('torchvision', reason="transformers' mask generation needs torchvision")
  import transformers  # pylint: disable=g-import-not-at-top
  vision = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, output_channels=8,
                image_size=64, patch_size=16, mlp_dim=32, global_attn_indexes=[1],
                window_size=2, num_pos_feats=4)
  cfg = transformers.SamConfig(vision_config=vision,
                               prompt_encoder_config=dict(hidden_size=8, image_size=64,
                                                          patch_size=16, mask_input_channels=4),
                               mask_decoder_config=dict(hidden_size=8, num_attention_heads=2,
                                                        mlp_dim=16, iou_head_hidden_dim=8))
  transformers.SamModel(cfg).save_pretrained(tmp_path)
  transformers.SamProcessor(transformers.SamImageProcessor(
      size={'longest_edge': 64}, pad_size={'height': 64, 'width': 64})).save_pretrained(tmp_path)
  expert = labelers.SamSegmentation(str(tmp_path), points_per_batch=16, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0, points_per_crop=4)
  segs = expert(_rgb_batch())
  assert len(segs) == 2 and segs[0].ids.shape == (32, 32)
  assert 0 <= segs[0].ids.min() and segs[0].ids.max() < labelers.MAX_SEGMENTS


def _tiny_marigold(path):
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
      up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), cross_attention_dim=8,
      norm_num_groups=4, attention_head_dim=2)
  vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                down_block_types=('DownEncoderBlock2D',) * 2,
                                up_block_types=('UpDecoderBlock2D',) * 2)
  scheduler = diffusers.DDIMScheduler(prediction_type='v_prediction', timestep_spacing='trailing')
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
      vocab_size=1000, projection_dim=8))
  os.makedirs(path / 'tok')
  (path / 'tok' / 'vocab.json').write_text(json.dumps({'<|startoftext|>': 0, '<|endoftext|>': 1}))
  (path / 'tok' / 'merges.txt').write_text('#version: 0.2\n')
  tokenizer = transformers.CLIPTokenizer(str(path / 'tok' / 'vocab.json'),
                                         str(path / 'tok' / 'merges.txt'), model_max_length=77)
  diffusers.MarigoldNormalsPipeline(
      unet=unet, vae=vae, scheduler=scheduler, text_encoder=text, tokenizer=tokenizer,
      default_denoising_steps=2, default_processing_resolution=32).save_pretrained(path / 'pipe')
  return path / 'pipe'


@needs_diffusers
def test_marigold_normals_are_unit_opencv_vectors_seeded_per_image(tmp_path):
  expert = labelers.make_normals(f'marigold:{_tiny_marigold(tmp_path)}', num_inference_steps=2)
  batch = _rgb_batch()
  n = expert(batch)
  assert n.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
  alone = expert(labelers.Batch(images=batch.images[1:], index=batch.index[1:]))
  np.testing.assert_allclose(alone[0], n[1], atol=1e-4)  # its noise is its own, in any batch
  assert expert.provenance['expert'] == 'marigold_normals'


def test_a_name_a_builder_is_registered_under_is_refused():
  for taken in ('imagenet2012_mmgen', 'mmgen_scenes', 'imagenet2012'):
    with pytest.raises(label_images.LabellingError, match='registered TFDS builder'):
      label_images._check_name_is_free(taken)
  label_images._check_name_is_free('photos_labelled')
