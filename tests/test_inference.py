"""Inference on a user's own files (mmgen_jax/inference.py, `--mode=sample --task=...`).

A one-block DiT freshly initialised with its weights perturbed (so that its
output depends on its input) is saved as a checkpoint once; the tests run every
task on files written here, in this process (8 fake devices) and through the
command line.
"""

import concurrent.futures
import importlib.util
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mmgen_jax import checkpoint as checkpoint_lib
from mmgen_jax import evaluate
from mmgen_jax import inference
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax import train
from mmgen_jax import train_state as ts_lib
from mmgen_jax.data import palettes
from mmgen_jax.data import pipeline
from mmgen_jax.diffusion import paths
from mmgen_jax.diffusion import samplers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny_cpu.py')
# A one-block model and two sampler steps: seconds per task on a CPU (patch 2: width 64
# carries the 2² × 10 patch inputs).
OVERRIDES = {'model.depth': 1, 'model.hidden_size': 64, 'model.num_heads': 2, 'model.patch_size': 2,
             'sample.num_steps': 2, 'sample.num_images': 4}
PHOTO_HW = (20, 36)   # not square, not the model's 32


def tiny_config():
  spec = importlib.util.spec_from_file_location('tiny_cpu', TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for key, value in OVERRIDES.items():
    section, leaf = key.split('.')
    c[section][leaf] = value
  return c


def _perturbed(tree, seed):
  """Every weight plus N(0, 0.05²) noise (adaLN-Zero starts as a constant map)."""
  g = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jax.device_put(
      np.asarray(x) + 0.05 * g.standard_normal(x.shape).astype(np.float32), x.sharding), tree)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A checkpoint (step 1) whose raw and EMA weights differ."""
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  tx = ts_lib.make_optimizer(config.optim,
                             ts_lib.make_schedule(config.optim, config.train.num_steps))
  plan = ts_lib.plan_train_state(train.default_parts(config).model_fn, tx, mesh,
                                 config.sharding_rules, int(config.seed), config.train.rng_impl)
  state = plan.init()
  state = state.replace(params=_perturbed(state.params, 1), ema_params=_perturbed(state.params, 2))
  path = tmp_path_factory.mktemp('workdir')
  ckpt = checkpoint_lib.Checkpointer(path, config)
  ckpt.save(1, state, None, force=True)
  ckpt.wait_until_finished()
  ckpt.close()
  return str(path)


@pytest.fixture(scope='module')
def restored(workdir):
  config = tiny_config()
  model, step, mesh = evaluate.restore_for_inference(config, workdir)
  assert step == 1 and len(mesh.devices.flat) == 8
  return config, model, mesh


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """One input file per image modality; the depth has invalid pixels."""
  d = tmp_path_factory.mktemp('inputs')
  g = np.random.default_rng(0)
  h, w = PHOTO_HW
  coarse = g.uniform(0, 255, (4, 6, 3))
  photo = np.kron(coarse, np.ones((5, 6, 1))).astype(np.uint8)  # 20×36, blocky
  Image.fromarray(photo).save(d / 'photo.png')
  depth = np.linspace(1.0, 8.0, 40 * 30, dtype=np.float32).reshape(40, 30)
  depth[0, :5] = np.nan
  depth[3, 3] = 0.0
  depth[5, 7] = -2.0
  depth[9, 9] = np.inf
  np.save(d / 'depth.npy', depth)
  n = g.normal(size=(24, 24, 3)).astype(np.float32)
  n[..., 2] = -np.abs(n[..., 2]) - 0.5
  np.save(d / 'normal.npy', n / np.linalg.norm(n, axis=-1, keepdims=True))
  ids = np.kron(g.integers(0, 7, (4, 5)), np.ones((4, 4), np.int64))  # 16×20
  Image.fromarray(palettes.colorize(ids, 'scenes')).save(d / 'seg.png')
  return {'rgb': str(d / 'photo.png'), 'depth': str(d / 'depth.npy'),
          'normal': str(d / 'normal.npy'), 'segmentation': str(d / 'seg.png'), 'dir': d}


def images(config):
  return modalities_lib.images(modalities_lib.from_config(config.modalities))


# ---- every task ---------------------------------------------------------------------------


def _run(restored, out, config=None, **kw):
  config = config or restored[0]
  _, model, mesh = restored
  opts = inference.Options(out=str(out), **kw)
  results = inference.run_task(config, model, mesh, opts)
  dirs = [inference.write_result(opts.out, r, images(config), 50.0) for r in results]
  return results, dirs


TASK_INPUT = {'rgb_to_x': 'rgb', 'depth_to_x': 'depth', 'normal_to_x': 'normal',
              'segmentation_to_x': 'segmentation', 'rgb_to_rgb': 'rgb'}


@pytest.mark.parametrize('task', ['joint', *TASK_INPUT])
def test_every_task_writes_every_modality_at_the_input_size(restored, files, tmp_path, task):
  config = restored[0]
  given = TASK_INPUT.get(task)
  kw = dict(num_samples=2, class_id=3) if given is None else dict(inputs=files[given])
  if given is None:  # the guided path: a class, cfg_scale > 1 (conditional and null rows)
    config = tiny_config()
    config.sample.cfg_scale = 2.0
    kw['config'] = config
  results, dirs = _run(restored, tmp_path, task=task, **kw)
  assert len(results) == (2 if given is None else 1)
  hw = (32, 32) if given is None else inference.read_input(files[given], {
      m.name: m for m in images(config)}[given]).shape[:2]
  names = [m.name for m in images(config)] + (['input_rgb'] if task == 'rgb_to_rgb' else [])
  for d in dirs:
    for name in names:
      x = np.load(os.path.join(d, f'{name}.npy'))
      kind = name.removeprefix('input_')
      assert x.shape[:2] == hw, (name, x.shape)
      assert {'rgb': 3, 'depth': 2, 'normal': 3, 'segmentation': 2}[kind] == x.ndim
      if kind == 'rgb':
        assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
      elif kind == 'normal':
        np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, atol=1e-5)
      elif kind == 'segmentation':
        assert x.dtype == np.int32 and 0 <= x.min() and x.max() < len(palettes.get('scenes'))
      assert np.asarray(Image.open(os.path.join(d, f'{name}.png'))).shape == (*hw, 3)
    grid = np.asarray(Image.open(os.path.join(d, 'grid.png')))
    assert grid.shape == (hw[0] + 4, 2 + len(names) * (hw[1] + 2), 3)
    assert os.path.getsize(os.path.join(d, 'scene.ply')) > 0
    assert not any(f.endswith('_spread.npy') for f in os.listdir(d))
  if given is not None:
    # The held input is written as read, and held bit for bit at the model's size.
    m = {m.name: m for m in images(config)}[given]
    raw = inference.read_input(files[given], m)
    out = np.load(os.path.join(dirs[0], f'{"input_" if task == "rgb_to_rgb" else ""}{given}.npy'))
    np.testing.assert_array_equal(out, raw)
    if task != 'rgb_to_rgb':
      np.testing.assert_array_equal(results[0].model[given], inference.to_model(raw, m, 32))
  if task == 'rgb_to_rgb':  # the second stage holds the predicted depth: written as held
    depth_m = {m.name: m for m in images(config)}['depth']
    np.testing.assert_array_equal(
        np.load(os.path.join(dirs[0], 'depth.npy')),
        inference.to_output(results[0].model['depth'], depth_m, hw, (1.0, 10.0)))
    assert np.ptp(results[0].model['depth']) == 2.0  # re-normalised to [-1, 1] like the data


def test_the_rgb_file_is_written_as_its_pixels(files, restored, tmp_path):
  _, dirs = _run(restored, tmp_path, task='rgb_to_x', inputs=files['rgb'])
  pixels = np.asarray(Image.open(files['rgb']))
  np.testing.assert_array_equal(np.load(os.path.join(dirs[0], 'rgb.npy')), pixels / np.float32(255))
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(dirs[0], 'rgb.png'))), pixels)


def test_jpeg_16_bit_png_and_png_normals_are_read(restored, tmp_path):
  mods = {m.name: m for m in images(restored[0])}
  g = np.random.default_rng(2)
  Image.fromarray(g.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / 'p.jpg')
  rgb = inference.read_input(str(tmp_path / 'p.jpg'), mods['rgb'])
  assert rgb.shape == (9, 7, 3) and rgb.dtype == np.float32 and 0 <= rgb.min() <= rgb.max() <= 1
  mm = g.integers(0, 60000, (6, 5)).astype(np.uint16)
  mm[0, 0] = 0  # no reading
  Image.fromarray(mm).save(tmp_path / 'd.png')
  depth = inference.read_input(str(tmp_path / 'd.png'), mods['depth'])
  np.testing.assert_array_equal(depth, mm.astype(np.float32))
  assert inference.valid_depth(depth).sum() == mm.size - 1
  n = np.zeros((4, 4, 3), np.float32)
  n[..., 2] = -1.0
  Image.fromarray(np.round((n + 1) * 127.5).astype(np.uint8)).save(tmp_path / 'n.png')
  normal = inference.read_input(str(tmp_path / 'n.png'), mods['normal'])
  np.testing.assert_allclose(normal, n, atol=1 / 127.5)  # 8 bits: 0 is stored as 128


def test_inputs_are_encoded_as_the_data_pipeline_encodes_records(restored):
  """At the model's size nothing is resized: the model arrays equal pipeline.normalise's."""
  config = restored[0]
  g = np.random.default_rng(1)
  n = g.normal(size=(32, 32, 3)).astype(np.float32)
  example = {'rgb': g.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             'depth': g.uniform(1, 12, (32, 32)).astype(np.float32),
             'normal': n / np.linalg.norm(n, axis=-1, keepdims=True),
             'segmentation': g.integers(0, 7, (32, 32)).astype(np.int32)}
  mods = modalities_lib.from_config(config.modalities)
  want = pipeline.normalise({**example, 'label': 0, 'index': 0},
                            modalities_lib.images(mods))
  raw = {'rgb': example['rgb'] / np.float32(255), 'depth': example['depth'],
         'normal': example['normal'], 'segmentation': example['segmentation']}
  for m in modalities_lib.images(mods):
    np.testing.assert_array_equal(inference.to_model(raw[m.name], m, 32), want[m.name],
                                  err_msg=m.name)


def test_params_raw_and_ema_are_the_two_weight_sets(restored, workdir, tmp_path):
  config = tiny_config()
  config.sample.use_ema = False   # what --params=raw sets
  raw_model, _, mesh = evaluate.restore_for_inference(config, workdir)
  opts = inference.Options(task='joint', out=str(tmp_path), num_samples=1, class_id=0)
  ema = inference.run_task(config, restored[1], mesh, opts)[0].model['rgb']
  raw = inference.run_task(config, raw_model, mesh, opts)[0].model['rgb']
  again = inference.run_task(config, restored[1], mesh, opts)[0].model['rgb']
  np.testing.assert_array_equal(ema, again)
  assert not np.allclose(ema, raw, atol=1e-3)


# ---- determinism ---------------------------------------------------------------------------


def test_an_ensemble_of_one_is_the_single_sample(restored, files, tmp_path):
  """The command's rows (sharded over 8 devices, padded) against one direct sampler call."""
  config, model, mesh = restored
  rgb_m = images(config)[0]
  seed = 5
  (one,), _ = _run(restored, tmp_path / 'one', task='rgb_to_x', inputs=files['rgb'],
                   ensemble=1, seed=seed)
  cond = inference.to_model(inference.read_input(files['rgb'], rgb_m), rgb_m, 32)[None]
  # The documented noise of a row: key(seed) -> stage 0 -> input 0 -> member 0 -> start draw.
  key = jax.random.key(seed, impl=config.train.rng_impl)
  for i in (0, 0, 0, 0):
    key = jax.random.fold_in(key, i)
  initial = paths.normal(key, (32, 32, 10))[None]
  settings = {**samplers.settings_from_config(config), 'cfg_scale': 1.0}
  ref = jax.jit(lambda m, c, n: samplers.sample(
      m, None, mods=modalities_lib.from_config(config.modalities), shape=(1, 32, 32),
      y=np.full((1,), 4, np.int32), num_classes=4, condition={'rgb': c},
      noise=samplers.Noise(n), **settings))(model, cond, initial)
  for m in images(config):
    np.testing.assert_array_equal(one.model[m.name], np.asarray(ref[m.name])[0], err_msg=m.name)
  assert one.members is None and not one.spread

  # Member 0 of a larger ensemble draws the single sample's noise (other rows beside
  # it change the batch, hence the tolerance); the aggregate differs from it.
  (three,), dirs = _run(restored, tmp_path / 'three', task='rgb_to_x', inputs=files['rgb'],
                        ensemble=3, seed=seed)
  for m in images(config)[1:]:
    np.testing.assert_allclose(three.members[m.name][0], one.model[m.name], atol=1e-5)
    assert not np.allclose(three.members[m.name][1], one.model[m.name], atol=1e-2)
    assert three.spread[m.name].shape == PHOTO_HW and three.spread[m.name].max() > 0
    assert np.load(os.path.join(dirs[0], f'{m.name}_spread.npy')).shape == PHOTO_HW
    assert os.path.exists(os.path.join(dirs[0], f'{m.name}_spread.png'))
  assert not np.allclose(three.model['depth'], one.model['depth'])


def test_aggregate_aligns_votes_and_averages():
  mods = modalities_lib.from_config(tiny_config().modalities)
  g = np.random.default_rng(0)
  base = g.uniform(-1, 1, (6, 5, 1)).astype(np.float32)
  # Depth: members that are the base up to scale and shift align back onto it.
  depth = np.stack([base, 2.0 * base + 0.5, 0.5 * base - 0.25])
  # Normals: one straight ahead, two tilted ±20° about y: the mean is straight ahead.
  t = np.radians(20.0)
  ahead, left, right = (0, 0, -1), (np.sin(t), 0, -np.cos(t)), (-np.sin(t), 0, -np.cos(t))
  normal = np.stack([np.broadcast_to(np.array(v, np.float32), (6, 5, 3))
                     for v in (ahead, left, right)])
  # Segmentation: ids 1, 1, 4 -> 1 with 2/3 agreement.
  colour = lambda i: np.broadcast_to(palettes.get('scenes')[i] / np.float32(127.5) - 1.0, (6, 5, 3))
  seg = np.stack([colour(1), colour(1), colour(4)])
  rgb = np.zeros((3, 6, 5, 3), np.float32)
  agg, spread = inference.aggregate(
      {'rgb': rgb, 'depth': depth, 'normal': normal, 'segmentation': seg},
      modalities_lib.images(mods))
  np.testing.assert_allclose(agg['depth'], base, atol=1e-6)
  np.testing.assert_allclose(spread['depth'], 0.0, atol=1e-6)
  np.testing.assert_allclose(agg['normal'], np.broadcast_to(ahead, (6, 5, 3)), atol=1e-6)
  np.testing.assert_allclose(spread['normal'], 40.0 / 3, atol=1e-4)  # (0 + 20 + 20) / 3
  np.testing.assert_array_equal(palettes.ids_from_colors(agg['segmentation']), 1)
  np.testing.assert_allclose(spread['segmentation'], 1 / 3, atol=1e-7)
  # Depth members that disagree: the median of the aligned members, their spread.
  other = np.stack([base, -base, base + 0.1 * g.normal(size=base.shape).astype(np.float32)])
  agg, spread = inference.aggregate({'depth': other}, [modalities_lib.by_name(mods, 'depth')])
  aligned = np.concatenate([other[:1, ..., 0], _aligned(other[1:, ..., 0], other[0, ..., 0])])
  np.testing.assert_allclose(agg['depth'][..., 0], np.median(aligned, 0), atol=1e-6)
  np.testing.assert_allclose(spread['depth'], aligned.std(0), atol=1e-6)


def _aligned(members, ref):
  out = []
  for p in members:
    a = np.stack([p.ravel(), np.ones(p.size)], 1)
    (s, b), *_ = np.linalg.lstsq(a, ref.ravel().astype(np.float64), rcond=None)
    out.append(s * p + b)
  return np.stack(out)


# ---- the point cloud -------------------------------------------------------------------------


def test_the_point_cloud_has_one_point_per_valid_pixel(restored, files, tmp_path):
  (result,), dirs = _run(restored, tmp_path, task='depth_to_x', inputs=files['depth'])
  depth = np.load(files['depth'])
  valid = np.isfinite(depth) & (depth > 0)
  assert 0 < valid.sum() < depth.size - 5
  pts = inference.read_ply(os.path.join(dirs[0], 'scene.ply'))
  assert len(pts) == valid.sum()
  i, j = np.nonzero(valid)   # row-major order, as written
  f = depth.shape[1] / (2 * np.tan(np.radians(50.0) / 2))
  np.testing.assert_allclose(pts['z'], depth[valid], rtol=1e-6)
  np.testing.assert_allclose(pts['x'], (j - (depth.shape[1] - 1) / 2) * depth[valid] / f,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pts['y'], (i - (depth.shape[0] - 1) / 2) * depth[valid] / f,
                             rtol=1e-5, atol=1e-5)
  normal = np.stack([pts['nx'], pts['ny'], pts['nz']], -1)
  np.testing.assert_allclose(normal, result.outputs['normal'][valid], atol=1e-7)
  rgb = np.stack([pts['red'], pts['green'], pts['blue']], -1)
  np.testing.assert_array_equal(rgb, np.round(result.outputs['rgb'][valid] * 255))


# ---- bad requests --------------------------------------------------------------------------


def _bad_files(d):
  (d / 'garbage.png').write_bytes(b'not a png at all')
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / 'grey.png')
  Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(d / 'rgba.png')
  np.save(d / 'bright.npy', np.full((8, 8, 3), 1.5, np.float32))
  np.save(d / 'nodepth.npy', np.zeros((8, 8), np.float32))
  np.save(d / 'ids.npy', np.full((8, 8), 9, np.int32))


BAD = [
    (dict(task='rgb_to_x', inputs='{d}/garbage.png'), r'garbage.png: cannot read it as an image'),
    (dict(task='rgb_to_x', inputs='{d}/grey.png'),
     r"grey.png: shape \(8, 8\) \(1 channel\(s\)\); the 'rgb' input must be an RGB image"),
    (dict(task='rgb_to_x', inputs='{d}/rgba.png'), r'rgba.png: shape \(8, 8, 4\) \(4 channel'),
    (dict(task='depth_to_x', inputs='{d}/grey.png'), r'grey.png: no valid depth pixel'),
    (dict(task='rgb_to_x', inputs='{d}/bright.npy'), r'float rgb must lie in \[0, 1\]'),
    (dict(task='depth_to_x', inputs='{d}/nodepth.npy'), r'no valid depth pixel'),
    (dict(task='segmentation_to_x', inputs='{d}/ids.npy'), r'ids span \[9, 9\]; palette'),
    (dict(task='albedo_to_x', inputs='{d}/grey.png'),
     r"--task=albedo_to_x: the model has no image modality 'albedo'.*tasks: joint, rgb_to_x"),
    (dict(task='rgb_to_rgb', via='albedo', inputs='{d}/grey.png'),
     r'--via=albedo: the model has no'),
    (dict(task='joint', class_id=4), r'--class_id=4 is outside \[0, 3\]'),
    (dict(task='joint', class_id=-1), r'--class_id=-1 is outside'),
    (dict(task='joint', cfg_scale=0.5), r'cfg_scale=0.5 must be >= 1'),
    (dict(task='joint', guidance_low=0.8, guidance_high=0.2), r'guidance_low=0.8 exceeds'),
    (dict(task='joint', num_steps=0), r'num_steps=0 must be >= 1'),
    (dict(task='rgb_to_x', inputs='{d}/*.jpeg'), r"--input='.*\*.jpeg' matches no file"),
    (dict(task='depth_to_x', inputs='{d}/nodepth.npy', ensemble=4),
     r'--ensemble=4 applies to understanding \(--task=rgb_to_x\), not --task=depth_to_x'),
    (dict(task='joint', inputs='{d}/grey.png'),
     r'--task=joint generates from a class; it reads no'),
    (dict(task='rgb_to_x', inputs='{d}/grey.png', num_samples=3), r'--num_samples applies to'),
]


@pytest.mark.parametrize('request_, message', BAD, ids=[m[:30] for _, m in BAD])
def test_a_bad_request_is_refused_naming_the_problem(restored, tmp_path, request_, message):
  _bad_files(tmp_path)
  config = tiny_config()
  kw = dict(request_)
  for key in ('cfg_scale', 'guidance_low', 'guidance_high', 'num_steps'):
    if key in kw:
      config.sample[key] = kw.pop(key)
  if 'inputs' in kw:
    kw['inputs'] = kw['inputs'].format(d=tmp_path)
  opts = inference.Options(out=str(tmp_path / 'out'), **kw)
  with pytest.raises(inference.InferenceError, match=message):
    inference.run_task(config, restored[1], restored[2], opts)
  assert not os.path.exists(tmp_path / 'out')


# ---- the command line ------------------------------------------------------------------------


def run_main(*args, devices=8, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  overrides = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  return subprocess.run([sys.executable, '-m', 'mmgen_jax.main', f'--config={TINY}', *overrides,
                         '--mode=sample', *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_the_command_refuses_a_bad_request_in_one_line(workdir, tmp_path):
  r = run_main(f'--workdir={workdir}', '--task=rgb_to_x', f'--input={tmp_path}/*.png',
               f'--out={tmp_path}/out')
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1] == (
      f"mmgen_jax sample: --input='{tmp_path}/*.png' matches no file.")
  assert 'Traceback' not in r.stderr


@pytest.mark.slow
def test_one_and_eight_devices_write_the_same_files(workdir, files, tmp_path):
  """The command on 1 and 8 fake devices (padded differently, SDE noise per step)."""
  inputs = tmp_path / 'in'
  inputs.mkdir()
  for name in ('a', 'b', 'c'):
    shutil.copy(files['rgb'], inputs / f'{name}.png')
  args = [f'--workdir={workdir}', '--task=rgb_to_x', f'--input={inputs}/*.png', '--ensemble=3',
          '--config.sample.method=euler_maruyama', '--seed=7', '--params=raw']
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = list(pool.map(lambda n: run_main(*args, f'--out={tmp_path}/dev{n}', devices=n), (1, 8)))
  for r in runs:
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'rgb_to_x: 3 result(s) from checkpoint step 1' in r.stdout
  for stem in 'abc':
    names = sorted(os.listdir(tmp_path / 'dev1' / stem))
    assert names == sorted(os.listdir(tmp_path / 'dev8' / stem))
    assert 'depth_spread.npy' in names and 'scene.ply' in names
    for name in names:
      one, eight = (tmp_path / f'dev{n}' / stem / name for n in (1, 8))
      assert one.read_bytes() == eight.read_bytes(), (stem, name)
  # The three copies of one photo got different noise.
  a, b = (np.load(tmp_path / 'dev8' / s / 'depth.npy') for s in 'ab')
  assert not np.array_equal(a, b)
