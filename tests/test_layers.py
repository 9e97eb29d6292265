"""Numerics of the layers: matmuls in the compute dtype both ways, and the hand-written
derivative rules against plain autodiff."""

from flax import nnx
import jax
from jax.ad_checkpoint import print_saved_residuals
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen_jax.models import layers

F32, BF16 = layers.Numerics(), layers.Numerics(dtype=jnp.bfloat16)

EQUATIONS = [  # every matmul the model makes
    ('...i,io->...o', (2, 5, 8), (8, 3)),
    ('btd,dshk->btshk', (2, 5, 8), (8, 3, 2, 4)),
    ('bhqk,bhtk->bhqt', (2, 3, 5, 4), (2, 3, 6, 4)),
    ('bhqt,bhtk->bhqk', (2, 3, 5, 6), (2, 3, 6, 4)),
    ('bhqk,hkd->bqd', (2, 3, 5, 4), (3, 4, 7)),
]


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _matmul_grads(equation, x, w, numerics):
  loss = lambda x, w: jnp.sum(jnp.sin(layers.matmul(equation, x, w, numerics)))
  return jax.grad(loss, argnums=(0, 1))(x, w)


def _dots(jaxpr):
  """Every dot_general in a jaxpr, nested ones (custom rules, scans) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      yield eqn
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from _dots(sub)


@pytest.mark.parametrize('equation,x_shape,w_shape', EQUATIONS, ids=[e[0] for e in EQUATIONS])
def test_bf16_matmul_gradients_track_f32(equation, x_shape, w_shape):
  x, w = _normal(0, x_shape), _normal(1, w_shape)
  for ref, got in zip(_matmul_grads(equation, x, w, F32), _matmul_grads(equation, x, w, BF16),
                      strict=True):
    assert got.dtype == jnp.float32 and got.shape == ref.shape
    assert float(jnp.abs(got - ref).max()) <= 0.03 * float(jnp.abs(ref).max())


def test_float32_matmul_is_a_plain_einsum():
  x, w = _normal(0, (2, 5, 8)), _normal(1, (8, 3))
  np.testing.assert_array_equal(layers.matmul('...i,io->...o', x, w, F32),
                                jnp.einsum('...i,io->...o', x, w))


def test_bf16_training_multiplies_bf16_operands_into_float32():
  """Forward and backward: every matmul of a block's gradient takes 16-bit operands and
  accumulates in float32 (plain autodiff would multiply the float32 cotangent in float32)."""
  with nnx.use_eager_sharding(False):
    attn = layers.Attention(16, 2, numerics=BF16, rngs=nnx.Rngs(0))
    mlp = layers.Mlp(16, 32, numerics=BF16, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split((attn, mlp))

  def loss(params, x):
    attn, mlp = nnx.merge(graphdef, params)
    return jnp.sum(mlp(attn(x)) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params, _normal(2, (2, 6, 16))).jaxpr
  dots = list(_dots(jaxpr))
  assert len(dots) >= 3 * 6  # six matmuls forward, two for each backward
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
    assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


def _autodiff_layer_norm(x, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize('fn,reference', [
    (layers.layer_norm, _autodiff_layer_norm),
    (layers.gelu_tanh, lambda x: jax.nn.gelu(x, approximate=True)),
    (layers.softmax, lambda x: jax.nn.softmax(x, axis=-1)),
], ids=['layer_norm', 'gelu_tanh', 'softmax'])
def test_derivative_rules_match_autodiff(fn, reference):
  x = 3 * _normal(0, (4, 24)) + 1.5  # an offset mean, as the residual stream has
  np.testing.assert_allclose(fn(x), reference(x), rtol=1e-5, atol=1e-6)
  cotangent = _normal(1, x.shape)
  grad = lambda f: jax.vjp(f, x)[1](cotangent)[0]
  np.testing.assert_allclose(grad(fn), grad(reference), rtol=1e-4, atol=1e-5)
  tangent = _normal(2, x.shape)
  np.testing.assert_allclose(jax.jvp(fn, (x,), (tangent,))[1],
                             jax.jvp(reference, (x,), (tangent,))[1], rtol=1e-4, atol=1e-5)


def test_mlp_backward_keeps_two_arrays_of_its_width(capsys):
  """GELU's rule keeps its slope (and fc2 its input); autodiff of the formula keeps six."""
  with nnx.use_eager_sharding(False):
    mlp = layers.Mlp(8, 32, numerics=F32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mlp)
  x = _normal(0, (2, 5, 8))
  print_saved_residuals(lambda p: nnx.merge(graphdef, p)(x).sum(), params)
  wide = [line for line in capsys.readouterr().out.splitlines() if line.startswith('f32[2,5,32]')]
  assert len(wide) == 2, wide
