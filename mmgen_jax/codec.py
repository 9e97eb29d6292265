"""Where images cross into the model's space: pixels as they are, or SD-VAE latents.

`config.codec.name`:
  'identity'  the model sees the pixels of every image modality ([-1, 1], NHWC);
  'sd_vae'    each image modality is encoded by the Stable Diffusion VAE as MMGen
              does: a 1-channel map is replicated to 3 channels, the posterior
              moments (mean, logvar) are kept, and every training step draws
              z = (mean + exp(logvar / 2)·ε) · scale (MMGen's `utils/latents.py`,
              scale 0.18215). Sampled latents are divided by the scale and decoded;
              a 1-channel modality is read back as the mean of the 3 decoded channels.

The moments come either from the latent cache (`<name>_moments` fields written by
`data/latent_cache.py`) or are computed from pixel batches by `Codec.add_moments`
before the step. Drawing the latent happens inside the step from its rng
(`wrap_loss`), so a resumed run draws the same latents.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from mmgen_jax import modalities as modalities_lib

Batch = Mapping[str, Any]
DOWNSAMPLE = 8  # the SD VAE's image side / latent side; configs are validated against it


def moments_field(name: str) -> str:
  """The batch field holding modality `name`'s posterior moments [mean | logvar]."""
  return f'{name}_moments'


def to_vae_input(image: jax.Array, vae_channels: int) -> jax.Array:
  """A modality's pixels as the VAE takes them: 1-channel maps replicated (MMGen's depth)."""
  c = image.shape[-1]
  if c == vae_channels:
    return image
  if c == 1:
    return jnp.repeat(image, vae_channels, axis=-1)
  raise ValueError(f'an image with {c} channels cannot be encoded by a VAE that takes '
                   f'{vae_channels} (only 1-channel maps are replicated).')


def from_vae_output(image: jax.Array, channels: int) -> jax.Array:
  """Decoded VAE pixels as the modality has them: 1-channel maps are the channel mean."""
  if image.shape[-1] == channels:
    return image
  if channels == 1:
    return image.mean(axis=-1, keepdims=True)
  raise ValueError(f'a decoded image with {image.shape[-1]} channels cannot become a '
                   f'{channels}-channel modality.')


def draw_latent(moments: jax.Array, key: jax.Array, scale: float) -> jax.Array:
  """(mean + exp(logvar / 2)·ε) · scale from moments [mean | logvar] on the last axis."""
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)) * scale


def draw_latents(batch: Batch, names: Sequence[str], key: jax.Array, scale: float) -> dict:
  """The batch with each modality's moments replaced by a scaled latent draw under its name."""
  out = dict(batch)
  for i, name in enumerate(names):
    field = moments_field(name)
    if field not in out:
      raise KeyError(f'the sd_vae codec needs batch field {field!r} (posterior moments of '
                     f'{name!r}); the batch has {sorted(out)}.')
    out[name] = draw_latent(out.pop(field), jax.random.fold_in(key, i), scale)
  return out


class Codec:
  """Pixels <-> model space for the image modalities of a config (identity: no-op)."""

  def __init__(self, mods: Sequence[modalities_lib.Modality], vae: Any = None,
               scale: float = 1.0, mesh: jax.sharding.Mesh | None = None, rules: Any = None):
    self.images = modalities_lib.images(mods)
    self.names = tuple(m.name for m in self.images)
    self.vae = vae
    self.scale = float(scale)
    if vae is None:
      return
    if vae.downsample_factor != DOWNSAMPLE:
      raise ValueError(f'the sd_vae codec needs a VAE that downsamples by {DOWNSAMPLE}; this one '
                       f'downsamples by {vae.downsample_factor} (its block_out_channels give '
                       'the number of down blocks: 4 for 8×).')
    if mesh is not None:  # the VAE's parameters beside the batch's shards
      from mmgen_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
      vae = autoencoder.place_on_mesh(vae, mesh, rules)
      self.vae = vae
    graphdef, state = nnx.split(vae)
    self._vae_state = state
    in_ch = int(vae.config.in_channels)

    @jax.jit
    def moments(state, images: dict[str, jax.Array]) -> dict[str, jax.Array]:
      model = nnx.merge(graphdef, state)
      # Every modality in one encoder call: one compiled VAE, larger matmuls.
      names = list(images)
      x = jnp.concatenate([to_vae_input(images[n], in_ch) for n in names], axis=0)
      mean, logvar = model.encode(x)
      both = jnp.split(jnp.concatenate([mean, logvar], axis=-1), len(names), axis=0)
      return {moments_field(n): m for n, m in zip(names, both)}

    @functools.partial(jax.jit, static_argnums=2)
    def decode(state, latents: dict[str, jax.Array], channels: tuple[tuple[str, int], ...]):
      model = nnx.merge(graphdef, state)
      ch = dict(channels)
      return {name: from_vae_output(model.decode(z / self.scale), ch[name])
              for name, z in latents.items()}

    self._moments, self._decode = moments, decode

  # ---- sizes -----------------------------------------------------------------------------

  @property
  def is_identity(self) -> bool:
    return self.vae is None

  @property
  def downsample(self) -> int:
    return 1 if self.vae is None else DOWNSAMPLE

  def model_channels(self) -> tuple[int, ...]:
    """Model-space channels of the image modalities, in slot order."""
    if self.vae is None:
      return tuple(m.channels for m in self.images)
    return (int(self.vae.latent_channels),) * len(self.images)

  def model_shape(self, n: int, resolution: int) -> tuple[int, int, int]:
    side = resolution // self.downsample
    return (n, side, side)

  # ---- pixels -> model space ---------------------------------------------------------------

  def add_moments(self, batch: Batch) -> Batch:
    """Adds `<name>_moments` for image modalities that arrive as pixels (sd_vae only)."""
    if self.vae is None:
      return batch
    todo = {n: batch[n] for n in self.names if moments_field(n) not in batch and n in batch}
    if not todo:
      return batch
    moments = self._moments(self._vae_state, todo)
    # The step is compiled for the batch's sharding: the moments take the images'
    # (the VAE's own layout, e.g. channels over 'tensor', would otherwise leak out).
    sharding = getattr(next(iter(todo.values())), 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      moments = jax.device_put(moments, sharding)
    return {**batch, **moments}

  def encode(self, images: Mapping[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
    """Pixels of some image modalities -> scaled latent draws (a sampler's condition)."""
    if self.vae is None:
      return dict(images)
    moments = self._moments(self._vae_state, dict(images))
    return draw_latents(moments, list(images), key, self.scale)

  def encode_mean(self, images: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Pixels -> posterior mean × scale: a deterministic condition (no draw).

    MMGen's exp_sample.py draws the condition from the posterior; the mean is
    that draw's expectation, and it needs no key, so the same input gives the
    same condition on any device count.
    """
    if self.vae is None:
      return dict(images)
    moments = self._moments(self._vae_state, dict(images))
    return {name: jnp.split(moments[moments_field(name)], 2, axis=-1)[0] * self.scale
            for name in images}

  # ---- model space -> pixels -----------------------------------------------------------------

  def decode(self, latents: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Model-space samples of image modalities -> pixels with each modality's channels."""
    if self.vae is None:
      return dict(latents)
    channels = tuple((m.name, m.channels) for m in self.images if m.name in latents)
    return self._decode(self._vae_state, dict(latents), channels)


def wrap_loss(loss_fn: Callable, config: ml_collections.ConfigDict) -> Callable:
  """loss_fn(model, batch, rng) that first draws each modality's latent from its moments."""
  if config.codec.name == 'identity':
    return loss_fn
  names = tuple(m.name for m in modalities_lib.images(modalities_lib.from_config(
      config.modalities)))
  scale = float(config.codec.scale)

  def loss(model, batch, rng):
    k_latent, rng = jax.random.split(rng)
    return loss_fn(model, draw_latents(batch, names, k_latent, scale), rng)

  return loss


def from_config(config: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh | None = None) -> Codec:
  """The codec `config.codec` names; 'sd_vae' reads the VAE from `config.codec.weights`.

  `config.codec.weights` is a local diffusers directory (`config.json` +
  `diffusion_pytorch_model.safetensors`, as `stabilityai/sd-vae-ft-mse` ships) or
  a `.safetensors` file. `mesh`: where the batches live (the VAE is placed there).
  """
  mods = modalities_lib.from_config(config.modalities)
  name = config.codec.name
  if name == 'identity':
    return Codec(mods)
  if name != 'sd_vae':
    raise ValueError(f"config.codec.name={name!r} is not one of ['identity', 'sd_vae'].")
  from mmgen_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(None):  # created whole (outside any mesh), then placed on `mesh`
    # Names missing or mismatching weights; precision: 'highest' for exact float32
    # on TPU/GPU, 'default' lets them use bf16 passes (about 1e-3 relative error).
    vae = autoencoder.load_codec(config.codec, precision=config.codec.precision)
  rules = None
  if mesh is not None:
    from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
    rules = parallel.rules_dict(config.sharding_rules)
  return Codec(mods, vae, float(config.codec.scale), mesh, rules)
