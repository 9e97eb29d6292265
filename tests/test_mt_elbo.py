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
    zeros = nnx.initializers.zeros
    self.image_heads = nnx.List([nnx.Linear(hidden, c, kernel_init=zeros, rngs=rngs)
                                 for c in spec['image_heads']])
    self.class_heads = nnx.List([nnx.Linear(hidden, k, kernel_init=zeros, rngs=rngs)
                                 for k in spec['class_heads']])

  def __call__(self, x, t, y, task=None):
    h = nnx.silu(self.body(x) + (self.t_proj(t) + self.y_emb(y))[:, None, None, :])
    return Out(images=tuple(head(h) for head in self.image_heads),
               logits=tuple(head(h.mean(axis=(1, 2))) for head in self.class_heads))


@functools.lru_cache(maxsize=None)
def _model(mods, seed=0, perturb=True):
  """Built once per argument set (eager initialisation is slow on CPU); never mutated."""
  rngs = nnx.Rngs(seed)
  trunk = FakeTrunk(mt_encoders.trunk_spec(mods, 'rgb'), rngs=rngs)
  model = mt_encoders.MTDiffusion(trunk, mods=mods, primary='rgb', spatial=HW, rngs=rngs)
  if perturb:  # move the zero-initialised heads so every path carries gradient
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    noise = np.random.default_rng(seed + 100)
    params = jax.tree.map(lambda p: p + 0.1 * noise.standard_normal(p.shape, np.float32), params)
    model = nnx.merge(graphdef, params, rest)
  return model


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
  pred = model.trunk(x, (t / T)[:, None].astype(jnp.float32), batch['label'], task=None).images[0]
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
  model, batch = _model(mods), _batch(mods, n=16)

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
      in_channels=6, image_heads=(3, 1), time_slots=(6,), class_heads=(NUM_CLASSES,), num_tasks=0)
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
  oracle.E[...] = model.encode('depth', depth) + model.encode('label', jnp.array([label]))

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
  model, data = _model(mods), _batch(mods, n=2)
  cfg = _cfg()
  run = lambda **kw: mt_elbo.sample(model, jax.random.key(0), mods=mods, cfg=cfg, num=2,
                                    num_classes=NUM_CLASSES, num_steps=4, **kw)
  joint = run(generate=['label'])  # joint image-label generation
  assert joint['rgb'].shape == (2, *HW, 3) and joint['label'].dtype == jnp.int32
  assert 'depth' not in joint  # neither observed nor generated: absent
  masked, _ = mt_elbo.masked_image(jax.random.key(1), data['rgb'])
  inpaint = run(observed={'masked_rgb': masked}, generate=[])
  np.testing.assert_array_equal(inpaint['masked_rgb'], masked)
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

  out = mt_elbo.sample(model, jax.random.key(1), mods=mods, cfg=cfg, num=2,
                       num_classes=NUM_CLASSES, observed={'depth': batch['depth'][:2]},
                       num_steps=3)
  assert out['rgb'].shape == (2, *HW, 3) and out['label'].shape == (2,)


def test_sampler_refuses_a_class_condition_when_labels_are_a_modality():
  mods = _mods('rgb', 'label')
  with pytest.raises(ValueError, match='observed='):
    mt_elbo.sample(_model(mods, perturb=False), jax.random.key(0), mods=mods, cfg=_cfg(), num=2,
                   num_classes=NUM_CLASSES, y=jnp.zeros((2,), jnp.int32))
