"""Building blocks of the diffusion transformer: pure functions and small layers.

Every parameter carries logical axis names (`out_sharding` metadata on its
`nnx.Param`); `config.sharding_rules` maps them to mesh axes. The
names used here: 'embed' (model width), 'mlp' (hidden widths), 'heads', 'kv'
(head dim), 'vocab' (table rows / class logits), 'patch_in' (p·p·C patch
values), 'freq' (sinusoid features); None means replicated.

Numerics: parameters are stored in `param_dtype`; every matmul (`matmul`)
takes its operands in the compute `dtype`, accumulates in float32 and returns
float32, in the backward pass too. Everything between matmuls (LayerNorm,
adaLN modulation, softmax, GELU, the residual stream) is float32 and fuses into
the neighbouring casts; the few elementwise functions whose autodiff would keep
several intermediates per token (layer_norm, gelu_tanh, softmax) carry their own
derivative rules so that the backward pass keeps one or two arrays instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]
xavier_uniform = nnx.initializers.xavier_uniform
zeros = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class Numerics:
  """Compute dtype, parameter dtype and matmul precision, shared by every layer."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: jax.lax.PrecisionLike = None


# ---- matmuls ------------------------------------------------------------------


def matmul(equation: str, x: jax.Array, w: jax.Array, numerics: Numerics) -> jax.Array:
  """`jnp.einsum(equation, x, w)` in the compute dtype, accumulated and returned in float32.

  In float32 it is a plain einsum at `numerics.precision`. In a 16-bit dtype the
  operands are cast and the product accumulates in float32
  (preferred_element_type); the backward matmuls take 16-bit operands as well
  (the incoming float32 cotangent is cast first), where plain autodiff would
  multiply the float32 cotangent by the 16-bit operand in float32.
  """
  dt = numerics.dtype
  if jnp.dtype(dt) == jnp.float32:
    return jnp.einsum(equation, x.astype(dt), w.astype(dt), precision=numerics.precision,
                      preferred_element_type=jnp.float32)
  return _low_precision_einsum(equation, x.astype(dt), w.astype(dt))


def _f32_einsum(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
  return _f32_einsum(equation, x, w)


def _low_precision_einsum_fwd(equation, x, w):
  return _f32_einsum(equation, x, w), (x, w)


def _low_precision_einsum_bwd(equation, residuals, g):
  # Each index of an operand appears in the other operand or in the result (true
  # of every equation here), so each gradient is one einsum of the other two.
  x, w = residuals
  operands, out = equation.split('->')
  lhs, rhs = operands.split(',')
  g = g.astype(x.dtype)
  dx = _f32_einsum(f'{out},{rhs}->{lhs}', g, w)
  dw = _f32_einsum(f'{lhs},{out}->{rhs}', x, g)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


# ---- pure functions -----------------------------------------------------------


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN: x·(1 + scale) + shift, with shift/scale broadcast over tokens."""
  return x * (1 + scale) + shift


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters over the last axis; float32 in and out.

  One pass over x (mean and mean square together, as flax's LayerNorm does);
  the backward pass keeps only the result and 1/σ.
  """
  return _normalise(x, eps)[0]


def _normalise(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.maximum(jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
  inv_std = jax.lax.rsqrt(var + eps)
  return (x - mean) * inv_std, inv_std


@layer_norm.defjvp
def _layer_norm_jvp(eps, primals, tangents):
  (x,), (dx,) = primals, tangents
  y, inv_std = _normalise(x, eps)
  dx = dx.astype(jnp.float32)
  dx = dx - dx.mean(-1, keepdims=True)
  return y, inv_std * (dx - y * (y * dx).mean(-1, keepdims=True))


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_jvp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU, tanh approximation (timm's GELU(approximate='tanh')).

  The backward pass keeps the derivative alone (autodiff of the formula would
  keep five arrays of the MLP's width).
  """
  return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  t = jnp.tanh(_GELU_C * (x + 0.044715 * x ** 3))
  slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)
  return gelu_tanh(x), slope * dx


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
  """Softmax over the last axis; the backward pass keeps only the result."""
  unnormalised = jnp.exp(x - jax.lax.stop_gradient(x.max(-1, keepdims=True)))
  return unnormalised / unnormalised.sum(-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = softmax(x)
  return y, y * (dx - (y * dx).sum(-1, keepdims=True))


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features [cos(t·f_k), sin(t·f_k)], f_k = max_period^(-k/(dim/2)).

  t is in [0, 1] (any shape); the result has shape t.shape + (dim,), float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
  return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sin-cos table (grid_h·grid_w, dim), float32, as in MAE/DiT/SiT.

  Token index is row·grid_w + col. The first dim/2 features encode the column,
  the last dim/2 the row; each half is [sin | cos] with ω_k = 10000^(−k/(dim/4)).
  Computed in float64 like the reference, then rounded once.
  """
  if dim % 4:
    raise ValueError(f'2-D sin-cos position embedding needs hidden_size % 4 == 0, got {dim}.')
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
  emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  return emb.astype(np.float32)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """(N, H, W, C) -> (N, H/p·W/p, p·p·C); tokens row-major, features (p_row, p_col, C)."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, grid_h: int, grid_w: int) -> jax.Array:
  """(N, T, p·p·C) -> (N, grid_h·p, grid_w·p, C); inverse of `patchify`."""
  n, _, d = x.shape
  c = d // (p * p)
  x = x.reshape(n, grid_h, grid_w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, grid_h * p, grid_w * p, c)


# ---- layers -------------------------------------------------------------------


class Dense(nnx.Module):
  """y = x·kernel + bias over the last axis through `matmul`; float32 out.

  Parameters are laid out like `nnx.Linear`'s (kernel (in, out), bias (out,)),
  and the bias is added in float32.
  """

  def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None],
               *, kernel_init: Initializer, numerics: Numerics, rngs: nnx.Rngs):
    pd = numerics.param_dtype
    self.numerics = numerics
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), pd),
                            out_sharding=axes)
    self.bias = nnx.Param(zeros(rngs.params(), (out_features,), pd), out_sharding=(axes[1],))

  def __call__(self, x: jax.Array) -> jax.Array:
    return matmul('...i,io->...o', x, self.kernel[...], self.numerics) + self.bias[...]


def dense(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
          numerics: Numerics, rngs: nnx.Rngs, kernel_init: Initializer | None = None,
          zero_init: bool = False) -> Dense:
  """A `Dense` layer with logical axis names on kernel (in, out) and bias (out,).

  Default init is xavier-uniform kernel and zero bias (DiT's `_basic_init`);
  `zero_init` zeroes both (adaLN-Zero and output layers).
  """
  if zero_init:
    kernel_init = zeros
  return Dense(in_features, out_features, axes, kernel_init=kernel_init or xavier_uniform(),
               numerics=numerics, rngs=rngs)


def attention_implementation(dtype: Any) -> str | None:
  """cuDNN's fused attention on GPU in 16-bit dtypes; None: this module's einsums."""
  if jax.default_backend() == 'gpu' and jnp.dtype(dtype).itemsize == 2:
    return 'cudnn'
  return None


class Attention(nnx.Module):
  """Multi-head self-attention with qkv bias and optional q/k LayerNorm.

  The qkv kernel is (embed, 3, heads, head_dim) and the output kernel
  (heads, head_dim, embed), so tensor parallelism shards whole heads. Scores
  and their mix are batched over (batch, heads) with both operands in
  (batch, heads, tokens, head_dim) layout, the layout dot products take
  without transposing; on GPU in 16-bit dtypes jax.nn.dot_product_attention
  runs cuDNN's fused kernel instead.
  """

  def __init__(self, hidden_size: int, num_heads: int, *, qk_norm: bool = False,
               numerics: Numerics, rngs: nnx.Rngs):
    if hidden_size % num_heads:
      raise ValueError(f'hidden_size={hidden_size} is not divisible by num_heads={num_heads}.')
    self.num_heads = num_heads
    self.head_dim = hd = hidden_size // num_heads
    self.numerics = numerics
    pd = numerics.param_dtype
    qkv_init = xavier_uniform(in_axis=0, out_axis=(1, 2, 3))
    self.qkv_kernel = nnx.Param(qkv_init(rngs.params(), (hidden_size, 3, num_heads, hd), pd),
                                out_sharding=('embed', None, 'heads', 'kv'))
    self.qkv_bias = nnx.Param(jnp.zeros((3, num_heads, hd), pd),
                              out_sharding=(None, 'heads', 'kv'))
    proj_init = xavier_uniform(in_axis=(0, 1), out_axis=2)
    self.proj_kernel = nnx.Param(proj_init(rngs.params(), (num_heads, hd, hidden_size), pd),
                                 out_sharding=('heads', 'kv', 'embed'))
    self.proj_bias = nnx.Param(jnp.zeros((hidden_size,), pd), out_sharding=('embed',))
    self.qk_norm = qk_norm
    if qk_norm:  # timm's q_norm/k_norm: LayerNorm(head_dim) with affine, eps 1e-5
      self.q_norm = _head_norm(hd, numerics, rngs)
      self.k_norm = _head_norm(hd, numerics, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    num = self.numerics
    qkv = matmul('btd,dshk->btshk', x, self.qkv_kernel[...], num) + self.qkv_bias[...]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (batch, tokens, heads, head_dim)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    implementation = attention_implementation(num.dtype)
    if implementation:
      dt = num.dtype
      out = jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), v.astype(dt),
                                         implementation=implementation)
      out_layout = 'bqhk'
    else:
      q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (batch, heads, tokens, hd)
      logits = matmul('bhqk,bhtk->bhqt', q, k, num) * self.head_dim ** -0.5
      out = matmul('bhqt,bhtk->bhqk', softmax(logits), v, num)
      out_layout = 'bhqk'
    out = matmul(f'{out_layout},hkd->bqd', out, self.proj_kernel[...], num)
    return out + self.proj_bias[...]


def _head_norm(head_dim: int, numerics: Numerics, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      head_dim, epsilon=1e-5, dtype=jnp.float32, param_dtype=numerics.param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ('kv',)),
      bias_init=nnx.with_partitioning(zeros, ('kv',)), rngs=rngs)


class Mlp(nnx.Module):
  """Transformer MLP: Linear -> GELU (tanh approximation) -> Linear."""

  def __init__(self, hidden_size: int, mlp_dim: int, *, numerics: Numerics, rngs: nnx.Rngs):
    self.fc1 = dense(hidden_size, mlp_dim, ('embed', 'mlp'), numerics=numerics, rngs=rngs)
    self.fc2 = dense(mlp_dim, hidden_size, ('mlp', 'embed'), numerics=numerics, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu_tanh(self.fc1(x)))


class PatchEmbed(nnx.Module):
  """Non-overlapping p×p patches -> tokens (N, T, D).

  Equivalent to a Conv with kernel = stride = p; stored as a (p·p·C, D) matrix
  over `patchify` features, initialised like a Linear layer (as in DiT).
  """

  def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *,
               numerics: Numerics, rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.proj = dense(patch_size * patch_size * in_channels, hidden_size, ('patch_in', 'embed'),
                      numerics=numerics, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(patchify(x, self.patch_size))


class MlpProjector(nnx.Module):
  """REPA projector: Linear -> SiLU -> Linear -> SiLU -> Linear, applied per token."""

  def __init__(self, hidden_size: int, projector_dim: int, z_dim: int, *,
               numerics: Numerics, rngs: nnx.Rngs):
    self.fc1 = dense(hidden_size, projector_dim, ('embed', 'mlp'), numerics=numerics, rngs=rngs)
    self.fc2 = dense(projector_dim, projector_dim, ('mlp', 'embed'), numerics=numerics, rngs=rngs)
    self.fc3 = dense(projector_dim, z_dim, ('embed', None), numerics=numerics, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc3(nnx.silu(self.fc2(nnx.silu(self.fc1(x)))))


def segment_mean(x: jax.Array, sizes: Sequence[int], axis: int) -> jax.Array:
  """Means over consecutive segments of `axis` with the given sizes (kept as that axis)."""
  bounds = np.cumsum(sizes)[:-1].tolist()
  parts = jnp.split(x, bounds, axis=axis)
  return jnp.concatenate([p.mean(axis, keepdims=True) for p in parts], axis=axis)
