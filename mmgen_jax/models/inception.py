"""The FID Inception-v3 of pytorch-fid in Flax NNX (2048-d pool3 features, 1008 logits).

This is the network `pytorch_fid.inception.InceptionV3(use_fid_inception=True)`
loads `pt_inception-2015-12-05-6726825d.pth` into: torchvision's Inception3
trunk with the FID blocks (Mixed_5b-5d, 6b-6e and 7b average-pool their pool
branch without counting the padding; Mixed_7c max-pools it), no aux head, and a
1008-way `fc`. The module tree mirrors the `.pth` key names, so every tensor
maps to one variable: `Mixed_6b.branch7x7_2.conv.weight` is NNX
`Mixed_6b/branch7x7_2/conv/kernel` (OIHW -> HWIO), `...bn.weight/bias/
running_mean/running_var` are `.../bn/scale, bias, mean, var` (the running
statistics are `nnx.BatchStat`s, so parameter counts exclude them), `fc.weight`
is `fc/kernel` transposed.

Usage:

  model = inception.from_pytorch_fid(state_dict)       # .pth names, or the wrapper's `blocks.*`
  model = inception.load_pytorch_fid_pth('pt_inception-2015-12-05-6726825d.pth')  # needs torch
  model = inception.load_safetensors('fid_inception.safetensors')                 # no torch
  feats = model(images)                 # NHWC in [0, 1], any size -> (N, 2048) float32
  feats, logits = model.features_and_logits(images)   # + (N, 1008), needs fc

Calls are compiled (once per input shape and dtype) and may also be traced
inside the caller's own `nnx.jit`.

`python -m mmgen_jax.models.inception --pth X.pth --out Y.safetensors` converts
the `.pth` once (float32, `.pth` key names) so that later runs need no torch.

Preprocessing is pytorch-fid's: bilinear resize to 299x299 (half-pixel
centres, i.e. align_corners=False, and no antialiasing, also when shrinking),
then 2x - 1. BatchNorm is in eval mode with eps 1e-3 and is folded into the
convolution weights at call time.

Logits: `logits(...)` returns `pool3 @ fc.weight.T`, without `fc.bias` by
default: the Inception Score reference implementations (improved-GAN's
`inception_score`, the ADM evaluator) take the softmax of the `softmax/logits/
MatMul` output of the TF graph, i.e. without its bias; torch-fidelity calls
the same quantity `logits_unbiased`. Pass `fc_bias=True` for `fc(pool3)`.

Numerics: convolutions take their operands in the compute `dtype` and
accumulate in float32 at `precision` (HIGHEST by default, which the parity
tolerance of 1e-4 needs on accelerators); the BatchNorm fold, the pools'
divisions and the outputs are float32. float32 is the default; bfloat16 is
for accelerators (on CPU it is not faster) and moves pool3 by ~0.03 on the
parity vectors, whose features reach ~7.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
from typing import Any, Callable, Mapping

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-3       # pytorch-fid's BasicConv2d BatchNorm (Flax's default is 1e-5)
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008   # the TF graph's classes (1000 ImageNet + 8 unused)

# pytorch-fid wrapper (`InceptionV3.blocks`) prefix -> `.pth` prefix.
WRAPPER_PREFIXES = {
    'blocks.0.0': 'Conv2d_1a_3x3', 'blocks.0.1': 'Conv2d_2a_3x3', 'blocks.0.2': 'Conv2d_2b_3x3',
    'blocks.1.0': 'Conv2d_3b_1x1', 'blocks.1.1': 'Conv2d_4a_3x3',
    'blocks.2.0': 'Mixed_5b', 'blocks.2.1': 'Mixed_5c', 'blocks.2.2': 'Mixed_5d',
    'blocks.2.3': 'Mixed_6a', 'blocks.2.4': 'Mixed_6b', 'blocks.2.5': 'Mixed_6c',
    'blocks.2.6': 'Mixed_6d', 'blocks.2.7': 'Mixed_6e',
    'blocks.3.0': 'Mixed_7a', 'blocks.3.1': 'Mixed_7b', 'blocks.3.2': 'Mixed_7c',
}

_PRECISIONS = {'highest': jax.lax.Precision.HIGHEST, 'high': jax.lax.Precision.HIGH,
               'default': jax.lax.Precision.DEFAULT}


# ---- layers -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Compute dtype and precision, shared by every conv (static, not a variable)."""
  dtype: Any
  precision: jax.lax.PrecisionLike


class _Conv(nnx.Module):
  def __init__(self, cin: int, cout: int, kernel: tuple[int, int], rngs: nnx.Rngs):
    fan_in = cin * kernel[0] * kernel[1]
    init = nnx.initializers.normal(math.sqrt(2.0 / fan_in))
    self.kernel = nnx.Param(init(rngs.params(), (*kernel, cin, cout), jnp.float32))


class _BatchNorm(nnx.Module):
  def __init__(self, c: int):
    self.scale = nnx.Param(jnp.ones((c,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((c,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((c,), jnp.float32))


class BasicConv2d(nnx.Module):
  """conv (no bias) -> BatchNorm (eval, eps 1e-3) -> ReLU; the BN is folded into the conv."""

  def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, stride: int = 1,
               padding: int | tuple[int, int] = 0, cfg: _Cfg, rngs: nnx.Rngs):
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    self.conv = _Conv(cin, cout, kernel, rngs)
    self.bn = _BatchNorm(cout)
    self.stride = stride
    self.padding = padding
    self.cfg = cfg

  def __call__(self, x: jax.Array) -> jax.Array:
    bn = self.bn
    mult = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + BN_EPS)
    shift = bn.bias[...] - bn.mean[...] * mult
    w = (self.conv.kernel[...] * mult).astype(self.cfg.dtype)
    (ph, pw) = self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.cfg.dtype), w, (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.cfg.precision,
        preferred_element_type=jnp.float32)
    return jax.nn.relu(y + shift).astype(self.cfg.dtype)


def max_pool(x: jax.Array, *, stride: int, padding: int = 0) -> jax.Array:
  """3x3 max pool (torch MaxPool2d: padding never wins, floor rounding)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 pad-1 average pool with count_include_pad=False (TF 'SAME' pooling)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  win, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, win, strides, pad)
  ones = jnp.ones((1, *x.shape[1:3], 1), jnp.float32)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, win, strides, pad)
  return (total / count).astype(x.dtype)


def _cat(*xs: jax.Array) -> jax.Array:
  return jnp.concatenate(xs, axis=-1)


# ---- blocks (torchvision names; FID variants of the pool branch) --------------


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d: [1x1, 5x5, 3x3dbl, avg-pool(excl. pad) + 1x1]."""

  def __init__(self, cin: int, pool_features: int, *, cfg: _Cfg, rngs: nnx.Rngs):
    c = functools.partial(BasicConv2d, cfg=cfg, rngs=rngs)
    self.branch1x1 = c(cin, 64, 1)
    self.branch5x5_1 = c(cin, 48, 1)
    self.branch5x5_2 = c(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = c(cin, 64, 1)
    self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = c(96, 96, 3, padding=1)
    self.branch_pool = c(cin, pool_features, 1)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return _cat(self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_exclude_pad(x)))


class InceptionB(nnx.Module):
  """Mixed_6a (35 -> 17): [3x3/2, 3x3dbl/2, max-pool 3x3/2]."""

  def __init__(self, cin: int, *, cfg: _Cfg, rngs: nnx.Rngs):
    c = functools.partial(BasicConv2d, cfg=cfg, rngs=rngs)
    self.branch3x3 = c(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = c(cin, 64, 1)
    self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = c(96, 96, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return _cat(self.branch3x3(x), b3, max_pool(x, stride=2))


class InceptionC(nnx.Module):
  """Mixed_6b-6e: [1x1, 7x7 as (1,7)(7,1), 7x7dbl as (7,1)(1,7)(7,1)(1,7), avg-pool + 1x1]."""

  def __init__(self, cin: int, c7: int, *, cfg: _Cfg, rngs: nnx.Rngs):
    c = functools.partial(BasicConv2d, cfg=cfg, rngs=rngs)
    self.branch1x1 = c(cin, 192, 1)
    self.branch7x7_1 = c(cin, c7, 1)
    self.branch7x7_2 = c(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = c(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = c(cin, c7, 1)
    self.branch7x7dbl_2 = c(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = c(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = c(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = c(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = c(cin, 192, 1)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      d = layer(d)
    return _cat(self.branch1x1(x), b7, d, self.branch_pool(avg_pool_exclude_pad(x)))


class InceptionD(nnx.Module):
  """Mixed_7a (17 -> 8): [1x1 + 3x3/2, 1x1 + (1,7)(7,1) + 3x3/2, max-pool 3x3/2]."""

  def __init__(self, cin: int, *, cfg: _Cfg, rngs: nnx.Rngs):
    c = functools.partial(BasicConv2d, cfg=cfg, rngs=rngs)
    self.branch3x3_1 = c(cin, 192, 1)
    self.branch3x3_2 = c(192, 320, 3, stride=2)
    self.branch7x7x3_1 = c(cin, 192, 1)
    self.branch7x7x3_2 = c(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = c(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = c(192, 192, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      b7 = layer(b7)
    return _cat(b3, b7, max_pool(x, stride=2))


class InceptionE(nnx.Module):
  """Mixed_7b (avg pool, excl. pad) / Mixed_7c (max pool):
  [1x1, 3x3_2a (1,3), 3x3_2b (3,1), 3x3dbl_3a (1,3), 3x3dbl_3b (3,1), pool + 1x1]."""

  def __init__(self, cin: int, *, pool: str, cfg: _Cfg, rngs: nnx.Rngs):
    if pool not in ('avg', 'max'):
      raise ValueError(f"InceptionE pool must be 'avg' or 'max'; got {pool!r}.")
    c = functools.partial(BasicConv2d, cfg=cfg, rngs=rngs)
    self.pool = pool
    self.branch1x1 = c(cin, 320, 1)
    self.branch3x3_1 = c(cin, 384, 1)
    self.branch3x3_2a = c(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = c(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = c(cin, 448, 1)
    self.branch3x3dbl_2 = c(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = c(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = c(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = c(cin, 192, 1)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = avg_pool_exclude_pad(x) if self.pool == 'avg' else max_pool(x, stride=1, padding=1)
    return _cat(self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled))


class _Dense(nnx.Module):
  def __init__(self, cin: int, cout: int, rngs: nnx.Rngs):
    init = nnx.initializers.normal(1.0 / math.sqrt(cin))
    self.kernel = nnx.Param(init(rngs.params(), (cin, cout), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))


# ---- the network --------------------------------------------------------------


def resize_and_normalize(images: jax.Array) -> jax.Array:
  """NHWC in [0, 1] -> 299x299 bilinear (half-pixel centres, no antialiasing) -> [-1, 1]."""
  n, h, w, c = images.shape
  x = images.astype(jnp.float32)
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    # antialias=False: torch's F.interpolate does not low-pass when shrinking.
    x = jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, c), 'bilinear', antialias=False)
  return 2.0 * x - 1.0


def _check_images(images: Any) -> jax.Array:
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be NHWC with 3 channels; got shape {images.shape}.')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'images must be floating point in [0, 1]; got dtype {images.dtype} '
                     '(divide uint8 images by 255).')
  return images


class FIDInceptionV3(nnx.Module):
  """pytorch-fid's FID Inception-v3: NHWC images in [0, 1] -> (N, 2048) pool3 features."""

  def __init__(self, *, fc: bool = True, dtype: Any = jnp.float32,
               precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
               rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    precision = _PRECISIONS.get(precision, precision) if isinstance(precision, str) else precision
    cfg = _Cfg(dtype, precision)
    c = functools.partial(BasicConv2d, cfg=cfg, rngs=rngs)
    self.Conv2d_1a_3x3 = c(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = c(32, 32, 3)
    self.Conv2d_2b_3x3 = c(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = c(64, 80, 1)
    self.Conv2d_4a_3x3 = c(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32, cfg=cfg, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, cfg=cfg, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, cfg=cfg, rngs=rngs)
    self.Mixed_6a = InceptionB(288, cfg=cfg, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, cfg=cfg, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, cfg=cfg, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, cfg=cfg, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, cfg=cfg, rngs=rngs)
    self.Mixed_7a = InceptionD(768, cfg=cfg, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, pool='avg', cfg=cfg, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, pool='max', cfg=cfg, rngs=rngs)
    self.fc = _Dense(FEATURE_DIM, NUM_LOGITS, rngs) if fc else None

  def intermediates(self, images: jax.Array) -> dict[str, jax.Array]:
    """The forward pass with the wrapper's block outputs (NHWC), for localising mismatches.

    Keys: 'model_input' (299x299 in [-1, 1]), 'conv2d_1a_3x3', 'block0' (73x73x64),
    'block1' (35x35x192), 'block2' (17x17x768), 'block3' (8x8x2048), 'pool3' (N, 2048).
    """
    return _forward(self, _check_images(images), True)

  def _forward(self, images: jax.Array) -> dict[str, jax.Array]:
    out = {'model_input': resize_and_normalize(images)}
    x = out['conv2d_1a_3x3'] = self.Conv2d_1a_3x3(out['model_input'])
    x = max_pool(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(x)), stride=2)
    out['block0'] = x
    x = out['block1'] = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
      x = block(x)
    out['block2'] = x
    x = out['block3'] = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
    out['pool3'] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return out

  def __call__(self, images: jax.Array) -> jax.Array:
    """NHWC images in [0, 1] (any size) -> (N, 2048) float32 pool3 features."""
    return _forward(self, _check_images(images), False)

  def logits_from_features(self, features: jax.Array, *, fc_bias: bool = False) -> jax.Array:
    """(N, 2048) pool3 -> (N, 1008) logits; see the module docstring for `fc_bias`."""
    if self.fc is None:
      raise ValueError('this model has no fc layer (the state dict held no fc.weight/fc.bias); '
                       'logits need the 1008-way fc of the .pth file.')
    logits = jnp.einsum('nd,dk->nk', features.astype(jnp.float32), self.fc.kernel[...],
                        precision=jax.lax.Precision.HIGHEST)
    return logits + self.fc.bias[...] if fc_bias else logits

  def features_and_logits(self, images: jax.Array, *, fc_bias: bool = False
                          ) -> tuple[jax.Array, jax.Array]:
    feats = self(images)
    return feats, self.logits_from_features(feats, fc_bias=fc_bias)

  def logits(self, images: jax.Array, *, fc_bias: bool = False) -> jax.Array:
    return self.features_and_logits(images, fc_bias=fc_bias)[1]


@functools.partial(nnx.jit, static_argnames=('everything',))
def _forward(model: FIDInceptionV3, images: jax.Array, everything: bool) -> Any:
  # Compiled once per input shape and dtype: op-by-op dispatch of the 94 convolutions
  # would compile each one separately (~30 s on a 2-core CPU before the first result).
  out = model._forward(images)  # pylint: disable=protected-access
  return out if everything else out['pool3']


def count_params(model: nnx.Module) -> int:
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


# ---- state dicts --------------------------------------------------------------


def _torch_key(path: tuple[Any, ...]) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """NNX path -> (`.pth` key, transform from the torch layout)."""
  *module, leaf = map(str, path)
  prefix = '.'.join(module)
  if module[-1] == 'conv':
    return f'{prefix}.weight', lambda w: w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if module[-1] == 'bn':
    name = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
    return f'{prefix}.{name[leaf]}', lambda w: w
  if module == ['fc']:
    return f'fc.{"weight" if leaf == "kernel" else "bias"}', (
        lambda w: w.T if leaf == 'kernel' else w)
  raise AssertionError(f'no torch name for {path}')


def state_dict_shapes(model: FIDInceptionV3) -> dict[str, tuple[int, ...]]:
  """`.pth` key -> torch-layout shape, for every variable of `model` (abstract models too)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    key, _ = _torch_key(path)
    shape = tuple(var.shape)
    out[key] = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (
        shape[::-1] if key == 'fc.weight' else shape)
  return out


def _canonical_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops `num_batches_tracked`; renames the wrapper's `blocks.i.j` prefixes to `.pth` names."""
  out = {}
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      continue  # BatchNorm's training counter, unused in eval
    name = key
    if key.startswith('blocks.'):
      head = '.'.join(key.split('.')[:3])
      if head not in WRAPPER_PREFIXES:
        raise ValueError(f'{key}: unknown pytorch-fid wrapper block {head!r}; expected one of '
                         f'{sorted(WRAPPER_PREFIXES)}.')
      name = WRAPPER_PREFIXES[head] + key[len(head):]
    if name in out:
      raise ValueError(f'{key}: the state dict holds {name} under two names.')
    out[name] = value
  return out


def from_pytorch_fid(state_dict: Mapping[str, Any], *, dtype: Any = jnp.float32,
                     precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST
                     ) -> FIDInceptionV3:
  """Builds the model from a pytorch-fid Inception state dict (numpy/torch arrays, any float dtype).

  Accepts the `.pth` names (`Conv2d_1a_3x3.conv.weight`, ..., optional `fc.weight`
  (1008, 2048) and `fc.bias`) or the pytorch-fid wrapper's (`blocks.0.0.conv.weight`,
  no fc). `num_batches_tracked` entries are ignored. Values are cast to float32.
  Missing or unexpected keys and shape mismatches raise a ValueError naming them all.
  """
  sd = _canonical_names(state_dict)
  has_fc = 'fc.weight' in sd or 'fc.bias' in sd
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: FIDInceptionV3(fc=has_fc, dtype=dtype, precision=precision,
                                                     rngs=nnx.Rngs(0)))
  state = nnx.state(abstract)
  flat = dict(nnx.to_flat_state(state))
  expected = state_dict_shapes(abstract)
  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(set(sd) - set(expected))
  bad = sorted(f'{k}: got {tuple(np.shape(sd[k]))}, expected {expected[k]}'
               for k in set(sd) & set(expected) if tuple(np.shape(sd[k])) != expected[k])
  if missing or unexpected or bad:
    raise ValueError(
        'state dict does not match the pytorch-fid Inception-v3: '
        f'{len(missing)} missing keys {_short(missing)}, {len(unexpected)} unexpected keys '
        f'{_short(unexpected)}, {len(bad)} shape mismatches {_short(bad)}.')
  for path, var in flat.items():
    key, transform = _torch_key(path)
    flat[path] = var.replace(jnp.asarray(transform(_to_numpy(sd[key]).astype(np.float32))))
  nnx.update(abstract, nnx.from_flat_state(flat))
  return abstract


def _short(items: list[str], limit: int = 12) -> str:
  return str(items if len(items) <= limit else items[:limit] + [f'... {len(items) - limit} more'])


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor (bfloat16 has no numpy dtype)
    value = value.detach().cpu().float().numpy()
  return np.asarray(value)


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a pytorch-fid `.pth` (a plain state dict) as float32 numpy arrays."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading {path} needs PyTorch: pip install "mmgen_jax[torch]" (or torch). '
                      'Alternatively convert it once where torch is installed: python -m '
                      'mmgen_jax.models.inception --pth X.pth --out X.safetensors, then use '
                      'load_safetensors.') from e
  sd = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(sd, Mapping):
    raise ValueError(f'{path}: expected a state dict (a mapping of tensors); got {type(sd)}.')
  if 'state_dict' in sd and isinstance(sd['state_dict'], Mapping):
    sd = sd['state_dict']
  return {k: _to_numpy(v).astype(np.float32) for k, v in sd.items()
          if not k.endswith('num_batches_tracked')}


def load_pytorch_fid_pth(path: str | os.PathLike, **kwargs) -> FIDInceptionV3:
  """Model from `pt_inception-2015-12-05-6726825d.pth` (needs torch); kwargs: dtype, precision."""
  return from_pytorch_fid(read_pth(path), **kwargs)


def load_safetensors(path: str | os.PathLike, *, prefix: str = '', **kwargs) -> FIDInceptionV3:
  """Model from a safetensors file with `.pth` key names (keys starting with `prefix`, stripped)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(os.fspath(path))
  sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  if not sd:
    raise ValueError(f'{path}: no tensors whose key starts with {prefix!r}.')
  return from_pytorch_fid(sd, **kwargs)


def to_pytorch_fid(model: FIDInceptionV3) -> dict[str, np.ndarray]:
  """The inverse of `from_pytorch_fid`: `.pth` key names, torch layouts, float32."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    key, _ = _torch_key(path)
    w = np.asarray(var.get_value(), np.float32)
    out[key] = w.transpose(3, 2, 0, 1) if w.ndim == 4 else (w.T if key == 'fc.weight' else w)
  return out


def convert_pth(pth: str | os.PathLike, out: str | os.PathLike) -> int:
  """`.pth` -> safetensors (float32, `.pth` key names), validated by building the model first."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  sd = read_pth(pth)
  model = from_pytorch_fid(sd)
  save_file({k: np.ascontiguousarray(v) for k, v in to_pytorch_fid(model).items()}, os.fspath(out))
  return count_params(model)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pth', required=True, help='pytorch-fid weights, e.g. '
                      'pt_inception-2015-12-05-6726825d.pth')
  parser.add_argument('--out', required=True, help='output .safetensors (`.pth` key names)')
  args = parser.parse_args(argv)
  n = convert_pth(args.pth, args.out)
  print(f'wrote {args.out} ({n:,} parameters)')


if __name__ == '__main__':
  main()
