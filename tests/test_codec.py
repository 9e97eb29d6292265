"""The codec: latent draws from posterior moments, 1-channel maps, and latent training end to end."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen_jax import codec as codec_lib
from mmgen_jax import modalities as modalities_lib

# A VAE with the SD architecture's four blocks (8× down) but a few channels each.
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 8, 8],
                layers_per_block=1, norm_num_groups=4, act_fn='silu', sample_size=32,
                scaling_factor=0.18215,
                down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4)


def test_a_latent_draw_is_mean_plus_std_times_noise_then_scaled():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
  logvar = rng.uniform(-3, 1, size=(2, 4, 4, 4)).astype(np.float32)
  key = jax.random.key(7)
  z = codec_lib.draw_latent(np.concatenate([mean, logvar], -1), key, 0.18215)
  eps = np.asarray(jax.random.normal(key, mean.shape))
  np.testing.assert_allclose(z, (mean + np.exp(logvar / 2) * eps) * 0.18215, rtol=1e-6, atol=1e-6)


def test_draws_replace_the_moments_with_latents_under_the_modality_name():
  batch = {'rgb_moments': jnp.zeros((2, 4, 4, 8)), 'depth_moments': jnp.zeros((2, 4, 4, 8)),
           'label': jnp.zeros((2,), jnp.int32)}
  out = codec_lib.draw_latents(batch, ('rgb', 'depth'), jax.random.key(0), 0.5)
  assert sorted(out) == ['depth', 'label', 'rgb']
  assert out['rgb'].shape == (2, 4, 4, 4)
  assert not np.allclose(out['rgb'], out['depth'])  # each modality its own noise
  with pytest.raises(KeyError, match="needs batch field 'normal_moments'"):
    codec_lib.draw_latents(batch, ('rgb', 'normal'), jax.random.key(0), 0.5)


def test_one_channel_maps_are_replicated_in_and_averaged_out():
  depth = jnp.arange(6.0).reshape(1, 1, 6, 1)
  three = codec_lib.to_vae_input(depth, 3)
  assert three.shape == (1, 1, 6, 3) and np.all(three == depth)
  decoded = jnp.concatenate([depth, depth + 3.0, depth - 3.0], -1)
  np.testing.assert_allclose(codec_lib.from_vae_output(decoded, 1), depth)
  with pytest.raises(ValueError, match='with 2 channels cannot be encoded'):
    codec_lib.to_vae_input(jnp.zeros((1, 2, 2, 2)), 3)


@pytest.fixture(scope='module')
def tiny_vae_dir(tmp_path_factory):
  from mmgen_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('vae'))
  autoencoder.main(['--random', '--out', path, '--seed', '3'])  # the command the config names
  vae = autoencoder.load_diffusers_dir(path)
  assert vae.config.to_diffusers()['block_out_channels'] == TINY_VAE['block_out_channels']
  return path


def _latent_config(data_dir, build, vae_dir):
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  config = tiny_cpu.get_config('latent')
  config.codec.weights = vae_dir
  config.data.builder_config, config.data.data_dir = build, data_dir
  config.data.global_batch_size = 8
  config.train.num_steps, config.train.log_every = 2, 1
  config.train.sample_every, config.train.checkpoint_every = 2, 2
  config.sample.num_steps, config.sample.num_images = 2, 2
  config.eval.num_examples = 0
  return config


def test_the_codec_encodes_decodes_and_moments_match_the_vae(tiny_vae_dir):
  from mmgen_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  config = tiny_cpu.get_config('latent')
  config.codec.weights = tiny_vae_dir
  codec = codec_lib.from_config(config)
  vae = autoencoder.load_diffusers_dir(tiny_vae_dir)
  rng = np.random.default_rng(1)
  batch = {'rgb': rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
           'depth': rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)}
  out = codec.add_moments(batch)
  mean, logvar = vae.encode(np.repeat(batch['depth'], 3, -1))
  np.testing.assert_allclose(out['depth_moments'], np.concatenate([mean, logvar], -1),
                             rtol=1e-5, atol=1e-5)
  assert codec.model_channels() == (4, 4, 4, 4) and codec.model_shape(5, 32) == (5, 4, 4)
  decoded = codec.decode({'depth': mean * 0.18215, 'rgb': mean * 0.18215})
  assert decoded['depth'].shape == (2, 32, 32, 1) and decoded['rgb'].shape == (2, 32, 32, 3)
  np.testing.assert_allclose(decoded['depth'][..., 0], np.asarray(vae.decode(mean)).mean(-1),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_latent_training_samples_decodes_and_evaluates(tiny_vae_dir, scenes_data_dir, tmp_path):
  """The SD-VAE codec end to end on the scenes: 2 steps, grids, the RGB -> X scores."""
  from tests.conftest import SCENES_TEST_BUILD  # pylint: disable=g-import-not-at-top
  from mmgen_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  config = _latent_config(scenes_data_dir, SCENES_TEST_BUILD, tiny_vae_dir)
  workdir = str(tmp_path / 'work')
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 2 and np.isfinite(result['loss'])
  for name in ('rgb', 'depth', 'normal', 'segmentation'):
    assert np.isfinite(result[f'loss/{name}']), name
  assert sorted(os.listdir(os.path.join(workdir, 'samples'))) == [
      'step_000002_from_rgb.png', 'step_000002_joint.png']
  scores = evaluate.evaluate(config, workdir)
  assert scores['eval/num_examples'] == 8
  for key in ('depth/abs_rel', 'normal/mean_deg', 'segmentation/miou'):
    assert np.isfinite(scores[f'eval/{key}']), key


def test_the_model_sees_latent_channels_and_the_downsampled_grid(tiny_vae_dir):
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  config = tiny_cpu.get_config('latent')
  kwargs = build.model_kwargs(config)
  names = [m.name for m in modalities_lib.images(modalities_lib.from_config(config.modalities))]
  assert kwargs['input_size'] == 4 and kwargs['image_heads'] == (4,) * len(names)


def test_the_wrapped_loss_draws_latents_with_a_key_of_their_own():
  """The latent draw and the loss's own noise must not share a key (same ε twice)."""
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  config = tiny_cpu.get_config('latent')
  seen = {}

  def loss_fn(model, batch, rng):
    del model
    seen['batch'], seen['rng'] = batch, rng
    return 0.0, {}

  loss = codec_lib.wrap_loss(loss_fn, config)
  names = ('rgb', 'depth', 'normal', 'segmentation')
  zeros = {codec_lib.moments_field(n): jnp.zeros((2, 4, 4, 8)) for n in names}  # N(0, 1) draws
  loss(None, zeros, jax.random.key(0))
  first, rng = seen['batch'], seen['rng']
  assert not np.array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(0)))
  assert sorted(first) == sorted(names) and first['rgb'].shape == (2, 4, 4, 4)
  np.testing.assert_allclose(np.std(np.asarray(first['rgb'])), config.codec.scale, rtol=0.3)
  loss(None, zeros, jax.random.key(0))
  np.testing.assert_array_equal(seen['batch']['rgb'], first['rgb'])  # a resumed step: the same
  loss(None, zeros, jax.random.key(1))
  assert not np.allclose(seen['batch']['rgb'], first['rgb'])  # the next step: new latents
  assert codec_lib.wrap_loss(loss_fn, tiny_cpu.get_config()) is loss_fn  # pixels: untouched


def test_moments_take_the_batch_sharding_even_when_the_vae_is_split(tiny_vae_dir):
  """A VAE with its channels over 'tensor' must hand the step moments laid out like the batch."""
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  from mmgen_jax import parallel  # pylint: disable=g-import-not-at-top
  config = tiny_cpu.get_config('latent')
  config.codec.weights = tiny_vae_dir
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 1, 2
  config.sharding_rules = [(k, 'tensor' if k == 'channels' else v) for k, v in
                           parallel.rules_dict(config.sharding_rules).items()]
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.rules_dict(config.sharding_rules)
  codec = codec_lib.from_config(config, mesh)
  sharding = parallel.batch_sharding(mesh, rules)
  images = jax.device_put(np.zeros((4, 32, 32, 3), np.float32), sharding)
  out = codec.add_moments({'rgb': images})
  assert out['rgb_moments'].sharding.is_equivalent_to(sharding, 4)
