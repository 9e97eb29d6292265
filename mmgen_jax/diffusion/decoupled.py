"""Objective 1 (MMGen): one velocity loss with a decoupled timestep per modality.

Per sample, inside jit:

* joint (probability `joint_prob`, task 0): all image modalities share one
  t ~ U(0, 1);
* conditional (else, task m + 1): one image modality m, drawn uniformly, is a
  condition at t = cond_t_max * U(0, 1) and is not supervised; the others share
  one t ~ U(0, 1).

Supervision masks (which (sample, modality) pairs enter the loss): a fraction
`rgb_only_prob` of all samples is supervised on slot 0 (RGB) only, and on the
other samples each non-RGB slot is dropped from the loss with probability
`slot_dropout_prob`. Modality m's loss is its per-sample MSE averaged over the
samples where it is supervised; the total is sum_m loss_weight_m * loss_m.

Read against MMGen's `loss.py` / `train.py` (jiepengwang/MMGen). Differences:

* MMGen lays modes out by batch position (the first 3/4 of a batch joint with
  `--use-quarter-mixing`, the first half RGB-only with `--ratio-train-onlyrgb
  0.5`); here each sample draws its mode. Their layout makes every RGB-only
  sample a joint one; we keep that coupling by drawing RGB-only among joint
  samples with probability rgb_only_prob / joint_prob, hence the requirement
  rgb_only_prob <= joint_prob.
* MMGen drops non-RGB slots from the loss at a per-batch rate that is itself
  uniform in [0, 1) (a random count of (sample, slot) pairs); here the rate is
  the fixed `slot_dropout_prob` (0.5 gives the same mean rate).
* MMGen masks the condition slot's loss only when RGB-only training is on (its
  default recipe); here it is always masked.
* The REPA projection loss (MMGen's `proj_coeff`) is not part of this objective.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mmgen_jax import modalities as modalities_lib
from mmgen_jax.diffusion import paths


def _check_cfg(cfg, num_image: int) -> None:
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
  if num_image == 0:
    raise ValueError('the decoupled objective needs at least one image modality.')


def sample_modes(rng, n: int, num_image: int, cfg) -> dict[str, jax.Array]:
  """Draws each sample's mode, slot times, task and supervision mask.

  Returns t (n, M) per-slot times, task (n,) int32, joint (n,) bool and
  supervised (n, M) float32 (1 where the slot's loss counts).
  """
  M = num_image
  # One uniform draw for everything (each separate draw is compiled separately).
  u = jax.random.uniform(rng, (n, 5 + M))
  # With one image modality there is nothing to condition on: all joint.
  joint = u[:, 0] < (cfg.joint_prob if M > 1 else 1.0)
  cond = jnp.minimum(jnp.floor(u[:, 1] * M), M - 1).astype(jnp.int32)
  is_cond = (jnp.arange(M)[None, :] == cond[:, None]) & ~joint[:, None]
  t = jnp.where(is_cond, cfg.cond_t_max * u[:, 3:4], u[:, 2:3])
  task = jnp.where(joint, 0, cond + 1).astype(jnp.int32)

  p_rgb_only = cfg.rgb_only_prob / cfg.joint_prob if cfg.joint_prob > 0 else 0.0
  rgb_only = joint & (u[:, 4] < p_rgb_only)
  dropped = u[:, 5:] < cfg.slot_dropout_prob
  non_rgb = jnp.arange(M)[None, :] > 0
  unsupervised = is_cond | (non_rgb & (rgb_only[:, None] | dropped))
  return dict(t=t, task=task, joint=joint, supervised=(~unsupervised).astype(jnp.float32))


def drop_labels(rng, y, prob: float, num_classes: int):
  """Classifier-free guidance: replace y by the null id num_classes with probability prob."""
  if prob <= 0.0:
    return y
  return jnp.where(jax.random.uniform(rng, y.shape) < prob, num_classes, y).astype(y.dtype)


def masked_mean(values, mask):
  """Mean of values over mask, per column; 0 where a column has no support."""
  count = mask.sum(axis=0)
  return (values * mask).sum(axis=0) / jnp.maximum(count, 1.0)


def decoupled_loss(model, batch: Mapping[str, jax.Array], rng, *,
                   mods: Sequence[modalities_lib.Modality], cfg, num_classes: int,
                   class_dropout_prob: float = 0.0, use_task: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MMGen's multi-modal loss. `cfg` is config.objective; returns (loss, metrics).

  `batch` holds each image modality (N, H, W, C) in model space and 'label'
  (N,) int32; `num_classes` is the null label id used for label dropout;
  use_task=False for a model without task embedding (the task is then implied
  by the condition slot's small t only).
  """
  images = modalities_lib.images(mods)
  _check_cfg(cfg, len(images))
  for m in images:
    if m.name not in batch:
      raise KeyError(f'batch has no {m.name!r} (image modality); keys: {sorted(batch)}.')
  x0_slots = [batch[m.name] for m in images]
  channels = [x.shape[-1] for x in x0_slots]
  x0 = jnp.concatenate(x0_slots, axis=-1)
  n = x0.shape[0]

  k_modes, k_label, k_noise = jax.random.split(rng, 3)
  modes = sample_modes(k_modes, n, len(images), cfg)
  y = drop_labels(k_label, batch['label'], class_dropout_prob, num_classes)

  eps = paths.normal(k_noise, x0.shape, x0.dtype)
  t_ch = paths.slot_times_to_channels(modes['t'], channels)
  x_t = paths.interpolate(cfg.path, x0, eps, t_ch)
  out = model(x_t, modes['t'], y, task=modes['task'] if use_task else None)
  if len(out.images) != len(images):
    raise ValueError(f'model returned {len(out.images)} image heads; expected one per image '
                     f'modality {[m.name for m in images]}.')
  pred = jnp.concatenate(out.images, axis=-1).astype(jnp.float32)
  if pred.shape != x0.shape:
    raise ValueError(f'model image heads concatenate to {pred.shape}; expected {x0.shape} '
                     f'(channels {channels} for {[m.name for m in images]}).')

  err = (pred - paths.target(cfg.path, cfg.prediction, x0, eps, t_ch)) ** 2
  per_slot = jnp.stack([e.mean(axis=(1, 2, 3)) for e in paths.split_slots(err, channels)], axis=1)
  losses = masked_mean(per_slot, modes['supervised'])
  weights = jnp.asarray([m.loss_weight for m in images], jnp.float32)
  loss = jnp.sum(weights * losses)

  metrics = {'loss': loss, 'joint_fraction': modes['joint'].mean()}
  for i, m in enumerate(images):
    metrics[f'loss/{m.name}'] = losses[i]
    metrics[f'supervised_fraction/{m.name}'] = modes['supervised'][:, i].mean()
  return loss, metrics


def make_loss_fn(config) -> Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple]:
  """(model, batch, rng) -> (loss, metrics) for the full config."""
  return functools.partial(
      decoupled_loss, mods=modalities_lib.from_config(config.modalities), cfg=config.objective,
      num_classes=config.data.num_classes, class_dropout_prob=config.model.class_dropout_prob,
      use_task=config.model.use_task_embedding)
