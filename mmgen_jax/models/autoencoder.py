"""The Stable Diffusion KL autoencoder (diffusers `AutoencoderKL`) in Flax NNX.

The module tree mirrors diffusers' names, so every parameter has exactly one
diffusers `state_dict` key: `encoder.down_blocks.0.resnets.1.norm2.weight` is
NNX `encoder/down_blocks/0/resnets/1/norm2/scale`. `from_diffusers` builds a
model from a state dict (PyTorch layouts) and the diffusers `config.json`
dict; `to_diffusers` is its inverse; `load_diffusers_dir` reads a local
diffusers directory. The architecture is read from the config alone (any
number of blocks, resnets per block, groups, image size).

Layout: NHWC activations, conv kernels HWIO (torch OIHW -> `transpose(2, 3, 1, 0)`),
dense kernels (in, out) (torch Linear (out, in) -> `.T`). Images are in
[-1, 1]. Neither `encode` nor `decode` applies `scaling_factor`
(`model.scaling_factor`: callers multiply latents by it after encoding and
divide before decoding).

Numerics: parameters in `param_dtype`; convolutions and matmuls take their
operands in the compute `dtype` and accumulate in float32 (at `precision`,
HIGHEST by default, in float32); GroupNorm statistics and the attention
softmax are float32; the activations between layers are in `dtype`, the
outputs of `encode`/`decode` float32.

Sharding: every parameter carries logical axis names (its output channels are
'channels', the rest replicated); `place_on_mesh` lays a model out by
`config.sharding_rules`. The default rules replicate the whole autoencoder
(84M parameters) and the batch, split over 'data', propagates through
`encode`/`decode` unchanged (every layer is per-sample).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from mmgen_jax.models import layers
from mmgen_jax.models.layers import Numerics

CHANNELS = 'channels'  # logical axis of every parameter's output channels
NORM_EPS = 1e-6        # GroupNorm eps everywhere in the diffusers VAE
LOGVAR_RANGE = (-30.0, 20.0)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'silu': jax.nn.silu, 'swish': jax.nn.silu, 'relu': jax.nn.relu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False), 'mish': lambda x: x * jnp.tanh(
        jax.nn.softplus(x)),
}
_PRECISIONS = {'highest': jax.lax.Precision.HIGHEST, 'high': jax.lax.Precision.HIGH,
               'default': jax.lax.Precision.DEFAULT}

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
WEIGHTS_INDEX_NAME = 'diffusion_pytorch_model.safetensors.index.json'
TORCH_WEIGHTS_NAME = 'diffusion_pytorch_model.bin'
CONFIG_NAME = 'config.json'


# ---- config -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The diffusers `AutoencoderKL` config; defaults are diffusers' own."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ('DownEncoderBlock2D',)
  up_block_types: tuple[str, ...] = ('UpDecoderBlock2D',)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = 'silu'
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Any = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> 'VAEConfig':
    """Parses a diffusers `config.json` dict; '_'-prefixed entries are metadata."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if k not in known and not k.startswith('_'))
    if unknown:
      # Entries of other diffusers versions; none of them changes this architecture.
      logging.warning('AutoencoderKL config: ignoring unknown entries %s', unknown)
    kwargs = {}
    for k in known & set(config):
      v = config[k]
      kwargs[k] = tuple(v) if isinstance(v, list) else v
    out = cls(**kwargs)
    out.validate()
    return out

  def to_diffusers(self) -> dict[str, Any]:
    """The config as diffusers writes it (`_class_name` included)."""
    out = {'_class_name': 'AutoencoderKL'}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      out[f.name] = list(v) if isinstance(v, tuple) else v
    return out

  def validate(self) -> None:
    n = len(self.block_out_channels)
    problems = []
    if n == 0:
      problems.append('block_out_channels is empty')
    for name, types, want in (('down_block_types', self.down_block_types, 'DownEncoderBlock2D'),
                              ('up_block_types', self.up_block_types, 'UpDecoderBlock2D')):
      if len(types) != n:
        problems.append(f'{name} has {len(types)} entries but block_out_channels has {n}')
      bad = sorted({t for t in types if t != want})
      if bad:
        problems.append(f'{name}: only {want!r} is supported, got {bad}')
    if self.act_fn not in _ACTIVATIONS:
      problems.append(f'act_fn={self.act_fn!r} is not one of {sorted(_ACTIVATIONS)}')
    if self.layers_per_block < 1:
      problems.append(f'layers_per_block={self.layers_per_block} must be >= 1')
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        problems.append(f'block_out_channels entry {c} is not divisible by '
                        f'norm_num_groups={self.norm_num_groups}')
    for name in ('in_channels', 'out_channels', 'latent_channels', 'norm_num_groups'):
      if int(getattr(self, name)) < 1:
        problems.append(f'{name}={getattr(self, name)} must be >= 1')
    if problems:
      raise ValueError('AutoencoderKL config: ' + '; '.join(problems) + '.')

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


# The released stabilityai/sd-vae-ft-mse architecture (83,653,863 parameters).
SD_VAE_FT_MSE = VAEConfig(
    down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    sample_size=256)


def _as_config(config: VAEConfig | Mapping[str, Any]) -> VAEConfig:
  if isinstance(config, VAEConfig):
    config.validate()
    return config
  return VAEConfig.from_diffusers(config)


# ---- layers -------------------------------------------------------------------------


_KERNEL_INIT = nnx.initializers.lecun_normal()
_ZEROS, _ONES = nnx.initializers.zeros_init(), nnx.initializers.ones_init()


def _param(rngs: nnx.Rngs | None, init, shape, dtype, axes) -> nnx.Param:
  """A parameter with logical axis names; kernels are zeros without `rngs` (to be loaded)."""
  if init is _KERNEL_INIT:
    value = init(rngs.params(), shape, dtype) if rngs is not None else jnp.zeros(shape, dtype)
  else:
    value = init(None, shape, dtype)  # constant: no key drawn
  # The logical names stay metadata, also under a mesh: `place_on_mesh` places
  # the parameters by `config.sharding_rules` in one step.
  with nnx.use_eager_sharding(False):
    return nnx.Param(value, out_sharding=axes)


class Conv2d(nnx.Module):
  """k×k convolution, NHWC input, HWIO kernel, explicit (low, high) padding per side."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
               padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
               numerics: Numerics, rngs: nnx.Rngs | None):
    k = kernel_size
    self.stride = stride
    # 'SAME' for odd k at stride 1 (torch padding k // 2).
    self.padding = padding if padding is not None else ((k // 2, k // 2), (k // 2, k // 2))
    self.numerics = numerics
    pd = numerics.param_dtype
    self.kernel = _param(rngs, _KERNEL_INIT, (k, k, in_ch, out_ch), pd,
                         (None, None, None, CHANNELS))
    self.bias = _param(rngs, _ZEROS, (out_ch,), pd, (CHANNELS,))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.numerics.dtype
    precision = self.numerics.precision if jnp.dtype(dt) == jnp.float32 else None
    y = jax.lax.conv_general_dilated(
        x.astype(dt), self.kernel[...].astype(dt), (self.stride, self.stride), self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision,
        preferred_element_type=jnp.float32)
    return (y + self.bias[...].astype(jnp.float32)).astype(dt)


class Linear(nnx.Module):
  """Dense layer over the channel axis (the attention's q/k/v/out projections)."""

  def __init__(self, in_features: int, out_features: int, *, numerics: Numerics,
               rngs: nnx.Rngs | None):
    self.numerics = numerics
    pd = numerics.param_dtype
    self.kernel = _param(rngs, _KERNEL_INIT, (in_features, out_features), pd,
                         (None, CHANNELS))
    self.bias = _param(rngs, _ZEROS, (out_features,), pd, (CHANNELS,))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.matmul('...i,io->...o', x, self.kernel[...], self.numerics)
    return (y + self.bias[...].astype(jnp.float32)).astype(self.numerics.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over (H, W, channels of a group) with affine scale/bias; float32 statistics."""

  def __init__(self, channels: int, groups: int, *, numerics: Numerics, rngs: nnx.Rngs | None):
    if channels % groups:
      raise ValueError(f'GroupNorm: {channels} channels do not split into {groups} groups.')
    self.groups = groups
    self.numerics = numerics
    pd = numerics.param_dtype
    self.scale = _param(rngs, _ONES, (channels,), pd, (CHANNELS,))
    self.bias = _param(rngs, _ZEROS, (channels,), pd, (CHANNELS,))

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)  # biased, as torch
    y = ((g - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(n, h, w, c)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.numerics.dtype)


class ResnetBlock2D(nnx.Module):
  """GN -> act -> conv3x3 -> GN -> act -> conv3x3, plus the input (1x1 conv if channels change)."""

  def __init__(self, in_ch: int, out_ch: int, *, groups: int, act: str, numerics: Numerics,
               rngs: nnx.Rngs | None):
    kw = dict(numerics=numerics, rngs=rngs)
    self.act = act
    self.norm1 = GroupNorm(in_ch, groups, **kw)
    self.conv1 = Conv2d(in_ch, out_ch, 3, **kw)
    self.norm2 = GroupNorm(out_ch, groups, **kw)
    self.conv2 = Conv2d(out_ch, out_ch, 3, **kw)
    self.conv_shortcut = Conv2d(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

  def __call__(self, x: jax.Array) -> jax.Array:
    act = _ACTIVATIONS[self.act]
    h = self.conv1(act(self.norm1(x)))
    h = self.conv2(act(self.norm2(h)))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return shortcut + h


class Attention(nnx.Module):
  """Single-head self-attention over all H·W positions (head dim = channels), residual."""

  def __init__(self, channels: int, *, groups: int, numerics: Numerics, rngs: nnx.Rngs | None):
    kw = dict(numerics=numerics, rngs=rngs)
    self.numerics = numerics
    self.group_norm = GroupNorm(channels, groups, **kw)
    self.to_q = Linear(channels, channels, **kw)
    self.to_k = Linear(channels, channels, **kw)
    self.to_v = Linear(channels, channels, **kw)
    self.to_out = Linear(channels, channels, **kw)  # diffusers `to_out.0`

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    t = self.group_norm(x).reshape(n, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    logits = layers.matmul('bqc,bkc->bqk', q, k, self.numerics) * (1.0 / math.sqrt(c))
    probs = layers.softmax(logits)  # float32
    out = layers.matmul('bqk,bkc->bqc', probs, v, self.numerics).astype(self.numerics.dtype)
    return x + self.to_out(out).reshape(n, h, w, c)


class Downsample2D(nnx.Module):
  """Zero-pad right and bottom by one, then 3x3 conv, stride 2, no other padding."""

  def __init__(self, channels: int, *, numerics: Numerics, rngs: nnx.Rngs | None):
    self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)),
                       numerics=numerics, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour x2, then 3x3 conv."""

  def __init__(self, channels: int, *, numerics: Numerics, rngs: nnx.Rngs | None):
    self.conv = Conv2d(channels, channels, 3, numerics=numerics, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return self.conv(x.reshape(n, 2 * h, 2 * w, c))


class EncoderBlock(nnx.Module):
  """diffusers `DownEncoderBlock2D`: resnets, then a downsampler unless last."""

  def __init__(self, in_ch: int, out_ch: int, num_layers: int, downsample: bool, *,
               groups: int, act: str, numerics: Numerics, rngs: nnx.Rngs | None):
    kw = dict(groups=groups, act=act, numerics=numerics, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, **kw)
                             for j in range(num_layers)])
    self.downsamplers = nnx.List(
        [Downsample2D(out_ch, numerics=numerics, rngs=rngs)] if downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in (*self.resnets, *self.downsamplers):
      x = block(x)
    return x


class DecoderBlock(nnx.Module):
  """diffusers `UpDecoderBlock2D`: resnets, then an upsampler unless last."""

  def __init__(self, in_ch: int, out_ch: int, num_layers: int, upsample: bool, *,
               groups: int, act: str, numerics: Numerics, rngs: nnx.Rngs | None):
    kw = dict(groups=groups, act=act, numerics=numerics, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, **kw)
                             for j in range(num_layers)])
    self.upsamplers = nnx.List(
        [Upsample2D(out_ch, numerics=numerics, rngs=rngs)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in (*self.resnets, *self.upsamplers):
      x = block(x)
    return x


class MidBlock(nnx.Module):
  """diffusers `UNetMidBlock2D` without time embedding: resnet, [attention, resnet]."""

  def __init__(self, channels: int, *, attention: bool, groups: int, act: str,
               numerics: Numerics, rngs: nnx.Rngs | None):
    kw = dict(numerics=numerics, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups=groups, act=act, **kw)
                             for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, groups=groups, **kw)] if attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if len(self.attentions):
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  """Image -> 2·latent_channels moments (before quant_conv)."""

  def __init__(self, cfg: VAEConfig, *, numerics: Numerics, rngs: nnx.Rngs | None):
    kw = dict(numerics=numerics, rngs=rngs)
    chans, g, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
    self.conv_in = Conv2d(cfg.in_channels, chans[0], 3, **kw)
    self.down_blocks = nnx.List([
        EncoderBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, i < len(chans) - 1,
                     groups=g, act=act, **kw) for i in range(len(chans))])
    self.mid_block = MidBlock(chans[-1], attention=cfg.mid_block_add_attention, groups=g,
                              act=act, **kw)
    self.conv_norm_out = GroupNorm(chans[-1], g, **kw)
    self.conv_out = Conv2d(chans[-1], 2 * cfg.latent_channels, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # diffusers: SiLU here always


class Decoder(nnx.Module):
  """Latent (after post_quant_conv) -> image; walks block_out_channels in reverse."""

  def __init__(self, cfg: VAEConfig, *, numerics: Numerics, rngs: nnx.Rngs | None):
    kw = dict(numerics=numerics, rngs=rngs)
    chans, g, act = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, cfg.act_fn
    self.conv_in = Conv2d(cfg.latent_channels, chans[0], 3, **kw)
    self.mid_block = MidBlock(chans[0], attention=cfg.mid_block_add_attention, groups=g,
                              act=act, **kw)
    self.up_blocks = nnx.List([
        DecoderBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1,
                     i < len(chans) - 1, groups=g, act=act, **kw) for i in range(len(chans))])
    self.conv_norm_out = GroupNorm(chans[-1], g, **kw)
    self.conv_out = Conv2d(chans[-1], cfg.out_channels, 3, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# ---- the autoencoder ----------------------------------------------------------------


class AutoencoderKL(nnx.Module):
  """diffusers `AutoencoderKL`: `encode` image -> (mean, logvar), `decode` latent -> image.

  Build it with `from_diffusers` / `load_diffusers_dir` (weights) or `create`
  (random init). All inputs and outputs are NHWC. With `rngs=None` every
  kernel is zero: a placeholder to load weights into (cheap to trace).
  """

  def __init__(self, config: VAEConfig | Mapping[str, Any], *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, precision: str | jax.lax.Precision = 'highest',
               rngs: nnx.Rngs | None):
    cfg = _as_config(config)
    if isinstance(precision, str):
      if precision not in _PRECISIONS:
        raise ValueError(f'precision={precision!r} is not one of {sorted(_PRECISIONS)}.')
      precision = _PRECISIONS[precision]
    numerics = Numerics(dtype=dtype, param_dtype=param_dtype, precision=precision)
    kw = dict(numerics=numerics, rngs=rngs)
    self.config = cfg
    self.numerics = numerics
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    m = 2 * cfg.latent_channels
    self.quant_conv = Conv2d(m, m, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = (Conv2d(cfg.latent_channels, cfg.latent_channels, 1, **kw)
                            if cfg.use_post_quant_conv else None)

  @property
  def scaling_factor(self) -> float:
    return float(self.config.scaling_factor)

  @property
  def shift_factor(self) -> float | None:
    return self.config.shift_factor

  @property
  def latent_channels(self) -> int:
    return int(self.config.latent_channels)

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side (2 ** (number of blocks - 1))."""
    return self.config.downsample_factor

  def encoder_out(self, x: jax.Array) -> jax.Array:
    """The raw encoder output (N, h, w, 2·latent_channels), before quant_conv; float32."""
    return self.encoder(x).astype(jnp.float32)

  def moments(self, x: jax.Array) -> jax.Array:
    """quant_conv(encoder(x)): [mean | logvar] on channels, logvar not clamped; float32."""
    h = self.encoder(x)
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    return h.astype(jnp.float32)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image (N, H, W, in_channels) in [-1, 1] -> (mean, logvar), logvar clamped to [-30, 20]."""
    mean, logvar = jnp.split(self.moments(x), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latent (N, h, w, latent_channels), unscaled -> image (N, H, W, out_channels), float32."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction from the posterior mean (diffusers' `sample_posterior=False`)."""
    return self.decode(self.encode(x)[0])


def create(config: VAEConfig | Mapping[str, Any], *, seed: int = 0, abstract: bool = False,
           **kwargs) -> AutoencoderKL:
  """A randomly initialised model: kernels N(0, 1/fan_in), zero biases, unit norm scales.

  `abstract`: its shapes only (`nnx.eval_shape`, no memory). `kwargs`: dtype,
  param_dtype, precision. The draws are numpy's (`seed`): compiling ~200
  random-kernel draws takes JAX on CPU a minute.
  """
  cfg = _as_config(config)
  model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=None, **kwargs))
  if abstract:
    return model
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(model)

  def draw(path, var):
    like = var.get_value()
    if path[-1] == 'kernel':
      fan_in = math.prod(like.shape[:-1])
      value = rng.standard_normal(like.shape, np.float32) / np.float32(math.sqrt(fan_in))
    else:
      value = np.full(like.shape, 1.0 if path[-1] == 'scale' else 0.0, np.float32)
    return var.replace(jnp.asarray(value, like.dtype))
  flat = {path: draw(path, var) for path, var in nnx.to_flat_state(state)}
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---- diffusers state dicts ----------------------------------------------------------

# Older diffusers-format checkpoints name the attention projections so.
_LEGACY_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
_LEGACY_RE = re.compile(r'^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$')


class StateDictMismatch(ValueError, KeyError):
  """A state dict whose keys or shapes do not fit the model (a ValueError and a KeyError)."""

  def __str__(self) -> str:  # KeyError would print the message's repr
    return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One diffusers key: its NNX path, what kind of tensor it is, its torch shape."""
  path: tuple[str | int, ...]
  kind: str  # 'conv' | 'linear' | 'vector'
  torch_shape: tuple[int, ...]


def _to_torch_shape(kind: str, shape: Sequence[int]) -> tuple[int, ...]:
  if kind == 'conv':  # HWIO -> OIHW
    h, w, i, o = shape
    return (o, i, h, w)
  if kind == 'linear':  # (in, out) -> (out, in)
    return (shape[1], shape[0])
  return tuple(shape)


def diffusers_keys(model: AutoencoderKL) -> dict[str, _Entry]:
  """diffusers key -> entry for every parameter of `model` (which may be abstract)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    *prefix, leaf = path
    parts = ['to_out.0' if p == 'to_out' else str(p) for p in prefix]
    shape = tuple(var.get_value().shape)
    if leaf == 'kernel':
      kind = 'conv' if len(shape) == 4 else 'linear'
    elif leaf in ('scale', 'bias'):
      kind = 'vector'
    else:
      raise AssertionError(f'unexpected parameter {path}')
    key = '.'.join(parts + ['bias' if leaf == 'bias' else 'weight'])
    out[key] = _Entry(tuple(path), kind, _to_torch_shape(kind, shape))
  return out


def canonical_key(key: str) -> str:
  """Current diffusers name of a key (`...attentions.0.query.weight` -> `...to_q.weight`)."""
  m = _LEGACY_RE.match(key)
  if not m:
    return key
  return f'{m.group(1)}{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}'


def _canonicalise(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
  """canonical key -> given key, and the problems (one tensor given under two names)."""
  out, problems = {}, []
  for name in names:
    c = canonical_key(name)
    if c in out:
      problems.append(f'{c} is given twice, as {out[c]!r} and {name!r}')
    else:
      out[c] = name
  return out, problems


def _fmt(keys: Sequence[str], limit: int = 40) -> str:
  shown = ', '.join(keys[:limit])
  return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def check_state_dict(model: AutoencoderKL, shapes: Mapping[str, Sequence[int]]
                     ) -> dict[str, str]:
  """Checks a state dict's keys and torch shapes against `model`, one to one.

  Returns model key -> the state dict's key. Raises one StateDictMismatch (a
  ValueError) naming every missing key, every unexpected key and every shape
  mismatch (expected vs got).
  """
  expected = diffusers_keys(model)
  given, problems = _canonicalise(shapes)
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(given[k] for k in set(given) - set(expected))
  if missing:
    problems.append(f'{len(missing)} missing key(s): {_fmt(missing)}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected key(s): {_fmt(unexpected)}')
  for key, entry in sorted(expected.items()):
    if key not in given:
      continue
    got = tuple(int(s) for s in shapes[given[key]])
    ok = [entry.torch_shape]
    if entry.kind == 'linear':
      ok.append(entry.torch_shape + (1, 1))  # stored as a 1x1 conv
    if got not in ok:
      want = ' or '.join(map(str, ok))
      problems.append(f'{given[key]}: shape mismatch, expected {want}, got {got}')
  if problems:
    cfg = model.config
    raise StateDictMismatch(
        f'state dict does not match AutoencoderKL(block_out_channels='
        f'{list(cfg.block_out_channels)}, layers_per_block={cfg.layers_per_block}, '
        f'latent_channels={cfg.latent_channels}):\n  ' + '\n  '.join(problems))
  return {k: given[k] for k in expected}


def _from_torch(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return w.transpose(2, 3, 1, 0)
  if kind == 'linear':
    return w.reshape(w.shape[:2]).T
  return w


def from_diffusers(state_dict: Mapping[str, Any], config: VAEConfig | Mapping[str, Any], *,
                   dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   precision: str | jax.lax.Precision = 'highest') -> AutoencoderKL:
  """The model of a diffusers `config.json` dict with the weights of `state_dict`.

  state_dict: diffusers key -> array in PyTorch layout (numpy, or anything
  `np.asarray` reads). Both attention spellings (`to_q`... and `query`...) are
  accepted, as are (C, C, 1, 1) attention weights. Keys must match one to one.
  """
  model = create(config, abstract=True, dtype=dtype, param_dtype=param_dtype,
                 precision=precision)
  sources = check_state_dict(model, {k: np.shape(v) for k, v in state_dict.items()})
  entries = diffusers_keys(model)
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  for key, entry in entries.items():
    var = flat[entry.path]
    value = _from_torch(entry.kind, np.asarray(state_dict[sources[key]]))
    flat[entry.path] = var.replace(jnp.asarray(value, dtype=var.get_value().dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def to_diffusers(model: AutoencoderKL, *, legacy_attention_names: bool = False
                 ) -> dict[str, np.ndarray]:
  """The diffusers state dict of `model` (PyTorch layouts, numpy, parameter dtype).

  `legacy_attention_names` writes the older `query/key/value/proj_attn` names.
  """
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  inverse = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  out = {}
  for key, entry in diffusers_keys(model).items():
    w = np.asarray(jax.device_get(flat[entry.path].get_value()))
    if entry.kind == 'conv':
      w = w.transpose(3, 2, 0, 1)
    elif entry.kind == 'linear':
      w = w.T
    if legacy_attention_names:
      m = re.match(r'^(.*\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$', key)
      if m:
        key = f'{m.group(1)}{inverse[m.group(2)]}.{m.group(3)}'
    out[key] = np.ascontiguousarray(w)
  return out


# ---- files --------------------------------------------------------------------------


def _read_weights(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  index = os.path.join(path, WEIGHTS_INDEX_NAME)
  single = os.path.join(path, WEIGHTS_NAME)
  if os.path.isfile(single):
    return load_file(single)
  if os.path.isfile(index):  # sharded safetensors
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
    out = {}
    for name in files:
      shard = os.path.join(path, name)
      if not os.path.isfile(shard):
        raise FileNotFoundError(f'{index} lists {name}, which is not in {path}.')
      out.update(load_file(shard))
    return out
  torch_file = os.path.join(path, TORCH_WEIGHTS_NAME)
  if os.path.isfile(torch_file):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'{torch_file} is a PyTorch pickle and reading it needs torch, which is '
                        f'not installed; convert it to {WEIGHTS_NAME} or install torch.'
                        ) from None
    sd = torch.load(torch_file, map_location='cpu', weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in sd.items()}
  raise FileNotFoundError(f'{path} holds no weights: expected {WEIGHTS_NAME} (or '
                          f'{WEIGHTS_INDEX_NAME} with its shards, or {TORCH_WEIGHTS_NAME}).')


def load_diffusers_dir(path: str | os.PathLike, *, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32,
                       precision: str | jax.lax.Precision = 'highest') -> AutoencoderKL:
  """Reads a local diffusers `AutoencoderKL` directory (config.json + weights).

  Weights: `diffusion_pytorch_model.safetensors` (read without PyTorch), its
  sharded form, or `diffusion_pytorch_model.bin` (needs torch).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path} is not a directory (expected a diffusers AutoencoderKL '
                            f'directory with {CONFIG_NAME} and {WEIGHTS_NAME}).')
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f'{config_file} is missing: a diffusers directory needs '
                            f'{CONFIG_NAME} next to its weights.')
  with open(config_file) as f:
    config = json.load(f)
  cls = config.get('_class_name', 'AutoencoderKL')
  if cls != 'AutoencoderKL':
    raise ValueError(f'{config_file}: _class_name is {cls!r}, expected AutoencoderKL.')
  return from_diffusers(_read_weights(path), config, dtype=dtype, param_dtype=param_dtype,
                        precision=precision)


def save_diffusers_dir(model: AutoencoderKL, path: str | os.PathLike) -> None:
  """Writes `model` as a diffusers directory (config.json + safetensors weights)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_NAME), 'w') as f:
    json.dump(model.config.to_diffusers(), f, indent=2)
  save_file(to_diffusers(model), os.path.join(path, WEIGHTS_NAME))


def load_codec(codec_config: Any, *, dtype: Any = jnp.float32,
               precision: str | jax.lax.Precision = 'highest') -> AutoencoderKL:
  """The autoencoder of `config.codec` (name 'sd_vae'; `weights` a diffusers directory).

  `weights` may also be a `.safetensors` file: its directory's config.json is
  used when present, else the sd-vae-ft-mse architecture (logged). The VAE's
  own scaling must be the config's: another VAE with the same keys (SDXL's,
  scaling 0.13025) would otherwise train silently at the wrong scale.
  """
  if codec_config.name != 'sd_vae':
    raise ValueError(f"config.codec.name={codec_config.name!r}: only 'sd_vae' has an "
                     'autoencoder.')
  weights = os.fspath(codec_config.weights or '')
  if not weights:
    raise ValueError("config.codec.weights is empty; set it to a diffusers AutoencoderKL "
                     "directory (config.json + diffusion_pytorch_model.safetensors).")
  if os.path.isdir(weights):
    model = load_diffusers_dir(weights, dtype=dtype, precision=precision)
  elif os.path.isfile(weights) and weights.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    config_file = os.path.join(os.path.dirname(weights), CONFIG_NAME)
    if os.path.isfile(config_file):
      with open(config_file) as f:
        config = json.load(f)
    else:
      logging.info('%s has no %s beside it: reading it as sd-vae-ft-mse.', weights, CONFIG_NAME)
      config = SD_VAE_FT_MSE
    model = from_diffusers(load_file(weights), config, dtype=dtype, precision=precision)
  else:
    raise FileNotFoundError(f'config.codec.weights={weights!r} is neither a directory nor a '
                            '.safetensors file.')
  if model.latent_channels != int(codec_config.latent_channels):
    raise ValueError(f'config.codec.latent_channels={codec_config.latent_channels} but the '
                     f'autoencoder at {weights} has {model.latent_channels} latent channels.')
  if abs(model.scaling_factor - float(codec_config.scale)) > 1e-6 or model.shift_factor:
    raise ValueError(f'config.codec.scale={codec_config.scale} but the autoencoder at {weights} '
                     f'has scaling_factor={model.scaling_factor}, shift_factor='
                     f'{model.shift_factor}: set config.codec.scale to its scaling_factor (a '
                     'shifted latent space is not supported).')
  return model


# ---- sharding -----------------------------------------------------------------------


def place_on_mesh(model: AutoencoderKL, mesh: jax.sharding.Mesh, rules: Any) -> AutoencoderKL:
  """Puts every parameter on `mesh` as `rules` (config.sharding_rules) map its logical axes."""
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  state = nnx.state(model)
  shardings = parallel.model_shardings(state, mesh, rules)
  pure = nnx.to_pure_dict(state)
  nnx.replace_by_pure_dict(state, jax.device_put(pure, shardings))
  nnx.update(model, state)
  return model


# ---- command line -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m mmgen_jax.models.autoencoder --random --out DIR`: a random VAE directory.

  The SD-VAE architecture (4 blocks: 8× down) with few channels, for trying the
  latent flow without the released weights (`configs/tiny_cpu.py:latent`).
  """
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m mmgen_jax.models.autoencoder',
                                   description=main.__doc__.split('\n')[0])
  parser.add_argument('--random', action='store_true', required=True,
                      help='write a randomly initialised VAE (the only action)')
  parser.add_argument('--out', required=True, help='diffusers directory to write')
  parser.add_argument('--block_out_channels', default='8,8,8,8',
                      help='channels per block; 4 blocks give the SD 8× downsampling')
  parser.add_argument('--layers_per_block', type=int, default=1)
  parser.add_argument('--norm_num_groups', type=int, default=4)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  channels = tuple(int(c) for c in args.block_out_channels.split(','))
  cfg = dataclasses.replace(
      SD_VAE_FT_MSE, block_out_channels=channels, layers_per_block=args.layers_per_block,
      norm_num_groups=args.norm_num_groups, down_block_types=('DownEncoderBlock2D',) * len(channels),
      up_block_types=('UpDecoderBlock2D',) * len(channels))
  save_diffusers_dir(create(cfg, seed=args.seed), args.out)
  print(f'{args.out}: random VAE, blocks {channels}, {cfg.downsample_factor}× down, '
        f'{cfg.latent_channels} latent channels')


if __name__ == '__main__':
  main()
