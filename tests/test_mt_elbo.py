"""MT-Diffusion: schedule, closed-form marginal, posterior, loss and sampler."""

import functools
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmgen_jax import config_schema
from mmgen_jax import modalities
from mmgen_jax.diffusion import mt_elbo
from mmgen_jax.diffusion import paths
from mmgen_jax.models import mt_encoders

NUM_CLASSES = 3  # of the 'label' modality and of the class condition y
HW = (4, 4)


class Out(NamedTuple):
  images: tuple
  logits: tuple = ()
  zs: tuple = ()


def _mods(*names):
  specs = dict(
      rgb=modalities.spec(0, 'rgb'),
      depth=modalities.spec(1, 'depth', 0.5),
      label=modalities.spec(2, 'label', 0.3, num_classes=NUM_CLASSES),
      masked_rgb=modalities.spec(3, 'rgb', 0.2, field='rgb'),
  )
  chosen = {n: dict(specs[n], slot=i) for i, n in enumerate(names)}
  return modalities.from_config(chosen)


def _cfg(**overrides):
  cfg = ml_collections.ConfigDict(config_schema.base_config().objective.to_dict())
  cfg.update(dict(name='mt_elbo', path='vp_cosine', prediction='eps', num_timesteps=20, w_max=0.5))
  cfg.update(overrides)
  return cfg


class FakeTrunk(nnx.Module):
  """Per-pixel MLP with the MMDiT call signature; heads zero-initialised like DiT's."""

  def __init__(self, spec, *, rngs, hidden=8):
    self.body = nnx.Linear(spec['in_channels'], hidden, rngs=rngs)
    self.t_proj = nnx.Linear(1, hidden, rngs=rngs)
    self.y_emb = nnx.Embed(NUM_CLASSES + 1, hidden, rngs=rngs)
    self.task_emb = nnx.Embed(spec['num_tasks'] + 1, hidden, rngs=rngs)
    zeros = nnx.initializers.zeros
    self.image_heads = nnx.List([nnx.Linear(hidden, c, kernel_init=zeros, rngs=rngs)
                                 for c in spec['image_heads']])
    self.class_heads = nnx.List([nnx.Linear(hidden, k, kernel_init=zeros, rngs=rngs)
                                 for k in spec['class_heads']])

  def __call__(self, x, t, y, task=None):
    task = jnp.zeros((x.shape[0],), jnp.int32) if task is None else task
    c = self.t_proj(t) + self.y_emb(y) + self.task_emb(task)
    h = nnx.silu(self.body(x) + c[:, None, None, :])
    return Out(images=tuple(head(h) for head in self.image_heads),
               logits=tuple(head(h.mean(axis=(1, 2))) for head in self.class_heads))


@functools.lru_cache(maxsize=None)
def _model(mods, seed=0, perturb=True, masked=''):
  """Built once per argument set (eager initialisation is slow on CPU); never mutated."""
  rngs = nnx.Rngs(seed)
  trunk = FakeTrunk(mt_encoders.trunk_spec(mods, 'rgb'), rngs=rngs)
  model = mt_encoders.MTDiffusion(trunk, mods=mods, primary='rgb', spatial=HW, masked=masked,
                                  rngs=rngs)
  return _perturbed(model, seed + 100) if perturb else model


def _perturbed(model, seed):
  """Moves the zero-initialised heads so every path carries gradient."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  noise = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: p + 0.1 * noise.standard_normal(p.shape, np.float32), params)
  return nnx.merge(graphdef, params, rest)


def _batch(mods, n=8, seed=0):
  rng = np.random.default_rng(seed)
  batch = {}
  for m in mods:
    if m.is_image:
      batch[m.name] = jnp.asarray(rng.uniform(-1, 1, (n, *HW, m.channels)), jnp.float32)
    else:
      batch[m.name] = jnp.asarray(rng.integers(0, m.channels, (n,)), jnp.int32)
  batch['label'] = jnp.asarray(rng.integers(0, NUM_CLASSES, (n,)), jnp.int32)
  return batch


# ---- schedule and the forward process ---------------------------------------------

@pytest.mark.parametrize('kind,T', [('cosine', 1000), ('linear', 1000), ('cosine', 20)])
def test_mean_shift_closed_form(kind, T):
  sched = mt_elbo.make_schedule(T, kind, w_max=0.7)
  ab, w = sched.alpha_bar, sched.w
  rec = np.zeros(T + 1)
  for t in range(1, T + 1):  # lambda_t = sqrt(alpha_t) (lambda_{t-1} + w_t)
    rec[t] = np.sqrt(ab[t] / ab[t - 1]) * (rec[t - 1] + w[t])
  np.testing.assert_allclose(sched.lam, rec, rtol=1e-9, atol=1e-15)
  # The default weights give lambda_t = w_max (t / T) sqrt(ab_t); E vanishes like z_0.
  np.testing.assert_allclose(sched.lam, 0.7 * np.arange(T + 1) / T * np.sqrt(ab), rtol=1e-9)
  # Any other weights: compare the cumulative-sum form with the recursion.
  w_any = np.concatenate([[0.0], np.random.default_rng(0).uniform(0, 1, T)])
  rec = np.zeros(T + 1)
  for t in range(1, T + 1):
    rec[t] = np.sqrt(ab[t] / ab[t - 1]) * (rec[t - 1] + w_any[t])
  np.testing.assert_allclose(mt_elbo.mean_shift(ab, w_any), rec, rtol=1e-9, atol=1e-15)


def test_marginal_matches_monte_carlo_of_the_sequential_kernel():
  T, n = 20, 200_000
  ab = paths.vp_alpha_bar_discrete('cosine', T)
  w = np.concatenate([[0.0], np.random.default_rng(1).uniform(0.1, 0.8, T)])
  sched = mt_elbo.Schedule(alpha_bar=ab, w=w)
  z0, E = 0.7, -1.3
  rng = np.random.default_rng(2)
  z = np.full(n, z0)
  for t in range(1, T + 1):
    alpha = ab[t] / ab[t - 1]
    z = np.sqrt(alpha) * (z + w[t] * E) + np.sqrt(1 - alpha) * rng.standard_normal(n)
    if t in (1, 5, 12, 20) or t == T:
      tt = jnp.array([t])
      mean = float(sched.q_sample(jnp.array([z0]), jnp.array([E]), tt, jnp.zeros(1))[0])
      std = float(sched.q_sample(jnp.array([z0]), jnp.array([E]), tt, jnp.ones(1))[0]) - mean
      var = std ** 2
      np.testing.assert_allclose(var, 1 - ab[t], rtol=1e-5)
      assert abs(z.mean() - mean) < 5 * np.sqrt(var / n), (t, z.mean(), mean)
      assert abs(z.var() - var) < 5 * var * np.sqrt(2 / n), (t, z.var(), var)


def _gauss(x, mean, var):
  return np.exp(-0.5 * (x - mean) ** 2 / var) / np.sqrt(2 * np.pi * var)


@pytest.mark.parametrize('t,s', [(2, 1), (9, 8), (20, 19), (9, 5), (20, 3)])
def test_posterior_matches_bayes_rule_on_a_grid(t, s):
  T = 20
  ab = paths.vp_alpha_bar_discrete('cosine', T)
  w = np.concatenate([[0.0], np.random.default_rng(3).uniform(0.1, 0.8, T)])
  sched = mt_elbo.Schedule(alpha_bar=ab, w=w)
  lam = sched.lam
  z0, E, z_t = 0.4, 1.1, -0.3
  grid = np.linspace(-15, 15, 300_001)
  prior = _gauss(grid, np.sqrt(ab[s]) * z0 + lam[s] * E, 1 - ab[s])  # q(z_s | z_0, x)
  if s == t - 1:  # the kernel as defined: N(sqrt(alpha_t)(z_{t-1} + w_t E), 1 - alpha_t)
    alpha = ab[t] / ab[t - 1]
    lik = _gauss(z_t, np.sqrt(alpha) * (grid + w[t] * E), 1 - alpha)
  else:  # s -> t by composing kernels: the shifted chain z - lambda E is a DDPM chain
    a_ts = ab[t] / ab[s]
    lik = _gauss(z_t, np.sqrt(a_ts) * (grid - lam[s] * E) + lam[t] * E, 1 - a_ts)
  post = prior * lik
  post /= np.trapezoid(post, grid)
  mean_num = np.trapezoid(grid * post, grid)
  var_num = np.trapezoid((grid - mean_num) ** 2 * post, grid)
  mean, var = sched.posterior_mean_var(jnp.array([z_t]), jnp.array([z0]), jnp.array([E]),
                                       jnp.array([t]), jnp.array([s]))
  np.testing.assert_allclose(float(mean[0]), mean_num, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(var[0]), var_num, rtol=1e-4, atol=1e-7)


def test_noise_form_of_the_posterior_mean():
  sched = mt_elbo.make_schedule(20, 'cosine', w_max=0.9)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  z_t, eps, E = (jax.random.normal(k, (6, 5)) for k in (k1, k2, k3))
  t = jnp.array([1, 2, 5, 10, 19, 20])
  z0 = sched.z0_from_eps(z_t, eps, E, t)
  mean, _ = sched.posterior_mean_var(z_t, z0, E, t)
  # The extra term in E: (z_t - beta_t / sigma_t eps) / sqrt(alpha_t) - w_t E.
  np.testing.assert_allclose(sched.eps_mean(z_t, eps, E, t), mean, rtol=1e-4, atol=1e-4)


# ---- the loss ----------------------------------------------------------------------

def _ddpm_loss(model, batch, rng, T):
  """The standard DDPM eps loss, drawn from rng as mt_elbo_loss does."""
  z0 = batch['rgb']
  n = z0.shape[0]
  k_u, k_eps, _, _ = jax.random.split(rng, 4)
  u = jax.random.uniform(k_u, (n, 1 + len(model.aux_names)))
  t = 1 + jnp.floor(u[:, 0] * T).astype(jnp.int32)
  eps = paths.normal(k_eps, z0.shape)
  ab = jnp.asarray(paths.vp_alpha_bar_discrete('cosine', T), jnp.float32)[t][:, None, None, None]
  z_t = jnp.sqrt(ab) * z0 + jnp.sqrt(1 - ab) * eps
  x = jnp.concatenate([z_t, jnp.zeros_like(z_t)], -1)
  task = jnp.full((n,), sum(3 ** i for i in range(len(model.aux_names))))  # all generated
  pred = model.trunk(x, (t / T)[:, None].astype(jnp.float32), batch['label'], task=task).images[0]
  return jnp.mean((pred - eps) ** 2)


@pytest.mark.parametrize('names', [('rgb',), ('rgb', 'depth')])
def test_zero_weights_give_the_ddpm_loss(names):
  mods = _mods(*names)
  # w = 0, no decoder terms, nothing observed: only the denoising term remains.
  cfg = _cfg(w_max=0.0, decoder_weight=0.0, aux_observed_prob=0.0, aux_absent_prob=0.0)
  model, batch, rng = _model(mods), _batch(mods), jax.random.key(5)

  @nnx.jit
  def both(model, batch, rng):
    loss, _ = mt_elbo.mt_elbo_loss(model, batch, rng, mods=mods, cfg=cfg, num_classes=NUM_CLASSES)
    return loss, _ddpm_loss(model, batch, rng, cfg.num_timesteps)

  loss, ddpm = both(model, batch, rng)
  assert float(ddpm) > 0.1
  np.testing.assert_allclose(loss, ddpm, rtol=1e-6)


@pytest.mark.slow
def test_gradients_reach_every_encoder_head_and_the_trunk():
  mods = _mods('rgb', 'depth', 'label', 'masked_rgb')
  cfg = _cfg(aux_observed_prob=0.5, aux_absent_prob=0.0, masked_modality='masked_rgb')
  model, batch = _model(mods, masked='masked_rgb'), _batch(mods, n=16)

  @nnx.jit
  def grads(model, batch, rng):
    fn = lambda m: mt_elbo.mt_elbo_loss(m, batch, rng, mods=mods, cfg=cfg, num_classes=NUM_CLASSES)
    return nnx.grad(fn, has_aux=True)(model)[0]

  g = nnx.to_pure_dict(grads(model, batch, jax.random.key(0)))
  norms = {jax.tree_util.keystr(path): float(jnp.abs(v).sum())
           for path, v in jax.tree_util.tree_flatten_with_path(g)[0]}
  assert any('encoders' in k and 'depth' in k for k in norms)
  assert any('encoders' in k and 'label' in k for k in norms)
  assert any('encoders' in k and 'masked_rgb' in k for k in norms)
  assert any('image_heads' in k for k in norms) and any('class_heads' in k for k in norms)
  zero = [k for k, v in norms.items() if v == 0.0]
  assert not zero, f'no gradient reaches {zero}'


def test_loss_metrics_and_finite_values():
  mods = _mods('rgb', 'depth', 'label')
  model, batch = _model(mods), _batch(mods, n=16)
  loss, metrics = nnx.jit(lambda m, b: mt_elbo.mt_elbo_loss(
      m, b, jax.random.key(1), mods=mods, cfg=_cfg(), num_classes=NUM_CLASSES))(model, batch)
  assert np.isfinite(float(loss))
  assert set(metrics) >= {'loss', 'loss/denoise', 'loss/depth', 'loss/label', 'accuracy/label',
                          'observed_fraction/depth'}
  # total = denoise + decoder_weight * sum_i loss_weight_i * decoder_i
  np.testing.assert_allclose(
      loss, metrics['loss/denoise'] + 0.5 * metrics['loss/depth'] + 0.3 * metrics['loss/label'],
      rtol=1e-5)


def test_masked_image():
  image = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (64, 16, 16, 3)), jnp.float32)
  masked, mask = jax.jit(mt_elbo.masked_image)(jax.random.key(0), image)
  mask = np.asarray(mask[..., 0])
  area = mask.mean(axis=(1, 2))
  assert np.all(area >= 0.25 ** 2 - 1e-6) and np.all(area <= 0.5 ** 2 + 1e-6)
  rows, cols = mask.any(axis=2), mask.any(axis=1)  # a box: its area is rows x cols
  np.testing.assert_array_equal(mask.sum(axis=(1, 2)), rows.sum(1) * cols.sum(1))
  np.testing.assert_array_equal(np.asarray(masked)[mask == 1], 0.0)
  np.testing.assert_array_equal(np.asarray(masked)[mask == 0], np.asarray(image)[mask == 0])


def test_trunk_spec_and_build():
  mods = _mods('rgb', 'depth', 'label')
  assert mt_encoders.trunk_spec(mods, 'rgb') == dict(
      in_channels=6, image_heads=(3, 1), time_slots=(6,), class_heads=(NUM_CLASSES,),
      num_tasks=3 ** 2 - 1, task_embed_init_std=0.0)
  # Every combination of states has its own row of the task table.
  states = np.array(np.meshgrid(*[range(3)] * 3, indexing='ij')).reshape(3, -1).T
  ids = np.asarray(mt_encoders.task_ids(states))
  assert sorted(ids.tolist()) == list(range(27))
  np.testing.assert_array_equal(ids, states @ np.array([1, 3, 9]))
  config = config_schema.base_config()
  config.modalities = config_schema.scenes_modalities(with_label_modality=True)
  config.codec.name = 'sd_vae'
  spec = mt_encoders.trunk_spec(modalities.from_config(config.modalities), 'rgb', 4)
  assert spec['in_channels'] == 8 and spec['image_heads'] == (4, 4, 4, 4)
  assert spec['class_heads'] == (4,)
  model = mt_encoders.build(FakeTrunk(spec, rngs=nnx.Rngs(0)), config, spatial=(4, 4),
                            rngs=nnx.Rngs(1))
  assert model.spatial == (4, 4) and model.channels == 4  # SD-VAE latents
  assert model.aux_images == ('depth', 'normal', 'segmentation') and model.aux_classes == ('label',)


def test_config_errors_are_named():
  mods = _mods('rgb', 'depth')
  model, batch = _model(mods, perturb=False), _batch(mods)
  with pytest.raises(ValueError, match='vp_cosine'):
    mt_elbo.mt_elbo_loss(model, batch, jax.random.key(0), mods=mods, cfg=_cfg(path='linear'),
                         num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match='must be <= 1'):
    mt_elbo.mt_elbo_loss(model, batch, jax.random.key(0), mods=mods,
                         cfg=_cfg(aux_observed_prob=0.7, aux_absent_prob=0.5),
                         num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match='image modality'):
    mt_encoders.split_primary(_mods('rgb', 'label'), 'label')


# ---- the ancestral sampler -------------------------------------------------------------

class Oracle(nnx.Module):
  """Knows the data: z_0 = z0*, depth = d*, label = c*. Predicts the exact noise and decodes."""

  def __init__(self, sched, z0, depth, label):
    self.sched = sched
    self.z0, self.depth, self.label = nnx.Variable(z0), nnx.Variable(depth), label
    self.E = nnx.Variable(jnp.zeros_like(z0))  # set once the encoders exist

  def __call__(self, x, t, y, task=None):
    z_t = x[..., :self.z0.shape[-1]]
    T = self.sched.num_timesteps
    t_int = jnp.round(t[:, 0] * T).astype(jnp.int32)
    ab = self.sched.at(self.sched.alpha_bar, t_int, 4)
    lam = self.sched.at(self.sched.lam, t_int, 4)
    eps = (z_t - jnp.sqrt(ab) * self.z0[...] - lam * self.E[...]) / jnp.sqrt(1 - ab)
    n = x.shape[0]
    logits = 30.0 * jax.nn.one_hot(jnp.full((n,), self.label), NUM_CLASSES)
    return Out(images=(eps, jnp.broadcast_to(self.depth[...], (n, *HW, 1))), logits=(logits,))


@pytest.mark.parametrize('observed,num_steps', [((), None), (('depth', 'label'), None),
                                                (('depth',), 5)])
def test_sampler_recovers_a_point_mass(observed, num_steps):
  mods = _mods('rgb', 'depth', 'label')
  cfg = _cfg(w_max=2.0)
  sched = mt_elbo.schedule_from_config(cfg)
  data = _batch(mods, n=2, seed=4)
  z0, depth, label = data['rgb'][:1], data['depth'][:1], 2
  oracle = Oracle(sched, z0, depth, label)
  model = mt_encoders.MTDiffusion(oracle, mods=mods, primary='rgb', spatial=HW, rngs=nnx.Rngs(0))
  # A generated label is not in the forward process; an observed one is.
  oracle.E[...] = model.encode('depth', depth) + (
      model.encode('label', jnp.array([label])) if 'label' in observed else 0.0)

  given = {'depth': jnp.broadcast_to(depth, (3, *HW, 1)), 'label': jnp.full((3,), label)}
  given = {k: given[k] for k in observed}
  out = mt_elbo.sample(model, jax.random.key(0), mods=mods, cfg=cfg, num=3,
                       num_classes=NUM_CLASSES, observed=given, num_steps=num_steps)
  np.testing.assert_allclose(out['rgb'], jnp.broadcast_to(z0, out['rgb'].shape), atol=2e-3)
  np.testing.assert_allclose(out['depth'], jnp.broadcast_to(depth, out['depth'].shape), atol=1e-6)
  np.testing.assert_array_equal(out['label'], label)


@pytest.mark.slow
def test_sampler_covers_the_three_uses():
  mods = _mods('rgb', 'depth', 'label', 'masked_rgb')
  model, data = _model(mods, masked='masked_rgb'), _batch(mods, n=2)
  cfg = _cfg()
  run = lambda **kw: mt_elbo.sample(model, jax.random.key(0), mods=mods, cfg=cfg, num=2,
                                    num_classes=NUM_CLASSES, num_steps=4, **kw)
  joint = run(generate=['label'])  # joint image-label generation
  assert joint['rgb'].shape == (2, *HW, 3) and joint['label'].dtype == jnp.int32
  assert 'depth' not in joint  # neither observed nor generated: absent
  masked, mask = mt_elbo.masked_image(jax.random.key(1), data['rgb'])
  given = mt_elbo.masked_input(data['rgb'], mask)
  inpaint = run(observed={'masked_rgb': given}, generate=[])
  np.testing.assert_array_equal(inpaint['masked_rgb'], given)
  np.testing.assert_array_equal(given[..., :3], masked)
  transition = run(observed={'depth': data['depth']})  # depth -> rgb (+ label, masked_rgb)
  assert set(transition) == {'rgb', 'depth', 'label', 'masked_rgb'}
  assert all(np.all(np.isfinite(np.asarray(v))) for v in transition.values())
  with pytest.raises(ValueError, match='also observed'):
    run(observed={'depth': data['depth']}, generate=['depth'])


# ---- with the real trunk -----------------------------------------------------------------

@pytest.mark.slow
def test_real_mmdit_trunk_gradients_and_sampling():
  from mmgen_jax.models import dit  # pylint: disable=g-import-not-at-top
  mods = _mods('rgb', 'depth', 'label')

  @nnx.jit
  def build():
    rngs = nnx.Rngs(0)
    with nnx.use_eager_sharding(False):  # no mesh here; as build.build_model does
      trunk = dit.MMDiT(input_size=HW[0], patch_size=2, **mt_encoders.trunk_spec(mods, 'rgb'),
                        hidden_size=32, depth=1, num_heads=2, mlp_ratio=2.0,
                        num_classes=NUM_CLASSES, class_dropout_prob=0.1, rngs=rngs)
    return mt_encoders.MTDiffusion(trunk, mods=mods, primary='rgb', spatial=HW, rngs=rngs)

  model = build()
  # The task embedding starts at zero: the states change nothing until it is trained.
  z = jnp.asarray(_batch(mods, n=2)['rgb'])
  t = jnp.array([0.3, 0.7])
  run = lambda states: model(z, t, jnp.zeros_like(z), jnp.full((2,), NUM_CLASSES),
                             jnp.asarray(states)).images[0]
  np.testing.assert_array_equal(run([[0, 0], [0, 0]]), run([[2, 1], [1, 2]]))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  noise = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.05 * noise.standard_normal(p.shape, np.float32), params)
  model = nnx.merge(graphdef, params, rest)
  cfg = _cfg(aux_observed_prob=0.5, aux_absent_prob=0.0)
  batch = _batch(mods, n=16)

  @nnx.jit
  def grads(model):
    fn = lambda m: mt_elbo.mt_elbo_loss(m, batch, jax.random.key(0), mods=mods, cfg=cfg,
                                        num_classes=NUM_CLASSES)
    return nnx.grad(fn, has_aux=True)(model)[0]

  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads(model)))[0]
  zero = [jax.tree_util.keystr(k) for k, v in flat if float(jnp.abs(v).sum()) == 0.0]
  assert not zero, f'no gradient reaches {zero}'
  assert any('final_layers' in jax.tree_util.keystr(k) for k, _ in flat)
  assert any('class_heads' in jax.tree_util.keystr(k) for k, _ in flat)
  assert any('task_embedder' in jax.tree_util.keystr(k) for k, _ in flat)

  out = mt_elbo.sample(model, jax.random.key(1), mods=mods, cfg=cfg, num=2,
                       num_classes=NUM_CLASSES, observed={'depth': batch['depth'][:2]},
                       num_steps=3)
  assert out['rgb'].shape == (2, *HW, 3) and out['label'].shape == (2,)


def test_sampler_refuses_a_class_condition_when_labels_are_a_modality():
  mods = _mods('rgb', 'label')
  with pytest.raises(ValueError, match='observed='):
    mt_elbo.sample(_model(mods, perturb=False), jax.random.key(0), mods=mods, cfg=_cfg(), num=2,
                   num_classes=NUM_CLASSES, y=jnp.zeros((2,), jnp.int32))


# ---- the loss with w != 0, against a direct implementation ------------------------------

def _lam(T, w_max, kind='cosine'):
  """lambda_t = w_max (t / T) sqrt(ab_t), written out independently of mt_elbo."""
  ab = paths.vp_alpha_bar_discrete(kind, T)
  return w_max * np.arange(T + 1) / T * np.sqrt(ab)


def _direct_loss_terms(model, batch, rng, cfg):
  """Denoising and decoder terms of the multi-task loss, drawn from rng as mt_elbo_loss does.

  States: absent below aux_absent_prob, then observed, then generated. E(x) sums
  the generated and observed images and the observed labels only.
  """
  T = cfg.num_timesteps
  names = model.aux_names
  z0 = batch['rgb']
  n = z0.shape[0]
  k_u, k_eps, k_mask, _ = jax.random.split(rng, 4)
  u = np.asarray(jax.random.uniform(k_u, (n, 1 + len(names))))
  inputs = dict(batch)
  if model.masked:  # encoder: [masked image, mask]; decoder target: the whole image
    mask = np.asarray(mt_elbo.random_box_mask(k_mask, batch[model.masked].shape[:3]))
    full = np.asarray(batch[model.masked])
    inputs[model.masked] = jnp.asarray(np.concatenate([full * (1 - mask), mask], -1))
  t = 1 + np.minimum(np.floor(u[:, 0] * T), T - 1).astype(np.int32)
  eps = paths.normal(k_eps, z0.shape)
  ua = u[:, 1:]
  states = np.where(ua < cfg.aux_absent_prob, 0,
                    np.where(ua < cfg.aux_absent_prob + cfg.aux_observed_prob, 2, 1))
  Ex, cond = jnp.zeros_like(z0), jnp.zeros_like(z0)
  for i, name in enumerate(names):
    e = model.encode(name, inputs[name])
    in_q = states[:, i] == 2 if name in model.aux_classes else states[:, i] > 0
    Ex = Ex + jnp.asarray(in_q, jnp.float32)[:, None, None, None] * e
    cond = cond + jnp.asarray(states[:, i] == 2, jnp.float32)[:, None, None, None] * e
  ab = paths.vp_alpha_bar_discrete('cosine', T)[t][:, None, None, None]
  lam = _lam(T, cfg.w_max)[t][:, None, None, None]
  z_t = np.sqrt(ab) * z0 + lam * Ex + np.sqrt(1 - ab) * eps
  task = jnp.asarray(states @ (3 ** np.arange(len(names))))
  # With a class modality the trunk's label is the null class, else the batch's label.
  y = jnp.full((n,), NUM_CLASSES) if model.aux_classes else batch['label']
  out = model.trunk(jnp.concatenate([z_t, cond], -1), jnp.asarray(t / T)[:, None], y, task=task)
  terms = {'loss/denoise': jnp.mean((out.images[0] - eps) ** 2)}
  if model.aux_classes:  # the class heads: a second pass at t' in 1..round(label_t_max T)
    k_tl, k_el = jax.random.split(jax.random.fold_in(rng, 7))
    t_max = max(1, round(cfg.label_t_max * T))
    t_lab = 1 + np.floor(np.asarray(jax.random.uniform(k_tl, (n,))) * t_max).astype(np.int32)
    ab_l = paths.vp_alpha_bar_discrete('cosine', T)[t_lab][:, None, None, None]
    lam_l = _lam(T, cfg.w_max)[t_lab][:, None, None, None]
    z_l = np.sqrt(ab_l) * z0 + lam_l * Ex + np.sqrt(1 - ab_l) * paths.normal(k_el, z0.shape)
    out_l = model.trunk(jnp.concatenate([z_l, cond], -1), jnp.asarray(t_lab / T)[:, None], y,
                        task=task)
  gen = states == 1
  for i, name in enumerate(names):
    g = gen[:, i]
    if name in model.aux_classes:
      logp = jax.nn.log_softmax(out_l.logits[model.aux_classes.index(name)])
      nll = -logp[np.arange(n), np.asarray(batch[name])]
    else:
      dec = out.images[1 + model.aux_images.index(name)]
      nll = jnp.mean((dec - batch[name]) ** 2, axis=(1, 2, 3))
    terms[f'loss/{name}'] = jnp.sum(nll * g) / max(g.sum(), 1)
  return terms, states


def test_loss_with_encoders_matches_a_direct_implementation():
  mods = _mods('rgb', 'depth', 'label')
  cfg = _cfg(w_max=3.0, aux_observed_prob=0.35, aux_absent_prob=0.3)
  model, batch, rng = _model(mods), _batch(mods, n=32), jax.random.key(7)
  _, metrics = nnx.jit(lambda m, b: mt_elbo.mt_elbo_loss(
      m, b, rng, mods=mods, cfg=cfg, num_classes=NUM_CLASSES))(model, batch)
  terms, states = _direct_loss_terms(model, batch, rng, cfg)
  for s in range(3):  # every state occurs for every auxiliary, so a wrong set shows
    assert np.all((states == s).sum(0) >= 3), states
  for key, value in terms.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)
  # The encodings matter here: with E left out the denoising term moves.
  _, zero_w = mt_elbo.mt_elbo_loss(model, batch, rng, mods=mods, cfg=_cfg(
      w_max=0.0, aux_observed_prob=0.35, aux_absent_prob=0.3), num_classes=NUM_CLASSES)
  assert abs(float(zero_w['loss/denoise']) - float(terms['loss/denoise'])) > 1e-3


def test_a_generated_label_is_not_readable_from_the_chain():
  """The label enters z_t only when observed: its head classifies the image."""
  mods = _mods('rgb', 'depth', 'label')
  cfg = _cfg(w_max=3.0, aux_observed_prob=0.0, aux_absent_prob=0.2)
  model, batch, rng = _model(mods), _batch(mods, n=16), jax.random.key(3)
  other = nnx.clone(model)  # a copy: merging the split state would share the cached model's
  other.encoders['label'].maps[...] = 5.0 * jax.random.normal(jax.random.key(9),
                                                              other.encoders['label'].maps.shape)
  assert not np.array_equal(other.encoders['label'].maps[...], model.encoders['label'].maps[...])
  run = nnx.jit(lambda m: mt_elbo.mt_elbo_loss(m, batch, rng, mods=mods, cfg=cfg,
                                               num_classes=NUM_CLASSES)[1])
  a, b = run(model), run(other)
  assert float(a['loss/label']) > 0
  for key in ('loss/denoise', 'loss/label', 'loss/depth'):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)


# ---- the sampler on Gaussian data: every intermediate step matters ----------------------

class GaussOracle(nnx.Module):
  """The exact posterior-mean denoiser of z_0 ~ N(mu, s^2 I) under a known shift E."""

  def __init__(self, T, w_max, mu, s, depth, prediction='eps'):
    self.T, self.s, self.prediction = T, s, prediction
    self.ab = np.asarray(paths.vp_alpha_bar_discrete('cosine', T), np.float32)
    self.lam = _lam(T, w_max).astype(np.float32)
    self.mu, self.depth = nnx.Variable(mu), nnx.Variable(depth)
    self.E = nnx.Variable(jnp.zeros_like(mu))

  def __call__(self, x, t, y, task=None):
    z_t = x[..., :self.mu.shape[-1]]
    t_int = jnp.round(t[:, 0] * self.T).astype(jnp.int32)
    ab = jnp.asarray(self.ab)[t_int][:, None, None, None]
    lam = jnp.asarray(self.lam)[t_int][:, None, None, None]
    zeta = z_t - lam * self.E[...]
    gain = jnp.sqrt(ab) * self.s ** 2 / (ab * self.s ** 2 + 1 - ab)
    z0_hat = self.mu[...] + gain * (zeta - jnp.sqrt(ab) * self.mu[...])
    eps = (zeta - jnp.sqrt(ab) * z0_hat) / jnp.sqrt(1 - ab)
    # x0 and v are those of the shifted chain zeta (docs §8); the sampler converts with
    # its own estimate of lambda_t E, so they catch a wrong lambda where eps cannot.
    pred = {'eps': eps, 'x0': z0_hat, 'v': jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * z0_hat}
    n = x.shape[0]
    return Out(images=(pred[self.prediction], jnp.broadcast_to(self.depth[...], (n, *HW, 1))))


def _expected_output(ab, lam_T, E, mu, s, ts):
  """Mean and variance of the ancestral sampler's output for Gaussian data (linear map)."""
  m, v = -lam_T * E, 1.0  # zeta_T = z_T - lambda_T E, z_T ~ N(0, I)
  for t, u in zip(ts[:-1], ts[1:]):
    a_ts = ab[t] / ab[u]
    c0 = np.sqrt(ab[u]) * (1 - a_ts) / (1 - ab[t])
    ct = np.sqrt(a_ts) * (1 - ab[u]) / (1 - ab[t])
    var = (1 - ab[u]) * (1 - a_ts) / (1 - ab[t])
    gain = np.sqrt(ab[t]) * s ** 2 / (ab[t] * s ** 2 + 1 - ab[t])
    m = c0 * (mu + gain * (m - np.sqrt(ab[t]) * mu)) + ct * m
    v = (c0 * gain + ct) ** 2 * v + var
  return m, v


@pytest.mark.parametrize('observe_depth,num_steps,prediction', [
    (True, None, 'eps'), (False, None, 'eps'), (True, 7, 'eps'), (True, None, 'v'),
    (False, 7, 'x0')])
def test_sampler_output_distribution_on_gaussian_data(observe_depth, num_steps, prediction):
  mods = _mods('rgb', 'depth')
  T, w_max, s, num = 20, 2.0, 0.5, 512
  cfg = _cfg(w_max=w_max, num_timesteps=T, prediction=prediction)
  data = _batch(mods, n=1, seed=6)
  mu, depth = np.asarray(data['rgb']), data['depth']
  oracle = GaussOracle(T, w_max, jnp.asarray(mu), s, depth, prediction)
  model = mt_encoders.MTDiffusion(oracle, mods=mods, primary='rgb', spatial=HW, rngs=nnx.Rngs(0))
  E = model.encode('depth', depth)
  oracle.E[...] = E
  given = {'depth': jnp.broadcast_to(depth, (num, *HW, 1))} if observe_depth else {}
  out = mt_elbo.sample(model, jax.random.key(1), mods=mods, cfg=cfg, num=num,
                       num_classes=NUM_CLASSES, observed=given, num_steps=num_steps)
  z = np.asarray(out['rgb'], np.float64)
  ab = paths.vp_alpha_bar_discrete('cosine', T)
  m, v = _expected_output(ab, _lam(T, w_max)[T], np.asarray(E, np.float64)[0], mu[0], s,
                          mt_elbo.step_times(T, num_steps))
  assert 0.5 * s ** 2 < v < s ** 2  # ancestral sampling with E[z_0|z_t] narrows the data
  resid = z - m
  se = np.sqrt(v / num)
  assert np.all(np.abs(resid.mean(0)) < 5 * se), np.abs(resid.mean(0)).max() / se
  # The shift direction, pooled over elements: catches a small offset along E.
  e = np.asarray(E, np.float64)[0]
  along = (resid.mean(0) * e).sum() / (e * e).sum()
  assert abs(along) < 5 * se / np.sqrt((e * e).sum()), along
  np.testing.assert_allclose(resid.var(), v, rtol=5 * np.sqrt(2 / resid.size))


# ---- observed primary: RGB -> depth and the label of an image ----------------------------

class Reader(nnx.Module):
  """Reads its heads off z_t: depth = channel 0, class logits = 50 x channel means."""

  def __call__(self, x, t, y, task=None):
    z = x[..., :3]
    return Out(images=(jnp.zeros_like(z), z[..., :1]), logits=(50.0 * z.mean(axis=(1, 2)),))


def test_observed_primary_holds_the_image_and_decodes():
  mods = _mods('rgb', 'depth', 'label')
  T, w_max, t_cond = 20, 2.0, 0.3
  cfg = _cfg(w_max=w_max, num_timesteps=T)
  model = mt_encoders.MTDiffusion(Reader(), mods=mods, primary='rgb', spatial=HW,
                                  rngs=nnx.Rngs(0))
  x = _batch(mods, n=5, seed=8)['rgb']
  key = jax.random.key(4)
  out = mt_elbo.sample(model, key, mods=mods, cfg=cfg, num=5, num_classes=NUM_CLASSES,
                       observed={'rgb': x}, t_cond=t_cond)
  # Held at t = round(t_cond T) = 6: z = sqrt(ab) x + lambda E_hat + sigma eps, one eps;
  # E_hat = E(depth estimate) (the generated label is not in the chain); two passes.
  t = 6
  ab, lam = paths.vp_alpha_bar_discrete('cosine', T)[t], _lam(T, w_max)[t]
  base = np.sqrt(ab) * x + np.sqrt(1 - ab) * paths.normal(key, x.shape)
  seen = base  # pass 1: nothing observed, E_hat = 0
  seen = base + lam * model.encode('depth', seen[..., :1])  # pass 2
  np.testing.assert_allclose(out['depth'], seen[..., :1], atol=1e-5)
  np.testing.assert_array_equal(out['label'], np.argmax(np.asarray(seen).mean((1, 2)), -1))
  np.testing.assert_array_equal(out['rgb'], x)
  direct = mt_elbo.infer_from_primary(model, x, key, cfg=cfg, num_classes=NUM_CLASSES,
                                      t_cond=t_cond, generate=['depth'])
  assert set(direct) == {'rgb', 'depth'}
  np.testing.assert_allclose(direct['depth'], out['depth'], atol=1e-6)


def test_classify_reads_the_image():
  mods = _mods('rgb', 'depth', 'label')
  cfg = _cfg(num_timesteps=20)
  model = mt_encoders.MTDiffusion(Reader(), mods=mods, primary='rgb', spatial=HW,
                                  rngs=nnx.Rngs(0))
  labels = np.array([0, 2, 1, 1, 0, 2])
  images = np.full((6, *HW, 3), -0.5, np.float32)
  images[np.arange(6), :, :, labels] = 0.8
  got = mt_elbo.classify(model, images, jax.random.key(0), cfg=cfg, num_classes=NUM_CLASSES)
  np.testing.assert_array_equal(got, labels)
  logits = mt_elbo.classify(model, images, jax.random.key(0), cfg=cfg, num_classes=NUM_CLASSES,
                            logits=True)
  assert logits.shape == (6, NUM_CLASSES)
  with pytest.raises(ValueError, match='not a class modality'):
    mt_elbo.classify(model, images, jax.random.key(0), cfg=cfg, num_classes=NUM_CLASSES,
                     name='depth')


# ---- evaluation: RGB held, transitions scored, the label head's accuracy --------------------

class SceneReader(nnx.Module):
  """Heads read off z_t: depth = channel mean, normal = z, segmentation = z reversed, and
  class logits from the channel means (4 scene classes)."""

  def __call__(self, x, t, y, task=None):
    z = x[..., :3]
    means = z.mean(axis=(1, 2))
    logits = 50.0 * jnp.concatenate([means, -means.sum(-1, keepdims=True)], -1)
    return Out(images=(jnp.zeros_like(z), z.mean(-1, keepdims=True), z, z[..., ::-1]),
               logits=(logits,))


def test_evaluate_mt_scores_transitions_and_classification(scenes_data_dir):
  from mmgen_jax import evaluate, mt_eval, parallel  # pylint: disable=g-import-not-at-top
  from tests.conftest import SCENES_TEST_BUILD  # pylint: disable=g-import-not-at-top
  from tests.evaluate_process import eval_config, image_predictor  # pylint: disable=g-import-not-at-top
  config = eval_config(scenes_data_dir, SCENES_TEST_BUILD)
  config.modalities = config_schema.scenes_modalities(with_label_modality=True)
  config.objective.update(dict(name='mt_elbo', primary='rgb', path='vp_linear',
                               num_timesteps=1000, prediction='eps'))
  mods = modalities.from_config(config.modalities)
  model = mt_encoders.MTDiffusion(SceneReader(), mods=mods, primary='rgb', spatial=(32, 32),
                                  rngs=nnx.Rngs(0))
  mesh = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:4])
  got = mt_eval.evaluate_mt(config, model, mesh)
  assert got['eval/mt/num_examples'] == 8
  # The heads read the (nearly clean) held RGB: the scores of reading the RGB itself.
  direct = evaluate.evaluate_predictor(config, image_predictor, mesh)
  for key in ('depth/abs_rel', 'normal/mean_deg', 'segmentation/pixel_acc'):
    np.testing.assert_allclose(got[f'eval/mt/{key}'], direct[f'eval/{key}'], rtol=0.05, atol=0.02,
                               err_msg=key)
  labels = np.concatenate([np.asarray(b['label'])[np.asarray(b['valid'])] for b in
                           pipeline_batches(config)])
  rgb = np.concatenate([np.asarray(b['rgb'])[np.asarray(b['valid'])] for b in
                        pipeline_batches(config)])
  means = rgb.mean(axis=(1, 2))
  expected = np.argmax(np.concatenate([means, -means.sum(-1, keepdims=True)], -1), -1)
  # Same ids as the head on the clean image, up to the small noise at t_cond.
  assert abs(got['eval/mt/label/accuracy'] - np.mean(expected == labels)) <= 2 / 8
  assert got['eval/mt/label/chance'] == np.bincount(labels).max() / len(labels)


def pipeline_batches(config):
  from mmgen_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return list(pipeline.make_iterator(config, config.data.eval_split, train=False))


# ---- masked-image training and inpainting --------------------------------------------------

def test_masked_modality_sees_the_mask_and_decodes_the_whole_image():
  mods = _mods('rgb', 'masked_rgb')
  model = _model(mods, masked='masked_rgb')
  assert model.encoders['masked_rgb'].conv1.kernel.shape[2] == 4  # rgb + mask channel
  cfg = _cfg(w_max=3.0, aux_observed_prob=0.35, aux_absent_prob=0.3,
             masked_modality='masked_rgb')
  batch, rng = _batch(mods, n=32), jax.random.key(11)
  _, metrics = nnx.jit(lambda m, b: mt_elbo.mt_elbo_loss(
      m, b, rng, mods=mods, cfg=cfg, num_classes=NUM_CLASSES))(model, batch)
  terms, _ = _direct_loss_terms(model, batch, rng, cfg)
  for key, value in terms.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)
  with pytest.raises(ValueError, match='built with masked'):
    mt_elbo.mt_elbo_loss(_model(mods), batch, rng, mods=mods, cfg=cfg, num_classes=NUM_CLASSES)


@pytest.mark.parametrize('num_steps', [None, 4])
def test_inpainting_keeps_the_known_pixels(num_steps):
  mods = _mods('rgb', 'masked_rgb')
  model, data = _model(mods, masked='masked_rgb'), _batch(mods, n=3, seed=2)
  mask = mt_elbo.random_box_mask(jax.random.key(2), (3, *HW), min_frac=0.5, max_frac=0.5)
  given = mt_elbo.masked_input(data['rgb'], mask)
  out = mt_elbo.sample(model, jax.random.key(0), mods=mods, cfg=_cfg(), num=3,
                       num_classes=NUM_CLASSES, observed={'masked_rgb': given},
                       num_steps=num_steps)
  keep = np.asarray(mask)[..., 0] == 0
  np.testing.assert_allclose(np.asarray(out['rgb'])[keep], np.asarray(data['rgb'])[keep],
                             atol=1e-6)
  assert np.abs(np.asarray(out['rgb'])[~keep] - np.asarray(data['rgb'])[~keep]).mean() > 0.05


# ---- masked-image training through a latent codec: boxes cut in pixels -------------------

@functools.lru_cache(maxsize=None)
def _tiny_codec():
  """The SD-VAE architecture (8x down) with 8 channels per block, random weights."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from mmgen_jax import codec as codec_lib  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(autoencoder.SD_VAE_FT_MSE, block_out_channels=(8, 8, 8, 8),
                            layers_per_block=1, norm_num_groups=4, sample_size=32)
  vae = autoencoder.create(cfg, seed=3)
  return codec_lib.Codec(_mods('rgb', 'masked_rgb'), vae, 0.18215)


def _latent_masked_config():
  config = config_schema.base_config()
  config.modalities = ml_collections.ConfigDict(dict(
      rgb=modalities.spec(0, 'rgb'), masked_rgb=modalities.spec(1, 'rgb', 0.2, field='rgb')))
  config.objective.update(dict(name='mt_elbo', masked_modality='masked_rgb'))
  config.codec.name = 'sd_vae'
  return config


def test_latent_masks_are_cut_in_pixels_before_the_vae():
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  codec, config = _tiny_codec(), _latent_masked_config()
  pixels = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  masker = mt_elbo.make_pixel_masker(config)
  # A batch split over 4 devices, as the training input hands it over: kept so.
  mesh = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.devices()[:4])
  sharding = parallel.batch_sharding(mesh, config.sharding_rules)
  split = jax.device_put(pixels, sharding)
  got = masker({'rgb': split, 'masked_rgb': split}, codec)
  assert got[mt_elbo.masked_field('masked_rgb')].sharding.is_equivalent_to(sharding, 4)
  given = np.asarray(got[mt_elbo.masked_field('masked_rgb')])
  assert given.shape == (4, 4, 4, 5)  # 4 latent channels + the mask at the latent grid
  base = jax.random.fold_in(jax.random.key(int(config.seed)), 11)
  mask = mt_elbo.random_box_mask(jax.random.fold_in(base, 0), (4, 32, 32))
  # The mask channel: each 8x8 cell's unknown fraction; boxes of 8..16 pixels at any
  # position cut through cells, so fractions strictly between 0 and 1 occur.
  np.testing.assert_allclose(given[..., 4:], mt_elbo.pool_mask(mask, 8), atol=1e-6)
  assert np.any((given[..., 4] > 0) & (given[..., 4] < 1))
  blanked = codec.encode_mean({'masked_rgb': pixels * (1 - mask)})['masked_rgb']
  np.testing.assert_allclose(given[..., :4], blanked, rtol=1e-4, atol=1e-5)
  # Not the whole image's latent with its cells blanked (a box cut in latent space).
  cut = codec.encode_mean({'rgb': pixels})['rgb'] * (1 - mt_elbo.pool_mask(mask, 8))
  assert np.abs(given[..., :4] - np.asarray(cut)).max() > 1e-2
  # The next batch draws new boxes; nothing is drawn in pixel space.
  again = masker({'rgb': pixels, 'masked_rgb': pixels}, codec)
  assert not np.array_equal(again[mt_elbo.masked_field('masked_rgb')][..., 4:], given[..., 4:])
  config.codec.name = 'identity'
  assert mt_elbo.make_pixel_masker(config) is None
  with pytest.raises(KeyError, match='pixels of'):
    masker({'rgb_moments': pixels}, codec)


def test_latent_loss_reads_the_pixel_cut_input_and_refuses_a_latent_cut():
  mods = _mods('rgb', 'masked_rgb')
  rngs = nnx.Rngs(0)
  trunk = FakeTrunk(mt_encoders.trunk_spec(mods, 'rgb', 4), rngs=rngs)
  model = _perturbed(mt_encoders.MTDiffusion(trunk, mods=mods, primary='rgb', spatial=HW,
                                             latent_channels=4, masked='masked_rgb', rngs=rngs), 1)
  rng = np.random.default_rng(3)
  lat = jnp.asarray(rng.normal(size=(8, *HW, 4)), jnp.float32)
  given = jnp.asarray(np.concatenate([rng.normal(size=(8, *HW, 4)),
                                      rng.uniform(0, 1, (8, *HW, 1))], -1), jnp.float32)
  batch = {'rgb': lat, 'masked_rgb': lat, 'masked_rgb_masked': given,
           'label': jnp.zeros((8,), jnp.int32)}
  cfg = _cfg(w_max=3.0, aux_observed_prob=1.0, aux_absent_prob=0.0,
             masked_modality='masked_rgb')
  run = lambda b, **kw: mt_elbo.mt_elbo_loss(model, b, jax.random.key(2), mods=mods, cfg=cfg,
                                             num_classes=NUM_CLASSES, **kw)[1]['loss/denoise']
  got = run(batch, pixel_space=False)
  # Every sample observes the masked modality: the trunk sees E(given) as its condition.
  other = dict(batch, masked_rgb_masked=given.at[..., :4].multiply(-1.0))
  assert abs(float(run(other, pixel_space=False)) - float(got)) > 1e-4
  with pytest.raises(KeyError, match='masked_rgb_masked'):
    run({k: v for k, v in batch.items() if k != 'masked_rgb_masked'}, pixel_space=False)


def test_latent_inpainting_keeps_the_known_pixels():
  codec = _tiny_codec()
  mods = _mods('rgb', 'masked_rgb')
  rngs = nnx.Rngs(0)
  trunk = FakeTrunk(mt_encoders.trunk_spec(mods, 'rgb', 4), rngs=rngs)
  model = mt_encoders.MTDiffusion(trunk, mods=mods, primary='rgb', spatial=HW, latent_channels=4,
                                  masked='masked_rgb', rngs=rngs)
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  mask = np.zeros((2, 32, 32, 1), np.float32)
  mask[:, 4:20, 10:22] = 1.0
  out = np.asarray(mt_elbo.inpaint(model, codec, images, mask, jax.random.key(0), mods=mods,
                                   cfg=_cfg(), num_classes=NUM_CLASSES, num_steps=3))
  known = mask[..., 0] == 0
  np.testing.assert_array_equal(out[known], np.asarray(images)[known])
  assert np.abs(out[~known] - np.asarray(images)[~known]).mean() > 0.05
