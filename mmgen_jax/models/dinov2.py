"""DINOv2 (ViT with layer scale) in Flax NNX, read from a local transformers directory.

The network of transformers' `Dinov2Model` (facebook/dinov2-{small,base,large}):
a patch-embedding convolution, a class token, learned position embeddings
(bicubically resized to the input's patch grid), pre-norm blocks with layer
scale (`x + λ1·attn(norm1(x))`, `x + λ2·mlp(norm2(x))`, exact-erf GELU) and a
final LayerNorm. `__call__` returns `last_hidden_state` (B, 1 + T, D); its
tokens after the first are DINOv2's normalised patch tokens
(`x_norm_patchtokens`), the REPA target MMGen's data/preprocess_dino.py stores.

  model = dinov2.load_transformers_dir('dinov2-base/')   # config.json + model.safetensors
  tokens = model(pixels)[:, 1:]                           # NHWC, ImageNet-normalised

Weights: the Hub layout (`encoder.layer.N.attention.attention.query.weight`, ...)
or the one transformers 5 uses in memory (`...attention.q_proj.weight`), with or
without a `dinov2.` prefix; every tensor is used once and a missing or unused
key is named. The SwiGLU blocks of dinov2-giant are not supported (refused).

Position embeddings: when the patch grid differs from the table's, the table is
resized as transformers does (PyTorch `interpolate(mode='bicubic',
align_corners=False)`, no antialiasing: cubic convolution with a = −0.75,
half-pixel centres, edges repeated), in float32; or, with
`antialias_positions=True`, as MMGen's data/preprocess_dino.py resized the
torch.hub model's 37×37 table to 16×16 (timm's `resample_abs_pos_embed`: PyTorch
bicubic with antialias, a = −0.5, the kernel widened by the shrink factor and
its weights renormalised at the edges).

As a REPA encoder (`config.data.repa_encoder='dinov2'`, weights in
`config.data.repa_encoder_weights`; data/latent_cache.py): images in [-1, 1] at
the data resolution are resized (bicubic, antialiased) to patch_size × the
model's token grid (224 px for 16×16 tokens of patch 14; MMGen centre-crops the
original image to 224 px instead), ImageNet-normalised, and their patch tokens
returned (B, T, hidden_size); the position table is resized as MMGen's was
(`antialias_positions=True`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
WEIGHTS_INDEX_NAME = 'model.safetensors.index.json'
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BICUBIC_A = -0.75  # PyTorch's cubic convolution coefficient without antialiasing
_BICUBIC_A_ANTIALIAS = -0.5  # ... and with it (as PIL)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """The transformers `Dinov2Config` fields the network depends on."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 14
  image_size: int = 518
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> 'Dinov2Config':
    """From a transformers config.json dict; refuses what this port does not implement."""
    if config.get('use_swiglu_ffn'):
      raise NotImplementedError('use_swiglu_ffn=True (dinov2-giant\'s SwiGLU blocks) is not '
                                'implemented; use dinov2-small/base/large.')
    if config.get('hidden_act', 'gelu') != 'gelu':
      raise NotImplementedError(f'hidden_act={config["hidden_act"]!r}; only exact GELU '
                                "('gelu') is implemented.")
    if config.get('model_type', 'dinov2') != 'dinov2':
      raise ValueError(f'model_type={config["model_type"]!r}; expected a dinov2 config.')
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel."""
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def bicubic_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
  """(n_out, n_in) weights of PyTorch's 1-d bicubic resize (align_corners=False).

  antialias=False: a = -0.75 on the 4 nearest samples, edges repeated.
  antialias=True: a = -0.5, the kernel's support widened by the shrink factor n_in / n_out
  when shrinking, the weights of the samples inside the input normalised to sum 1.
  """
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    if antialias:
      width = max(scale, 1.0)
      centre = (i + 0.5) * scale
      lo = max(int(centre - 2.0 * width + 0.5), 0)
      hi = min(int(centre + 2.0 * width + 0.5), n_in)
      w = _cubic((np.arange(lo, hi) - centre + 0.5) / width, _BICUBIC_A_ANTIALIAS)
      m[i, lo:hi] = w / w.sum()
    else:
      src = (i + 0.5) * scale - 0.5
      x0 = int(np.floor(src))
      for k in range(x0 - 1, x0 + 3):
        m[i, min(max(k, 0), n_in - 1)] += _cubic(np.float64(src - k), _BICUBIC_A)
  return m


class _Linear(nnx.Module):
  def __init__(self, cin: int, cout: int, *, bias: bool = True, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (cin, cout)))
    self.bias = nnx.Param(jnp.zeros((cout,))) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum('...i,io->...o', x, self.kernel[...], precision=jax.lax.Precision.HIGHEST)
    return y if self.bias is None else y + self.bias[...]


class _LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.scale, self.bias, self.eps = nnx.Param(jnp.ones((dim,))), nnx.Param(jnp.zeros((dim,))), eps

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class Block(nnx.Module):
  """Pre-norm attention and MLP, each scaled per channel (layer scale) before the residual."""

  def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
    d, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    self.heads = cfg.num_attention_heads
    self.norm1 = _LayerNorm(d, cfg.layer_norm_eps)
    self.query = _Linear(d, d, bias=cfg.qkv_bias, rngs=rngs)
    self.key = _Linear(d, d, bias=cfg.qkv_bias, rngs=rngs)
    self.value = _Linear(d, d, bias=cfg.qkv_bias, rngs=rngs)
    self.out = _Linear(d, d, rngs=rngs)
    self.layer_scale1 = nnx.Param(jnp.ones((d,)))
    self.norm2 = _LayerNorm(d, cfg.layer_norm_eps)
    self.fc1 = _Linear(d, hidden, rngs=rngs)
    self.fc2 = _Linear(hidden, d, rngs=rngs)
    self.layer_scale2 = nnx.Param(jnp.ones((d,)))

  def attention(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    split = lambda t: t.reshape(b, n, self.heads, d // self.heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, k, precision=jax.lax.Precision.HIGHEST)
    weights = jax.nn.softmax(logits * (d // self.heads) ** -0.5, axis=-1)
    y = jnp.einsum('bhqk,bkhc->bqhc', weights, v, precision=jax.lax.Precision.HIGHEST)
    return self.out(y.reshape(b, n, d))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.layer_scale1[...] * self.attention(self.norm1(x))
    h = self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))
    return x + self.layer_scale2[...] * h


class Dinov2(nnx.Module):
  """NHWC ImageNet-normalised pixels -> last_hidden_state (B, 1 + T, hidden_size)."""

  def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs | None = None, *,
               antialias_positions: bool = False):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    d, p = cfg.hidden_size, cfg.patch_size
    self.cfg = cfg
    self.antialias_positions = antialias_positions  # module docstring
    self.grid = cfg.image_size // p  # the position table's side
    self.patch_kernel = nnx.Param(
        nnx.initializers.lecun_normal()(rngs.params(), (p, p, cfg.num_channels, d)))
    self.patch_bias = nnx.Param(jnp.zeros((d,)))
    self.cls_token = nnx.Param(jnp.zeros((1, 1, d)))
    self.position_embeddings = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, self.grid ** 2 + 1, d)))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
    self.layernorm = _LayerNorm(d, cfg.layer_norm_eps)

  def position_table(self, gh: int, gw: int) -> jax.Array:
    """(1, 1 + gh·gw, D): the table, resized to a gh × gw patch grid as transformers does."""
    table = self.position_embeddings[...]
    if gh == gw == self.grid:
      return table
    patches = table[0, 1:].reshape(self.grid, self.grid, -1).astype(jnp.float32)
    mh = jnp.asarray(bicubic_matrix(self.grid, gh, self.antialias_positions), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(self.grid, gw, self.antialias_positions), jnp.float32)
    resized = jnp.einsum('yi,xj,ijd->yxd', mh, mw, patches, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([table[:, :1], resized.reshape(1, gh * gw, -1).astype(table.dtype)], 1)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    b, h, w, c = pixels.shape
    p = self.cfg.patch_size
    if c != self.cfg.num_channels or h % p or w % p:
      raise ValueError(f'pixels of shape {pixels.shape}: expected NHWC with {self.cfg.num_channels}'
                       f' channels and sides that are multiples of the patch size {p}.')
    x = jax.lax.conv_general_dilated(
        pixels.astype(jnp.float32), self.patch_kernel[...], (p, p), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
    x = (x + self.patch_bias[...]).reshape(b, (h // p) * (w // p), -1)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_table(h // p, w // p)
    for block in self.blocks:
      x = block(x)
    return self.layernorm(x)


# ---- weights --------------------------------------------------------------------------------

# transformers 5's in-memory names -> the Hub's (read either).
_RENAMES = (('.attention.q_proj.', '.attention.attention.query.'),
            ('.attention.k_proj.', '.attention.attention.key.'),
            ('.attention.v_proj.', '.attention.attention.value.'),
            ('.attention.o_proj.', '.attention.output.dense.'))
_UNUSED = ('embeddings.mask_token',)  # masked-image pre-training only


def _hub_names(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in state_dict.items():
    k = k[len('dinov2.'):] if k.startswith('dinov2.') else k
    for new, old in _RENAMES:
      k = k.replace(new, old)
    out[k] = np.asarray(v, np.float32)
  return out


def _targets(model: Dinov2) -> dict[str, tuple[nnx.Param, Any]]:
  """Hub key -> (variable, torch array -> this layout)."""
  linear_t = lambda w: w.T
  out = {'embeddings.cls_token': (model.cls_token, None),
         'embeddings.position_embeddings': (model.position_embeddings, None),
         'embeddings.patch_embeddings.projection.weight':
             (model.patch_kernel, lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
         'embeddings.patch_embeddings.projection.bias': (model.patch_bias, None),
         'layernorm.weight': (model.layernorm.scale, None),
         'layernorm.bias': (model.layernorm.bias, None)}
  for i, blk in enumerate(model.blocks):
    pre = f'encoder.layer.{i}.'
    for name, lin in (('attention.attention.query', blk.query), ('attention.attention.key', blk.key),
                      ('attention.attention.value', blk.value),
                      ('attention.output.dense', blk.out), ('mlp.fc1', blk.fc1),
                      ('mlp.fc2', blk.fc2)):
      out[f'{pre}{name}.weight'] = (lin.kernel, linear_t)
      if lin.bias is not None:
        out[f'{pre}{name}.bias'] = (lin.bias, None)
    for name, norm in (('norm1', blk.norm1), ('norm2', blk.norm2)):
      out[f'{pre}{name}.weight'] = (norm.scale, None)
      out[f'{pre}{name}.bias'] = (norm.bias, None)
    out[f'{pre}layer_scale1.lambda1'] = (blk.layer_scale1, None)
    out[f'{pre}layer_scale2.lambda1'] = (blk.layer_scale2, None)
  return out


def from_transformers(state_dict: Mapping[str, Any], config: Mapping[str, Any], *,
                      antialias_positions: bool = False) -> Dinov2:
  """A transformers Dinov2Model state dict (numpy values) and config dict -> Dinov2."""
  cfg = Dinov2Config.from_transformers(config)
  # Shapes only: every value is read below.
  model = nnx.eval_shape(lambda: Dinov2(cfg, antialias_positions=antialias_positions))
  weights = _hub_names(state_dict)
  targets = _targets(model)
  missing = sorted(set(targets) - set(weights))
  unused = sorted(set(weights) - set(targets) - set(_UNUSED))
  if missing or unused:
    raise KeyError(f'DINOv2 weights do not match the config: missing {missing[:8]}'
                   f'{" ..." if len(missing) > 8 else ""}, unused {unused[:8]}'
                   f'{" ..." if len(unused) > 8 else ""}.')
  for key, (var, convert) in targets.items():
    w = weights[key] if convert is None else convert(weights[key])
    if w.shape != var.value.shape:
      raise ValueError(f'DINOv2 weight {key}: shape {weights[key].shape} gives {w.shape}; the '
                       f'config needs {var.value.shape}.')
    var.value = jnp.asarray(w)
  return model


def load_transformers_dir(path: str | os.PathLike, *, antialias_positions: bool = False
                          ) -> Dinov2:
  """Reads a local transformers Dinov2Model directory (config.json + safetensors, no torch)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f'{config_file} is missing: expected a transformers Dinov2Model '
                            f'directory ({CONFIG_NAME} + {WEIGHTS_NAME}), e.g. facebook/dinov2-base.')
  with open(config_file) as f:
    config = json.load(f)
  single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_INDEX_NAME)
  if os.path.isfile(single):
    weights = load_file(single)
  elif os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
    weights = {}
    for name in files:
      weights.update(load_file(os.path.join(path, name)))
  else:
    raise FileNotFoundError(f'{path} holds no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}); '
                            'save the model with safe_serialization=True.')
  return from_transformers(weights, config, antialias_positions=antialias_positions)


# ---- the REPA encoder ------------------------------------------------------------------------


def repa_encoder(model: Dinov2, token_grid: int):
  """images {'rgb'-like first image: (B, H, W, 3) in [-1, 1]} -> (B, token_grid², D) tokens."""
  side = token_grid * model.cfg.patch_size
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, x):
    x = (x.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[1:3] != (side, side):
      x = jax.image.resize(x, (x.shape[0], side, side, x.shape[3]), 'cubic', antialias=True)
    return nnx.merge(graphdef, state)((x - mean) / std)[:, 1:]

  return lambda x: encode(state, x)
