"""REPA's projection loss (REPA / MMGen loss.py) in the decoupled objective."""

import importlib.util
import os
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmgen_jax import config_schema
from mmgen_jax import config_validation
from mmgen_jax import modalities
from mmgen_jax import plan
from mmgen_jax.data import pipeline
from mmgen_jax.diffusion import decoupled
from mmgen_jax.diffusion import paths
from mmgen_jax.models import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODS = modalities.from_config(config_schema.scenes_modalities())
CHANNELS = [m.channels for m in modalities.images(MODS)]  # 3, 1, 3, 3
N, RES, TOKENS, Z = 4, 8, 16, 6  # 8×8 pixels, patch 2: a 4×4 token grid


def _loss(zt, z):
  return float(decoupled.repa_loss([jnp.asarray(zt, jnp.float32)], [jnp.asarray(z, jnp.float32)]))


# ---- the loss -------------------------------------------------------------------------


def test_repa_loss_of_aligned_orthogonal_and_opposite_tokens():
  z = np.random.default_rng(0).normal(size=(2, 5, 3))
  assert _loss(z, z) == pytest.approx(-1.0)
  assert _loss(-z, z) == pytest.approx(1.0)
  assert _loss(3.7 * z, 0.2 * z) == pytest.approx(-1.0)  # lengths do not matter
  e = np.eye(3)
  assert _loss(np.broadcast_to(e[0], (2, 5, 3)), np.broadcast_to(e[1], (2, 5, 3))) == \
      pytest.approx(0.0, abs=1e-7)


def test_repa_loss_means_over_tokens_then_samples_and_projectors():
  # Sample 0: cos = 1 and 0 on its two tokens (−0.5); sample 1: cos = −1 twice (+1).
  zt = np.array([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, -3.0]]])
  z = np.array([[[5.0, 0.0], [1.0, 0.0]], [[-1.0, -1.0], [0.0, 1.0]]])
  assert _loss(zt, z) == pytest.approx((-0.5 + 1.0) / 2)
  # Two projectors: the mean of their losses.
  two = decoupled.repa_loss([jnp.asarray(zt), jnp.asarray(z)], [jnp.asarray(z), jnp.asarray(z)])
  assert float(two) == pytest.approx(((-0.5 + 1.0) / 2 - 1.0) / 2)


# ---- the objective ------------------------------------------------------------------------


class Out(NamedTuple):
  images: tuple
  logits: tuple = ()
  zs: tuple = ()


class FixedProjection:
  """Predicts zero images and a fixed projection, so the REPA term is known."""

  def __init__(self, zs):
    self.zs = zs

  def __call__(self, x, t, y, task=None):
    return Out(images=paths.split_slots(jnp.zeros_like(x), CHANNELS), zs=self.zs)


def _cfg(**overrides):
  cfg = ml_collections.ConfigDict(config_schema.base_config().objective.to_dict())
  cfg.update(overrides)
  return cfg


def _batch(features=True, tokens=TOKENS):
  rng = np.random.default_rng(1)
  b = {name: jnp.asarray(rng.uniform(-1, 1, (N, RES, RES, c)), jnp.float32)
       for name, c in zip(['rgb', 'depth', 'normal', 'segmentation'], CHANNELS)}
  b['label'] = jnp.zeros((N,), jnp.int32)
  if features:
    b['repa_features'] = jnp.asarray(rng.normal(size=(N, tokens, Z)), jnp.float32)
  return b


def _run(model, batch, coeff):
  return jax.jit(lambda b: decoupled.decoupled_loss(
      model, b, jax.random.key(0), mods=MODS, cfg=_cfg(repa_coeff=coeff), num_classes=4))(batch)


def test_total_is_diffusion_plus_coeff_times_projection():
  batch = _batch()
  zs = (jnp.asarray(np.random.default_rng(2).normal(size=(N, TOKENS, Z)), jnp.float32),)
  model = FixedProjection(zs)
  loss, m = _run(model, batch, 0.5)
  expected_repa = float(decoupled.repa_loss(zs, [batch['repa_features']]))
  assert float(m['repa_loss']) == pytest.approx(expected_repa)
  assert float(loss) == pytest.approx(float(m['diffusion_loss']) + 0.5 * expected_repa)
  assert float(m['loss']) == pytest.approx(float(loss))
  # Off: the same diffusion loss (same draws), no REPA metrics, features not needed.
  loss0, m0 = _run(model, _batch(features=False), 0.0)
  assert float(loss0) == pytest.approx(float(m['diffusion_loss']))
  assert 'repa_loss' not in m0


def test_errors_name_the_field_and_the_token_grid():
  zs = (jnp.zeros((N, TOKENS, Z)),)
  with pytest.raises(KeyError, match=r"batch\['repa_features'\] of shape \(N, T, z\) = "
                                     r'\(4, 16, 6\)'):
    _run(FixedProjection(zs), _batch(features=False), 0.5)
  with pytest.raises(ValueError, match=r"batch\['repa_features'\] has shape \(4, 64, 6\); "
                                       r"expected \(4, 16, 6\).*4×4 token grid"):
    _run(FixedProjection(zs), _batch(tokens=64), 0.5)
  with pytest.raises(ValueError, match=r'no REPA projector.*repa_encoder_depth'):
    _run(FixedProjection(()), _batch(), 0.5)
  with pytest.raises(ValueError, match=r'repa_coeff=-1.0 must be >= 0'):
    _run(FixedProjection(zs), _batch(), -1.0)


# ---- the gradient reaches the projector and the blocks before it only ----------------------


def _tiny_config(scan_layers=True):
  c = config_schema.base_config()
  c.data.resolution = RES
  c.model.update(hidden_size=32, depth=4, num_heads=2, repa_encoder_depth=2, repa_z_dim=Z,
                 repa_projector_dim=16, scan_layers=scan_layers)
  return c


def _model(scan_layers):
  return build.build_model(_tiny_config(scan_layers), rngs=nnx.Rngs(0))


def test_the_planned_batch_feeds_the_loss():
  c = _tiny_config()
  c.objective.repa_coeff = 0.5
  abatch = plan.abstract_batch(c, 2)
  assert abatch['repa_features'].shape == (2, TOKENS, Z)
  loss_fn = decoupled.make_loss_fn(c)
  _, metrics = jax.eval_shape(lambda b: loss_fn(_model(True), b, jax.random.key(0)), abatch)
  assert 'repa_loss' in metrics


def _leaf_norms(tree, prefix):
  """(path, array) of every leaf of `tree` whose path starts with `prefix`."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = '.'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)
    if name.startswith(prefix):
      out.append((name, np.asarray(leaf)))
  assert out, f'no parameter under {prefix!r}'
  return out


@pytest.mark.parametrize('scan_layers', [True, False])
def test_gradient_reaches_projector_and_first_blocks_only(scan_layers):
  model = _model(scan_layers)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, RES, RES, sum(CHANNELS))), jnp.float32)
  t = jnp.full((2, len(CHANNELS)), 0.5)
  y, task = jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
  feats = jnp.asarray(rng.normal(size=(2, TOKENS, Z)), jnp.float32)

  graphdef, params = nnx.split(model)
  loss = lambda p: decoupled.repa_loss(nnx.merge(graphdef, p)(x, t, y, task).zs, [feats])
  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))  # eager dispatch is slow on CPU
  assert all(np.abs(g).max() > 0 for _, g in _leaf_norms(grads, 'projectors'))
  assert all(not g.any() for _, g in _leaf_norms(grads, 'final_layers'))
  if scan_layers:  # one stacked module: axis 0 is the block
    leaves = _leaf_norms(grads, 'blocks')
    for block in range(4):
      touched = any(np.abs(g[block]).max() > 0 for _, g in leaves)
      assert touched == (block < 2), block
  else:
    for block in range(4):
      touched = any(np.abs(g).max() > 0 for _, g in _leaf_norms(grads, f'blocks.{block}.'))
      assert touched == (block < 2), block


# ---- data and config --------------------------------------------------------------------


def _records(n, features):
  rng = np.random.default_rng(4)
  return [dict(rgb=rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8),
               depth=rng.uniform(1, 5, (RES, RES)).astype(np.float32),
               normal=np.tile(np.float32([0, 0, -1]), (RES, RES, 1)),
               segmentation=np.zeros((RES, RES), np.uint8), label=np.int64(1),
               repa_features=features(i)) for i in range(n)]


def _data_config(repa_coeff=0.5):
  c = config_schema.base_config()
  c.data.resolution = RES
  c.data.global_batch_size = 2
  c.data.augment.hflip = False
  c.objective.repa_coeff = repa_coeff
  return c


def test_training_batches_carry_each_record_s_features():
  records = _records(4, lambda i: np.full((TOKENS, Z), i, np.float32))
  it = pipeline.make_iterator(_data_config(), 'train', train=True, source=records)
  for _ in range(2):  # the whole (shuffled) split
    batch = next(it)
    assert batch['repa_features'].shape == (2, TOKENS, Z)
    np.testing.assert_array_equal(batch['repa_features'][:, 0, 0], batch['index'])


def test_pipeline_names_a_bad_feature_record():
  records = _records(4, lambda i: np.zeros((TOKENS, Z), np.float32))
  records[1]['repa_features'] = np.zeros((TOKENS * Z,), np.float32)
  it = pipeline.make_iterator(_data_config(), 'train', train=True, source=records)
  with pytest.raises(pipeline.BadRecordError, match=r"train\[1\], field 'repa_features': "
                                                    r'expected float \(tokens, dim\)'):
    for _ in range(2):  # the split, in its shuffled order
      next(it)


def test_evaluation_batches_leave_the_features_unread_with_the_repa_loss_on():
  # Evaluation never reads them: a large array not to decode, batch or send to devices.
  records = _records(5, lambda i: np.full((TOKENS, Z), i, np.float32))
  records[3]['repa_features'] = np.zeros((TOKENS * Z,), np.float32)  # would be refused if read
  batches = list(pipeline.make_iterator(_data_config(repa_coeff=0.5), 'validation', train=False,
                                        source=records))
  assert len(batches) == 3 and [b['valid'].sum() for b in batches] == [2, 2, 1]
  for batch in batches:
    assert 'repa_features' not in batch, sorted(batch)
    assert batch['rgb'].shape == (2, RES, RES, 3)
  assert all('repa_features' in r for r in records)  # the records themselves are untouched


def test_without_the_repa_loss_the_features_are_left_unread():
  records = _records(4, lambda i: np.zeros((TOKENS, Z), np.float32))
  records[1]['repa_features'] = np.zeros((TOKENS * Z,), np.float32)  # would be refused if read
  for train in (True, False):
    batch = next(pipeline.make_iterator(_data_config(repa_coeff=0.0), 'train', train=train,
                                        source=records))
    assert 'repa_features' not in batch and batch['rgb'].shape == (2, RES, RES, 3)
  assert all('repa_features' in r for r in records)  # the records themselves are untouched


def test_validation_names_what_repa_needs():
  c = config_schema.base_config()
  c.objective.repa_coeff = 0.5
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(c, num_devices=1, num_processes=1)
  message = str(e.value)
  assert 'needs the REPA projector: set config.model.repa_encoder_depth' in message
  assert 'config.data.augment must be off (hflip=True' in message
  c.model.repa_encoder_depth = 2
  c.data.augment.hflip = False
  assert config_validation.validate(c, num_devices=1, num_processes=1) == []
  c.objective.name = 'mt_elbo'
  with pytest.raises(config_validation.ConfigError, match="'decoupled' objective only"):
    config_validation.validate(c, num_devices=1, num_processes=1)


def test_imagenet_config_sets_the_released_recipe():
  path = os.path.join(REPO, 'configs', 'imagenet256_xl2.py')
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.objective.repa_coeff == 0.5
  assert (c.model.repa_encoder_depth, c.model.repa_z_dim) == (8, 768)
  mods = {m.name: m for m in modalities.from_config(c.modalities)}
  assert [mods[k].encoding for k in ('rgb', 'depth', 'normal', 'segmentation')] == \
      ['rgb', 'disparity_minmax', 'stablenormal_rgb', 'random_colors']
  assert mods['depth'].channels == 1  # the codec replicates it to RGB for the SD-VAE
  # 256 px / VAE 8 / patch 2 = 16×16 tokens: DINOv2-B/14 at 224 px gives the same 256.
  assert (c.data.resolution // 8 // c.model.patch_size) ** 2 == (224 // 14) ** 2
