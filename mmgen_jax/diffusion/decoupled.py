"""Objective 1 (MMGen): one velocity loss with a decoupled timestep per modality.

Every sample takes one of three modes (its task index in brackets):

* joint [0]: all image modalities share one t ~ U(0, 1);
* RGB-only [0]: a joint sample supervised on RGB (slot 0) alone;
* conditional [m + 1]: image modality m is a condition at t = cond_t_max · U(0, 1)
  and is not supervised; the others share one t ~ U(0, 1). m is drawn uniformly
  per sample, or is `cond_task_fixed` for every conditional sample.

Which sample takes which mode (`layout`):

* 'per_sample': joint with probability joint_prob, and RGB-only with
  probability rgb_only_prob overall, drawn among the joint samples (hence
  rgb_only_prob <= joint_prob);
* 'by_position' (MMGen's loss.py): in each group of G samples the first
  rgb_only_prob·G are RGB-only, the next ones up to joint_prob·G joint, the
  rest conditional (`--ratio-train-onlyrgb 0.5 --use-quarter-mixing`: 1/2, 3/4).

Non-RGB loss dropout, on the samples that are not RGB-only (`slot_dropout`):

* 'fixed': each non-RGB slot leaves the loss with probability slot_dropout_prob;
* 'per_batch' (MMGen's loss.py): per group, k of its P (sample, slot) pairs are
  drawn without replacement, k uniform in {0, ..., P - 1}, and the non-RGB ones
  among them leave the loss (RGB is never dropped).

The loss: per group, modality m's loss is its per-sample MSE (mean over pixels
and the slot's channels) averaged over the group's samples where m is
supervised (0 where there is none), the group's loss is sum_m loss_weight_m ·
loss_m, and the loss is the mean over groups. A group is `group_size`
consecutive samples (0: the whole batch), standing for one process's batch in
MMGen's data-parallel training: its train.py computes this per process and
DDP averages the gradients, so the layout, the dropout rate and the
normalisation are all per process batch there.

configs/imagenet256_xl2.py sets MMGen's released recipe (scripts/train_imagenet.sh)
in these terms. Its RGB -> X fine-tune (scripts/finetune_hypersim_rgb2x.sh,
`--cond-task-fixed 0`) is joint_prob = 0, cond_t_max = 0 and cond_task_fixed =
'rgb': every sample is conditioned on clean RGB (t = 0 exactly) and supervises
the other modalities (configs/scenes32.py:rgb2x).

REPA (`repa_coeff` > 0, MMGen's `--proj-coeff`; REPA's loss.py, which
MMGen's loss.py repeats): the loss is diffusion loss + repa_coeff × proj_loss,

  proj_loss = mean over projectors j and samples b of
              mean over tokens t of −cos(z̃_jbt, z_jbt),

z̃ the model's projector output per token (`ModelOutput.zs`, read after block
`model.repa_encoder_depth`) and z the frozen encoder's features of the clean
RGB image, the batch field 'repa_features' (N, T, z): DINOv2-B/14 patch
tokens at 224 px in the release, 16×16 = 256 tokens of 768, the latent token
grid. As in MMGen's train.py (`--use-half-projloss` off) it is taken over
every sample whatever its mode (joint, RGB-only or conditional) and is not
split into groups: each process's mean, averaged by DDP, is the batch mean.

Multimodal prompts (`config.prompt`, models/prompt_encoder.py). When the model
has a prompt encoder and the batch holds the prompt fields (`prompt_tokens`,
`prompt_mask`, `prompt_entity`, `entity_images`), the prompt conditions every
sample and the class label is replaced by the null class: the prompt names the
scene's objects, so a label beside it would be a second, partly redundant
condition, and guidance would have to decide what to do with it. One condition,
one set of guidance passes; a prompt model still samples from labels without a
prompt. Each sample's words leave the prompt with probability
`prompt.text_dropout_prob` and its entity images with `entity_dropout_prob`,
independently (by masking: `prompt_encoder.drop_condition`), so the model
learns the "none", "text only" and "full" conditions guidance combines.

Entity alignment (`entity_align_coeff` > 0; FastComposer's localisation loss):
with A the cross-attention weights of the image tokens on the prompt tokens (the
mean over blocks and heads, `ModelOutput.attention`), a_k = the weight each
image token puts on entity k's tokens (its phrase `entity_spans`, which holds
its '<ent>' slots, and the slots marked k + 1; only tokens left in the prompt),
and m_k its mask `entity_masks` averaged over each token's patch,

  align = mean over present (sample, k) of
          sum_T a_k (1 - m_k) / sum_T (1 - m_k)  -  sum_T a_k m_k / sum_T m_k,

a present entity having unmasked tokens and a mask covering part (not all) of
the image. It lies in [-1, 1] and falls as attention moves inside the masks.

Read against MMGen's loss.py / train.py (jiepengwang/MMGen). Differences:

* MMGen masks the condition slot's loss only when RGB-only training or a fixed
  condition is on (as in all its released recipes); here it is always masked.
* MMGen runs its per-batch dropout exactly when RGB-only training is on
  (0 < ratio_train_onlyrgb < 0.9); here `slot_dropout` is its own option.
* Labels are dropped here, not inside the model (the same law: each label
  becomes the null class with probability class_dropout_prob).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mmgen_jax import modalities as modalities_lib
from mmgen_jax.diffusion import paths
from mmgen_jax.models import prompt_encoder as prompt_lib

# Batch fields of the entity alignment loss (the prompt data contract).
ENTITY_MASKS, ENTITY_SPANS, ENTITY_VALID = 'entity_masks', 'entity_spans', 'entity_valid'

LAYOUTS = ('per_sample', 'by_position')
SLOT_DROPOUTS = ('fixed', 'per_batch')


def check_cfg(cfg, names: Sequence[str]) -> None:
  """Raises naming the `config.objective` key that cannot work with image modalities `names`."""
  paths.check_path(cfg.path, cfg.prediction)
  for key in ('joint_prob', 'rgb_only_prob', 'slot_dropout_prob', 'cond_t_max'):
    value = getattr(cfg, key)
    if not 0.0 <= value <= 1.0:
      raise ValueError(f'config.objective.{key}={value} must be in [0, 1].')
  if cfg.rgb_only_prob > cfg.joint_prob:
    raise ValueError(
        f'config.objective.rgb_only_prob={cfg.rgb_only_prob} exceeds joint_prob='
        f'{cfg.joint_prob}: RGB-only samples are drawn among joint samples (as in '
        'MMGen, where a conditional sample always supervises its other modalities).')
  if not names:
    raise ValueError('the decoupled objective needs at least one image modality.')
  for key, valid in (('layout', LAYOUTS), ('slot_dropout', SLOT_DROPOUTS)):
    if getattr(cfg, key) not in valid:
      raise ValueError(f'config.objective.{key}={getattr(cfg, key)!r} is not one of {list(valid)}.')
  if cfg.cond_task_fixed and cfg.cond_task_fixed not in names:
    raise ValueError(f'config.objective.cond_task_fixed={cfg.cond_task_fixed!r} is not an image '
                     f'modality; image modalities: {list(names)}.')
  if cfg.group_size < 0:
    raise ValueError(f'config.objective.group_size={cfg.group_size} must be >= 0 (0: the '
                     'whole batch).')
  if cfg.repa_coeff < 0:
    raise ValueError(f'config.objective.repa_coeff={cfg.repa_coeff} must be >= 0 (0: no REPA).')
  if getattr(cfg, 'entity_align_coeff', 0.0) < 0:
    raise ValueError(f'config.objective.entity_align_coeff={cfg.entity_align_coeff} must be >= 0 '
                     '(0: no alignment loss).')


def group_size(cfg, n: int) -> int:
  """Samples per group: `cfg.group_size`, or the whole batch of n when it is 0."""
  g = int(cfg.group_size) or n
  if n % g:
    raise ValueError(f'a batch of {n} samples does not split into groups of '
                     f'config.objective.group_size={g}.')
  return g


def position_counts(cfg, g: int) -> tuple[int, int]:
  """(RGB-only, joint) samples at the head of every group of g for layout 'by_position'."""
  counts = []
  for key in ('rgb_only_prob', 'joint_prob'):
    count = getattr(cfg, key) * g
    if abs(count - round(count)) > 1e-6:
      raise ValueError(f"config.objective.layout='by_position' needs a whole number of samples: "
                       f'{key} × group size = {getattr(cfg, key)} × {g} = {count:g}.')
    counts.append(round(count))
  return counts[0], counts[1]


def _joint_and_rgb_only(u_joint, u_rgb_only, g: int, cfg) -> tuple[jax.Array, jax.Array]:
  if cfg.layout == 'by_position':
    n_rgb_only, n_joint = position_counts(cfg, g)
    position = jnp.arange(u_joint.shape[0]) % g
    return position < n_joint, position < n_rgb_only
  joint = u_joint < cfg.joint_prob
  p_rgb_only = cfg.rgb_only_prob / cfg.joint_prob if cfg.joint_prob > 0 else 0.0
  return joint, joint & (u_rgb_only < p_rgb_only)


def _dropped_slots(u_pairs, u_rate, eligible, g: int, cfg) -> jax.Array:
  """(n, M) bool: the (sample, slot) pairs the random dropout takes out (RGB's are ignored)."""
  if cfg.slot_dropout == 'fixed':
    return u_pairs < cfg.slot_dropout_prob
  # MMGen: a count k ~ U{0, ..., P - 1} per group of the P pairs of its eligible
  # samples, drawn without replacement (the k lowest of i.i.d. uniforms).
  n, m = u_pairs.shape
  eligible = jnp.broadcast_to(eligible[:, None], (n, m)).reshape(n // g, g * m)
  keys = jnp.where(eligible, u_pairs.reshape(n // g, g * m), 2.0)  # ineligible pairs rank last
  rank = jnp.argsort(jnp.argsort(keys, axis=1), axis=1)
  pairs = eligible.sum(axis=1)
  k = jnp.minimum(jnp.floor(u_rate * pairs), pairs - 1)
  return (rank < k[:, None]).reshape(n, m)


def sample_modes(rng, n: int, names: Sequence[str], cfg) -> dict[str, jax.Array]:
  """Draws each sample's mode, slot times, task and supervision mask.

  `names`: the image modalities in slot order (slot 0 is RGB). Returns t (n, M)
  per-slot times, task (n,) int32, joint (n,) bool and supervised (n, M)
  float32 (1 where the slot's loss counts).
  """
  M = len(names)
  g = group_size(cfg, n)
  # One uniform draw for everything (each separate draw is compiled separately).
  u = jax.random.uniform(rng, (n, 6 + M))
  joint, rgb_only = _joint_and_rgb_only(u[:, 0], u[:, 1], g, cfg)
  if M == 1:  # nothing to condition on
    joint = jnp.ones_like(joint)
  if cfg.cond_task_fixed:
    cond = jnp.full((n,), list(names).index(cfg.cond_task_fixed), jnp.int32)
  else:
    cond = jnp.minimum(jnp.floor(u[:, 2] * M), M - 1).astype(jnp.int32)
  is_cond = (jnp.arange(M)[None, :] == cond[:, None]) & ~joint[:, None]
  t = jnp.where(is_cond, cfg.cond_t_max * u[:, 4:5], u[:, 3:4])
  task = jnp.where(joint, 0, cond + 1).astype(jnp.int32)

  dropped = _dropped_slots(u[:, 6:], u[::g, 5], ~rgb_only, g, cfg)  # one rate per group
  non_rgb = jnp.arange(M)[None, :] > 0
  unsupervised = is_cond | (non_rgb & (rgb_only[:, None] | dropped))
  return dict(t=t, task=task, joint=joint, supervised=(~unsupervised).astype(jnp.float32))


def drop_labels(rng, y, prob: float, num_classes: int):
  """Classifier-free guidance: replace y by the null id num_classes with probability prob."""
  if prob <= 0.0:
    return y
  return jnp.where(jax.random.uniform(rng, y.shape) < prob, num_classes, y).astype(y.dtype)


def group_masked_mean(values, mask, g: int):
  """(n, M) -> (n / g, M): each group's mean of values over mask, per column (0 if empty)."""
  n, m = values.shape
  values, mask = values.reshape(n // g, g, m), mask.reshape(n // g, g, m)
  return (values * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)


def _normalize(x, eps: float = 1e-12):
  """x / max(|x|, eps) over the last axis (torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def repa_loss(zs_tilde: Sequence[jax.Array], zs: Sequence[jax.Array]) -> jax.Array:
  """REPA's projection loss: the mean over projectors and samples of the token-mean −cos.

  zs_tilde, zs: one (N, T, z) array per projector (predictions, frozen features).
  Lies in [−1, 1]: −1 when every token points along its feature.
  """
  if len(zs_tilde) != len(zs) or not zs:
    raise ValueError(f'{len(zs_tilde)} projector outputs for {len(zs)} feature sets; expected '
                     'one feature set per projector (and at least one).')
  per = []
  for z_tilde, z in zip(zs_tilde, zs):
    if z_tilde.shape != z.shape:
      raise ValueError(f'projector output {z_tilde.shape} != features {z.shape}.')
    cos = jnp.sum(_normalize(z_tilde.astype(jnp.float32)) * _normalize(z.astype(jnp.float32)), -1)
    per.append(-cos.mean(axis=-1))  # (N,): mean over tokens
  return jnp.mean(jnp.stack(per))


def _repa_features(batch: Mapping[str, jax.Array], zs_tilde: Sequence[jax.Array]) -> jax.Array:
  """The batch's features, checked against the projector output they are compared with."""
  key = modalities_lib.REPA_FEATURES
  if not zs_tilde:
    raise ValueError('config.objective.repa_coeff > 0 but the model has no REPA projector: set '
                     'config.model.repa_encoder_depth (and repa_z_dim).')
  if len(zs_tilde) != 1:
    raise ValueError(f'the model has {len(zs_tilde)} REPA projectors; the batch holds one '
                     f'feature set ({key!r}).')
  n, t, z = zs_tilde[0].shape
  if key not in batch:
    raise KeyError(f'config.objective.repa_coeff > 0 needs batch[{key!r}] of shape (N, T, z) = '
                   f'({n}, {t}, {z}): the frozen encoder\'s features per token; the batch has '
                   f'{sorted(batch)}. Add the field to the records or set repa_coeff=0.')
  features = batch[key]
  if features.shape != (n, t, z):
    side = int(round(t ** 0.5))
    raise ValueError(f'batch[{key!r}] has shape {tuple(features.shape)}; expected ({n}, {t}, {z}): '
                     f'one feature per token of the model\'s {side}×{side} token grid, of '
                     f'config.model.repa_z_dim={z}.')
  return features


def entity_token_sets(prompt: prompt_lib.Prompt, spans: jax.Array | None,
                      num_entities: int) -> jax.Array:
  """(N, K, L) bool: entity k's tokens, its phrase [start, end) and its slots, where unmasked."""
  length = prompt.tokens.shape[1]
  pos = jnp.arange(length)
  sets = prompt.entity[:, None, :] == jnp.arange(1, num_entities + 1)[None, :, None]
  if spans is not None:
    if spans.shape != (prompt.tokens.shape[0], num_entities, 2):
      raise ValueError(f'batch[{ENTITY_SPANS!r}] has shape {tuple(spans.shape)}; expected '
                       f'({prompt.tokens.shape[0]}, {num_entities}, 2) [start, end) per entity.')
    sets |= (pos >= spans[..., :1]) & (pos < spans[..., 1:])
  return sets & prompt.mask[:, None, :]


def masks_to_tokens(masks: jax.Array, grid: int) -> jax.Array:
  """(N, K, H, W) masks -> (N, K, grid²) fractions of each token's patch (row-major tokens)."""
  n, k, h, w = masks.shape
  if h != w or h % grid:
    raise ValueError(f'batch[{ENTITY_MASKS!r}] has {h}×{w} masks; expected a square side that '
                     f'is a multiple of the {grid}×{grid} token grid.')
  f = h // grid
  m = masks.astype(jnp.float32).reshape(n, k, grid, f, grid, f).mean(axis=(3, 5))
  return m.reshape(n, k, grid * grid)


def entity_alignment_loss(attention: jax.Array, token_sets: jax.Array, token_masks: jax.Array,
                          present: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """FastComposer's balanced localisation loss (module docstring); returns (loss, count).

  attention: (N, T, L) weights of image tokens on prompt tokens; token_sets: (N,
  K, L) bool; token_masks: (N, K, T) in [0, 1]; present: (N, K) bool or None.
  count: the (sample, entity) pairs that took part (0 gives loss 0).
  """
  a = jnp.einsum('ntl,nkl->nkt', attention.astype(jnp.float32), token_sets.astype(jnp.float32))
  m = token_masks.astype(jnp.float32)
  inside, outside = m.sum(-1), (1.0 - m).sum(-1)
  fg = (a * m).sum(-1) / jnp.maximum(inside, 1e-6)
  bg = (a * (1.0 - m)).sum(-1) / jnp.maximum(outside, 1e-6)
  valid = token_sets.any(-1) & (inside > 0) & (outside > 0)
  if present is not None:
    valid &= present.astype(bool)
  count = valid.sum()
  loss = jnp.where(valid, bg - fg, 0.0).sum() / jnp.maximum(count, 1)
  return loss, count


def drop_prompt(rng, prompt: prompt_lib.Prompt, text_prob: float, entity_prob: float
                ) -> tuple[prompt_lib.Prompt, jax.Array, jax.Array]:
  """Condition dropout: each sample loses its words (text_prob) and, independently, its
  entity images (entity_prob). Returns (prompt, drop_text, drop_entities)."""
  u = jax.random.uniform(rng, (prompt.tokens.shape[0], 2))
  drop_text, drop_entities = u[:, 0] < text_prob, u[:, 1] < entity_prob
  return prompt_lib.drop_condition(prompt, drop_text, drop_entities), drop_text, drop_entities


def decoupled_loss(model, batch: Mapping[str, jax.Array], rng, *,
                   mods: Sequence[modalities_lib.Modality], cfg, num_classes: int,
                   class_dropout_prob: float = 0.0, use_task: bool = True,
                   prompt_cfg=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MMGen's multi-modal loss. `cfg` is config.objective; returns (loss, metrics).

  `batch` holds each image modality (N, H, W, C) in model space and 'label'
  (N,) int32; `num_classes` is the null label id used for label dropout;
  use_task=False for a model without task embedding (the task is then implied
  by the condition slot's small t only). With cfg.repa_coeff > 0 the batch also
  holds 'repa_features' (N, T, z) and the REPA term is added (module docstring).
  prompt_cfg: config.prompt of a model with a prompt encoder (None: no prompts);
  a batch with the prompt fields then conditions on its prompts (module docstring).
  """
  images = modalities_lib.images(mods)
  names = [m.name for m in images]
  check_cfg(cfg, names)
  for name in names:
    if name not in batch:
      raise KeyError(f'batch has no {name!r} (image modality); keys: {sorted(batch)}.')
  x0_slots = [batch[name] for name in names]
  channels = [x.shape[-1] for x in x0_slots]
  x0 = jnp.concatenate(x0_slots, axis=-1)
  n = x0.shape[0]
  g = group_size(cfg, n)

  k_modes, k_label, k_noise = jax.random.split(rng, 3)
  modes = sample_modes(k_modes, n, names, cfg)
  prompt = prompt_lib.from_batch(batch) if prompt_cfg is not None else None
  align_coeff = float(getattr(cfg, 'entity_align_coeff', 0.0))
  if align_coeff > 0 and prompt is None:
    raise ValueError(f'config.objective.entity_align_coeff={align_coeff} needs prompts: set '
                     'config.prompt.name and give batches with the prompt fields '
                     f'{list(prompt_lib.FIELDS)}; the batch has {sorted(batch)}.')
  prompt_metrics = {}
  if prompt is None:
    y = drop_labels(k_label, batch['label'], class_dropout_prob, num_classes)
  else:  # the prompt conditions; the label is the null class (module docstring)
    if class_dropout_prob <= 0:
      raise ValueError('a prompt replaces the label by the null class, which a model with '
                       'config.model.class_dropout_prob=0 does not have.')
    y = jnp.full((n,), num_classes, jnp.int32)
    prompt, drop_text, drop_entities = drop_prompt(
        k_label, prompt, float(prompt_cfg.text_dropout_prob),
        float(prompt_cfg.entity_dropout_prob))
    prompt_metrics = {'prompt/text_dropped': drop_text.mean(),
                      'prompt/entities_dropped': drop_entities.mean()}

  eps = paths.normal(k_noise, x0.shape, x0.dtype)
  t_ch = paths.slot_times_to_channels(modes['t'], channels)
  x_t = paths.interpolate(cfg.path, x0, eps, t_ch)
  task = modes['task'] if use_task else None
  if prompt is None:
    out = model(x_t, modes['t'], y, task=task)
  else:
    out = model(x_t, modes['t'], y, task=task, prompt=prompt, return_attention=align_coeff > 0)
  if len(out.images) != len(images):
    raise ValueError(f'model returned {len(out.images)} image heads; expected one per image '
                     f'modality {names}.')
  pred = jnp.concatenate(out.images, axis=-1).astype(jnp.float32)
  if pred.shape != x0.shape:
    raise ValueError(f'model image heads concatenate to {pred.shape}; expected {x0.shape} '
                     f'(channels {channels} for {names}).')

  err = (pred - paths.target(cfg.path, cfg.prediction, x0, eps, t_ch)) ** 2
  per_slot = jnp.stack([e.mean(axis=(1, 2, 3)) for e in paths.split_slots(err, channels)], axis=1)
  losses = group_masked_mean(per_slot, modes['supervised'], g)  # (groups, M)
  weights = jnp.asarray([m.loss_weight for m in images], jnp.float32)
  loss = jnp.mean(jnp.sum(losses * weights, axis=1))

  metrics = {'loss': loss, 'joint_fraction': modes['joint'].mean()}
  if cfg.repa_coeff > 0:
    proj = repa_loss(out.zs, [_repa_features(batch, out.zs)])
    metrics.update(diffusion_loss=loss, repa_loss=proj)
    loss = loss + cfg.repa_coeff * proj
    metrics['loss'] = loss
  metrics.update(prompt_metrics)
  if align_coeff > 0:
    align, count = _alignment(out.attention, prompt, batch)
    metrics.update(entity_align_loss=align, entity_align_count=count.astype(jnp.float32))
    loss = loss + align_coeff * align
    metrics['loss'] = loss
  for i, name in enumerate(names):
    metrics[f'loss/{name}'] = losses[:, i].mean()
    metrics[f'supervised_fraction/{name}'] = modes['supervised'][:, i].mean()
  return loss, metrics


def _alignment(attention, prompt: prompt_lib.Prompt, batch: Mapping[str, jax.Array]
               ) -> tuple[jax.Array, jax.Array]:
  """The alignment loss of a batch: its masks (at the scene's pixel resolution, whatever
  the codec) averaged onto the token grid of `attention`."""
  if ENTITY_MASKS not in batch:
    raise KeyError(f'config.objective.entity_align_coeff > 0 needs batch[{ENTITY_MASKS!r}] (N, K, '
                   f'H, W); the batch has {sorted(batch)}.')
  masks = batch[ENTITY_MASKS]
  grid = int(round(attention.shape[1] ** 0.5))
  if masks.ndim != 4:
    raise ValueError(f'batch[{ENTITY_MASKS!r}] has shape {tuple(masks.shape)}; expected (N, K, '
                     f'H, W), H = W a multiple of the {grid}×{grid} token grid.')
  sets = entity_token_sets(prompt, batch.get(ENTITY_SPANS), masks.shape[1])
  return entity_alignment_loss(attention, sets, masks_to_tokens(masks, grid),
                               batch.get(ENTITY_VALID))


def make_loss_fn(config) -> Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple]:
  """(model, batch, rng) -> (loss, metrics) for the full config."""
  prompt = config.get('prompt')
  return functools.partial(
      decoupled_loss, mods=modalities_lib.from_config(config.modalities), cfg=config.objective,
      num_classes=config.data.num_classes, class_dropout_prob=config.model.class_dropout_prob,
      use_task=config.model.use_task_embedding,
      prompt_cfg=prompt if prompt is not None and prompt.name else None)
