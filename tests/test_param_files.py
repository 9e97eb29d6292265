"""Small networks' safetensors files (models/param_files.py) and the atomic writers under them
(data/atomic_io.py)."""

import json
import os

from flax import nnx
import numpy as np
import pytest

from mmgen_jax.data import atomic_io
from mmgen_jax.models import param_files


class _Net(nnx.Module):

  def __init__(self, width: int, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.layers = nnx.List([nnx.Linear(2, width, rngs=rngs), nnx.Linear(width, 3, rngs=rngs)])


def _abstract(width: int) -> _Net:
  """Shapes only: no initialiser compiled per width (the loader fills every value)."""
  return nnx.eval_shape(lambda: _Net(width))


def _tensors(width: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shapes = {'layers/0/kernel': (2, width), 'layers/0/bias': (width,),
            'layers/1/kernel': (width, 3), 'layers/1/bias': (3,)}
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _values(model) -> dict[str, np.ndarray]:
  return {'/'.join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_load_params_sets_every_parameter_by_path():
  tensors = _tensors(4, seed=1)
  dst = _abstract(4)
  param_files.load_params(dst, tensors, 'test.safetensors')
  got = _values(dst)
  assert sorted(got) == sorted(tensors)
  for k, v in got.items():
    np.testing.assert_array_equal(v, tensors[k], err_msg=k)


def test_load_params_names_missing_unexpected_and_mismatched_keys_and_assigns_nothing():
  dst = _abstract(4)
  param_files.load_params(dst, _tensors(4, seed=2), 'first')
  before = _values(dst)
  tensors = _tensors(4, seed=1)
  tensors['layers/1/kernel'] = np.zeros((5, 3), np.float32)   # width 5, not 4
  tensors['layers/2/kernel'] = tensors.pop('layers/1/bias')   # renamed
  with pytest.raises(ValueError) as e:
    param_files.load_params(dst, tensors, '/some/dir/weights.safetensors')
  msg = str(e.value)
  assert msg.startswith('/some/dir/weights.safetensors ')
  assert "missing keys ['layers/1/bias']" in msg
  assert "unexpected keys ['layers/2/kernel']" in msg
  assert 'layers/1/kernel (5, 3) (expected (4, 3))' in msg
  for k, v in _values(dst).items():   # no parameter half-loaded
    np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_a_shape_mismatch_alone_is_refused():
  tensors = _tensors(4, seed=0)
  tensors['layers/0/bias'] = np.zeros((1, 4), np.float32)   # same size, other shape
  with pytest.raises(ValueError, match=r'layers/0/bias \(1, 4\) \(expected \(4,\)\)'):
    param_files.load_params(_abstract(4), tensors, 'w')


def test_save_and_load_round_trip_with_a_fingerprint(tmp_path):
  model = _abstract(4)
  param_files.load_params(model, _tensors(4, seed=3), 'made here')
  param_files.save(model, str(tmp_path / 'net'), {'width': 4})
  assert sorted(os.listdir(tmp_path / 'net')) == [param_files.META, param_files.WEIGHTS]
  meta = param_files.read_meta(str(tmp_path / 'net'), 'train one.')
  assert meta == {'width': 4}
  loaded, fingerprint = param_files.load(str(tmp_path / 'net'), lambda m: _abstract(m['width']),
                                         meta)
  assert len(fingerprint) == 12
  assert param_files.load(str(tmp_path / 'net'), lambda m: _abstract(4), meta)[1] == fingerprint
  for k, v in _values(loaded).items():
    np.testing.assert_array_equal(v, _values(model)[k], err_msg=k)
  with pytest.raises(ValueError, match=r'net/weights.safetensors \(architecture from '
                                       r"config.json\) does not fit .*'layers/0/kernel \(2, 4\) "
                                       r'\(expected \(2, 5\)\)'):
    param_files.load(str(tmp_path / 'net'), lambda m: _abstract(5), meta)
  with pytest.raises(FileNotFoundError, match='no weights.safetensors \\+ config.json; train one.'):
    param_files.read_meta(str(tmp_path / 'elsewhere'), 'train one.')


# ---- atomic_io ---------------------------------------------------------------------------------


def test_write_json_is_sorted_indented_fsynced_and_leaves_no_temporary(tmp_path, monkeypatch):
  synced = []
  real_fsync = os.fsync
  monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(fd), real_fsync(fd))[1])
  path = tmp_path / 'state.json'
  atomic_io.write_json(path, {'b': 1, 'a': [1, 2]})
  assert path.read_text() == json.dumps({'a': [1, 2], 'b': 1}, indent=1, sort_keys=True)
  assert synced, 'the bytes must reach the disk before the rename'
  assert os.listdir(tmp_path) == ['state.json']
  assert atomic_io.read_json(path) == {'a': [1, 2], 'b': 1}
  assert atomic_io.read_json(tmp_path / 'absent.json') is None


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / 'state.json'
  atomic_io.write_json(path, {'old': True})

  def fail(fd):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'fsync', fail)
  with pytest.raises(OSError, match='disk full'):
    atomic_io.write_json(path, {'old': False})
  assert atomic_io.read_json(path) == {'old': True}
  assert os.listdir(tmp_path) == ['state.json']   # the temporary is gone too


def test_differences_names_every_differing_leaf():
  written = {'a': {'b': 1, 'c': 2}, 'd': 'x'}
  wanted = {'a': {'b': 1, 'c': 3}, 'e': 4}
  assert atomic_io.differences(written, wanted, '{key}: {written} -> {wanted}') == [
      'a.c: 2 -> 3', "d: 'x' -> '<absent>'", "e: '<absent>' -> 4"]
