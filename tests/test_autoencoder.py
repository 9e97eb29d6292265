"""The SD KL autoencoder: parity with diffusers (tiny vectors), key manifest, other configs."""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mmgen_jax import parallel
from mmgen_jax.config_schema import base_config
from mmgen_jax.models import autoencoder as ae

FULL_PARAMS = 83_653_863
TINY_PARAMS = 658_375
# Another architecture: 3 blocks, 2 resnets per block, 4 groups, channels that
# change at every block, no quant convs on one side.
OTHER = dict(in_channels=3, out_channels=2, down_block_types=['DownEncoderBlock2D'] * 3,
             up_block_types=['UpDecoderBlock2D'] * 3, block_out_channels=[8, 16, 24],
             layers_per_block=2, norm_num_groups=4, latent_channels=3, act_fn='silu',
             scaling_factor=0.5, sample_size=40)


def _data_dir():
  return os.path.join(os.path.dirname(__file__), 'data')


@pytest.fixture(scope='module')
def vectors():
  return load_file(os.path.join(_data_dir(), 'sd_vae_tiny.safetensors'))


@pytest.fixture(scope='module')
def meta():
  with open(os.path.join(_data_dir(), 'sd_vae_tiny.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def state_dict(vectors):
  return {k[len('params/'):]: v for k, v in vectors.items() if k.startswith('params/')}


@pytest.fixture(scope='module')
def tiny(state_dict, meta):
  return ae.from_diffusers(state_dict, meta['diffusers_config'])


@nnx.jit
def _outputs(model, x, z):
  mean, logvar = model.encode(x)
  return dict(encoder_out=model.encoder_out(x), moments=model.moments(x), mean=mean,
              logvar=logvar, decoded=model.decode(z))


def _nhwc(a):
  return jnp.asarray(a).transpose(0, 2, 3, 1)


def _nchw(a):
  return np.asarray(a, np.float32).transpose(0, 3, 1, 2)


def _run_tiny(model, vectors):
  return _outputs(model, _nhwc(vectors['inputs/image']),
                  _nhwc(vectors['outputs/latent_dist.mean']))


def _random_state_dict(model, seed=0):
  """Independent random values in torch layouts for every key of `model`."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, entry in ae.diffusers_keys(model).items():
    shape = entry.torch_shape
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    scale = 1 / np.sqrt(fan_in) if len(shape) > 1 else 0.1
    base = 1.0 if key.endswith('weight') and len(shape) == 1 else 0.0
    out[key] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
  return out


# ---- parity with diffusers --------------------------------------------------------


def test_tiny_matches_diffusers(tiny, vectors):
  got = _run_tiny(tiny, vectors)
  refs = dict(encoder_out='encoder_out', moments='moments', mean='latent_dist.mean',
              logvar='latent_dist.logvar', decoded='decoded_from_mean')
  for name, ref_key in refs.items():
    ref = vectors[f'outputs/{ref_key}']
    out = _nchw(got[name])
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, err_msg=name)


def test_tiny_config_and_attributes(tiny, meta):
  n = sum(v.size for v in jax.tree.leaves(nnx.state(tiny, nnx.Param)))
  assert n == meta['param_count'] == TINY_PARAMS
  assert tiny.scaling_factor == pytest.approx(0.18215)
  assert tiny.latent_channels == 4 and tiny.downsample_factor == 2
  assert tiny.config.to_diffusers()['block_out_channels'] == [32, 64]


def test_older_attention_names_and_1x1_conv_weights(tiny, state_dict, meta, vectors):
  legacy = {}
  for key, value in state_dict.items():
    key = ae.canonical_key(key)
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                     ('to_out.0', 'proj_attn')):
      key = key.replace(f'.attentions.0.{new}.', f'.attentions.0.{old}.')
    if '.attentions.' in key and value.ndim == 2:
      value = value.reshape(*value.shape, 1, 1)
    legacy[key] = value
  assert 'encoder.mid_block.attentions.0.query.weight' in legacy
  assert legacy['decoder.mid_block.attentions.0.proj_attn.weight'].shape == (64, 64, 1, 1)
  other = ae.from_diffusers(legacy, meta['diffusers_config'])
  a, b = _run_tiny(tiny, vectors), _run_tiny(other, vectors)
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
  assert set(ae.to_diffusers(other, legacy_attention_names=True)) == set(legacy)


def test_to_diffusers_gives_back_the_state_dict(tiny, state_dict):
  back = ae.to_diffusers(tiny)
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_logvar_is_clamped_and_moments_are_not(state_dict, meta, vectors):
  sd = dict(state_dict)
  bias = sd['quant_conv.bias'].copy()
  bias[4:6] += 100.0   # two logvar channels far above 20
  bias[6:] -= 100.0    # two far below -30
  sd['quant_conv.bias'] = bias
  out = _outputs(ae.from_diffusers(sd, meta['diffusers_config']), _nhwc(vectors['inputs/image']),
                 _nhwc(vectors['outputs/latent_dist.mean']))
  moments = np.asarray(out['moments'])
  assert moments[..., 4:6].min() > 20 and moments[..., 6:].max() < -30
  logvar = np.asarray(out['logvar'])
  np.testing.assert_array_equal(logvar[..., :2], 20.0)
  np.testing.assert_array_equal(logvar[..., 2:], -30.0)
  np.testing.assert_array_equal(np.asarray(out['mean']), moments[..., :4])


def test_bfloat16_compute_keeps_float32_params_and_stays_close(state_dict, meta, vectors):
  model = ae.from_diffusers(state_dict, meta['diffusers_config'], dtype=jnp.bfloat16)
  dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  got = _run_tiny(model, vectors)
  assert got['mean'].dtype == jnp.float32
  for name, ref_key in (('mean', 'latent_dist.mean'), ('decoded', 'decoded_from_mean')):
    ref = vectors[f'outputs/{ref_key}']
    err = np.abs(_nchw(got[name]) - ref).max()
    assert 1e-6 < err < 0.1 * np.abs(ref).max(), (name, err)  # bf16, not float32 in disguise


# ---- the full-size manifest -------------------------------------------------------


def _manifest():
  entries, total = {}, None
  with open(os.path.join(_data_dir(), 'sd_vae_keys.tsv')) as f:
    for line in f:
      fields = line.rstrip('\n').split('\t')
      if line.startswith('# total_params'):
        total = int(fields[1])
      elif not line.startswith('#'):
        entries[fields[0]] = tuple(int(s) for s in fields[1].split('x')) if fields[1] else ()
  return entries, total


def test_full_size_keys_and_shapes_match_the_manifest(meta):
  cfg = meta['full_size_reference_config']
  assert ae.VAEConfig.from_diffusers(cfg) == ae.SD_VAE_FT_MSE
  model = ae.create(cfg, abstract=True)  # shapes only
  entries, total = _manifest()
  ours = {k: e.torch_shape for k, e in ae.diffusers_keys(model).items()}
  assert sorted(set(entries) - set(ours)) == [] and sorted(set(ours) - set(entries)) == []
  assert ours == entries
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert isinstance(params[0], jax.ShapeDtypeStruct)
  assert sum(int(np.prod(p.shape)) for p in params) == total == FULL_PARAMS
  # The manifest's shapes pass the state-dict check one to one.
  assert len(ae.check_state_dict(model, entries)) == len(entries) == 248


# ---- other configurations ---------------------------------------------------------


def _expected_keys(cfg):
  """diffusers' AutoencoderKL key names, written out from its naming rules."""
  keys = []
  conv = lambda p: keys.extend([f'{p}.weight', f'{p}.bias'])

  def resnet(p, cin, cout):
    for name in ('norm1', 'conv1', 'norm2', 'conv2'):
      conv(f'{p}.{name}')
    if cin != cout:
      conv(f'{p}.conv_shortcut')

  def mid(p, c):
    resnet(f'{p}.resnets.0', c, c)
    if cfg.get('mid_block_add_attention', True):
      for name in ('group_norm', 'to_q', 'to_k', 'to_v', 'to_out.0'):
        conv(f'{p}.attentions.0.{name}')
    resnet(f'{p}.resnets.1', c, c)

  ch, n, lpb = cfg['block_out_channels'], len(cfg['block_out_channels']), cfg['layers_per_block']
  conv('encoder.conv_in')
  cin = ch[0]
  for i in range(n):
    for j in range(lpb):
      resnet(f'encoder.down_blocks.{i}.resnets.{j}', cin if j == 0 else ch[i], ch[i])
    cin = ch[i]
    if i < n - 1:
      conv(f'encoder.down_blocks.{i}.downsamplers.0.conv')
  mid('encoder.mid_block', ch[-1])
  conv('encoder.conv_norm_out')
  conv('encoder.conv_out')
  rev = ch[::-1]
  conv('decoder.conv_in')
  mid('decoder.mid_block', rev[0])
  cin = rev[0]
  for i in range(n):
    for j in range(lpb + 1):
      resnet(f'decoder.up_blocks.{i}.resnets.{j}', cin if j == 0 else rev[i], rev[i])
    cin = rev[i]
    if i < n - 1:
      conv(f'decoder.up_blocks.{i}.upsamplers.0.conv')
  conv('decoder.conv_norm_out')
  conv('decoder.conv_out')
  if cfg.get('use_quant_conv', True):
    conv('quant_conv')
  if cfg.get('use_post_quant_conv', True):
    conv('post_quant_conv')
  return set(keys)


@pytest.mark.parametrize('cfg', [
    OTHER,
    dict(OTHER, mid_block_add_attention=False, use_quant_conv=False),
    dict(OTHER, block_out_channels=[8], down_block_types=['DownEncoderBlock2D'],
         up_block_types=['UpDecoderBlock2D'], layers_per_block=1, use_post_quant_conv=False),
], ids=['3_blocks', 'no_attention_no_quant', '1_block'])
def test_other_config_keys_follow_diffusers_naming(cfg):
  model = ae.create(cfg, abstract=True)
  assert set(ae.diffusers_keys(model)) == _expected_keys(cfg)


def test_other_config_round_trips_through_a_state_dict():
  cfg = dict(OTHER, use_post_quant_conv=False)
  source = ae.create(cfg, abstract=True)
  sd = _random_state_dict(source, seed=1)
  model = ae.from_diffusers(sd, cfg)
  back = ae.to_diffusers(model)
  assert set(back) == set(sd)
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)

  x = jax.random.uniform(jax.random.key(0), (2, 40, 24, 3), minval=-1, maxval=1)
  z = jax.random.normal(jax.random.key(1), (2, 10, 6, 3))
  again = ae.from_diffusers(back, json.loads(json.dumps(model.config.to_diffusers())))
  a, b = _outputs(model, x, z), _outputs(again, x, z)
  assert a['mean'].shape == (2, 10, 6, 3) and a['encoder_out'].shape == (2, 10, 6, 6)
  assert a['decoded'].shape == (2, 40, 24, 2)
  assert model.scaling_factor == 0.5 and model.post_quant_conv is None
  for name in a:
    assert np.all(np.isfinite(np.asarray(a[name]))), name
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
  # Not a constant map: different inputs give different latents.
  assert np.abs(np.asarray(a['mean'][0] - a['mean'][1])).max() > 1e-3


class _NumpyVAE:
  """A float64 NCHW reference of diffusers' AutoencoderKL, straight from the state dict."""

  def __init__(self, sd, cfg):
    self.sd = {ae.canonical_key(k): np.asarray(v, np.float64) for k, v in sd.items()}
    self.cfg = cfg

  def conv(self, name, x, stride=1, pad=None):
    w, b = self.sd[f'{name}.weight'], self.sd[f'{name}.bias']
    k = w.shape[-1]
    pad = (k // 2,) * 4 if pad is None else pad  # top, bottom, left, right
    x = np.pad(x, ((0, 0), (0, 0), pad[:2], pad[2:]))
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    out = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))  # (n, h, w, o)
    return out.transpose(0, 3, 1, 2) + b[:, None, None]

  def norm(self, name, x):
    n, c, h, w = x.shape
    g = x.reshape(n, self.cfg['norm_num_groups'], -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
    return (g.reshape(n, c, h, w) * self.sd[f'{name}.weight'][:, None, None]
            + self.sd[f'{name}.bias'][:, None, None])

  @staticmethod
  def silu(x):
    return x / (1 + np.exp(-x))

  def resnet(self, p, x):
    h = self.conv(f'{p}.conv1', self.silu(self.norm(f'{p}.norm1', x)))
    h = self.conv(f'{p}.conv2', self.silu(self.norm(f'{p}.norm2', h)))
    return (self.conv(f'{p}.conv_shortcut', x) if f'{p}.conv_shortcut.weight' in self.sd
            else x) + h

  def mid(self, p, x):
    x = self.resnet(f'{p}.resnets.0', x)
    if f'{p}.attentions.0.to_q.weight' in self.sd:
      a = f'{p}.attentions.0'
      n, c, h, w = x.shape
      t = self.norm(f'{a}.group_norm', x).reshape(n, c, h * w).transpose(0, 2, 1)
      lin = lambda name, v: v @ self.sd[f'{a}.{name}.weight'].reshape(c, c).T + self.sd[
          f'{a}.{name}.bias']
      q, k, v = lin('to_q', t), lin('to_k', t), lin('to_v', t)
      s = q @ k.transpose(0, 2, 1) / np.sqrt(c)
      s = np.exp(s - s.max(-1, keepdims=True))
      out = lin('to_out.0', (s / s.sum(-1, keepdims=True)) @ v)
      x = x + out.transpose(0, 2, 1).reshape(n, c, h, w)
    return self.resnet(f'{p}.resnets.1', x)

  def moments(self, x):
    n_blocks, lpb = len(self.cfg['block_out_channels']), self.cfg['layers_per_block']
    x = self.conv('encoder.conv_in', x)
    for i in range(n_blocks):
      for j in range(lpb):
        x = self.resnet(f'encoder.down_blocks.{i}.resnets.{j}', x)
      if i < n_blocks - 1:
        x = self.conv(f'encoder.down_blocks.{i}.downsamplers.0.conv', x, 2, (0, 1, 0, 1))
    x = self.mid('encoder.mid_block', x)
    x = self.conv('encoder.conv_out', self.silu(self.norm('encoder.conv_norm_out', x)))
    return self.conv('quant_conv', x) if 'quant_conv.weight' in self.sd else x

  def decode(self, z):
    n_blocks, lpb = len(self.cfg['block_out_channels']), self.cfg['layers_per_block']
    if 'post_quant_conv.weight' in self.sd:
      z = self.conv('post_quant_conv', z)
    x = self.mid('decoder.mid_block', self.conv('decoder.conv_in', z))
    for i in range(n_blocks):
      for j in range(lpb + 1):
        x = self.resnet(f'decoder.up_blocks.{i}.resnets.{j}', x)
      if i < n_blocks - 1:
        x = self.conv(f'decoder.up_blocks.{i}.upsamplers.0.conv', x.repeat(2, 2).repeat(2, 3))
    return self.conv('decoder.conv_out', self.silu(self.norm('decoder.conv_norm_out', x)))


def test_numpy_reference_matches_the_vectors(state_dict, meta, vectors):
  """The reference below is right where diffusers' outputs are known."""
  ref = _NumpyVAE(state_dict, meta['diffusers_config'])
  np.testing.assert_allclose(ref.moments(vectors['inputs/image'].astype(np.float64)),
                             vectors['outputs/moments'], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ref.decode(vectors['outputs/latent_dist.mean'].astype(np.float64)),
                             vectors['outputs/decoded_from_mean'], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('cfg', [
    OTHER, dict(OTHER, mid_block_add_attention=False, use_quant_conv=False,
                block_out_channels=[8, 8, 16])], ids=['3_blocks', 'no_attention_no_quant'])
def test_other_config_matches_the_numpy_reference(cfg):
  """3 blocks, 2 resnets per block, 4 groups, a 40x24 image: against the float64 reference."""
  sd = _random_state_dict(ae.create(cfg, abstract=True), seed=2)
  model = ae.from_diffusers(sd, cfg)
  x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 40, 24))
  z = np.random.default_rng(4).standard_normal((2, 3, 10, 6))
  got = _outputs(model, _nhwc(x.astype(np.float32)), _nhwc(z.astype(np.float32)))
  ref = _NumpyVAE(sd, cfg)
  moments = ref.moments(x)
  np.testing.assert_allclose(_nchw(got['moments']), moments, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_nchw(got['mean']), moments[:, :3], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_nchw(got['decoded']), ref.decode(z), rtol=1e-4, atol=1e-4)


def test_group_norm_eps_is_1e_6():
  """eps matters only for nearly constant groups: there 1e-5 is a different answer."""
  rng = np.random.default_rng(0)
  x = 1.0 + 1e-3 * rng.standard_normal((1, 3, 5, 8))  # group variance ~1e-6
  norm = ae.GroupNorm(8, 2, numerics=ae.Numerics(precision=jax.lax.Precision.HIGHEST),
                      rngs=nnx.Rngs(0))
  g = x.reshape(1, 3, 5, 2, 4)
  want = ((g - g.mean((1, 2, 4), keepdims=True)) /
          np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-6)).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x, jnp.float32))), want, rtol=1e-3,
                             atol=1e-3)


def test_create_draws_a_random_model():
  model = ae.create(OTHER, seed=5)
  sd = ae.to_diffusers(model)
  assert set(sd) == set(ae.diffusers_keys(ae.create(OTHER, abstract=True)))
  w = sd['decoder.up_blocks.0.resnets.1.conv1.weight']  # (24, 24, 3, 3): fan_in 216
  assert abs(w.std() * np.sqrt(216) - 1) < 0.05
  assert np.all(sd['encoder.conv_norm_out.weight'] == 1) and np.all(sd['quant_conv.bias'] == 0)
  again = ae.to_diffusers(ae.create(OTHER, seed=5))
  np.testing.assert_array_equal(again['encoder.conv_in.weight'], sd['encoder.conv_in.weight'])


# ---- errors -----------------------------------------------------------------------


def test_missing_and_unexpected_keys_are_named(state_dict, meta):
  sd = dict(state_dict)
  del sd['decoder.up_blocks.1.resnets.1.conv2.bias']
  sd['encoder.down_blocks.0.resnets.0.nrom1.weight'] = sd.pop(
      'encoder.down_blocks.0.resnets.0.norm1.weight')
  with pytest.raises(KeyError) as e:
    ae.from_diffusers(sd, meta['diffusers_config'])
  msg = str(e.value)
  assert "missing key(s): decoder.up_blocks.1.resnets.1.conv2.bias, " \
         "encoder.down_blocks.0.resnets.0.norm1.weight" in msg
  assert 'unexpected key(s): encoder.down_blocks.0.resnets.0.nrom1.weight' in msg


def test_shape_mismatch_names_key_expected_and_got(state_dict, meta):
  sd = dict(state_dict)
  sd['encoder.conv_in.weight'] = np.zeros((32, 3, 5, 5), np.float32)
  sd['decoder.mid_block.attentions.0.to_k.weight'] = np.zeros((64, 32), np.float32)
  with pytest.raises(ValueError) as e:
    ae.from_diffusers(sd, meta['diffusers_config'])
  msg = str(e.value)
  assert 'encoder.conv_in.weight: shape mismatch, expected (32, 3, 3, 3), got (32, 3, 5, 5)' in msg
  assert ('decoder.mid_block.attentions.0.to_k.weight: shape mismatch, expected (64, 64) or '
          '(64, 64, 1, 1), got (64, 32)') in msg


def test_a_tensor_under_both_attention_names_is_refused(state_dict, meta):
  sd = dict(state_dict)
  attn = 'encoder.mid_block.attentions.0'
  sd[f'{attn}.query.weight'] = sd[f'{attn}.to_q.weight']
  with pytest.raises(ae.StateDictMismatch, match=r'attentions.0.to_q.weight is given twice'):
    ae.from_diffusers(sd, meta['diffusers_config'])


@pytest.mark.parametrize('change, message', [
    (dict(up_block_types=['UpDecoderBlock2D']), 'up_block_types has 1 entries but'),
    (dict(down_block_types=['DownEncoderBlock2D', 'AttnDownEncoderBlock2D']),
     "only 'DownEncoderBlock2D' is supported, got \\['AttnDownEncoderBlock2D'\\]"),
    (dict(norm_num_groups=6), 'entry 32 is not divisible by norm_num_groups=6'),
    (dict(act_fn='elu'), "act_fn='elu' is not one of"),
])
def test_bad_config_is_explained(meta, change, message):
  with pytest.raises(ValueError, match=message):
    ae.VAEConfig.from_diffusers(dict(meta['diffusers_config'], **change))


# ---- files ------------------------------------------------------------------------


def test_load_diffusers_dir(tmp_path, state_dict, meta, tiny, vectors):
  path = tmp_path / 'vae'
  path.mkdir()
  with open(path / 'config.json', 'w') as f:
    json.dump(dict(meta['diffusers_config'], _class_name='AutoencoderKL',
                   _diffusers_version='0.42.1'), f)
  with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model.safetensors'):
    ae.load_diffusers_dir(path)
  save_file(state_dict, str(path / 'diffusion_pytorch_model.safetensors'))
  model = ae.load_diffusers_dir(path)
  a, b = _run_tiny(tiny, vectors), _run_tiny(model, vectors)
  for name in a:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)

  saved = tmp_path / 'saved'
  ae.save_diffusers_dir(model, saved)
  again = ae.load_diffusers_dir(saved, dtype=jnp.bfloat16)
  assert again.config == model.config and again.numerics.dtype == jnp.bfloat16

  (path / 'config.json').unlink()
  with pytest.raises(FileNotFoundError, match='config.json is missing'):
    ae.load_diffusers_dir(path)
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    ae.load_diffusers_dir(tmp_path / 'nothing')


def test_torch_bin_without_torch_says_so(tmp_path, meta):
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip('torch is installed')
  except ImportError:
    pass
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(meta['diffusers_config'], f)
  (tmp_path / 'diffusion_pytorch_model.bin').write_bytes(b'')
  with pytest.raises(ImportError, match='needs torch'):
    ae.load_diffusers_dir(tmp_path)


def test_load_codec_from_config(tmp_path, state_dict, meta):
  path = tmp_path / 'vae'
  path.mkdir()
  with open(path / 'config.json', 'w') as f:
    json.dump(meta['diffusers_config'], f)
  save_file(state_dict, str(path / 'diffusion_pytorch_model.safetensors'))
  config = base_config()
  config.codec.name = 'sd_vae'
  config.codec.weights = str(path)
  assert ae.load_codec(config.codec).config.block_out_channels == (32, 64)
  # A lone weights file takes the config.json beside it.
  config.codec.weights = str(path / 'diffusion_pytorch_model.safetensors')
  assert ae.load_codec(config.codec).config.block_out_channels == (32, 64)
  config.codec.latent_channels = 8
  with pytest.raises(ValueError, match='has 4 latent channels'):
    ae.load_codec(config.codec)


# ---- sharding ---------------------------------------------------------------------


def test_every_parameter_has_logical_axes_the_default_rules_know():
  rules = base_config().sharding_rules
  model = ae.create(OTHER, abstract=True)
  specs = jax.tree.leaves(parallel.param_specs(nnx.state(model, nnx.Param), rules),
                          is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert len(specs) == len(ae.diffusers_keys(model))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata()['out_sharding']
    assert len(names) == len(var.get_value().shape), path
    assert names[-1] == 'channels', path


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake CPU) devices')
@pytest.mark.parametrize('channels_over', [None, 'tensor'], ids=['replicated', 'channels_split'])
def test_encode_decode_on_a_batch_sharded_over_data(tiny, vectors, channels_over):
  config = base_config()
  if channels_over:  # parameters split on their output channels as well
    config.mesh.tensor = 2
    config.sharding_rules = tuple((k, channels_over if k == 'channels' else v)
                                  for k, v in config.sharding_rules)
  mesh = parallel.make_mesh(config.mesh)  # data=-1: the rest of the 8 devices
  x = jnp.concatenate([_nhwc(vectors['inputs/image'])] * 4)  # 8 images
  z = jnp.concatenate([_nhwc(vectors['outputs/latent_dist.mean'])] * 4)
  want = _outputs(tiny, x, z)

  sharded = ae.place_on_mesh(nnx.clone(tiny), mesh, config.sharding_rules)
  kernel = sharded.encoder.conv_in.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, channels_over)
  batch = parallel.batch_sharding(mesh, config.sharding_rules)
  xs, zs = jax.device_put(x, batch), jax.device_put(z, batch)
  with jax.set_mesh(mesh):
    got = _outputs(sharded, xs, zs)
  for name in want:
    assert got[name].sharding.spec[0] in ('data', ('data', 'fsdp')), (name, got[name].sharding)
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-5,
                               atol=1e-5, err_msg=name)
