"""Orbax checkpoints: state + Grain iterator, resharding restore, damaged checkpoints."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from mmgen_jax import checkpoint
from mmgen_jax import parallel
from mmgen_jax import train_state as ts
from tests import tiny_task


def _plan(mesh_shape, config):
  mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape, strict=True)))
  tx = ts.make_optimizer(config.optim, ts.make_schedule(config.optim, 100))
  return ts.plan_train_state(tiny_task.make_model_fn(config), tx, mesh, config.sharding_rules,
                             0, config.train.rng_impl)


def _assert_same_values(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(jax.device_get(x), jax.device_get(y))


@pytest.fixture(scope='module')
def config():
  return tiny_task.tiny_config()


@pytest.fixture(scope='module')
def saved(tmp_path_factory, config):
  """Steps 1 and 2 saved from a (2, 2, 2) mesh, the iterator 2 and 3 batches in."""
  workdir = tmp_path_factory.mktemp('saved')
  plan = _plan((2, 2, 2), config)
  state = plan.init()
  it = tiny_task.make_data_iter(config, 0, 1)
  ckpt = checkpoint.Checkpointer(workdir, config)
  next(it), next(it)
  ckpt.save(1, state, it, force=True)
  state2 = state.replace(step=state.step + 1,
                         params=jax.tree.map(lambda x: x + 1.0, state.params))
  next(it)
  ckpt.save(2, state2, it, force=True)
  ckpt.close()
  return workdir, jax.device_get(state), jax.device_get(state2)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_saved_layout_holds_state_iterator_and_config(saved, config):
  workdir, _, _ = saved
  step_dir = workdir / 'checkpoints' / '2'
  assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == ['config', 'data', 'state']
  position = json.loads((step_dir / 'data' / 'process_0-of-1.json').read_text())
  assert position  # the Grain iterator's own state dict
  saved_config = json.loads((step_dir / 'config' / 'metadata').read_text())
  assert saved_config['train']['num_steps'] == config.train.num_steps


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (1, 8, 1)])
def test_restore_onto_a_different_mesh(saved, config, tmp_path, mesh_shape):
  workdir, _, state2 = saved
  plan = _plan(mesh_shape, config)
  it = tiny_task.make_data_iter(config, 0, 1)
  ckpt = checkpoint.Checkpointer(_copy(workdir, tmp_path / 'w'), config)
  state, step = ckpt.restore_latest(plan.abstract, it)
  ckpt.close()
  assert step == 2 and int(state.step) == int(state2.step)
  _assert_same_values(state, state2)
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(plan.shardings), strict=True):
    assert leaf.sharding == sharding
  # The iterator resumes where the saved one stood: the 4th batch.
  expected = tiny_task.make_data_iter(config, 0, 1)
  for _ in range(3):
    next(expected)
  np.testing.assert_array_equal(next(it)['rgb'], next(expected)['rgb'])


def _truncate_arrays(step_dir):
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[:7])


def _drop_metadata(step_dir):
  os.remove(step_dir / 'state' / '_METADATA')


def _drop_iterator_state(step_dir):
  os.remove(step_dir / 'data' / 'process_0-of-1.json')


# Orbax's failed async read of truncated data leaves an event-loop callback behind.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', [_truncate_arrays, _drop_metadata, _drop_iterator_state])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(saved, config, tmp_path, caplog,
                                                              damage):
  workdir, state1, _ = saved
  workdir = _copy(workdir, tmp_path / 'w')
  damage(workdir / 'checkpoints' / '2')
  plan = _plan((8, 1, 1), config)
  it = tiny_task.make_data_iter(config, 0, 1)
  ckpt = checkpoint.Checkpointer(workdir, config)
  with caplog.at_level(logging.ERROR):
    state, step = ckpt.restore_latest(plan.abstract, it)
  assert step == 1
  _assert_same_values(state, state1)
  assert 'Checkpoint step 2' in caplog.text and 'cannot be restored' in caplog.text
  assert ckpt.all_steps() == [1]
  moved = list((workdir / checkpoint.CORRUPT_DIR).iterdir())
  assert [p.name.split('.')[0] for p in moved] == ['2']
  # The run goes on from step 1 and can write step 2 again.
  assert ckpt.save(2, state, it, force=True)
  ckpt.close()
  assert checkpoint.Checkpointer(workdir, config).all_steps() == [1, 2]


def test_half_written_latest_checkpoint_is_ignored(saved, config, tmp_path):
  """A save killed before Orbax committed it stays a temporary directory."""
  workdir, state1, _ = saved
  workdir = _copy(workdir, tmp_path / 'w')
  steps = workdir / 'checkpoints'
  os.rename(steps / '2', steps / '2.orbax-checkpoint-tmp-1234')
  ckpt = checkpoint.Checkpointer(workdir, config)
  state, step = ckpt.restore_latest(_plan((8, 1, 1), config).abstract, None)
  ckpt.close()
  assert step == 1
  _assert_same_values(state, state1)
  assert sorted(p.name for p in steps.iterdir()) == ['1']  # the leftover is cleaned up


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(saved, config, tmp_path):
  workdir, _, _ = saved
  workdir = _copy(workdir, tmp_path / 'w')
  for step in ('1', '2'):
    _drop_metadata(workdir / 'checkpoints' / step)
  ckpt = checkpoint.Checkpointer(workdir, config)
  with pytest.raises(RuntimeError, match='no checkpoint .* could be restored, and none was moved'):
    ckpt.restore_latest(_plan((8, 1, 1), config).abstract, None)
  ckpt.close()
  assert checkpoint.Checkpointer(workdir, config).all_steps() == [1, 2]


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_run_that_differs_from_its_checkpoints_is_refused_and_moves_nothing(saved, config,
                                                                               tmp_path):
  """Every step failing alike (here: a wider model) is a setup mismatch, not damage."""
  workdir, _, _ = saved
  workdir = _copy(workdir, tmp_path / 'w')
  wider = config.copy_and_resolve_references()
  wider.model.hidden_size *= 2
  ckpt = checkpoint.Checkpointer(workdir, wider)
  with pytest.raises(RuntimeError, match='differs from the one that saved them') as e:
    ckpt.restore_latest(_plan((8, 1, 1), wider).abstract, None)
  ckpt.close()
  assert 'step 2:' in str(e.value) and 'step 1:' in str(e.value)
  assert checkpoint.Checkpointer(workdir, config).all_steps() == [1, 2]
  assert not (workdir / checkpoint.CORRUPT_DIR).exists()


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_read_only_reader_leaves_damaged_steps_and_saves_in_progress_alone(saved, config,
                                                                             tmp_path):
  workdir, state1, _ = saved
  workdir = _copy(workdir, tmp_path / 'w')
  steps = workdir / 'checkpoints'
  _drop_metadata(steps / '2')
  shutil.copytree(steps / '1', steps / '3.orbax-checkpoint-tmp-1234')  # a save being written
  ckpt = checkpoint.Checkpointer(workdir, config, read_only=True)
  state, step = ckpt.restore_latest(_plan((8, 1, 1), config).abstract, None)
  ckpt.close()
  assert step == 1
  _assert_same_values(state, state1)
  assert sorted(p.name for p in steps.iterdir()) == ['1', '2', '3.orbax-checkpoint-tmp-1234']


def test_empty_workdir_restores_nothing(config, tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, config)
  assert ckpt.restore_latest(_plan((8, 1, 1), config).abstract, None) is None
  ckpt.close()


def test_a_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint.Checkpointer('relative/workdir', tiny_task.tiny_config())
  assert ckpt.directory.is_absolute() and str(ckpt.directory).startswith(str(tmp_path))
  ckpt.close()


# ---- another run's weights (config.train.init_from) ------------------------------------------


@pytest.mark.parametrize('where', ['workdir', 'checkpoints', 'step'])
def test_load_weights_reads_params_and_ema_only(saved, config, where):
  workdir, state1, state2 = saved
  source = {'workdir': workdir, 'checkpoints': workdir / 'checkpoints',
            'step': workdir / 'checkpoints' / '1'}[where]
  want = state1 if where == 'step' else state2  # a directory of steps gives its newest
  plan = _plan((1, 8, 1), config)
  weights = checkpoint.load_weights(str(source), plan.abstract)
  assert sorted(weights) == ['ema_params', 'params']
  _assert_same_values(weights['params'], want.params)
  _assert_same_values(weights['ema_params'], want.ema_params)
  for leaf, sharding in zip(jax.tree.leaves(weights['params']),
                            jax.tree.leaves(plan.shardings.params), strict=True):
    assert leaf.sharding == sharding


def test_load_weights_from_nowhere_names_the_path(tmp_path, config):
  with pytest.raises(FileNotFoundError, match=f"init_from='{tmp_path}/run': no finished "
                     'checkpoint there'):
    checkpoint.load_weights(str(tmp_path / 'run'), _plan((8, 1, 1), config).abstract)


def test_load_weights_of_another_model_lists_the_differences(saved, config):
  workdir, _, _ = saved
  wider = config.copy_and_resolve_references()
  wider.model.hidden_size *= 2
  with pytest.raises(ValueError) as e:
    checkpoint.load_weights(str(workdir), _plan((8, 1, 1), wider).abstract)
  message = str(e.value)
  assert f"init_from='{workdir}' ({workdir}/checkpoints/2) does not fit this model" in message
  assert 'params/inp/kernel: saved (5, 64), model (5, 128)' in message
  assert 'ema_params/up/kernel: saved (64, 128), model (128, 256)' in message


def test_load_weights_names_missing_and_unexpected_parameters(saved, config):
  workdir, _, _ = saved
  abstract = _plan((8, 1, 1), config).abstract
  params = dict(abstract.params)
  params['mlp'] = params.pop('up')  # a model whose layer is named differently
  with pytest.raises(ValueError) as e:
    checkpoint.load_weights(str(workdir), abstract.replace(params=params))
  message = str(e.value)
  assert '(4 difference(s))' in message  # kernel and bias, each way; the EMA fits
  assert 'params/mlp/kernel: not in the checkpoint' in message
  assert 'params/up/bias: in the checkpoint, not in the model' in message


def test_load_weights_round_trips_the_real_model(tmp_path):
  """The DiT's per-modality heads are a list: Orbax stores their indices as strings."""
  from mmgen_jax import config_schema  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import build  # pylint: disable=g-import-not-at-top
  config = config_schema.base_config()
  config.data.resolution = 8
  config.model.update(patch_size=2, hidden_size=32, depth=1, num_heads=2)
  mesh = parallel.make_mesh(config.mesh)
  tx = ts.make_optimizer(config.optim, ts.make_schedule(config.optim, 10))
  plan = ts.plan_train_state(lambda rngs: build.build_model(config, rngs=rngs), tx, mesh,
                             config.sharding_rules, 0)
  state = plan.init()
  ckpt = checkpoint.Checkpointer(tmp_path, config)
  ckpt.save(1, state, None, force=True)
  ckpt.close()
  weights = checkpoint.load_weights(str(tmp_path), plan.abstract)
  _assert_same_values(weights['params'], state.params)
  assert 0 in weights['params']['final_layers']


@pytest.mark.parametrize('saved_scanned', [False, True],
                         ids=['per_block_into_scanned', 'scanned_into_per_block'])
def test_a_checkpoint_restores_into_the_other_trunk_layout(tmp_path, saved_scanned):
  """model.scan_layers may change between runs: the state (EMA, Adam moments) is converted."""
  from mmgen_jax import config_schema  # pylint: disable=g-import-not-at-top
  from mmgen_jax.models import build, convert  # pylint: disable=g-import-not-at-top
  config = config_schema.base_config()
  config.data.resolution = 8
  config.model.update(patch_size=2, hidden_size=32, depth=3, num_heads=2)
  config.mesh.update(data=1, fsdp=-1)
  mesh = parallel.make_mesh(config.mesh)
  tx = ts.make_optimizer(config.optim, ts.make_schedule(config.optim, 10))

  def plan(scan_layers):
    config.model.scan_layers = scan_layers
    return ts.plan_train_state(lambda rngs: build.build_model(config, rngs=rngs), tx, mesh,
                               config.sharding_rules, 0)

  state = plan(saved_scanned).init()
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
  ckpt = checkpoint.Checkpointer(tmp_path, config)
  ckpt.save(1, state, None, force=True)
  ckpt.close()

  other = plan(not saved_scanned)
  restored, step = checkpoint.Checkpointer(tmp_path, config).restore_latest(other.abstract, None)
  want = convert.to_layout(jax.device_get(state), not saved_scanned)
  assert step == 1 and convert.scan_layers_of(restored) == (not saved_scanned)
  assert jax.tree.structure(restored) == jax.tree.structure(want)
  _assert_same_values(restored, want)
  for x, a in zip(jax.tree.leaves(restored), jax.tree.leaves(other.abstract), strict=True):
    assert x.sharding.is_equivalent_to(a.sharding, x.ndim)

  weights = checkpoint.load_weights(str(tmp_path), other.abstract)
  _assert_same_values(weights, {'params': want.params, 'ema_params': want.ema_params})
