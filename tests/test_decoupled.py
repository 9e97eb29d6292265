"""MMGen's decoupled-timestep objective, checked against MMGen's loss.py / train.py with fake models."""

import importlib.util
import math
import os
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
NAMES = [m.name for m in modalities.images(MODS)]  # rgb, depth, normal, segmentation
CHANNELS = [m.channels for m in modalities.images(MODS)]  # 3, 1, 3, 3
WEIGHTS = [m.loss_weight for m in modalities.images(MODS)]  # 1, 0.2, 0.1, 0.1
NUM_CLASSES = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Out(NamedTuple):
  images: tuple
  logits: tuple = ()
  zs: tuple = ()


class Recorder:
  """Predicts zero for every head (the loss is then the masked mean of target²) and
  keeps what it was fed; under jit the loss function returns `seen` as outputs."""

  def __call__(self, x, t, y, task=None):
    self.seen = dict(x_t=x, t=t, y=y, task=task)
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


def _run(batch, rng, cfg, **kw):
  """(loss, metrics, what the model saw), under one jit (eager dispatch is slow on CPU)."""
  model = Recorder()

  def fn(b, r):
    loss, metrics = decoupled.decoupled_loss(model, b, r, mods=MODS, cfg=cfg,
                                             num_classes=NUM_CLASSES, **kw)
    return loss, metrics, model.seen
  return jax.device_get(jax.jit(fn)(batch, rng))


def _modes(cfg, n, seed=1):
  modes = jax.jit(lambda k: decoupled.sample_modes(k, n, NAMES, cfg))(jax.random.key(seed))
  return {k: np.asarray(v) for k, v in modes.items()}


def _cfg(**overrides):
  cfg = ml_collections.ConfigDict(config_schema.base_config().objective.to_dict())
  cfg.update(overrides)
  return cfg


def _batch(n=8, seed=0, hw=4):
  rng = np.random.default_rng(seed)
  batch = {name: jnp.asarray(rng.uniform(-1, 1, (n, hw, hw, c)), jnp.float32)
           for name, c in zip(NAMES, CHANNELS, strict=True)}
  batch['label'] = jnp.asarray(rng.integers(0, NUM_CLASSES, (n,)), jnp.int32)
  return batch


def _noise(batch, rng):
  """The noise the loss draws: rng splits into (modes, labels, noise)."""
  x0 = np.concatenate([batch[name] for name in NAMES], -1)
  return x0, np.asarray(paths.normal(jax.random.split(rng, 3)[2], x0.shape))


def _slots(x):
  return np.split(x, np.cumsum(CHANNELS)[:-1], axis=-1)


def _config_file(name, variant=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


# ---- what the model is fed ------------------------------------------------------------------


def test_model_sees_x_t_per_slot_times_and_tasks():
  batch, rng = _batch(n=64), jax.random.key(3)
  _, _, seen = _run(batch, rng, _cfg(joint_prob=0.5, rgb_only_prob=0.25))
  x0, eps = _noise(batch, rng)
  t, task = seen['t'], seen['task']
  assert t.shape == (64, 4) and task.shape == (64,)
  # x_t = (1 - t) x0 + t eps, each slot at its own time.
  for i, (x_t, x, e) in enumerate(zip(_slots(seen['x_t']), _slots(x0), _slots(eps), strict=True)):
    ti = t[:, i, None, None, None]
    np.testing.assert_allclose(x_t, (1 - ti) * x + ti * e, atol=1e-6)
  joint = task == 0
  assert 0 < joint.sum() < 64
  # Joint: one shared time. Conditional (task m + 1): slot m at t <= 0.01, the rest shared.
  np.testing.assert_array_equal(t[joint], np.repeat(t[joint][:, :1], 4, axis=1))
  rows = np.flatnonzero(~joint)
  cond = task[rows] - 1
  assert np.all((cond >= 0) & (cond < 4))
  assert np.all(t[rows, cond] <= 0.01)
  for r, c in zip(rows, cond, strict=True):
    others = np.delete(t[r], c)
    assert np.all(others == others[0])


@pytest.mark.parametrize('prob', [0.0, 1.0])
def test_model_sees_dropped_labels(prob):
  batch = _batch(n=16)
  _, _, seen = _run(batch, jax.random.key(0), _cfg(), class_dropout_prob=prob)
  want = np.full(16, NUM_CLASSES) if prob else np.asarray(batch['label'])
  np.testing.assert_array_equal(seen['y'], want)


def test_label_dropout_rate():
  y = jnp.zeros((20_000,), jnp.int32)
  dropped = decoupled.drop_labels(jax.random.key(0), y, 0.1, NUM_CLASSES)
  assert set(np.unique(dropped)) == {0, NUM_CLASSES}
  assert abs(float((dropped == NUM_CLASSES).mean()) - 0.1) < 0.01
  assert decoupled.drop_labels(jax.random.key(0), y, 0.0, NUM_CLASSES) is y


def test_model_without_task_embedding_gets_no_task():
  _, _, seen = _run(_batch(), jax.random.key(0), _cfg(), use_task=False)
  assert seen['task'] is None


# ---- how modes are drawn --------------------------------------------------------------------


def test_per_sample_mode_statistics():
  n = 40_000
  m = _modes(_cfg(joint_prob=0.75, rgb_only_prob=0.5, slot_dropout_prob=0.3), n)
  t, task, joint, sup = m['t'], m['task'], m['joint'], m['supervised']
  se = 4 / np.sqrt(n)
  assert abs(joint.mean() - 0.75) < se
  assert np.all(task[joint] == 0) and np.all(task[~joint] > 0)
  slot = task[~joint] - 1
  rows = np.arange(len(slot))
  assert set(np.unique(slot)) == {0, 1, 2, 3}
  assert np.all(sup[~joint][rows, slot] == 0)  # the condition is never supervised
  # RGB is supervised unless it is the condition.
  assert np.all(sup[joint][:, 0] == 1) and np.all(sup[~joint][slot != 0, 0] == 1)
  # RGB-only: rgb_only_prob of all samples, all joint (the others lose all three
  # non-RGB slots only by dropout, w.p. 0.3^3).
  no_aux = joint & (sup[:, 1:].sum(1) == 0)
  assert abs(no_aux.mean() - (0.5 + 0.25 * 0.3 ** 3)) < se
  # Fixed-rate dropout: conditional samples keep each other non-RGB slot w.p. 0.7.
  others = np.ones((len(slot), 4), bool)
  others[rows, slot] = False
  keep = sup[~joint][:, 1:][others[:, 1:]]
  assert abs(keep.mean() - 0.7) < 4 / np.sqrt(keep.size)


def test_by_position_layout_is_mmgens_quarter_mixing():
  """train_imagenet.sh: --ratio-train-onlyrgb 0.5 --use-quarter-mixing, per process batch."""
  cfg = _cfg(layout='by_position', group_size=8, joint_prob=0.75, rgb_only_prob=0.5)
  m = _modes(cfg, 4 * 8)
  position = np.arange(32) % 8
  np.testing.assert_array_equal(m['joint'], position < 6)
  np.testing.assert_array_equal(m['task'] == 0, position < 6)
  supervised_aux = m['supervised'][:, 1:].sum(1)
  np.testing.assert_array_equal(supervised_aux[position < 4], 0)  # RGB only
  np.testing.assert_array_equal(m['supervised'][position < 6, 0], 1)
  np.testing.assert_array_equal(supervised_aux[(position >= 4) & (position < 6)], 3)
  cond = np.flatnonzero(position >= 6)
  assert np.all(m['task'][cond] > 0)
  assert np.all(m['supervised'][cond, m['task'][cond] - 1] == 0)


def _mmgen_dropped_count_pmf(pairs: int, non_rgb: int) -> np.ndarray:
  """P(d non-RGB pairs dropped): k ~ U{0..P-1} of P pairs without replacement (loss.py)."""
  pmf = np.zeros(non_rgb + 1)
  for k in range(pairs):
    for d in range(non_rgb + 1):
      pmf[d] += (math.comb(non_rgb, d) * math.comb(pairs - non_rgb, k - d)
                 / math.comb(pairs, k) / pairs) if 0 <= k - d <= pairs - non_rgb else 0.0
  return pmf


def test_per_batch_dropout_is_mmgens_count_per_process_batch():
  """Per group of 8: 4 RGB-only samples, then 4 joint ones whose 16 (sample, slot)
  pairs lose k ~ U{0..15} drawn without replacement, RGB pairs spared."""
  groups = 4000
  cfg = _cfg(layout='by_position', group_size=8, joint_prob=1.0, rgb_only_prob=0.5,
             slot_dropout='per_batch')
  sup = _modes(cfg, 8 * groups)['supervised'].reshape(groups, 8, 4)
  assert np.all(sup[:, :, 0] == 1)  # RGB is never dropped
  assert np.all(sup[:, :4, 1:] == 0)  # RGB-only samples
  dropped = (1 - sup[:, 4:, 1:]).sum(axis=(1, 2))
  freq = np.bincount(dropped.astype(int), minlength=13) / groups
  pmf = _mmgen_dropped_count_pmf(pairs=16, non_rgb=12)
  tol = 4 * np.sqrt(pmf * (1 - pmf) / groups) + 1e-3
  assert np.all(np.abs(freq - pmf) < tol), np.round(np.stack([freq, pmf]), 3)


def test_finetune_rgb2x_conditions_every_sample_on_clean_rgb():
  """scenes32.py:rgb2x is finetune_hypersim_rgb2x.sh's --cond-task-fixed 0."""
  cfg = _config_file('scenes32', 'rgb2x').objective
  batch, rng = _batch(n=32), jax.random.key(5)
  _, metrics, seen = _run(batch, rng, cfg)
  np.testing.assert_array_equal(seen['task'], 1)  # 1 + index of rgb: every sample
  assert np.all(seen['t'][:, 0] == 0.0)  # exactly clean
  np.testing.assert_array_equal(_slots(seen['x_t'])[0], batch['rgb'])
  t_rest = seen['t'][:, 1:]
  assert np.all(t_rest == t_rest[:, :1]) and len(np.unique(t_rest[:, 0])) == 32
  assert float(metrics['joint_fraction']) == 0.0
  assert float(metrics['supervised_fraction/rgb']) == 0.0 and float(metrics['loss/rgb']) == 0.0
  for name in NAMES[1:]:
    assert float(metrics[f'supervised_fraction/{name}']) == 1.0


def test_fixed_condition_among_joint_samples():
  m = _modes(_cfg(joint_prob=0.5, rgb_only_prob=0.0, cond_task_fixed='normal'), 2000)
  assert set(np.unique(m['task'])) == {0, 3}
  assert np.all(m['t'][m['task'] == 3, 2] <= 0.01)


# ---- the loss ---------------------------------------------------------------------------------


def _expected_loss(batch, rng, modes, weights, group):
  """train.py: per group, sum_m w_m · mean over supervised samples of the slot MSE."""
  x0, eps = _noise(batch, rng)
  sup = modes['supervised']
  per_slot = np.stack([(v ** 2).mean(axis=(1, 2, 3)) for v in _slots(eps - x0)], axis=1)
  totals, per_mod = [], []
  for g in range(0, len(sup), group):
    s, p = sup[g:g + group], per_slot[g:g + group]
    means = (s * p).sum(0) / np.maximum(s.sum(0), 1)
    per_mod.append(means)
    totals.append(float(np.dot(weights, means)))
  return np.mean(totals), np.mean(per_mod, axis=0)


@pytest.mark.parametrize('group', [0, 4])
def test_loss_is_the_weighted_masked_mean_per_group(group):
  cfg = _cfg(joint_prob=0.5, rgb_only_prob=0.25, slot_dropout_prob=0.5, group_size=group)
  batch, rng = _batch(n=16), jax.random.key(7)
  loss, metrics, _ = _run(batch, rng, cfg)
  modes = jax.device_get(jax.jit(lambda k: decoupled.sample_modes(k, 16, NAMES, cfg))(
      jax.random.split(rng, 3)[0]))
  want, per_mod = _expected_loss(batch, rng, modes, WEIGHTS, group or 16)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for name, value in zip(NAMES, per_mod, strict=True):
    np.testing.assert_allclose(metrics[f'loss/{name}'], value, rtol=1e-5)


def test_loss_weights_come_from_the_modalities():
  """With every slot supervised the loss is sum_m w_m · MSE_m: MMGen's 1 / 0.2 / 0.1 / 0.1."""
  cfg = _cfg(joint_prob=1.0, rgb_only_prob=0.0)
  loss, metrics, _ = _run(_batch(), jax.random.key(2), cfg)
  assert WEIGHTS == [1.0, 0.2, 0.1, 0.1]
  per_mod = np.array([metrics[f'loss/{name}'] for name in NAMES])
  assert np.all(per_mod > 0.5)
  np.testing.assert_allclose(loss, np.dot(WEIGHTS, per_mod), rtol=1e-6)


def test_unsupervised_modality_gives_zero_not_nan():
  loss, metrics, _ = _run(_batch(), jax.random.key(0), _cfg(joint_prob=1.0, rgb_only_prob=1.0))
  assert float(metrics['loss/depth']) == 0.0 and float(metrics['loss/segmentation']) == 0.0
  np.testing.assert_allclose(loss, metrics['loss/rgb'], rtol=1e-6)


@pytest.mark.parametrize('path,prediction', [('vp_cosine', 'eps'), ('vp_linear', 'x0')])
def test_other_paths_use_their_targets(path, prediction):
  cfg = _cfg(path=path, prediction=prediction, joint_prob=1.0, rgb_only_prob=0.0)
  batch, rng = _batch(), jax.random.key(3)
  _, metrics, _ = _run(batch, rng, cfg)
  x0, eps = _noise(batch, rng)
  want = eps if prediction == 'eps' else x0
  np.testing.assert_allclose(metrics['loss/rgb'], np.mean(want[..., :3] ** 2), rtol=1e-5)


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


@pytest.mark.parametrize('overrides, match', [
    (dict(joint_prob=0.25, rgb_only_prob=0.5), 'rgb_only_prob'),
    (dict(layout='quarter'), "layout='quarter' is not one of"),
    (dict(slot_dropout='uniform'), "slot_dropout='uniform' is not one of"),
    (dict(cond_task_fixed='albedo'), "cond_task_fixed='albedo' is not an image modality"),
    (dict(group_size=3), 'does not split into groups of config.objective.group_size=3'),
    (dict(layout='by_position', group_size=4, joint_prob=0.6, rgb_only_prob=0.5),
     r'joint_prob × group size = 0.6 × 4 = 2.4'),
])
def test_config_errors_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    decoupled.decoupled_loss(Recorder(), _batch(), jax.random.key(0), mods=MODS,
                             cfg=_cfg(**overrides), num_classes=4)


def test_missing_modality_is_named():
  batch = _batch()
  del batch['depth']
  with pytest.raises(KeyError, match='depth'):
    decoupled.decoupled_loss(Recorder(), batch, jax.random.key(0), mods=MODS, cfg=_cfg(),
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
