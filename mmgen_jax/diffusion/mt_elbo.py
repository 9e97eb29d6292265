"""Objective 2 (MT-Diffusion): the multi-task ELBO, its schedule and sampler.

Forward kernel (auxiliary modalities encoded into the primary's space and summed,
E(x) = sum_i E_i(x_i)):

    q(z_t | z_{t-1}, x) = N(sqrt(alpha_t) (z_{t-1} + w_t E(x)), (1 - alpha_t) I)
    q(z_t | z_0, x)     = N(sqrt(ab_t) z_0 + lambda_t E(x), (1 - ab_t) I)
    lambda_t            = sum_{s<=t} w_s sqrt(ab_t / ab_{s-1})

with the weight schedule w_t = (w_max / T) sqrt(ab_{t-1}), which gives
lambda_t = w_max (t / T) sqrt(ab_t): the mean is sqrt(ab_t) (z_0 + w_max t/T E),
so E vanishes at T exactly as fast as z_0 does and the prior stays N(0, I).

Shifting by the mean, zeta_t = z_t - lambda_t E is a standard DDPM chain, so the
posterior q(z_s | z_t, z_0, x) is DDPM's with an extra E term; with the noise
parameterisation its mean is the DDPM mean minus w_t E. The reverse model
predicts eps (or x0 / v) from [z_t, observed encodings] and decodes every
auxiliary modality; the loss is the simple denoising loss plus the decoder
negative log-likelihoods (MSE for images, cross-entropy for classes). The
derivation, the bound that yields the decoder terms and the sampler's use of
E are in docs/mt_elbo.md.

Each auxiliary modality of a sample is in one of three states during training:
absent (E_i zeroed in the forward process), generated (decoded by its head; an
image is in the forward process, a label is not, so its head classifies the
image rather than reading the shift; its cross-entropy is taken in a second
pass at t <= label_t_max T, where the image is readable) or observed (in the
forward process and fed to the trunk as a condition). The trunk is told the
states (task ids). Masked-image training through a latent codec cuts its
boxes in pixels before the VAE (make_pixel_masker); inpaint() keeps the
known pixels.

Inference from a given primary (RGB -> depth, classify) holds it at a small
time instead of sampling the chain (infer_from_primary, classify).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mmgen_jax import modalities as modalities_lib
from mmgen_jax.diffusion import paths
from mmgen_jax.models import mt_encoders

_SCHEDULES = {'vp_cosine': 'cosine', 'vp_linear': 'linear'}


# ---- schedule ----------------------------------------------------------------

def encoder_weights(alpha_bar: np.ndarray, w_max: float) -> np.ndarray:
  """w_0..T with w_0 = 0 and w_t = (w_max / T) sqrt(ab_{t-1})."""
  T = len(alpha_bar) - 1
  return np.concatenate([[0.0], w_max / T * np.sqrt(alpha_bar[:-1])])


def mean_shift(alpha_bar: np.ndarray, w: np.ndarray) -> np.ndarray:
  """lambda_0..T = sum_{s<=t} w_s sqrt(ab_t / ab_{s-1}), by cumulative sums.

  Written as sqrt(ab_t) * cumsum_s(w_s / sqrt(ab_{s-1})) and evaluated in
  float64 with logs of alpha_bar, so no product of many alphas is formed.
  """
  alpha_bar = np.asarray(alpha_bar, np.float64)
  w = np.asarray(w, np.float64)
  log_ab = np.log(alpha_bar)
  terms = w[1:] * np.exp(-0.5 * log_ab[:-1])
  return np.concatenate([[0.0], np.exp(0.5 * log_ab[1:]) * np.cumsum(terms)])


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """Discrete MT-Diffusion schedule, arrays indexed by t = 0..T (float64)."""
  alpha_bar: np.ndarray
  w: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return len(self.alpha_bar) - 1

  @functools.cached_property
  def lam(self) -> np.ndarray:
    return mean_shift(self.alpha_bar, self.w)

  def at(self, values: np.ndarray, t, ndim: int):
    """values[t] as float32, with trailing axes to broadcast against ndim-d arrays."""
    v = jnp.asarray(values, jnp.float32)[t]
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))

  def q_sample(self, z0, Ex, t, eps):
    """z_t = sqrt(ab_t) z0 + lambda_t E(x) + sqrt(1 - ab_t) eps; t (N,) int in 1..T."""
    ab = self.at(self.alpha_bar, t, z0.ndim)
    return jnp.sqrt(ab) * z0 + self.at(self.lam, t, z0.ndim) * Ex + jnp.sqrt(1.0 - ab) * eps

  def posterior_mean_var(self, z_t, z0, Ex, t, s=None):
    """Mean and variance of q(z_s | z_t, z_0, x), s < t (default s = t - 1).

    zeta = z - lambda E is a DDPM chain, so with ab_{t|s} = ab_t / ab_s:
      mean = lambda_s E + c0 z0 + ct (z_t - lambda_t E),
      c0 = sqrt(ab_s) (1 - ab_{t|s}) / (1 - ab_t),
      ct = sqrt(ab_{t|s}) (1 - ab_s) / (1 - ab_t),
      var = (1 - ab_s)(1 - ab_{t|s}) / (1 - ab_t).
    """
    s = t - 1 if s is None else s
    nd = z_t.ndim
    ab_t, ab_s = self.at(self.alpha_bar, t, nd), self.at(self.alpha_bar, s, nd)
    ab_ts = ab_t / ab_s
    c0 = jnp.sqrt(ab_s) * (1.0 - ab_ts) / (1.0 - ab_t)
    ct = jnp.sqrt(ab_ts) * (1.0 - ab_s) / (1.0 - ab_t)
    lam_t, lam_s = self.at(self.lam, t, nd), self.at(self.lam, s, nd)
    mean = lam_s * Ex + c0 * z0 + ct * (z_t - lam_t * Ex)
    var = (1.0 - ab_s) * (1.0 - ab_ts) / (1.0 - ab_t)
    return mean, var

  def z0_from_eps(self, z_t, eps, Ex, t):
    ab = self.at(self.alpha_bar, t, z_t.ndim)
    return (z_t - self.at(self.lam, t, z_t.ndim) * Ex - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)

  def eps_mean(self, z_t, eps, Ex, t):
    """One-step posterior mean in noise form.

    (z_t - beta_t / sigma_t eps) / sqrt(alpha_t) - w_t E, with eps the noise of
    the marginal z_t = sqrt(ab_t) z0 + lambda_t E + sigma_t eps.
    """
    nd = z_t.ndim
    ab_t, ab_p = self.at(self.alpha_bar, t, nd), self.at(self.alpha_bar, t - 1, nd)
    alpha = ab_t / ab_p
    return ((z_t - (1.0 - alpha) / jnp.sqrt(1.0 - ab_t) * eps) / jnp.sqrt(alpha)
            - self.at(self.w, t, nd) * Ex)


def make_schedule(num_timesteps: int, kind: str = 'cosine', w_max: float = 0.1) -> Schedule:
  """kind: 'cosine' | 'linear' (see paths.vp_alpha_bar_discrete)."""
  if w_max < 0:
    raise ValueError(f'w_max={w_max} must be >= 0.')
  ab = paths.vp_alpha_bar_discrete(kind, num_timesteps)
  return Schedule(alpha_bar=ab, w=encoder_weights(ab, w_max))


@functools.lru_cache(maxsize=8)
def _cached_schedule(num_timesteps: int, kind: str, w_max: float) -> Schedule:
  return make_schedule(num_timesteps, kind, w_max)


def schedule_from_config(cfg) -> Schedule:
  """The schedule of config.objective (path vp_cosine | vp_linear)."""
  if cfg.path not in _SCHEDULES:
    raise ValueError(f'config.objective.path={cfg.path!r}: the mt_elbo objective is a discrete '
                     f'variance-preserving chain; use one of {sorted(_SCHEDULES)}.')
  return _cached_schedule(int(cfg.num_timesteps), _SCHEDULES[cfg.path], float(cfg.w_max))


# ---- masked-image auxiliary input --------------------------------------------

def random_box_mask(rng, shape: tuple[int, int, int], *, min_frac: float = 0.25,
                    max_frac: float = 0.5):
  """(N, H, W, 1) float mask, 1 inside one random box per sample.

  Box sides are uniform in [min_frac, max_frac] of the image side; the position
  is uniform over where the box fits.
  """
  if not 0.0 < min_frac <= max_frac <= 1.0:
    raise ValueError(f'need 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}.')
  n, h, w = shape
  u = jax.random.uniform(rng, (n, 4))
  frac = min_frac + (max_frac - min_frac) * u[:, :2]
  size = jnp.round(frac * jnp.array([h, w])).astype(jnp.int32)
  start = jnp.floor(u[:, 2:] * (jnp.array([h, w]) - size + 1))
  start = start.astype(jnp.int32)
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_rows = (rows >= start[:, :1]) & (rows < start[:, :1] + size[:, :1])
  in_cols = (cols >= start[:, 1:]) & (cols < start[:, 1:] + size[:, 1:])
  return (in_rows[:, :, None] & in_cols[:, None, :]).astype(jnp.float32)[..., None]


def masked_input(image, mask, *, fill: float = 0.0):
  """[image with the mask's pixels set to fill, mask]: the masked modality's input."""
  mask = jnp.broadcast_to(jnp.asarray(mask, image.dtype), (*image.shape[:3], 1))
  return jnp.concatenate([image * (1.0 - mask) + fill * mask, mask], axis=-1)


def masked_image(rng, image, *, fill: float = 0.0, **box_kwargs):
  """The masked-image auxiliary input: `image` with a random box set to `fill`.

  Returns (masked image, mask). Use with an auxiliary modality that reads the
  rgb field (e.g. modalities.spec(slot, 'rgb', field='rgb')) and
  config.objective.masked_modality naming it.
  """
  mask = random_box_mask(rng, image.shape[:3], **box_kwargs)
  return image * (1.0 - mask) + fill * mask, mask


def masked_field(name: str) -> str:
  """The batch field holding a masked modality's model-space input cut in pixel space."""
  return f'{name}_masked'


def pool_mask(mask, factor: int):
  """(N, H, W, 1) pixel mask -> (N, H/f, W/f, 1): the unknown fraction of each f x f cell."""
  if factor == 1:
    return mask
  n, h, w, c = mask.shape
  if h % factor or w % factor:
    raise ValueError(f'mask of shape {mask.shape}: its sides must be multiples of the codec '
                     f'downsampling {factor}.')
  return mask.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def pixel_masked_input(codec, name: str, pixels, mask):
  """The masked modality's model-space input, cut in pixel space, then encoded.

  [codec(pixels with the box set to 0), the mask pooled to the model grid]: with the
  identity codec this is `masked_input(pixels, mask)`; with the SD-VAE the blanked
  image goes through the encoder (posterior mean x scale, as any condition) and the
  mask channel holds each latent cell's fraction of unknown pixels.
  """
  blanked, pooled = _blank(jnp.asarray(pixels, jnp.float32), jnp.asarray(mask, jnp.float32),
                           codec.downsample)
  return _join(codec.encode_mean({name: blanked})[name], pooled)


@functools.partial(jax.jit, static_argnums=2)
def _blank(pixels, mask, factor: int):
  """(pixels with the mask's pixels set to 0, the mask pooled by factor); jitted, so global
  arrays of several processes stay where they are."""
  mask = jnp.broadcast_to(mask, (*pixels.shape[:3], 1))
  return pixels * (1.0 - mask), pool_mask(mask, factor)


@functools.partial(jax.jit, static_argnums=2)
def _cut_boxes(key, pixels, factor: int):
  """One random box per sample drawn and cut, in the pixels' own placement."""
  return _blank(pixels, random_box_mask(key, pixels.shape[:3]), factor)


@jax.jit
def _join(latent, pooled):
  return jnp.concatenate([latent, pooled.astype(latent.dtype)], axis=-1)


def make_pixel_masker(config) -> Callable[[Mapping[str, jax.Array], Any], dict] | None:
  """(batch, codec) -> batch with `masked_field(name)`: masked-image training through a
  latent codec, whose boxes must be cut in pixels before the VAE (None otherwise).

  Runs in the training input, on the pixel batch, before `codec.add_moments` (the
  decoder's target stays the whole image's latent). The boxes are drawn from
  config.seed and a count of the batches this masker has seen, so a run resumed
  from a checkpoint draws fresh boxes rather than the interrupted run's.
  """
  name = config.objective.masked_modality
  if config.objective.name != 'mt_elbo' or not name or config.codec.name == 'identity':
    return None
  base = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.train.rng_impl), 11)
  seen = [0]

  def apply(batch: Mapping[str, jax.Array], codec) -> dict:
    if name not in batch:
      raise KeyError(f'masked-image training through the {config.codec.name} codec cuts its '
                     f'boxes in pixels: the batch needs the pixels of {name!r} (a latent cache '
                     f'holds moments only); it has {sorted(batch)}.')
    pixels = batch[name]
    blanked, pooled = _cut_boxes(jax.random.fold_in(base, seen[0]), pixels, codec.downsample)
    seen[0] += 1
    given = _join(codec.encode_mean({name: blanked})[name], pooled)
    sharding = getattr(pixels, 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):  # laid out like the batch
      given = jax.device_put(given, sharding)
    return {**batch, masked_field(name): given}

  return apply


# ---- loss ----------------------------------------------------------------------

def _check_cfg(cfg) -> None:
  if cfg.prediction not in paths.PREDICTIONS:
    raise ValueError(f'config.objective.prediction={cfg.prediction!r} is not one of '
                     f'{paths.PREDICTIONS}.')
  for key in ('aux_observed_prob', 'aux_absent_prob'):
    if not 0.0 <= getattr(cfg, key) <= 1.0:
      raise ValueError(f'config.objective.{key}={getattr(cfg, key)} must be in [0, 1].')
  if cfg.aux_observed_prob + cfg.aux_absent_prob > 1.0:
    raise ValueError('config.objective.aux_observed_prob + aux_absent_prob must be <= 1, got '
                     f'{cfg.aux_observed_prob} + {cfg.aux_absent_prob}.')
  if cfg.decoder_weight < 0:
    raise ValueError(f'config.objective.decoder_weight={cfg.decoder_weight} must be >= 0.')
  if not 0.0 < cfg.label_t_max <= 1.0:
    raise ValueError(f'config.objective.label_t_max={cfg.label_t_max} must be in (0, 1].')


def label_times(u, num_timesteps: int, label_t_max: float):
  """(N,) int times of the class heads' pass: uniform on 1..max(1, round(label_t_max T))."""
  t_max = max(1, int(round(label_t_max * num_timesteps)))
  return 1 + jnp.minimum(jnp.floor(u * t_max), t_max - 1).astype(jnp.int32)


def aux_states(u, names: Sequence[str], cfg, batch: Mapping[str, jax.Array]):
  """(N, A) int32 states (mt_encoders.ABSENT / GENERATED / OBSERVED) of the auxiliaries.

  u: (N, A) uniforms: absent below aux_absent_prob, observed in the next
  aux_observed_prob, generated otherwise. A batch may carry '<name>_present'
  (N,) bool for samples that lack a modality (then absent).
  """
  n = u.shape[0]
  present = u >= cfg.aux_absent_prob
  observed = present & (u < cfg.aux_absent_prob + cfg.aux_observed_prob)
  if names:
    given = jnp.stack([jnp.asarray(batch.get(f'{m}_present', jnp.ones((n,), bool)), bool)
                       for m in names], axis=1)
    present, observed = present & given, observed & given
  return jnp.where(observed, mt_encoders.OBSERVED,
                   jnp.where(present, mt_encoders.GENERATED, mt_encoders.ABSENT)).astype(jnp.int32)


def forward_weights(states, names: Sequence[str], aux_classes: Sequence[str]):
  """(N, A) float: 1 where E_i enters the forward process q.

  Image modalities enter when generated or observed. A class modality enters
  only when observed: a generated label is decoded from the image alone, so the
  label head cannot read it back from the shift lambda_t E(y) (docs/mt_elbo.md §7).
  """
  is_class = jnp.asarray([n in aux_classes for n in names], bool)[None, :]
  observed = states == mt_encoders.OBSERVED
  return jnp.where(is_class, observed, states != mt_encoders.ABSENT).astype(jnp.float32)


def _weighted_sum(encodings: Sequence[jax.Array], weights, like):
  """sum_i weights[:, i] * encodings[i] (zeros shaped like `like` when there are none)."""
  total = jnp.zeros_like(like)
  for i, e in enumerate(encodings):
    total = total + weights[:, i].reshape((-1, 1, 1, 1)) * e
  return total


def _class_condition(mods, batch, rng, n, num_classes, class_dropout_prob):
  """Class modalities are modelled by the chain, so y is then the null class."""
  if modalities_lib.classes(mods) or 'label' not in batch:
    return jnp.full((n,), num_classes, jnp.int32)
  y = batch['label']
  if class_dropout_prob > 0:
    y = jnp.where(jax.random.uniform(rng, (n,)) < class_dropout_prob, num_classes, y)
  return y.astype(jnp.int32)


def prediction_target(prediction: str, z0, eps, alpha_bar):
  if prediction == 'eps':
    return eps
  if prediction == 'x0':
    return z0
  return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * z0


def mt_elbo_loss(model: mt_encoders.MTDiffusion, batch: Mapping[str, jax.Array], rng, *,
                 mods: Sequence[modalities_lib.Modality], cfg, num_classes: int,
                 class_dropout_prob: float = 0.0, pixel_space: bool = True
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The multi-task ELBO loss; `cfg` is config.objective. Returns (loss, metrics).

  pixel_space: the model space is the pixels (identity codec), so the masked
  modality's boxes may be cut here; otherwise the batch must carry them cut in
  pixels and encoded (`masked_field`, `make_pixel_masker`).

  rng is split as (uniforms, eps, box masks, labels); the uniforms (N, 1 + A)
  give t = 1 + floor(u[:, 0] T) and the auxiliary states from u[:, 1:].
  """
  _check_cfg(cfg)
  sched = schedule_from_config(cfg)
  primary, aux = mt_encoders.split_primary(mods, cfg.primary)
  names = model.aux_names
  if sorted(names) != sorted(m.name for m in aux):
    raise ValueError(f'model encoders {sorted(names)} do not match the auxiliary modalities '
                     f'{sorted(m.name for m in aux)}.')
  z0 = batch[primary.name]
  n = z0.shape[0]
  k_u, k_eps, k_mask, k_label = jax.random.split(rng, 4)

  inputs = dict(batch)  # what the encoders see; the decoders' targets stay `batch`
  if cfg.masked_modality:
    if cfg.masked_modality != model.masked:
      raise ValueError(f'config.objective.masked_modality={cfg.masked_modality!r} but the '
                       f'model was built with masked={model.masked!r}.')
    # The encoder sees the masked image and its mask; the decoder predicts the whole
    # image (a learnable target: the box positions are random).
    field = masked_field(cfg.masked_modality)
    if field in batch:  # cut in pixels, then encoded (a latent codec)
      inputs[cfg.masked_modality] = batch[field]
    elif pixel_space:
      full = batch[cfg.masked_modality]
      inputs[cfg.masked_modality] = masked_input(full, random_box_mask(k_mask, full.shape[:3]))
    else:
      raise KeyError(f'masked-image training in a latent space needs batch field {field!r} '
                     '(boxes cut in pixels before the VAE: mt_elbo.make_pixel_masker); a box '
                     f'cut in latents would blank whole 8x8 cells. Batch: {sorted(batch)}.')

  T = sched.num_timesteps
  u = jax.random.uniform(k_u, (n, 1 + len(names)))  # one draw: each draw compiles separately
  t = 1 + jnp.minimum(jnp.floor(u[:, 0] * T), T - 1).astype(jnp.int32)
  eps = paths.normal(k_eps, z0.shape, z0.dtype)
  states = aux_states(u[:, 1:], names, cfg, inputs)
  observed = (states == mt_encoders.OBSERVED).astype(jnp.float32)
  generated = (states == mt_encoders.GENERATED).astype(jnp.float32)
  encoded = mt_encoders.encode_all(model, inputs)
  encodings = [encoded[m] for m in names]
  Ex = _weighted_sum(encodings, forward_weights(states, names, model.aux_classes), z0)
  cond = _weighted_sum(encodings, observed, z0)

  z_t = sched.q_sample(z0, Ex, t, eps)
  y = _class_condition(mods, batch, k_label, n, num_classes, class_dropout_prob)
  out = model(z_t, t.astype(jnp.float32) / T, cond, y, states)
  decoded = model.decoder_outputs(out)
  if model.aux_classes:
    # The class heads' term -log p(y | z_0) is estimated at small t only (docs §7a):
    # a second pass of the same samples and states at t' <= label_t_max T, where the
    # image is visible; at large t the label is unreadable and its gradient is noise.
    k_tl, k_el = jax.random.split(jax.random.fold_in(rng, 7))
    t_lab = label_times(jax.random.uniform(k_tl, (n,)), T, cfg.label_t_max)
    z_lab = sched.q_sample(z0, Ex, t_lab, paths.normal(k_el, z0.shape, z0.dtype))
    labelled = model.decoder_outputs(model(z_lab, t_lab.astype(jnp.float32) / T, cond, y,
                                           states))
    decoded = {**decoded, **{k: labelled[k] for k in model.aux_classes}}

  ab = sched.at(sched.alpha_bar, t, z0.ndim)
  target = prediction_target(cfg.prediction, z0, eps, ab)
  denoise = jnp.mean((out.images[0].astype(jnp.float32) - target) ** 2)

  loss = denoise
  metrics = {'loss/denoise': denoise}
  for i, name in enumerate(names):
    mod = modalities_lib.by_name(mods, name)
    g = generated[:, i]
    if mod.is_image:
      nll = jnp.mean((decoded[name].astype(jnp.float32) - batch[name]) ** 2, axis=(1, 2, 3))
    else:
      logits = decoded[name].astype(jnp.float32)
      labels = batch[name].astype(jnp.int32)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
      correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
      metrics[f'accuracy/{name}'] = jnp.sum(correct * g) / jnp.maximum(g.sum(), 1.0)
    dec = jnp.sum(nll * g) / jnp.maximum(g.sum(), 1.0)
    loss = loss + cfg.decoder_weight * mod.loss_weight * dec
    metrics[f'loss/{name}'] = dec
    metrics[f'observed_fraction/{name}'] = observed[:, i].mean()
  metrics['loss'] = loss
  return loss, metrics


def make_loss_fn(config) -> Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple]:
  """(model, batch, rng) -> (loss, metrics) for the full config."""
  return functools.partial(
      mt_elbo_loss, mods=modalities_lib.from_config(config.modalities), cfg=config.objective,
      num_classes=config.data.num_classes, class_dropout_prob=config.model.class_dropout_prob,
      pixel_space=config.codec.name == 'identity')


# ---- ancestral sampler -----------------------------------------------------------

def step_times(num_timesteps: int, num_steps: int | None) -> np.ndarray:
  """Decreasing integer times T = t_0 > ... > t_K = 0 (K = num_steps, default T)."""
  K = num_timesteps if num_steps is None else int(num_steps)
  if not 1 <= K <= num_timesteps:
    raise ValueError(f'num_steps={num_steps} must be in [1, T={num_timesteps}].')
  # Spacing T / K >= 1, so rounding keeps the times strictly decreasing.
  return np.round(np.linspace(num_timesteps, 0, K + 1)).astype(np.int32)


def _states_row(names: Sequence[str], observed, generate) -> np.ndarray:
  """(A,) int states of a sampling call: observed, generated, otherwise absent."""
  return np.array([mt_encoders.OBSERVED if m in observed else
                   mt_encoders.GENERATED if m in generate else mt_encoders.ABSENT
                   for m in names], np.int32)


def _check_request(model, observed, generate):
  names = model.aux_names
  unknown = sorted(set(observed) - set(names) - {model.primary})
  if unknown:
    raise KeyError(f'observed {unknown} are not modalities of the model (primary '
                   f'{model.primary!r}, auxiliary {list(names)}).')
  generate = [m for m in names if m not in observed] if generate is None else list(generate)
  bad = sorted(set(generate) - set(names)) + sorted(set(generate) & set(observed))
  if bad:
    raise ValueError(f'generate={generate}: {bad} are unknown or also observed '
                     f'(auxiliary modalities: {list(names)}).')
  return generate


def _estimate(net, decoded, cond, generate):
  """E_hat = observed encodings + E_i of the generated images' decoder outputs.

  Generated class modalities are not in the forward process (forward_weights),
  so they add nothing.
  """
  E_hat = cond
  for name in generate:
    if name not in net.aux_classes:
      E_hat = E_hat + net.encode_estimate(name, decoded[name])
  return E_hat


def _outputs(model, last, generate):
  return {k: (jnp.argmax(last[k], -1).astype(jnp.int32) if k in model.aux_classes else last[k])
          for k in generate}


def _conditioning(model, observed, generate, y, num: int, num_classes: int, shape):
  """(class ids, auxiliary-state rows, summed encodings of the observed modalities).

  y None is the null class; every sample has the same observed/generated/absent states.
  """
  y = jnp.full((num,), num_classes, jnp.int32) if y is None else y
  states = jnp.broadcast_to(_states_row(model.aux_names, observed, generate),
                            (num, len(model.aux_names)))
  cond = jnp.zeros(shape)
  for name, x in observed.items():
    cond = cond + model.encode(name, jnp.asarray(x))
  return y, states, cond


def sample(model: mt_encoders.MTDiffusion, rng, *, mods: Sequence[modalities_lib.Modality],
           cfg, num: int, num_classes: int, observed: Mapping[str, jax.Array] | None = None,
           generate: Sequence[str] | None = None, y: jax.Array | None = None,
           num_steps: int | None = None, t_cond: float = 0.005) -> dict[str, jax.Array]:
  """Ancestral sampling with the derived posterior; returns {name: array}.

  observed: modalities given; their exact E_i enters both the trunk input and
  the posterior (image transition, masked image, class-conditional). The
  primary may be observed too (RGB -> depth, classification): then the chain
  is not sampled but held, see `infer_from_primary` (t_cond, num_steps).
  generate: auxiliary modalities to generate (default: every one not
  observed); the E_i of a generated image is estimated at each step from its
  decoder head. Any other auxiliary modality is absent (E_i = 0). y: class
  condition for a trunk trained with labels (only without class modalities;
  default null).

  Returns the primary sample, each generated modality's decoder output at the
  last step (class modalities as int32 ids, read from the classifier head) and
  the observed inputs.
  """
  observed = dict(observed or {})
  generate = _check_request(model, observed, generate)
  if y is not None and modalities_lib.classes(mods):
    raise ValueError(
        f'y was given but class modalities {[m.name for m in modalities_lib.classes(mods)]} '
        'are modelled by the chain (the trunk was trained with the null class); condition '
        'on them through observed={name: labels} instead.')
  if model.primary in observed:
    primary = observed.pop(model.primary)
    if primary.shape[0] != num:
      raise ValueError(f'observed[{model.primary!r}] has {primary.shape[0]} samples; num={num}.')
    return infer_from_primary(model, primary, rng, cfg=cfg, num_classes=num_classes,
                              observed=observed, generate=generate, y=y, t_cond=t_cond,
                              num_iters=2 if num_steps is None else int(num_steps))
  sched = schedule_from_config(cfg)
  shape = (num, *model.spatial, model.channels)
  y, states, cond = _conditioning(model, observed, generate, y, num, num_classes, shape)
  known = _known_pixels(model, mods, observed)
  ts = step_times(sched.num_timesteps, num_steps)
  k_init, k_steps = jax.random.split(rng)
  graphdef, state = nnx.split(model)

  def step(carry, inputs):
    z, _ = carry
    t, s, key = inputs
    net = nnx.merge(graphdef, state)
    t_vec = jnp.full((num,), t)
    out = net(z, t_vec.astype(jnp.float32) / sched.num_timesteps, cond, y, states)
    decoded = net.decoder_outputs(out)
    E_hat = _estimate(net, decoded, cond, generate)
    ab = sched.at(sched.alpha_bar, t_vec, z.ndim)
    zeta = z - sched.at(sched.lam, t_vec, z.ndim) * E_hat
    eps = paths.vp_convert(zeta, out.images[0].astype(jnp.float32), ab, cfg.prediction, 'eps')
    z0 = sched.z0_from_eps(z, eps, E_hat, t_vec)
    mean, var = sched.posterior_mean_var(z, z0, E_hat, t_vec, jnp.full((num,), s))
    z = mean + jnp.sqrt(var) * paths.normal(key, z.shape)
    if known is not None:  # inpainting: the known pixels follow q(z_s | x_known, E_hat)
      x_known, keep = known
      s_vec = jnp.full((num,), s)
      z_known = sched.q_sample(x_known, E_hat, s_vec,
                               paths.normal(jax.random.fold_in(key, 1), z.shape))
      z = keep * z_known + (1.0 - keep) * z
    return (z, {k: decoded[k].astype(jnp.float32) for k in generate}), None

  # The decoder outputs are carried (not stacked) so memory does not grow with T.
  z = paths.normal(k_init, shape)
  keys = jax.random.split(k_steps, len(ts) - 1)
  (z, last), _ = jax.lax.scan(step, (z, _empty_outputs(model, mods, num, generate)),
                              (jnp.asarray(ts[:-1]), jnp.asarray(ts[1:]), keys))
  return {model.primary: z, **{k: jnp.asarray(v) for k, v in observed.items()},
          **_outputs(model, last, generate)}


def _known_pixels(model, mods, observed):
  """(known primary values, keep mask) when an observed masked modality shows the
  primary's own field (inpainting), else None.

  In pixel space these are the known pixels. With a latent codec they are the
  latents of the blanked image, kept only in cells with no unknown pixel.
  """
  name = model.masked
  if not name or name not in observed:
    return None
  if (modalities_lib.by_name(mods, name).field != modalities_lib.by_name(mods, model.primary).field
      or model.aux_channels[name] != model.channels):
    return None
  given = jnp.asarray(observed[name], jnp.float32)
  if given.shape[-1] != model.channels + 1:
    raise ValueError(f'observed[{name!r}] has shape {given.shape}; expected [image, mask] with '
                     f'{model.channels + 1} channels (mt_elbo.masked_input).')
  # Cells with any unknown pixel are generated; in pixel space the mask is binary.
  return given[..., :-1], (given[..., -1:] == 0).astype(jnp.float32)


def inpaint(model: mt_encoders.MTDiffusion, codec, images, mask, rng, *,
            mods: Sequence[modalities_lib.Modality], cfg, num_classes: int,
            num_steps: int | None = None) -> jax.Array:
  """Fills the box `mask` (N, H, W, 1), 1 = unknown, of pixel `images`; returns pixels.

  The masked modality is observed as `pixel_masked_input` (cut in pixels, then
  encoded) and the chain is sampled with the known values reset to the forward
  marginal after every step. The decoded sample then takes the known pixels back
  exactly (with a latent codec the latents cannot hold them: a cell mixes 8x8
  pixels and the VAE does not reconstruct exactly).
  """
  name = model.masked
  if not name:
    raise ValueError('inpaint needs a model built with masked=<modality>.')
  images = jnp.asarray(images, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), (*images.shape[:3], 1))
  given = pixel_masked_input(codec, name, images, mask)
  if _known_pixels(model, mods, {name: given}) is None:
    raise ValueError(f'the masked modality {name!r} does not show the primary '
                     f'{model.primary!r}: nothing to inpaint.')
  out = sample(model, rng, mods=mods, cfg=cfg, num=images.shape[0], num_classes=num_classes,
               observed={name: given}, generate=[], num_steps=num_steps)
  pixels = codec.decode({model.primary: out[model.primary]})[model.primary]
  return mask * pixels + (1.0 - mask) * images


def _empty_outputs(model, mods, num, generate):
  last = {}
  for name in generate:
    if name in model.aux_classes:
      last[name] = jnp.zeros((num, modalities_lib.by_name(mods, name).channels))
    else:
      last[name] = jnp.zeros((num, *model.spatial, model.aux_channels[name]))
  return last


def held_step(num_timesteps: int, t_cond: float) -> int:
  """The integer time a held primary sits at: round(t_cond T), at least 1."""
  if not 0.0 <= t_cond < 1.0:
    raise ValueError(f't_cond={t_cond} must be in [0, 1).')
  return max(1, int(round(t_cond * num_timesteps)))


def infer_from_primary(model: mt_encoders.MTDiffusion, primary, rng, *, cfg, num_classes: int,
                       observed: Mapping[str, jax.Array] | None = None,
                       generate: Sequence[str] | None = None, y: jax.Array | None = None,
                       t_cond: float = 0.005, num_iters: int = 2) -> dict[str, jax.Array]:
  """The auxiliaries of a given primary (RGB -> depth, the label of an image).

  As a held condition slot of the decoupled sampler, the primary is noised once
  to the small time t = held_step(T, t_cond) and held there:

      z_t = sqrt(ab_t) x_p + lambda_t E_hat + sigma_t eps,   one eps draw,

  the forward marginal with the unknown encodings replaced by their estimate.
  E_hat starts at the observed encodings and is refined num_iters times from
  the decoder heads (lambda_t is tiny at small t, so this settles at once).
  Returns the generated modalities' decoder outputs of the last pass (class
  ids by argmax), the primary and the observed inputs.
  """
  observed = dict(observed or {})
  generate = _check_request(model, {**observed, model.primary: None}, generate)
  if num_iters < 1:
    raise ValueError(f'num_iters={num_iters} must be >= 1.')
  sched = schedule_from_config(cfg)
  primary = jnp.asarray(primary, jnp.float32)
  num = primary.shape[0]
  expected = (*model.spatial, model.channels)
  if primary.shape[1:] != expected:
    raise ValueError(f'primary {model.primary!r} has shape {primary.shape}; expected '
                     f'(N, *{expected}) in model space.')
  y, states, cond = _conditioning(model, observed, generate, y, num, num_classes,
                                  primary.shape)
  t_vec = jnp.full((num,), held_step(sched.num_timesteps, t_cond))
  eps = paths.normal(rng, primary.shape)
  z_clean = sched.q_sample(primary, jnp.zeros_like(primary), t_vec, eps)  # E_hat added below
  lam = sched.at(sched.lam, t_vec, primary.ndim)
  E_hat, decoded = cond, {}
  for _ in range(num_iters):
    out = model(z_clean + lam * E_hat, t_vec.astype(jnp.float32) / sched.num_timesteps, cond,
                y, states)
    decoded = {k: v.astype(jnp.float32) for k, v in model.decoder_outputs(out).items()}
    E_hat = _estimate(model, decoded, cond, generate)
  return {model.primary: primary, **{k: jnp.asarray(v) for k, v in observed.items()},
          **_outputs(model, decoded, generate)}


def classify(model: mt_encoders.MTDiffusion, images, rng, *, cfg, num_classes: int,
             name: str | None = None, t_cond: float = 0.005, logits: bool = False):
  """The label of each given primary image by the label head, the label unobserved.

  Every other auxiliary modality is absent; name: the class modality (default
  the only one). Returns (N,) int32 ids, or the (N, K) logits with logits=True.
  """
  classes = model.aux_classes
  if name is None:
    if len(classes) != 1:
      raise ValueError(f'name=None needs exactly one class modality; the model has '
                       f'{list(classes)}.')
    name = classes[0]
  if name not in classes:
    raise ValueError(f'{name!r} is not a class modality of the model {list(classes)}.')
  sched = schedule_from_config(cfg)
  images = jnp.asarray(images, jnp.float32)
  num = images.shape[0]
  t_vec = jnp.full((num,), held_step(sched.num_timesteps, t_cond))
  z = sched.q_sample(images, jnp.zeros_like(images), t_vec, paths.normal(rng, images.shape))
  states = jnp.broadcast_to(_states_row(model.aux_names, (), (name,)),
                            (num, len(model.aux_names)))
  out = model(z, t_vec.astype(jnp.float32) / sched.num_timesteps, jnp.zeros_like(images),
              jnp.full((num,), num_classes, jnp.int32), states)
  head = model.decoder_outputs(out)[name].astype(jnp.float32)
  return head if logits else jnp.argmax(head, -1).astype(jnp.int32)
