"""The NNX DINOv2 against transformers' Dinov2Model (tiny random weights, tests/data/
README_dinov2.md): the position table as is, resized up and down; weight names; the
registered REPA encoder."""

import os

from flax import nnx
import numpy as np
import pytest
from safetensors.numpy import load_file

from mmgen_jax import config_schema
from mmgen_jax.data import latent_cache
from mmgen_jax.models import dinov2

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
TINY = os.path.join(DATA, 'dinov2_tiny')


_forward = nnx.jit(lambda m, x: m(x))  # eager op-by-op dispatch is slow on CPU


@pytest.fixture(scope='module')
def model():
  return dinov2.load_transformers_dir(TINY)


@pytest.mark.parametrize('case', ['same', 'up', 'down'])
def test_last_hidden_state_matches_transformers(model, case):
  vectors = load_file(os.path.join(DATA, 'dinov2_tiny_parity.safetensors'))
  pixels = vectors[f'{case}/pixel_values'].transpose(0, 2, 3, 1)  # NCHW -> NHWC
  got = np.asarray(_forward(model, pixels))
  want = vectors[f'{case}/last_hidden_state']
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('antialias', [False, True])
def test_the_position_table_resize_is_pytorchs_bicubic(antialias):
  """transformers' resize (no antialias) and timm's, which MMGen's tokens used (antialias)."""
  vectors = load_file(os.path.join(DATA, 'dinov2_pos_resize.safetensors'))
  for case, (n_in, n_out) in {'down': (37, 16), 'up': (4, 6)}.items():
    m = dinov2.bicubic_matrix(n_in, n_out, antialias)
    got = np.einsum('yi,xj,ijd->yxd', m, m, vectors[f'{case}/table'])
    np.testing.assert_allclose(got, vectors[f'{case}/antialias_{int(antialias)}'], atol=2e-6,
                               err_msg=case)


def test_weights_in_either_naming_and_mismatches_named(model):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(TINY, 'config.json')) as f:
    config = json.load(f)
  hub = load_file(os.path.join(TINY, 'model.safetensors'))
  renamed = {'dinov2.' + k.replace('attention.attention.query', 'attention.q_proj')
             .replace('attention.output.dense', 'attention.o_proj'): v for k, v in hub.items()}
  other = dinov2.from_transformers(renamed, config)
  x = np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(_forward(other, x)), np.asarray(_forward(model, x)))
  del hub['encoder.layer.1.mlp.fc2.bias']
  with pytest.raises(KeyError, match=r"missing \['encoder.layer.1.mlp.fc2.bias'\]"):
    dinov2.from_transformers(hub, config)
  with pytest.raises(NotImplementedError, match='use_swiglu_ffn'):
    dinov2.from_transformers(hub, {**config, 'use_swiglu_ffn': True})


def test_the_registered_repa_encoder_gives_the_patch_tokens(model):
  c = config_schema.base_config()
  c.data.resolution, c.model.patch_size = 32, 4  # pixel space: an 8×8 token grid
  c.data.repa_encoder, c.model.repa_z_dim = 'dinov2', 32
  with pytest.raises(FileNotFoundError, match='repa_encoder_weights'):
    latent_cache.make_repa_encoder(c)
  c.data.repa_encoder_weights = TINY
  encode = latent_cache.make_repa_encoder(c)
  rgb = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  tokens = np.asarray(encode({'rgb': rgb}))
  assert tokens.shape == (2, 64, 32)
  # 32 px = 8 patches of 4: no image resize, so the tokens are those of the model (its
  # 4×4 position table resized as MMGen's was) on the normalised image.
  pixels = ((rgb + 1) / 2 - np.float32(dinov2.IMAGENET_MEAN)) / np.float32(dinov2.IMAGENET_STD)
  mmgen_like = dinov2.load_transformers_dir(TINY, antialias_positions=True)
  np.testing.assert_allclose(tokens, np.asarray(_forward(mmgen_like, pixels))[:, 1:], rtol=1e-5,
                             atol=1e-5)
  assert np.abs(tokens - np.asarray(_forward(model, pixels))[:, 1:]).max() > 1e-3
  assert len(latent_cache.repa_fingerprint(c)) == 64
