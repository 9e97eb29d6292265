"""Builds the `MMDiT` a config describes; presets for the released MMGen model."""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax.models import dit
from mmgen_jax.models import mt_encoders

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def _dtype(name: str, key: str):
  if name not in _DTYPES:
    raise ValueError(f'config.model.{key}={name!r} is not one of {sorted(_DTYPES)}.')
  return _DTYPES[name]


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """MMDiT constructor arguments derived from the config (everything but rngs)."""
  mods = modalities_lib.from_config(config.modalities)
  image_mods = modalities_lib.images(mods)
  if not image_mods:
    raise ValueError('config.modalities has no image modality; the model needs one.')

  resolution = int(config.data.resolution)
  codec = config.codec.name
  if codec == 'identity':
    channels = {m.name: m.channels for m in image_mods}
    input_size = resolution
  elif codec == 'sd_vae':
    if resolution % 8:
      raise ValueError(f'config.data.resolution={resolution} must be a multiple of 8 with the '
                       'sd_vae codec (it downsamples by 8).')
    channels = {m.name: int(config.codec.latent_channels) for m in image_mods}
    input_size = resolution // 8
  else:
    raise ValueError(f"config.codec.name={codec!r} is not one of ['identity', 'sd_vae'].")

  m = config.model
  objective = config.objective.name
  if objective == 'decoupled':
    heads = tuple(channels[mod.name] for mod in image_mods)
    layout = dict(in_channels=sum(heads), image_heads=heads, time_slots=heads, class_heads=(),
                  num_tasks=len(image_mods) if m.use_task_embedding else 0,
                  task_embed_init_std=float(m.task_embed_init_std))
  elif objective == 'mt_elbo':
    # The trunk sees [z_t, observed encodings] and decodes every other modality.
    latent = int(config.codec.latent_channels) if codec == 'sd_vae' else None
    layout = mt_encoders.trunk_spec(mods, config.objective.primary, latent)
  else:
    raise ValueError(f"config.objective.name={objective!r} is not one of "
                     "['decoupled', 'mt_elbo'].")

  repa = int(m.repa_encoder_depth)
  prompt = prompt_kwargs(config)
  return dict(**({'prompt': prompt} if prompt else {}),
      input_size=input_size, patch_size=int(m.patch_size), **layout,
      hidden_size=int(m.hidden_size), depth=int(m.depth), num_heads=int(m.num_heads),
      mlp_ratio=float(m.mlp_ratio), qk_norm=bool(m.qk_norm),
      num_classes=int(config.data.num_classes),
      class_dropout_prob=float(m.class_dropout_prob),
      repa_encoder_depth=repa, repa_z_dims=(int(m.repa_z_dim),) if repa else (),
      repa_projector_dim=int(m.repa_projector_dim), scan_layers=bool(m.scan_layers),
      scan_unroll=int(m.scan_unroll), remat_policy=str(m.remat_policy),
      batch_axes=parallel.rules_dict(config.sharding_rules).get('batch'),
      dtype=_dtype(m.dtype, 'dtype'), param_dtype=_dtype(m.param_dtype, 'param_dtype'))


PROMPT_ENCODERS = ('unimo',)


def prompt_vocab_size(config: ml_collections.ConfigDict) -> int:
  """config.prompt.vocab_size, or (0) the size of the data side's `prompts.VOCAB`."""
  size = int(config.prompt.vocab_size)
  if size > 0:
    return size
  try:
    from mmgen_jax.data import prompts  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError('config.prompt.vocab_size=0 takes the size of mmgen_jax.data.prompts.VOCAB, '
                     f'which cannot be imported ({e}); set config.prompt.vocab_size.') from e
  return len(prompts.VOCAB)


def prompt_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """`PromptEncoder` arguments of config.prompt, None when config.prompt.name is ''."""
  p = config.get('prompt')
  if p is None or not p.name:
    return None
  if p.name not in PROMPT_ENCODERS:
    raise ValueError(f'config.prompt.name={p.name!r} is not one of {["", *PROMPT_ENCODERS]}.')
  if config.objective.name != 'decoupled':
    raise ValueError(f'config.prompt.name={p.name!r} conditions the decoupled objective only, '
                     f'not config.objective.name={config.objective.name!r}.')
  return dict(vocab_size=prompt_vocab_size(config), width=int(p.width), depth=int(p.depth),
              num_heads=int(p.heads), entity_tokens=int(p.entity_tokens),
              max_tokens=int(p.max_tokens), max_entities=int(p.max_entities),
              entity_size=int(p.entity_size), entity_widths=tuple(int(w) for w in p.entity_widths),
              resampler_depth=int(p.resampler_depth), mlp_ratio=float(p.mlp_ratio))


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> dit.MMDiT:
  """The model of `config`.

  Under an active mesh (`jax.set_mesh`) every parameter is created sharded as
  `config.sharding_rules` maps its logical axes; without one it is created
  unsharded (its logical names stay in the metadata for later placement).
  Works under `nnx.eval_shape` / `nnx.jit` as well.
  """
  kwargs = model_kwargs(config)
  if jax.sharding.get_abstract_mesh().empty:
    ctx = nnx.use_eager_sharding(False)
  else:
    ctx = nnx.logical_axis_rules(tuple(tuple(r) for r in config.sharding_rules))
  with ctx:
    return dit.MMDiT(**kwargs, rngs=rngs)


def mmgen_sit_kwargs(*, input_size: int = 32, patch_size: int = 2, latent_channels: int = 4,
                     num_modalities: int = 4, hidden_size: int = 1152, depth: int = 28,
                     num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                     class_dropout_prob: float = 0.1, repa_encoder_depth: int = 8,
                     repa_z_dims: Sequence[int] = (768,), repa_projector_dim: int = 2048,
                     qk_norm: bool = False, **overrides: Any) -> dict[str, Any]:
  """MMDiT arguments equal to the official MMGen SiT; defaults are the released SiT-XL/2.

  Released flags: is_mmcat_diff, use_decouple_task, use_taskcond_emb,
  num_tasks = 4 modalities (rgb, depth, normal, mask) × 4 SD-VAE latent channels,
  256 px images (latent 32×32), ImageNet classes, REPA on DINOv2-B features.
  """
  per = (latent_channels,) * num_modalities
  return dict(input_size=input_size, patch_size=patch_size, in_channels=sum(per),
              image_heads=per, time_slots=per, class_heads=(), hidden_size=hidden_size,
              depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm,
              num_classes=num_classes, class_dropout_prob=class_dropout_prob,
              num_tasks=num_modalities, repa_encoder_depth=repa_encoder_depth,
              repa_z_dims=tuple(repa_z_dims), repa_projector_dim=repa_projector_dim,
              **overrides)


def model_config_for_mmgen_xl2() -> dict[str, Any]:
  """The released MMGen SiT-XL/2 (694,353,024 trainable parameters)."""
  return mmgen_sit_kwargs()
