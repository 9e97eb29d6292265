"""Checks a config before anything compiles; every message names key, value and what is valid.

Unknown keys and wrong types are already refused by the locked ConfigDict (and
by `config_flags` on the command line). This module checks what a schema
cannot: sizes that must divide each other, names that must be known, values
that must lie in a range, and one measured failure mode, the narrow patch (a
model narrower than its patch input cannot carry the noise through and its
training stalls). All problems are reported at once.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import jax
import ml_collections

from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax.diffusion import paths
from mmgen_jax.diffusion import samplers
from mmgen_jax.models import dit

OBJECTIVES = ('decoupled', 'mt_elbo')
CODEC_DOWNSAMPLE = {'identity': 1, 'sd_vae': 8}
DTYPES = ('float32', 'bfloat16', 'float16')
SCHEDULES = ('constant', 'cosine')
ON_BAD_RECORD = ('raise', 'skip')


class ConfigError(ValueError):
  """Every problem found in one config, one per line."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    lines = '\n'.join(f'  - {p}' for p in self.problems)
    super().__init__(f'the config has {len(self.problems)} problem(s):\n{lines}')


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             num_processes: int | None = None) -> list[str]:
  """Raises `ConfigError` listing every problem; returns (and logs) the warnings.

  num_devices / num_processes: the topology the config will run on (default:
  this job's, `jax.device_count()` / `jax.process_count()`); pass a target's to
  check a config for a machine you are not on.
  """
  if num_devices is None or num_processes is None:  # starts the backend: only if not given
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
  problems: list[str] = []
  warnings: list[str] = []
  for check in _CHECKS:
    for message in check(config, num_devices, num_processes):
      (warnings if message.startswith(_WARN) else problems).append(message.removeprefix(_WARN))
  if problems:
    raise ConfigError(problems)
  for w in warnings:
    logging.warning('config: %s', w)
  return warnings


def patch_input_size(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(patch_size, model input channels, patch_size² × channels) of the configured model."""
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  kwargs = build.model_kwargs(config)
  p, ch = kwargs['patch_size'], kwargs['in_channels']
  return p, ch, p * p * ch


# ---- the checks: each yields messages; a warning starts with _WARN ---------------

_WARN = 'warning: '
Check = Callable[[ml_collections.ConfigDict, int, int], Iterator[str]]


def _in_range(key: str, value: float, lo: float, hi: float) -> Iterator[str]:
  if not lo <= value <= hi:
    yield f'config.{key}={value} must be in [{lo}, {hi}].'


def _at_least(key: str, value: float, lo: float) -> Iterator[str]:
  if value < lo:
    yield f'config.{key}={value} must be >= {lo}.'


def _one_of(key: str, value: str, valid) -> Iterator[str]:
  if value not in valid:
    yield f'config.{key}={value!r} is not one of {list(valid)}.'


def _check_modalities(config, num_devices, num_processes) -> Iterator[str]:
  try:
    mods = modalities_lib.from_config(config.modalities)
  except (ValueError, KeyError) as e:
    yield str(e)
    return
  if not modalities_lib.images(mods):
    yield ('config.modalities has no image modality (kind "image"); the model needs one. '
           f'Configured: {[m.name for m in mods]}.')


def _check_data(config, num_devices, num_processes) -> Iterator[str]:
  d = config.data
  yield from _at_least('data.global_batch_size', d.global_batch_size, 1)
  yield from _at_least('data.num_classes', d.num_classes, 1)
  yield from _at_least('data.resolution', d.resolution, 1)
  yield from _at_least('data.worker_count', d.worker_count, 0)
  yield from _one_of('data.on_bad_record', d.on_bad_record, ON_BAD_RECORD)
  if not 0.0 < d.augment.crop_min_scale <= 1.0:
    yield f'config.data.augment.crop_min_scale={d.augment.crop_min_scale} must be in (0, 1].'
  yield from _check_latent_cache(config)
  if d.name == 'mmgen_scenes':
    from mmgen_jax.data import tfds_scenes  # registers the builder; imports TFDS
    try:
      built = tfds_scenes.get_config(d.builder_config).resolution
    except ValueError as e:
      yield f'config.data.builder_config: {e}'
      return
    if built != d.resolution:
      yield (f'config.data.resolution={d.resolution} but builder config '
             f'{d.builder_config!r} renders {built}×{built} scenes.')
  if d.name == 'mmgen_prompts':
    yield from _check_prompt_records(config)


def _check_prompt_records(config) -> Iterator[str]:
  """Scenes with multimodal prompts: the build's sizes are the run's."""
  from mmgen_jax.data import tfds_prompts  # pylint: disable=g-import-not-at-top
  d = config.data
  try:
    built = tfds_prompts.get_config(d.builder_config)
  except ValueError as e:
    yield f'config.data.builder_config: {e}'
    return
  if built.resolution != d.resolution:
    yield (f'config.data.resolution={d.resolution} but builder config '
           f'{d.builder_config!r} renders {built.resolution}×{built.resolution} scenes.')
  if d.augment.crop_min_scale < 1.0:
    yield (f'config.data.augment.crop_min_scale={d.augment.crop_min_scale}: random crops are '
           'refused for prompt records (a crop could cut out an object the prompt mentions).')
  p = config.get('prompt')
  for key in ('max_tokens', 'entity_tokens', 'entity_size'):
    if p is not None and key in p and p[key] != getattr(built, key):
      yield (f'config.prompt.{key}={p[key]} but builder config {d.builder_config!r} was '
             f'written with {key}={getattr(built, key)}.')


def _check_latent_cache(config) -> Iterator[str]:
  d = config.data
  yield from _one_of('data.latent_cache_dtype', d.latent_cache_dtype, ('float32', 'float16'))
  if d.repa_encoder:
    from mmgen_jax.data import latent_cache  # pylint: disable=g-import-not-at-top
    yield from _one_of('data.repa_encoder', d.repa_encoder, latent_cache.repa_encoders())
  if not d.latent_cache:
    return
  if config.codec.name != 'sd_vae':
    yield (f'config.data.latent_cache={d.latent_cache!r} holds SD-VAE moments: it needs '
           f"config.codec.name='sd_vae', not {config.codec.name!r}.")
  if d.augment.hflip or d.augment.crop_min_scale < 1.0:
    yield (f'config.data.latent_cache={d.latent_cache!r} holds the moments of unaugmented '
           'images, which cannot be flipped or cropped exactly: set '
           f'config.data.augment.hflip=False (is {d.augment.hflip}) and crop_min_scale=1.0 '
           f'(is {d.augment.crop_min_scale}).')


def _check_mesh(config, num_devices, num_processes) -> Iterator[str]:
  try:
    parallel.rules_dict(config.sharding_rules)
    data, fsdp, tensor = parallel.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    yield str(e)
    return
  batch, accum = config.data.global_batch_size, config.optim.grad_accum_steps
  batch_ways = data * fsdp
  if accum < 1:
    yield f'config.optim.grad_accum_steps={accum} must be >= 1.'
    return
  if batch % accum:
    yield (f'config.data.global_batch_size={batch} is not divisible by '
           f'config.optim.grad_accum_steps={accum}.')
  elif (batch // accum) % batch_ways:
    micro = '' if accum == 1 else f' / grad_accum_steps {accum} = {batch // accum}'
    yield (f'config.data.global_batch_size={batch}{micro} is not divisible by the mesh\'s '
           f'batch axes data×fsdp = {data}×{fsdp} = {batch_ways} ({num_devices} devices).')
  if batch % num_processes:
    yield (f'config.data.global_batch_size={batch} is not divisible by the {num_processes} '
           'processes (each loads an equal share).')
  heads, hidden = config.model.num_heads, config.model.hidden_size
  if tensor > 1 and heads % tensor:
    yield (f'{_WARN}config.model.num_heads={heads} does not split over mesh.tensor={tensor}; '
           'those weights are replicated instead.')
  if fsdp > 1 and hidden % fsdp:
    yield (f'{_WARN}config.model.hidden_size={hidden} does not split over mesh.fsdp={fsdp}; '
           'those weights are replicated instead.')


def _check_model(config, num_devices, num_processes) -> Iterator[str]:
  m = config.model
  for key in ('patch_size', 'hidden_size', 'depth', 'num_heads'):
    yield from _at_least(f'model.{key}', m[key], 1)
  if m.num_heads >= 1 and m.hidden_size % m.num_heads:
    yield (f'config.model.hidden_size={m.hidden_size} is not divisible by '
           f'config.model.num_heads={m.num_heads}.')
  if m.mlp_ratio <= 0:
    yield f'config.model.mlp_ratio={m.mlp_ratio} must be > 0.'
  yield from _in_range('model.class_dropout_prob', m.class_dropout_prob, 0.0, 1.0)
  yield from _at_least('model.task_embed_init_std', m.task_embed_init_std, 0.0)
  yield from _in_range('model.repa_encoder_depth', m.repa_encoder_depth, 0, max(m.depth, 0))
  if m.repa_encoder_depth:
    yield from _at_least('model.repa_z_dim', m.repa_z_dim, 1)
    yield from _at_least('model.repa_projector_dim', m.repa_projector_dim, 1)
  yield from _one_of('model.dtype', m.dtype, DTYPES)
  yield from _one_of('model.param_dtype', m.param_dtype, DTYPES)
  yield from _at_least('model.scan_unroll', m.scan_unroll, 1)
  yield from _one_of('model.remat_policy', m.remat_policy, dit.REMAT_POLICIES)

  codec = config.codec.name
  if codec not in CODEC_DOWNSAMPLE:
    yield f'config.codec.name={codec!r} is not one of {list(CODEC_DOWNSAMPLE)}.'
    return
  yield from _at_least('codec.latent_channels', config.codec.latent_channels, 1)
  down, res, p = CODEC_DOWNSAMPLE[codec], config.data.resolution, m.patch_size
  if res % down:
    yield (f'config.data.resolution={res} must be a multiple of {down} with '
           f'config.codec.name={codec!r} (it downsamples by {down}).')
  elif p >= 1 and (res // down) % p:
    where = f'{res}' if down == 1 else f'{res} / {down} = {res // down} (latent)'
    yield f'config.data.resolution: {where} is not divisible by config.model.patch_size={p}.'


def _check_narrow_patch(config, num_devices, num_processes) -> Iterator[str]:
  try:
    p, ch, size = patch_input_size(config)
  except (ValueError, KeyError):
    return  # the other checks name the cause
  width = config.model.hidden_size
  if width >= size:
    return
  message = (f'config.model.hidden_size={width} is below the patch input size '
             f'patch_size² × input channels = {p}² × {ch} = {size}: a model narrower than '
             'its patch cannot carry the noise through and its training stalls. Use '
             f'hidden_size >= {size} or a smaller patch_size')
  if config.allow_narrow_patch:
    yield f'{_WARN}{message} (allowed by config.allow_narrow_patch=True).'
  else:
    yield f'{message}, or set config.allow_narrow_patch=True to train it anyway.'


def _check_objective(config, num_devices, num_processes) -> Iterator[str]:
  o = config.objective
  yield from _one_of('objective.name', o.name, OBJECTIVES)
  yield from _one_of('objective.path', o.path, paths.PATHS)
  yield from _one_of('objective.prediction', o.prediction, paths.PREDICTIONS)
  for key in ('joint_prob', 'rgb_only_prob', 'slot_dropout_prob', 'cond_t_max'):
    yield from _in_range(f'objective.{key}', o[key], 0.0, 1.0)
  yield from _check_repa(config)
  if o.name == 'decoupled':
    yield from _check_decoupled(config)
  if o.name == 'mt_elbo':
    yield from _at_least('objective.num_timesteps', o.num_timesteps, 1)
    yield from _in_range('objective.w_max', o.w_max, 0.0, 1.0)
    yield from _at_least('objective.decoder_weight', o.decoder_weight, 0.0)
    if not 0.0 < o.label_t_max <= 1.0:  # the loss would refuse it only when it first runs
      yield (f'config.objective.label_t_max={o.label_t_max} must be in (0, 1]: '
             "objective.name='mt_elbo' trains its class heads at t <= label_t_max × "
             f'objective.num_timesteps ({o.num_timesteps}).')
    try:
      mods = modalities_lib.from_config(config.modalities)
    except (ValueError, KeyError):
      return
    images = [m.name for m in modalities_lib.images(mods)]
    if o.primary not in images:
      yield (f'config.objective.primary={o.primary!r} must name an image modality; '
             f'image modalities: {images}.')


def _check_repa(config) -> Iterator[str]:
  o, m, aug = config.objective, config.model, config.data.augment
  yield from _at_least('objective.repa_coeff', o.repa_coeff, 0.0)
  if o.repa_coeff <= 0:
    return
  if o.name != 'decoupled':
    yield (f'config.objective.repa_coeff={o.repa_coeff}: the REPA loss is part of the '
           f"'decoupled' objective only, not {o.name!r}; set repa_coeff=0.")
  if not m.repa_encoder_depth:
    yield (f'config.objective.repa_coeff={o.repa_coeff} needs the REPA projector: set '
           'config.model.repa_encoder_depth (1..depth) and repa_z_dim.')
  d = config.data
  if d.repa_encoder == 'dinov2' and not (d.repa_encoder_weights or '').strip():
    # Else met late: by the cache job when it builds the encoder, by training as a cache
    # identity mismatch (the cache names the encoder by its weights' SHA-256).
    yield (f"config.data.repa_encoder='dinov2' (with config.objective.repa_coeff="
           f'{o.repa_coeff}) needs config.data.repa_encoder_weights, which is empty: set it '
           'to a local transformers directory of facebook/dinov2-small, -base or -large '
           '(config.json + model.safetensors, e.g. from `huggingface-cli download '
           'facebook/dinov2-base --local-dir dinov2-base`) whose width is '
           f'config.model.repa_z_dim={m.repa_z_dim} (384, 768, 1024).')
  if aug.hflip or aug.crop_min_scale < 1.0:
    yield (f'config.objective.repa_coeff={o.repa_coeff}: the encoder features in the records '
           'are of the unaugmented image, so config.data.augment must be off '
           f'(hflip={aug.hflip}, crop_min_scale={aug.crop_min_scale}; use False and 1.0).')


def _check_decoupled(config) -> Iterator[str]:
  from mmgen_jax.diffusion import decoupled  # pylint: disable=g-import-not-at-top
  o = config.objective
  if o.rgb_only_prob > o.joint_prob:
    yield (f'config.objective.rgb_only_prob={o.rgb_only_prob} exceeds joint_prob='
           f'{o.joint_prob}: RGB-only samples are drawn among the joint ones.')
  yield from _one_of('objective.layout', o.layout, decoupled.LAYOUTS)
  yield from _one_of('objective.slot_dropout', o.slot_dropout, decoupled.SLOT_DROPOUTS)
  yield from _at_least('objective.group_size', o.group_size, 0)
  try:
    images = [m.name for m in modalities_lib.images(modalities_lib.from_config(config.modalities))]
  except (ValueError, KeyError):
    images = None  # _check_modalities names the cause
  if o.cond_task_fixed and images is not None and o.cond_task_fixed not in images:
    yield (f'config.objective.cond_task_fixed={o.cond_task_fixed!r} must name an image '
           f'modality; image modalities: {images}.')
  batch, accum = config.data.global_batch_size, config.optim.grad_accum_steps
  if accum < 1 or batch % accum or o.group_size < 0:
    return  # _check_mesh and the line above name the cause
  micro = batch // accum
  if o.group_size and micro % o.group_size:
    where = f'{batch}' if accum == 1 else f'{batch} / grad_accum_steps {accum} = {micro}'
    yield (f'config.objective.group_size={o.group_size} does not divide the batch each loss '
           f'sees: config.data.global_batch_size={where}.')
  elif o.layout == 'by_position':
    try:
      decoupled.position_counts(o, o.group_size or micro)
    except ValueError as e:
      yield str(e)


def _check_prompt(config, num_devices, num_processes) -> Iterator[str]:
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  if 'prompt' not in config:  # a config written before prompts existed
    return
  p, o, s = config.prompt, config.objective, config.sample
  yield from _at_least('objective.entity_align_coeff', o.entity_align_coeff, 0.0)
  yield from _at_least('sample.text_scale', s.text_scale, 0.0)
  yield from _at_least('sample.entity_scale', s.entity_scale, 0.0)
  probs = tuple(float(x) for x in p.kind_probs)
  if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
    yield (f'config.prompt.kind_probs={probs} must be 3 non-negative numbers summing to 1 '
           '(text only, entity images without their words, with them).')
  if not p.name:
    if o.entity_align_coeff > 0:
      yield (f'config.objective.entity_align_coeff={o.entity_align_coeff} reads the prompt '
             "cross-attention: set config.prompt.name='unimo' or the coefficient to 0.")
    if s.text_scale != 1.0 or s.entity_scale != 1.0:
      yield (f'{_WARN}config.sample.text_scale={s.text_scale} / entity_scale={s.entity_scale} '
             'guide prompts, and config.prompt.name is empty (no prompts).')
    return
  yield from _one_of('prompt.name', p.name, ('', *build.PROMPT_ENCODERS))
  if o.name != 'decoupled':
    yield (f'config.prompt.name={p.name!r} conditions the decoupled objective only, not '
           f'config.objective.name={o.name!r}.')
  if config.model.class_dropout_prob <= 0:
    yield (f'config.prompt.name={p.name!r} replaces the label by the null class, which '
           f'config.model.class_dropout_prob={config.model.class_dropout_prob} leaves out; '
           'make it > 0.')
  for key in ('width', 'heads', 'max_tokens', 'entity_tokens', 'max_entities', 'entity_size',
              'resampler_depth'):
    yield from _at_least(f'prompt.{key}', p[key], 1)
  yield from _at_least('prompt.depth', p.depth, 0)
  yield from _at_least('prompt.vocab_size', p.vocab_size, 0)
  if p.mlp_ratio <= 0:
    yield f'config.prompt.mlp_ratio={p.mlp_ratio} must be > 0.'
  for key in ('text_dropout_prob', 'entity_dropout_prob'):
    yield from _in_range(f'prompt.{key}', p[key], 0.0, 1.0)
  if p.heads >= 1 and p.width % p.heads:
    yield f'config.prompt.width={p.width} is not divisible by config.prompt.heads={p.heads}.'
  widths = tuple(p.entity_widths)
  if not widths or min(widths) < 1:
    yield f'config.prompt.entity_widths={widths} must be positive conv widths (at least one).'
  elif p.entity_size >= 1 and p.entity_size % 2 ** len(widths):
    yield (f'config.prompt.entity_size={p.entity_size} is not divisible by 2^{len(widths)} '
           f'(one stride-2 conv per entry of config.prompt.entity_widths={widths}).')
  if p.max_entities * p.entity_tokens > p.max_tokens:
    yield (f'config.prompt: max_entities × entity_tokens = {p.max_entities} × '
           f'{p.entity_tokens} slots do not fit in max_tokens={p.max_tokens}.')
  try:
    vocab = build.prompt_vocab_size(config)
  except ValueError as e:
    yield str(e)
    return
  try:
    from mmgen_jax.data import prompts  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if vocab < len(prompts.VOCAB):
    yield (f'config.prompt.vocab_size={vocab} is below the {len(prompts.VOCAB)} words of '
           'mmgen_jax.data.prompts.VOCAB; use 0 (its size).')


def _check_optim(config, num_devices, num_processes) -> Iterator[str]:
  o = config.optim
  if o.learning_rate <= 0:
    yield f'config.optim.learning_rate={o.learning_rate} must be > 0.'
  yield from _at_least('optim.warmup_steps', o.warmup_steps, 0)
  yield from _one_of('optim.schedule', o.schedule, SCHEDULES)
  for key in ('b1', 'b2', 'ema_decay'):
    yield from _in_range(f'optim.{key}', o[key], 0.0, 1.0)
  yield from _at_least('optim.weight_decay', o.weight_decay, 0.0)
  yield from _at_least('optim.grad_clip_norm', o.grad_clip_norm, 0.0)
  if o.warmup_steps > config.train.num_steps:
    yield (f'{_WARN}config.optim.warmup_steps={o.warmup_steps} exceeds '
           f'config.train.num_steps={config.train.num_steps}.')


def _check_train(config, num_devices, num_processes) -> Iterator[str]:
  t = config.train
  yield from _at_least('train.num_steps', t.num_steps, 1)
  for key in ('log_every', 'sample_every', 'checkpoint_every'):
    yield from _at_least(f'train.{key}', t[key], 0)
  yield from _at_least('train.keep_checkpoints', t.keep_checkpoints, 1)
  yield from _at_least('train.peak_flops', t.peak_flops, 0.0)


def _check_sample(config, num_devices, num_processes) -> Iterator[str]:
  s = config.sample
  yield from _one_of('sample.method', s.method, samplers.METHODS)
  yield from _at_least('sample.num_steps', s.num_steps, 1)
  yield from _at_least('sample.num_images', s.num_images, 1)
  yield from _at_least('sample.cfg_scale', s.cfg_scale, 1.0)
  yield from _in_range('sample.guidance_low', s.guidance_low, 0.0, 1.0)
  yield from _in_range('sample.guidance_high', s.guidance_high, 0.0, 1.0)
  yield from _in_range('sample.t_cond', s.t_cond, 0.0, 1.0)
  if s.guidance_low > s.guidance_high:
    yield (f'config.sample.guidance_low={s.guidance_low} exceeds guidance_high='
           f'{s.guidance_high}: guidance would never be applied.')
  if s.cfg_scale > 1.0 and config.model.class_dropout_prob == 0:
    yield (f'config.sample.cfg_scale={s.cfg_scale} needs the null class, which a model with '
           'config.model.class_dropout_prob=0 does not have; set cfg_scale=1.')


_CHECKS: tuple[Check, ...] = (_check_modalities, _check_data, _check_mesh, _check_model,
                              _check_narrow_patch, _check_objective, _check_prompt, _check_optim,
                              _check_train, _check_sample)


def describe(config: ml_collections.ConfigDict) -> str:
  """One line naming the model and data of `config` (for logs)."""
  m, d = config.model, config.data
  p, ch, size = patch_input_size(config)
  tokens = (d.resolution // CODEC_DOWNSAMPLE.get(config.codec.name, 1) // p) ** 2
  return (f'{config.objective.name} on {d.name}/{d.builder_config or "-"} at {d.resolution}px '
          f'({config.codec.name}); DiT width {m.hidden_size} depth {m.depth} heads '
          f'{m.num_heads} patch {p} ({tokens} tokens, patch input {size}); batch '
          f'{d.global_batch_size}; {config.train.num_steps} steps; {m.dtype} compute; '
          f'mesh data={config.mesh.data} fsdp={config.mesh.fsdp} tensor={config.mesh.tensor}.')
