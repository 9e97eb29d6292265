"""The released MMGen checkpoint, end to end, with tiny random weights of the same architectures.

The official tiny SiT state dict (`params/` of tests/data/mmgen_sit_tiny.safetensors:
exactly `SiT.state_dict()` of the official model code at the tiny size, with its
inputs and outputs; tests/data/mmgen_sit_tiny.json describes it) stands in for
`0600000.pt`, and a random SD-architecture VAE (`autoencoder --random`: 4 blocks,
8× down) for sd-vae-ft-mse. The config is configs/imagenet256_xl2.py shrunk by
overrides to the tiny sizes (64 px -> 8×8 latents, width 64, depth 2, 4 heads,
REPA after block 1, z 32, projector 64, 10 classes), read by the same commands
the README gives for the real weights: `convert --config`, then
`--mode=sample --task=...` and `--mode=evaluate` with `--config.sample.checkpoint`.
"""

import concurrent.futures
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from mmgen_jax import evaluate
from mmgen_jax import inference
from mmgen_jax import modalities as modalities_lib
from mmgen_jax.data import encodings
from mmgen_jax.data import pipeline
from mmgen_jax.models import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XL2 = os.path.join(REPO, 'configs', 'imagenet256_xl2.py')
TINY_SIT = os.path.join(REPO, 'tests', 'data', 'mmgen_sit_tiny.safetensors')
SCENES_BUILD = 'res64_n8_4'   # 8 train / 4 validation scenes at 64×64
PHOTO_HW = (40, 56)           # not square, not the model's 64

# imagenet256_xl2 at the size of the official tiny SiT (mmgen_sit_tiny.json), on the scenes.
MODEL_OVERRIDES = {
    'data.resolution': 64, 'data.num_classes': 10, 'model.hidden_size': 64, 'model.depth': 2,
    'model.num_heads': 4, 'model.patch_size': 2, 'model.repa_encoder_depth': 1,
    'model.repa_z_dim': 32, 'model.repa_projector_dim': 64, 'model.class_dropout_prob': 0.1,
}
RUN_OVERRIDES = {
    'model.dtype': 'float32', 'data.name': 'mmgen_scenes', 'data.builder_config': SCENES_BUILD,
    'data.global_batch_size': 8, 'data.worker_count': 0, 'modalities.rgb.field': 'rgb',
    'objective.group_size': 8,    # MMGen's per-process batch of 32 is the whole batch here
    'sample.num_steps': 2, 'sample.num_images': 4, 'eval.num_examples': 4,
}


def _flags(overrides):
  return [f'--config.{k}={v}' for k, v in overrides.items()]


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """(config, paths): the converted tiny checkpoint, the tiny VAE and the 64-px scenes."""
  from mmgen_jax.data import tfds_scenes  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('release')
  vae = str(d / 'sd-vae-tiny')
  autoencoder.main(['--random', '--out', vae, '--seed', '1'])
  tfds_scenes.build(SCENES_BUILD, str(d / 'tfds'))
  weights = str(d / 'xl2.safetensors')
  # The README's command, with the tiny sizes as overrides (the state dict's keys are
  # prefixed 'params/' in the parity file; the released .pt holds them under 'ema').
  convert.main(['--checkpoint', TINY_SIT, '--prefix', 'params/', '--config', XL2,
                *_flags(MODEL_OVERRIDES), '--out', weights])
  run = {**RUN_OVERRIDES, 'data.data_dir': str(d / 'tfds'), 'codec.weights': vae,
         'sample.checkpoint': weights}
  config = convert.load_config(XL2, _flags({**MODEL_OVERRIDES, **run}))
  photo = np.kron(np.random.default_rng(0).uniform(0, 255, (4, 7, 3)),
                  np.ones((10, 8, 1))).astype(np.uint8)   # 40×56, blocky
  Image.fromarray(photo).save(d / 'photo.png')
  return config, {'dir': d, 'vae': vae, 'weights': weights, 'photo': str(d / 'photo.png'),
                  'overrides': {**MODEL_OVERRIDES, **run}}


@pytest.fixture(scope='module')
def restored(release):
  config, _ = release
  model, step, mesh = evaluate.restore_for_inference(config, None)  # no workdir: the file
  return model, step, mesh


def test_the_modalities_are_in_the_official_channel_order():
  """MMGen concatenates latents as data/path.py's TASK_NAMES = (rgb, depth, normal, mask)."""
  config = convert.load_config(XL2)
  mods = modalities_lib.images(modalities_lib.from_config(config.modalities))
  assert [(m.name, m.encoding) for m in mods] == [
      ('rgb', 'rgb'), ('depth', 'disparity_minmax'), ('normal', 'stablenormal_rgb'),
      ('segmentation', 'random_colors')]


def test_the_config_builds_the_released_model_key_for_key():
  """convert --config=imagenet256_xl2.py against the released SiT-XL/2's state-dict manifest."""
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  shapes = {}
  with open(os.path.join(REPO, 'tests', 'data', 'mmgen_sit_xl2_keys.tsv')) as f:
    for line in f:
      key, shape, *_ = line.rstrip('\n').split('\t')
      if not key.startswith('#'):
        shapes[key] = tuple(int(v) for v in shape.split('x'))
  config = convert.load_config(XL2)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: build.build_model(config, rngs=nnx.Rngs(0)))
  rules = convert.plan_conversion(model, shapes)  # raises naming any mismatch
  assert len(rules) == len(shapes) - 1 == 314     # every key but the fixed pos_embed


def test_the_converted_file_gives_the_official_outputs(release, restored):
  """convert --config -> .safetensors -> restore_for_inference: the official model's forward."""
  model, step, mesh = restored
  assert step == 0 and model.scan_layers  # the config's layout (the file is stacked too)
  v = load_file(TINY_SIT)
  n = v['inputs/x'].shape[0]
  out = nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(v['inputs/x']).transpose(0, 2, 3, 1),
                                     jnp.asarray(v['inputs/t']).reshape(n, -1),
                                     jnp.asarray(v['inputs/y']), jnp.asarray(v['inputs/task']))
  pred = np.asarray(jnp.concatenate(out.images, -1).transpose(0, 3, 1, 2))
  ref = v['outputs/pred']
  assert np.abs(pred - ref).max() <= 1e-5 * np.abs(ref).max()


def test_size_flags_and_config_write_the_same_weights(release, tmp_path):
  config, paths = release
  flags = str(tmp_path / 'flags.safetensors')
  convert.main(['--checkpoint', TINY_SIT, '--prefix', 'params/', '--input_size', '8',
                '--hidden_size', '64', '--depth', '2', '--num_heads', '4', '--num_classes', '10',
                '--repa_encoder_depth', '1', '--repa_z_dim', '32', '--repa_projector_dim', '64',
                '--out', flags])
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      nnx.to_pure_dict(nnx.state(_abstract_model(config), nnx.Param)))
  a, b = convert.read_params(flags, like), convert.read_params(paths['weights'], like)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _abstract_model(config):
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  return nnx.eval_shape(lambda: build.build_model(config, rngs=nnx.Rngs(0)))


def test_convert_refuses_unclear_requests(tmp_path, capsys):
  base = ['--checkpoint', TINY_SIT, '--prefix', 'params/', '--out', str(tmp_path / 'x.st')]
  cases = [
      (['--config', XL2, '--depth', '2'], '--config sizes the model; drop --depth'),
      (['--config', XL2, '--config.model.detph=2'],
       "--config.model.detph: config.model has no key 'detph'; valid keys: ["),
      (['--config', XL2, '--config.model.depth=two'], '--config.model.depth=two: not a int'),
      (['--depth', '2', '--config.model.depth=2'], 'overrides need --config=<file>'),
  ]
  for args, message in cases:
    with pytest.raises(SystemExit):
      convert.main(base + args)
    assert message in capsys.readouterr().err, args
  # The config's sizes must be the checkpoint's: every mismatching key is named.
  with pytest.raises(ValueError, match=r'blocks\.0\.mlp\.fc1\.weight: torch shape'):
    convert.main(base + ['--config', XL2, *_flags({**MODEL_OVERRIDES, 'model.hidden_size': 128,
                                                  'model.num_heads': 2})])


def test_a_file_for_another_model_is_refused_naming_the_keys(release):
  config, paths = release
  other = convert.load_config(XL2, _flags({**paths['overrides'], 'model.depth': 3,
                                           'model.scan_layers': False}))
  with pytest.raises(ValueError, match=r"config.sample.checkpoint: .* missing keys \['blocks.2"):
    evaluate.restore_for_inference(other, None)
  # The command says it in one line (an InferenceError), before sampling anything.
  opts = inference.Options(task='joint', out=str(paths['dir'] / 'never'))
  with pytest.raises(inference.InferenceError, match=r'does not match the model'):
    inference.run(other, None, opts)
  assert not os.path.exists(paths['dir'] / 'never')


def test_a_released_pt_converts_like_its_state_dict(release, tmp_path):
  torch = pytest.importorskip(
      'torch', reason='torch is not installed (the optional `torch` extra reads .pt files)')
  import argparse  # pylint: disable=g-import-not-at-top
  sd = {k[len('params/'):]: torch.from_numpy(v.copy()) for k, v in load_file(TINY_SIT).items()
        if k.startswith('params/')}
  pt = str(tmp_path / '0600000.pt')
  # As MMGen's train.py saves: model, ema, opt, args (vars of its argparse flags), steps.
  zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
  torch.save({'model': zeros, 'ema': sd, 'opt': {}, 'args': vars(argparse.Namespace(
      model='SiT-XL/2', resolution=256)), 'steps': 600000}, pt)
  out = str(tmp_path / 'from_pt.safetensors')
  convert.main(['--checkpoint', pt, '--config', XL2, *_flags(MODEL_OVERRIDES), '--out', out])
  a, b = load_file(out), load_file(release[1]['weights'])
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_without_torch_a_pt_file_names_the_extra(tmp_path):
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    pytest.skip('torch is installed: the message for its absence cannot be seen')
  except ImportError:
    pass
  (tmp_path / 'x.pt').write_bytes(b'')
  with pytest.raises(ImportError, match=r'needs PyTorch \(pip install torch\)'):
    convert.load_torch_state_dict(str(tmp_path / 'x.pt'))


# ---- the latent model on files ---------------------------------------------------------


def test_conditions_are_the_posterior_mean_times_the_scale(release, restored):
  from mmgen_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  config, paths = release
  model, _, mesh = restored
  sampler = inference.Sampler(config, model, mesh, seed=0)
  x = np.random.default_rng(3).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  got = sampler.encode('rgb', x)
  mean, _ = autoencoder.load_diffusers_dir(paths['vae']).encode(x)
  np.testing.assert_allclose(got, np.asarray(mean) * 0.18215, rtol=1e-5, atol=1e-6)
  assert sampler.side == 8 and sampler.channels == (4, 4, 4, 4)


def test_mmgen_encodings_read_as_the_pipeline_encodes_records(release):
  """At the model's size, to_model equals pipeline.normalise (record index 0 for the colours)."""
  config, _ = release
  mods = modalities_lib.images(modalities_lib.from_config(config.modalities))
  g = np.random.default_rng(1)
  n = g.normal(size=(64, 64, 3)).astype(np.float32)
  example = {'rgb': g.integers(0, 256, (64, 64, 3), dtype=np.uint8),
             'depth': g.uniform(1, 12, (64, 64)).astype(np.float32),
             'normal': n / np.linalg.norm(n, axis=-1, keepdims=True),
             'segmentation': g.integers(0, 9, (64, 64)).astype(np.int32)}
  want = pipeline.normalise({**example, 'label': 0, 'index': 0}, mods)
  raw = {**example, 'rgb': example['rgb'] / np.float32(255)}
  for m in mods:
    np.testing.assert_array_equal(inference.to_model(raw[m.name], m, 64), want[m.name],
                                  err_msg=m.name)


def test_mmgen_encodings_decode_back_to_depth_normals_and_segments(release):
  config, _ = release
  by = {m.name: m for m in modalities_lib.from_config(config.modalities)}
  g = np.random.default_rng(2)
  # Disparity: 1/depth of the output is affine in 1/depth of the input; nearest -> near.
  depth = g.uniform(2, 30, (16, 16)).astype(np.float32)
  out = inference.decode(inference.encode(depth, by['depth']), by['depth'], (1.0, 10.0))
  assert out.shape == (16, 16)
  np.testing.assert_allclose(out.flat[depth.argmin()], 1.0, rtol=1e-6)
  np.testing.assert_allclose(out.flat[depth.argmax()], 10.0, rtol=1e-5)
  assert np.corrcoef(1 / out.ravel(), 1 / depth.ravel())[0, 1] > 0.9999
  # Normals: through StableNormal's 8-bit RGB and back to the OpenCV frame.
  n = g.normal(size=(16, 16, 3)).astype(np.float32)
  n /= np.linalg.norm(n, axis=-1, keepdims=True)
  back = inference.decode(inference.encode(n, by['normal']), by['normal'], (1.0, 10.0))
  assert np.degrees(np.arccos(np.clip((back * n).sum(-1), -1, 1))).max() < 1.0
  # Segments: random colours -> ids, the same partition (ids renumbered).
  ids = np.kron(g.integers(0, 5, (4, 4)), np.ones((4, 4), np.int64))
  got = inference.decode(inference.encode(ids, by['segmentation']), by['segmentation'],
                         (1.0, 10.0))
  pairs = set(zip(ids.ravel().tolist(), got.ravel().tolist()))
  assert len(pairs) == len(np.unique(ids)) == len(np.unique(got))


@pytest.mark.slow
def test_every_task_reads_and_writes_mmgen_files(release, restored, tmp_path):
  """MMGen's stored condition files (8-bit disparity, a colour per segment), an ensemble of
  two (random colours have no vote: no spread) and rgb_to_rgb, on the latent model."""
  config, paths = release
  model, _, mesh = restored
  by = {m.name: m for m in modalities_lib.from_config(config.modalities)}
  g = np.random.default_rng(4)
  disparity = np.kron(g.integers(0, 256, (5, 7)), np.ones((8, 8))).astype(np.uint8)
  disparity[0, 0], disparity[-1, -1] = 0, 255   # as min-max stores it
  Image.fromarray(disparity).save(tmp_path / 'disp.png')
  ids = np.kron(g.integers(0, 4, (5, 7)), np.ones((8, 8), np.int64))
  Image.fromarray(encodings.random_colors(ids, 0, 0)).save(tmp_path / 'mask.png')
  depth = inference.read_input(str(tmp_path / 'disp.png'), by['depth'])
  near_far = depth[disparity == 255].max(), depth[disparity == 0].min()
  np.testing.assert_allclose(near_far, (1.0, 10.0), rtol=1e-6)   # bright = near
  # Read back into the model, the disparity is MMGen's stored image exactly.
  np.testing.assert_array_equal(
      inference.encode(depth, by['depth'])[..., 0], encodings.to_model_space(disparity))
  seg = inference.read_input(str(tmp_path / 'mask.png'), by['segmentation'])
  assert len(set(zip(ids.ravel().tolist(), seg.ravel().tolist()))) == len(np.unique(ids))

  def run(**kw):
    opts = inference.Options(out=str(tmp_path / 'out'), **kw)
    return inference.run_task(config, model, mesh, opts)

  (r,) = run(task='depth_to_x', inputs=str(tmp_path / 'disp.png'))
  np.testing.assert_array_equal(r.outputs['depth'], depth)   # the input, as read
  assert r.outputs['segmentation'].shape == (40, 56)
  (r,) = run(task='segmentation_to_x', inputs=str(tmp_path / 'mask.png'))
  np.testing.assert_array_equal(r.outputs['segmentation'], seg)
  (r,) = run(task='rgb_to_x', inputs=paths['photo'], ensemble=2)
  assert sorted(r.spread) == ['depth', 'normal'] and r.spread['depth'].shape == PHOTO_HW
  np.testing.assert_array_equal(r.model['segmentation'], r.members['segmentation'][0])
  (r,) = run(task='rgb_to_rgb', inputs=paths['photo'])
  assert r.outputs['input_rgb'].shape == (*PHOTO_HW, 3) and r.outputs['rgb'].shape == (*PHOTO_HW, 3)


def test_a_latent_model_without_its_vae_is_refused(release, tmp_path):
  config, paths = release
  config = convert.load_config(XL2, _flags({**paths['overrides'], 'codec.weights': ''}))
  opts = inference.Options(task='rgb_to_x', inputs=paths['photo'], out=str(tmp_path / 'o'))
  with pytest.raises(inference.InferenceError, match=r'needs its VAE: --config.codec.weights='):
    inference.check(config, opts)


def run_main(paths, *args, devices=1, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, '-m', 'mmgen_jax.main', f'--config={XL2}',
                         *_flags(paths['overrides']), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_rgb_to_x_from_the_converted_weights_on_1_and_8_devices(release):
  """The README's command, without a workdir, on a photo; the same bytes on 1 and 8 devices."""
  _, paths = release
  out = paths['dir'] / 'rgb_to_x'
  # Data parallel: every device runs the 1-device program on its rows. (With the config's
  # fsdp the DiT's sums are split over devices: equal up to float rounding, ~1e-5.)
  args = ['--mode=sample', '--task=rgb_to_x', f'--input={paths["photo"]}', '--seed=3',
          '--config.mesh.data=-1', '--config.mesh.fsdp=1']
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = list(pool.map(lambda n: run_main(paths, *args, f'--out={out}/dev{n}', devices=n),
                         (1, 8)))
  for r in runs:
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'rgb_to_x: 1 result(s) from {paths["weights"]}' in r.stdout
  d = out / 'dev8' / 'photo'
  h, w = PHOTO_HW
  assert np.load(d / 'depth.npy').shape == (h, w)
  assert np.load(d / 'segmentation.npy').shape == (h, w)
  normal = np.load(d / 'normal.npy')
  assert normal.shape == (h, w, 3)
  np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(np.load(d / 'rgb.npy'),
                                np.asarray(Image.open(paths['photo'])) / np.float32(255))
  for name in ('rgb', 'depth', 'normal', 'segmentation', 'grid'):
    assert Image.open(d / f'{name}.png').size[::-1] == ((h, w) if name != 'grid' else
                                                        Image.open(d / 'grid.png').size[::-1])
  assert len(inference.read_ply(str(d / 'scene.ply'))) > 0
  names = sorted(os.listdir(d))
  assert names == sorted(os.listdir(out / 'dev1' / 'photo'))
  for name in names:
    assert (d / name).read_bytes() == (out / 'dev1' / 'photo' / name).read_bytes(), name


def test_joint_generation_from_the_converted_weights(release, restored, tmp_path):
  config, _ = release
  model, _, mesh = restored
  opts = inference.Options(task='joint', out=str(tmp_path), num_samples=2, class_id=3)
  results = inference.run_task(config, model, mesh, opts)
  assert [r.stem for r in results] == ['sample_000', 'sample_001']
  images = modalities_lib.images(modalities_lib.from_config(config.modalities))
  for r in results:
    d = inference.write_result(str(tmp_path), r, images, 60.0)
    assert np.load(os.path.join(d, 'rgb.npy')).shape == (64, 64, 3)
    assert np.load(os.path.join(d, 'depth.npy')).shape == (64, 64)
    assert np.load(os.path.join(d, 'normal.npy')).shape == (64, 64, 3)
    seg = np.load(os.path.join(d, 'segmentation.npy'))
    assert seg.shape == (64, 64) and seg.dtype == np.int32
  assert not np.array_equal(results[0].model['rgb'], results[1].model['rgb'])


@pytest.mark.slow
def test_evaluate_and_grids_from_the_converted_weights(release, tmp_path):
  """--mode=evaluate (RGB -> X scores on the 64-px scenes, in MMGen's encodings) and
  --mode=sample's grids, as main.run does them, from the converted weights."""
  from mmgen_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  config, _ = release
  scores = evaluate.evaluate(config, str(tmp_path))
  assert scores['eval/num_examples'] == 4
  for key in ('depth/abs_rel', 'normal/mean_deg', 'segmentation/matched_iou'):
    assert np.isfinite(scores[f'eval/{key}']), key
  assert os.path.exists(tmp_path / 'eval' / 'step_000000.json')
  main_lib.write_samples(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'samples')) == [
      'checkpoint_000000_from_rgb.png', 'checkpoint_000000_joint.png']
