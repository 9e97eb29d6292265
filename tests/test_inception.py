"""The FID Inception-v3 (pytorch-fid) port: key manifest, loaders, pooling and resize facts, parity.

The parity vectors (fid_inception_tiny.safetensors, 51 MB, random weights) stay
outside the repository: they are read from ../shared/parity next to the
checkout or from $MMGEN_PARITY_DIR; that test skips when neither holds them.
"""

import os
from pathlib import Path
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmgen_jax.models import inception

DATA = Path(__file__).resolve().parent / 'data'
PARITY_NAME = 'fid_inception_tiny.safetensors'


def _parity_file() -> Path | None:
  for base in (os.environ.get('MMGEN_PARITY_DIR'),
               Path(__file__).resolve().parents[2] / 'shared' / 'parity'):
    if base and (Path(base) / PARITY_NAME).is_file():
      return Path(base) / PARITY_NAME
  return None


def _manifest() -> tuple[dict[str, tuple[tuple[int, ...], str]], int]:
  entries, total = {}, None
  for line in (DATA / 'fid_inception_keys.tsv').read_text().splitlines():
    if line.startswith('# total_params'):
      total = int(line.split('\t')[1])
    elif line and not line.startswith('#'):
      key, shape, dtype = line.split('\t')
      entries[key] = (tuple(int(s) for s in shape.split('x')) if shape else (), dtype)
  return entries, total


def _zeros_state_dict(dtype=np.float16) -> dict[str, np.ndarray]:
  """Every manifest entry, num_batches_tracked included, as small-dtype arrays."""
  entries, _ = _manifest()
  return {k: np.zeros(shape, np.int64 if dt == 'int64' else dtype)
          for k, (shape, dt) in entries.items()}


# ---- structure, loaders ---------------------------------------------------------


def test_manifest_maps_one_to_one_and_counts_parameters():
  entries, total = _manifest()
  assert len(entries) == 566 and total == 23_850_960
  model = nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0)))
  ours = inception.state_dict_shapes(model)
  theirs = {k: s for k, (s, _) in entries.items() if not k.endswith('num_batches_tracked')}
  assert len(theirs) == 472 and ours == theirs
  assert inception.count_params(model) == total  # BN running statistics are not parameters
  no_fc = nnx.eval_shape(lambda: inception.FIDInceptionV3(fc=False, rngs=nnx.Rngs(0)))
  assert inception.count_params(no_fc) == total - 1008 * 2048 - 1008


def test_from_pytorch_fid_full_manifest_float16_round_trip():
  sd = _zeros_state_dict()
  rng = np.random.default_rng(0)
  for key in ('Conv2d_1a_3x3.conv.weight', 'Mixed_6b.branch7x7_2.conv.weight', 'fc.weight',
              'Mixed_7c.branch3x3dbl_3b.bn.running_var', 'fc.bias'):
    sd[key] = rng.normal(size=sd[key].shape).astype(np.float16)
  model = inception.from_pytorch_fid(sd)
  assert model.fc is not None
  # Layouts: OIHW -> HWIO, (1008, 2048) -> (2048, 1008); float16 values cast exactly.
  np.testing.assert_array_equal(model.Mixed_6b.branch7x7_2.conv.kernel[...],
                                sd['Mixed_6b.branch7x7_2.conv.weight'].astype(np.float32)
                                .transpose(2, 3, 1, 0))
  assert model.Mixed_6b.branch7x7_2.conv.kernel.shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(model.fc.kernel[...], sd['fc.weight'].astype(np.float32).T)
  np.testing.assert_array_equal(model.Mixed_7c.branch3x3dbl_3b.bn.var[...],
                                sd['Mixed_7c.branch3x3dbl_3b.bn.running_var'].astype(np.float32))
  back = inception.to_pytorch_fid(model)
  assert set(back) == {k for k in sd if not k.endswith('num_batches_tracked')}
  for key, value in back.items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, sd[key].astype(np.float32), err_msg=key)


def test_from_pytorch_fid_names_missing_unexpected_and_misshaped_keys():
  sd = _zeros_state_dict()
  del sd['Mixed_5b.branch5x5_2.conv.weight']
  sd['Mixed_5b.branch5x5_3.conv.weight'] = np.zeros((64, 48, 5, 5), np.float16)
  sd['Mixed_7b.branch3x3_2a.conv.weight'] = np.zeros((384, 384, 3, 1), np.float16)  # (1,3) kernel
  with pytest.raises(ValueError) as err:
    inception.from_pytorch_fid(sd)
  msg = str(err.value)
  assert '1 missing keys' in msg and 'Mixed_5b.branch5x5_2.conv.weight' in msg
  assert '1 unexpected keys' in msg and 'Mixed_5b.branch5x5_3.conv.weight' in msg
  assert ('Mixed_7b.branch3x3_2a.conv.weight: got (384, 384, 3, 1), expected (384, 384, 1, 3)'
          in msg)


def test_fc_is_optional_and_logits_need_it():
  sd = {k: v for k, v in _zeros_state_dict().items() if not k.startswith('fc.')}
  model = inception.from_pytorch_fid(sd)
  assert model.fc is None
  with pytest.raises(ValueError, match='no fc layer'):
    model.logits_from_features(jnp.zeros((1, 2048)))
  del sd['Conv2d_1a_3x3.bn.bias']
  with pytest.raises(ValueError, match='Conv2d_1a_3x3.bn.bias'):
    inception.from_pytorch_fid(sd)


def test_wrapper_key_names_load_the_same_model():
  sd = {k: v for k, v in _zeros_state_dict().items() if not k.startswith('fc.')}
  sd['Mixed_5d.branch_pool.bn.running_mean'] = np.arange(64, dtype=np.float16)
  to_wrapper = {v: k for k, v in inception.WRAPPER_PREFIXES.items()}
  wrapped = {}
  for key, value in sd.items():
    head = key.split('.')[0]
    wrapped[to_wrapper[head] + key[len(head):]] = value
  assert 'blocks.2.2.branch_pool.bn.running_mean' in wrapped
  model = inception.from_pytorch_fid(wrapped)
  np.testing.assert_array_equal(model.Mixed_5d.branch_pool.bn.mean[...], np.arange(64))
  with pytest.raises(ValueError, match=r"blocks\.4\.0\.conv\.weight: unknown pytorch-fid wrapper"):
    inception.from_pytorch_fid({**wrapped, 'blocks.4.0.conv.weight': np.zeros(1)})


def test_logits_are_pool3_times_fc_weight():
  model = nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  w = rng.normal(size=(1008, 2048)).astype(np.float32)
  b = rng.normal(size=(1008,)).astype(np.float32)
  model.fc.kernel.set_value(jnp.asarray(w.T))
  model.fc.bias.set_value(jnp.asarray(b))
  feats = rng.normal(size=(3, 2048)).astype(np.float32)
  ref = feats.astype(np.float64) @ w.T.astype(np.float64)
  np.testing.assert_allclose(model.logits_from_features(feats), ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(model.logits_from_features(feats, fc_bias=True), ref + b,
                             rtol=1e-5, atol=1e-4)


def test_pth_loader_names_the_torch_extra_when_torch_is_absent(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError
  with pytest.raises(ImportError, match=r'needs PyTorch.*mmgen_jax\[torch\].*load_safetensors'):
    inception.load_pytorch_fid_pth(tmp_path / 'pt_inception.pth')


def test_pth_loader_with_torch(tmp_path):
  torch = pytest.importorskip('torch')
  sd = _zeros_state_dict(np.float32)
  sd['Conv2d_2a_3x3.conv.weight'] = np.random.default_rng(2).normal(
      size=(32, 32, 3, 3)).astype(np.float32)
  path = tmp_path / 'pt_inception.pth'
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  model = inception.load_pytorch_fid_pth(path)
  np.testing.assert_array_equal(model.Conv2d_2a_3x3.conv.kernel[...],
                                sd['Conv2d_2a_3x3.conv.weight'].transpose(2, 3, 1, 0))


def test_convert_cli_writes_a_loadable_safetensors(monkeypatch, tmp_path):
  sd = _zeros_state_dict(np.float32)
  sd['Mixed_6e.branch7x7dbl_5.conv.weight'] = np.random.default_rng(3).normal(
      size=(192, 192, 1, 7)).astype(np.float32)
  # Reading the .pth needs torch; the conversion around it does not.
  monkeypatch.setattr(inception, 'read_pth', lambda path: {
      k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')})
  out = tmp_path / 'fid_inception.safetensors'
  inception.main(['--pth', str(tmp_path / 'x.pth'), '--out', str(out)])
  model = inception.load_safetensors(out)
  np.testing.assert_array_equal(model.Mixed_6e.branch7x7dbl_5.conv.kernel[...],
                                sd['Mixed_6e.branch7x7dbl_5.conv.weight'].transpose(2, 3, 1, 0))
  assert inception.count_params(model) == 23_850_960
  with pytest.raises(ValueError, match="no tensors whose key starts with 'params/'"):
    inception.load_safetensors(out, prefix='params/')


# ---- preprocessing and pooling facts (no weights needed) ------------------------


def _torch_bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
  """The (n_out, n_in) interpolation matrix of F.interpolate(bilinear, align_corners=False)."""
  scale = n_in / n_out
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = max((i + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(np.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    frac = src - i0
    m[i, i0] += 1 - frac
    m[i, i1] += frac
  return m


@pytest.mark.parametrize('size', [(64, 64), (320, 352), (299, 299)])
def test_resize_matches_torch_bilinear_without_antialiasing(size):
  h, w = size
  img = np.random.default_rng(4).uniform(size=(1, h, w, 3)).astype(np.float32)
  rows = np.einsum('ph,hwc->pwc', _torch_bilinear_1d(h, 299), img[0].astype(np.float64),
                   optimize=True)
  ref = np.einsum('qw,pwc->pqc', _torch_bilinear_1d(w, 299), rows, optimize=True) * 2 - 1
  got = inception.resize_and_normalize(jnp.asarray(img))[0]
  # float32 source positions in jax give up to ~6e-5; antialiasing would give ~0.5 here.
  np.testing.assert_allclose(got, ref, atol=1e-4)


def test_avg_pool_excludes_padding_and_max_pool_ignores_it():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1) - 100.0  # all negative
  avg = inception.avg_pool_exclude_pad(x)[0, ..., 0]
  assert avg[0, 0] == pytest.approx(np.mean([0, 1, 4, 5]) - 100)   # 4 real pixels
  assert avg[0, 1] == pytest.approx(np.mean([0, 1, 2, 4, 5, 6]) - 100)
  assert avg[1, 1] == pytest.approx(np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10]) - 100)
  mx = inception.max_pool(x, stride=1, padding=1)[0, ..., 0]
  assert mx[0, 0] == 5 - 100 and mx.shape == (4, 4)               # padding never wins
  assert inception.max_pool(jnp.zeros((1, 147, 147, 1)), stride=2).shape == (1, 73, 73, 1)


def test_images_must_be_float_nhwc():
  model = nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='divide uint8 images by 255'):
    model(jnp.zeros((1, 32, 32, 3), jnp.uint8))
  with pytest.raises(ValueError, match='NHWC with 3 channels'):
    model(jnp.zeros((1, 3, 32, 32)))


# ---- parity with pytorch-fid (random weights) --------------------------------------


@pytest.fixture(scope='module')
def parity():
  path = _parity_file()
  if path is None:
    pytest.skip(f'{PARITY_NAME} (51 MB) not found in $MMGEN_PARITY_DIR or '
                '<checkout>/../shared/parity; it is kept out of the repository.')
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return path, load_file(path)


def _close(got, want, name):
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_matches_pytorch_fid(parity):
  path, ref = parity
  model = inception.load_safetensors(path, prefix='params/')  # float16 on disk
  assert model.fc is None
  out = model.intermediates(jnp.asarray(ref['inputs/images'].transpose(0, 2, 3, 1)))
  _close(out['model_input'].mean((1, 2)), ref['outputs/model_input_channel_mean'], 'input')
  _close(jnp.transpose(out['conv2d_1a_3x3'], (0, 3, 1, 2)), ref['outputs/conv2d_1a_3x3'],
         'conv2d_1a_3x3')
  for i in range(3):
    _close(out[f'block{i}'].mean((1, 2)), ref[f'outputs/block{i}_channel_mean'], f'block{i}')
  _close(out['pool3'], ref['outputs/pool3_features'], 'pool3_features')
  # The 320x352 input: the resize is a down-sample (no antialiasing), through __call__.
  large = model(jnp.asarray(ref['inputs/images_large'].transpose(0, 2, 3, 1)))
  assert large.shape == (1, 2048) and large.dtype == jnp.float32
  _close(large, ref['outputs/pool3_features_large'], 'pool3_features_large')
