"""MMGen's decoupled-timestep objective with small fake models."""

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmgen_jax import config_schema
from mmgen_jax import modalities
from mmgen_jax.diffusion import decoupled
from mmgen_jax.diffusion import paths

MODS = modalities.from_config(config_schema.scenes_modalities())
CHANNELS = [m.channels for m in modalities.images(MODS)]  # rgb 3, depth 1, normal 3, seg 3
NUM_CLASSES = 4


class Out(NamedTuple):
  images: tuple
  logits: tuple = ()
  zs: tuple = ()


class ZeroModel(nnx.Module):
  """Predicts zero for every head: the loss is then the masked mean of target^2."""

  def __call__(self, x, t, y, task=None):
    return Out(images=paths.split_slots(jnp.zeros_like(x), CHANNELS))


class TinyModel(nnx.Module):
  """A learnable per-pixel model with the MMDiT call signature."""

  def __init__(self, rngs):
    c = sum(CHANNELS)
    self.conv = nnx.Linear(c, c, rngs=rngs)  # a 1x1 convolution on NHWC
    self.t_proj = nnx.Linear(len(CHANNELS), c, rngs=rngs)
    self.y_emb = nnx.Embed(NUM_CLASSES + 1, c, rngs=rngs)
    self.task_emb = nnx.Embed(len(CHANNELS) + 1, c, rngs=rngs)

  def __call__(self, x, t, y, task=None):
    h = self.conv(x) + (self.t_proj(t) + self.y_emb(y) + self.task_emb(task))[:, None, None, :]
    return Out(images=paths.split_slots(h, CHANNELS))


def _loss(model, batch, rng, cfg, **kw):
  """decoupled_loss under one jit (eager op-by-op dispatch is slow on CPU)."""
  fn = lambda b, r: decoupled.decoupled_loss(model, b, r, mods=MODS, cfg=cfg,
                                             num_classes=NUM_CLASSES, **kw)
  return jax.jit(fn)(batch, rng)


def _cfg(**overrides):
  cfg = ml_collections.ConfigDict(config_schema.base_config().objective.to_dict())
  cfg.update(overrides)
  return cfg


def _batch(n=8, seed=0, hw=4):
  rng = np.random.default_rng(seed)
  batch = {m.name: jnp.asarray(rng.uniform(-1, 1, (n, hw, hw, m.channels)), jnp.float32)
           for m in modalities.images(MODS)}
  batch['label'] = jnp.asarray(rng.integers(0, NUM_CLASSES, (n,)), jnp.int32)
  return batch


def test_mode_statistics():
  n, M = 40_000, 4
  cfg = _cfg(joint_prob=0.75, rgb_only_prob=0.5, slot_dropout_prob=0.3, cond_t_max=0.01)
  modes = jax.jit(lambda k: decoupled.sample_modes(k, n, M, cfg))(jax.random.key(1))
  t, task, joint, sup = (np.asarray(modes[k]) for k in ('t', 'task', 'joint', 'supervised'))
  se = 4 / np.sqrt(n)
  assert abs(joint.mean() - 0.75) < se
  # Joint samples: task 0, one shared t.
  assert np.all(task[joint] == 0)
  assert np.all(t[joint] == t[joint][:, :1])
  # Conditional: task m + 1, the condition slot at t <= cond_t_max and unsupervised.
  cond = ~joint
  slot = task[cond] - 1
  rows = np.arange(cond.sum())
  assert set(np.unique(slot)) == {0, 1, 2, 3}
  assert np.all(t[cond][rows, slot] <= 0.01)
  assert np.all(sup[cond][rows, slot] == 0)
  others = np.ones((cond.sum(), M), bool)
  others[rows, slot] = False
  t_others = np.where(others, t[cond], np.nan)
  assert np.allclose(np.nanmax(t_others, 1), np.nanmin(t_others, 1))
  # RGB is always supervised unless it is the condition.
  assert np.all(sup[joint][:, 0] == 1) and np.all(sup[cond][slot != 0, 0] == 1)
  # RGB-only: a fraction rgb_only_prob of all samples, all of them joint.
  # (Joint samples that are not RGB-only lose all three non-RGB slots w.p. 0.3^3.)
  no_aux = joint & (sup[:, 1:].sum(1) == 0)
  assert abs(no_aux.mean() - (0.5 + 0.25 * 0.3 ** 3)) < se
  # Slot dropout on the rest: non-RGB, non-condition slots kept with prob 0.7.
  keep = sup[cond][:, 1:][others[:, 1:]]
  assert abs(keep.mean() - 0.7) < 4 / np.sqrt(keep.size)


def test_loss_is_masked_weighted_mean():
  cfg = _cfg(joint_prob=0.5, rgb_only_prob=0.25, slot_dropout_prob=0.5)
  batch = _batch(n=16)
  rng = jax.random.key(7)
  loss, metrics = _loss(ZeroModel(), batch, rng, cfg)
  # Direct computation from the documented rng layout.
  k_modes, _, k_noise = jax.random.split(rng, 3)
  modes = jax.jit(lambda k: decoupled.sample_modes(k, 16, 4, cfg))(k_modes)
  images = modalities.images(MODS)
  x0 = np.concatenate([batch[m.name] for m in images], -1)
  eps = np.asarray(paths.normal(k_noise, x0.shape))
  v = np.split(eps - x0, np.cumsum(CHANNELS)[:-1], axis=-1)
  sup = np.asarray(modes['supervised'])
  total = 0.0
  for i, m in enumerate(images):
    per_sample = np.asarray(v[i] ** 2).mean(axis=(1, 2, 3))
    expected = (per_sample * sup[:, i]).sum() / max(sup[:, i].sum(), 1)
    np.testing.assert_allclose(metrics[f'loss/{m.name}'], expected, rtol=1e-5)
    total += m.loss_weight * expected
  np.testing.assert_allclose(loss, total, rtol=1e-5)
  np.testing.assert_allclose(metrics['joint_fraction'], np.asarray(modes['joint']).mean())


def test_unsupervised_modality_gives_zero_not_nan():
  cfg = _cfg(joint_prob=1.0, rgb_only_prob=1.0)
  loss, metrics = _loss(ZeroModel(), _batch(), jax.random.key(0), cfg)
  assert float(metrics['loss/depth']) == 0.0 and float(metrics['loss/segmentation']) == 0.0
  np.testing.assert_allclose(loss, metrics['loss/rgb'], rtol=1e-6)


@pytest.mark.parametrize('path,prediction', [('vp_cosine', 'eps'), ('vp_linear', 'x0')])
def test_other_paths_use_their_targets(path, prediction):
  cfg = _cfg(path=path, prediction=prediction, joint_prob=1.0, rgb_only_prob=0.0)
  batch = _batch()
  rng = jax.random.key(3)
  _, metrics = _loss(ZeroModel(), batch, rng, cfg)
  _, _, k_noise = jax.random.split(rng, 3)
  x0 = jnp.concatenate([batch[m.name] for m in modalities.images(MODS)], -1)
  eps = paths.normal(k_noise, x0.shape)
  want = eps if prediction == 'eps' else x0
  np.testing.assert_allclose(metrics['loss/rgb'], jnp.mean(want[..., :3] ** 2), rtol=1e-5)


def test_label_dropout():
  y = jnp.zeros((20_000,), jnp.int32)
  dropped = decoupled.drop_labels(jax.random.key(0), y, 0.1, NUM_CLASSES)
  assert set(np.unique(dropped)) == {0, NUM_CLASSES}
  assert abs(float((dropped == NUM_CLASSES).mean()) - 0.1) < 0.01
  assert decoupled.drop_labels(jax.random.key(0), y, 0.0, NUM_CLASSES) is y


def test_jit_and_grad_with_learnable_model():
  model = TinyModel(nnx.Rngs(0))
  cfg = _cfg(slot_dropout_prob=0.2)
  batch = _batch()

  @nnx.jit
  def step(model, batch, rng):
    fn = lambda m: decoupled.decoupled_loss(m, batch, rng, mods=MODS, cfg=cfg,
                                            num_classes=NUM_CLASSES, class_dropout_prob=0.1)
    return nnx.value_and_grad(fn, has_aux=True)(model)

  (loss, metrics), grads = step(model, batch, jax.random.key(0))
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert set(metrics) >= {'loss', 'joint_fraction', 'loss/rgb', 'loss/depth', 'loss/normal',
                          'loss/segmentation'}
  norms = jax.tree.leaves(jax.tree.map(lambda g: float(jnp.abs(g).sum()), nnx.to_pure_dict(grads)))
  assert all(v > 0 for v in norms)


def test_config_errors_are_named():
  with pytest.raises(ValueError, match='rgb_only_prob'):
    decoupled.decoupled_loss(ZeroModel(), _batch(), jax.random.key(0), mods=MODS,
                             cfg=_cfg(joint_prob=0.25, rgb_only_prob=0.5), num_classes=4)
  with pytest.raises(KeyError, match='depth'):
    batch = _batch()
    del batch['depth']
    decoupled.decoupled_loss(ZeroModel(), batch, jax.random.key(0), mods=MODS, cfg=_cfg(),
                             num_classes=4)


def tiny_config():
  config = config_schema.base_config()
  config.data.resolution = 4
  config.model.update(hidden_size=32, depth=1, num_heads=2, mlp_ratio=2.0)
  return config


@pytest.mark.slow
def test_real_mmdit_loss_reaches_every_parameter():
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  model = nnx.jit(lambda: build.build_model(config, rngs=nnx.Rngs(0)))()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  noise = np.random.default_rng(0)  # move the zero-initialised (adaLN-Zero) layers
  params = jax.tree.map(lambda p: p + 0.05 * noise.standard_normal(p.shape, np.float32), params)
  model = nnx.merge(graphdef, params, rest)
  loss_fn = decoupled.make_loss_fn(config)
  batch = _batch(n=16)

  @nnx.jit
  def step(model):
    return nnx.value_and_grad(lambda m: loss_fn(m, batch, jax.random.key(0)), has_aux=True)(model)

  (loss, metrics), grads = step(model)
  assert np.isfinite(float(loss)) and 0.0 < float(metrics['joint_fraction']) < 1.0
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]
  zero = [jax.tree_util.keystr(k) for k, v in flat if float(jnp.abs(v).sum()) == 0.0]
  assert not zero, f'no gradient reaches {zero}'
