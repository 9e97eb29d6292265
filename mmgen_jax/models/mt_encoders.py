"""MT-Diffusion's encoders E_i and the module joining them to the shared trunk.

The primary modality (e.g. rgb) is the diffusion space z_0 itself. Every
auxiliary modality i has an encoder E_i into that space, (N, H, W, C_primary):

* image modality: two 3x3 convolutions (any channel count -> C_primary);
* class modality: a learned per-class map of the full (H, W, C_primary) shape.

Each E_i output is scaled to unit RMS per sample, so the forward process sees
encodings of a fixed size and `objective.w_max` alone sets how strongly they
shift the chain (a free scale would let the encoders grow without bound).

The trunk is an MMDiT built from `trunk_spec`: input = [z_t, observed
encodings] on channels, one time slot, image heads (eps for the primary, then
one decoder per auxiliary image modality), class heads (one classifier per
auxiliary class modality), and a task embedding that tells the trunk the state
of every auxiliary modality (absent / generated / observed, `task_ids`). See
docs/mt_elbo.md for the derivation.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from mmgen_jax import modalities as modalities_lib

# State of an auxiliary modality in a sample (docs/mt_elbo.md, section 6).
ABSENT, GENERATED, OBSERVED = 0, 1, 2
NUM_STATES = 3
# The task table has one row per combination of states, NUM_STATES ** A rows.
MAX_AUX = 6


def split_primary(mods: Sequence[modalities_lib.Modality], primary: str
                  ) -> tuple[modalities_lib.Modality, tuple[modalities_lib.Modality, ...]]:
  """(primary modality, auxiliary modalities in slot order)."""
  p = modalities_lib.by_name(mods, primary)
  if not p.is_image:
    raise ValueError(f'config.objective.primary={primary!r} is a {p.kind!r} modality; the '
                     'primary is the diffusion space and must be an image modality.')
  return p, tuple(m for m in mods if m.name != primary)


def image_channels(mod: modalities_lib.Modality, latent_channels: int | None) -> int:
  """Model-space channels: pixel channels, or the codec's latent channels."""
  return latent_channels if latent_channels else mod.channels


def trunk_spec(mods: Sequence[modalities_lib.Modality], primary: str,
               latent_channels: int | None = None) -> dict:
  """Keyword arguments for the MMDiT trunk of an MT-Diffusion model."""
  p, aux = split_primary(mods, primary)
  c = image_channels(p, latent_channels)
  if len(aux) > MAX_AUX:
    raise ValueError(f'{len(aux)} auxiliary modalities {[m.name for m in aux]}: the task '
                     f'table has {NUM_STATES}^A rows; at most {MAX_AUX} are supported.')
  return dict(
      in_channels=2 * c,  # z_t and the sum of observed encodings
      image_heads=(c,) + tuple(image_channels(m, latent_channels) for m in aux if m.is_image),
      time_slots=(2 * c,),
      class_heads=tuple(m.channels for m in aux if not m.is_image),
      # One row per combination of auxiliary states (task_ids), zero-initialised so
      # a new model starts as one without the embedding.
      num_tasks=NUM_STATES ** len(aux) - 1 if aux else 0,
      task_embed_init_std=0.0,
  )


def task_ids(states):
  """(N, A) int states (ABSENT / GENERATED / OBSERVED) -> (N,) task ids sum_i s_i 3^i."""
  states = jnp.asarray(states, jnp.int32)
  return jnp.sum(states * NUM_STATES ** jnp.arange(states.shape[1], dtype=jnp.int32), axis=1)


def rms_normalize(x, eps: float = 1e-6):
  """Scales each sample to unit root-mean-square over all non-batch axes."""
  axes = tuple(range(1, x.ndim))
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=axes, keepdims=True) + eps)


def _conv_init(key, shape, dtype=jnp.float32):
  """LeCun-normal conv kernel drawn as a 2-d (fan_in, out) array and reshaped.

  Same distribution as the default; XLA:CPU compiles a 4-d draw far slower.
  """
  flat = nnx.initializers.lecun_normal()(key, (math.prod(shape[:-1]), shape[-1]), dtype)
  return flat.reshape(shape)


class ImageEncoder(nnx.Module):
  """E_i for an image modality: conv3x3 -> SiLU -> conv3x3 -> unit RMS."""

  def __init__(self, in_channels: int, out_channels: int, hidden: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, hidden, (3, 3), kernel_init=_conv_init, rngs=rngs)
    self.conv2 = nnx.Conv(hidden, out_channels, (3, 3), kernel_init=_conv_init, rngs=rngs)

  def __call__(self, x):
    return rms_normalize(self.conv2(nnx.silu(self.conv1(x))))


class ClassEncoder(nnx.Module):
  """E_i for a class modality: one learned (H, W, C) map per class, unit RMS."""

  def __init__(self, num_classes: int, spatial: tuple[int, int], out_channels: int, *,
               rngs: nnx.Rngs):
    shape = (num_classes, *spatial, out_channels)
    # Drawn flat: XLA:CPU compiles N-d threefry draws far slower than 1-d ones.
    self.maps = nnx.Param(jax.random.normal(rngs.params(), (math.prod(shape),)).reshape(shape))

  def normalized_maps(self):
    return rms_normalize(self.maps[...])

  def __call__(self, y):
    return self.normalized_maps()[y]

  def from_probs(self, probs):
    """E under a class distribution: sum_k p_k E(k) (the sampler's estimate)."""
    return jnp.einsum('nk,khwc->nhwc', probs, self.normalized_maps())


class MTDiffusion(nnx.Module):
  """Shared trunk + one encoder per auxiliary modality."""

  def __init__(self, trunk: nnx.Module, *, mods: Sequence[modalities_lib.Modality], primary: str,
               spatial: tuple[int, int], latent_channels: int | None = None,
               encoder_hidden: int = 32, masked: str = '', rngs: nnx.Rngs):
    """masked: an auxiliary image modality given as [image, mask] (one more channel,
    1 = unknown pixel); its decoder predicts the whole image."""
    p, aux = split_primary(mods, primary)
    self.trunk = trunk
    self.primary = p.name
    self.spatial = tuple(spatial)
    self.channels = image_channels(p, latent_channels)
    self.aux_images = tuple(m.name for m in aux if m.is_image)
    self.aux_classes = tuple(m.name for m in aux if not m.is_image)
    self.aux_channels = {m.name: image_channels(m, latent_channels) for m in aux if m.is_image}
    if masked and masked not in self.aux_images:
      raise ValueError(f'masked={masked!r} is not an auxiliary image modality '
                       f'{list(self.aux_images)}.')
    self.masked = masked
    encoders = {}
    for m in aux:
      if m.is_image:
        encoders[m.name] = ImageEncoder(self.aux_channels[m.name] + int(m.name == masked),
                                        self.channels, encoder_hidden, rngs=rngs)
      else:
        encoders[m.name] = ClassEncoder(m.channels, self.spatial, self.channels, rngs=rngs)
    self.encoders = nnx.Dict(encoders)

  @property
  def aux_names(self) -> tuple[str, ...]:
    return self.aux_images + self.aux_classes

  def encode(self, name: str, x):
    """E_i(x_i) -> (N, H, W, C_primary)."""
    out = self.encoders[name](x)
    expected = self.spatial + (self.channels,)
    if out.shape[1:] != expected:
      raise ValueError(f'encoding of {name!r} has shape {out.shape}; expected (N, *{expected}) '
                       f'(auxiliary images must share the primary {self.primary!r} resolution).')
    return out

  def encode_estimate(self, name: str, estimate):
    """E_i of a decoder output: image mean, or class logits -> expected map."""
    if name in self.aux_classes:
      return self.encoders[name].from_probs(jax.nn.softmax(estimate, axis=-1))
    if name == self.masked:  # the decoded whole image, nothing masked
      estimate = jnp.concatenate([estimate, jnp.zeros_like(estimate[..., :1])], axis=-1)
    return self.encode(name, estimate)

  def __call__(self, z_t, t, cond, y, states):
    """z_t (N,H,W,C); t (N,) in [0, 1]; cond (N,H,W,C) observed encodings; y (N,) int;
    states (N, A) int, each auxiliary's state in `aux_names` order."""
    if states.shape != (z_t.shape[0], len(self.aux_names)):
      raise ValueError(f'states has shape {states.shape}; expected (N, {len(self.aux_names)}) '
                       f'over {list(self.aux_names)}.')
    task = task_ids(states) if self.aux_names else None
    out = self.trunk(jnp.concatenate([z_t, cond], axis=-1), t[:, None], y, task=task)
    if out.images[0].shape != z_t.shape:
      raise ValueError(f'trunk image head 0 has shape {out.images[0].shape}; expected the '
                       f'primary {self.primary!r} shape {z_t.shape}.')
    return out

  def decoder_outputs(self, out) -> dict[str, jax.Array]:
    """Auxiliary decoder outputs by name: image means, class logits."""
    want = (len(self.aux_images) + 1, len(self.aux_classes))
    if (len(out.images), len(out.logits)) != want:
      raise ValueError(f'trunk returned {len(out.images)} image heads and {len(out.logits)} '
                       f'class heads; expected {want} (eps + {list(self.aux_images)}, '
                       f'{list(self.aux_classes)}).')
    return {**dict(zip(self.aux_images, out.images[1:])),
            **dict(zip(self.aux_classes, out.logits))}


def build(trunk: nnx.Module, config, *, spatial: tuple[int, int], rngs: nnx.Rngs) -> MTDiffusion:
  """MTDiffusion for a full config; `trunk` is an MMDiT laid out by `trunk_spec`.

  spatial: the model-space (H, W) (the resolution, / 8 with the SD-VAE codec).
  """
  latent = None if config.codec.name == 'identity' else int(config.codec.latent_channels)
  return MTDiffusion(trunk, mods=modalities_lib.from_config(config.modalities),
                     primary=config.objective.primary, spatial=spatial,
                     latent_channels=latent, masked=config.objective.masked_modality,
                     rngs=rngs)


def encode_all(model: MTDiffusion, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """E_i(x_i) for every auxiliary modality in the batch."""
  missing = [n for n in model.aux_names if n not in batch]
  if missing:
    raise KeyError(f'batch lacks auxiliary modalities {missing}; keys: {sorted(batch)}.')
  return {n: model.encode(n, batch[n]) for n in model.aux_names}
