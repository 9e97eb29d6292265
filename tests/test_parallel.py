"""Mesh construction, logical-axis rules, sharded init and mesh-independent losses."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mmgen_jax import parallel
from mmgen_jax import train_state as ts
from mmgen_jax.data import pipeline
from tests import tiny_task

RULES = tiny_task.tiny_config().sharding_rules


def _mesh_cfg(data, fsdp, tensor):
  return dict(data=data, fsdp=fsdp, tensor=tensor)


# ---- mesh and rules ------------------------------------------------------------------


def test_mesh_shape_fills_the_minus_one_axis():
  assert parallel.mesh_shape(_mesh_cfg(-1, 2, 1), 8) == (4, 2, 1)
  assert parallel.mesh_shape(_mesh_cfg(2, 2, 2), 8) == (2, 2, 2)
  mesh = parallel.make_mesh(_mesh_cfg(2, -1, 2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


def test_batch_ways_counts_the_mesh_axes_the_batch_splits_over():
  mesh = parallel.make_mesh(_mesh_cfg(2, 1, 4))
  assert parallel.batch_ways(mesh, RULES) == 2  # data × fsdp; the tensor axis does not split it
  mesh = parallel.make_mesh(_mesh_cfg(2, 2, 2))
  assert parallel.batch_ways(mesh, RULES) == 4
  only_data = [(k, 'data' if k == 'batch' else v) for k, v in RULES]
  assert parallel.batch_ways(mesh, only_data) == 2
  assert parallel.batch_ways(mesh, [(k, None if k == 'batch' else v) for k, v in RULES]) == 1


@pytest.mark.parametrize('cfg, message', [
    (_mesh_cfg(-1, 3, 1), 'does not divide the 8 devices'),
    (_mesh_cfg(2, 2, 1), 'has 4 devices but 8 are available'),
    (_mesh_cfg(-1, -1, 1), 'only one axis may be -1'),
    (_mesh_cfg(0, 1, 1), 'config.mesh.data=0'),
])
def test_bad_mesh_is_explained(cfg, message):
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(cfg)


def test_logical_to_spec_follows_the_rules():
  assert parallel.logical_to_spec(('embed', 'mlp'), RULES) == P('fsdp', 'tensor')
  assert parallel.logical_to_spec(('batch', None), RULES) == P(('data', 'fsdp'), None)
  assert parallel.logical_to_spec(('vocab', 'embed'), RULES) == P(None, 'fsdp')
  assert parallel.logical_to_spec(None, RULES) == P()


def test_unknown_logical_axis_names_it_and_the_known_ones():
  with pytest.raises(KeyError, match=r"'embd'.*known logical axes: \['batch', 'channels'"):
    parallel.logical_to_spec(('embd',), RULES)


def test_rules_reject_unknown_mesh_axes_and_double_use():
  with pytest.raises(ValueError, match=r"names unknown mesh axes \['model'\]"):
    parallel.rules_dict([('embed', 'model')])
  with pytest.raises(ValueError, match='two dimensions of one array'):
    parallel.logical_to_spec(('embed', 'embed'), RULES)


def test_unknown_logical_axis_in_a_model_names_the_parameter():
  def model_fn(rngs):
    return nnx.Linear(4, 8, rngs=rngs, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ('embed', 'hidden')))
  _, params = nnx.split(parallel.abstract_model(model_fn))
  with pytest.raises(KeyError, match="parameter kernel: logical axis 'hidden'"):
    parallel.param_specs(params, RULES)


def test_initialize_distributed_single_process_is_a_no_op_and_checks_arguments():
  parallel.initialize_distributed(env={})  # nothing to join
  parallel.initialize_distributed(env={'MMGEN_COORDINATOR': 'h:1', 'MMGEN_NUM_PROCESSES': '1',
                                       'MMGEN_PROCESS_ID': '0'})
  with pytest.raises(ValueError, match=r"missing \['MMGEN_PROCESS_ID'\]"):
    parallel.initialize_distributed(env={'MMGEN_COORDINATOR': 'h:1',
                                         'MMGEN_NUM_PROCESSES': '2'})


def test_initialize_distributed_joins_when_a_cluster_is_detected_or_asked_for(monkeypatch):
  calls = []
  monkeypatch.setattr(parallel.jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  parallel.initialize_distributed(env={'MMGEN_AUTO_DISTRIBUTED': '1'})      # Cloud TPU VM
  parallel.initialize_distributed(env={'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'})
  parallel.initialize_distributed(env={'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'})  # one task
  parallel.initialize_distributed(env={'MMGEN_COORDINATOR': 'h:1', 'MMGEN_NUM_PROCESSES': '2',
                                       'MMGEN_PROCESS_ID': '1'})
  assert calls == [{}, {}, dict(coordinator_address='h:1', num_processes=2, process_id=1)]


# ---- sharded state and steps ----------------------------------------------------------


def _setup(mesh, config):
  schedule = ts.make_schedule(config.optim, 100)
  tx = ts.make_optimizer(config.optim, schedule)
  plan = ts.plan_train_state(tiny_task.make_model_fn(config), tx, mesh, config.sharding_rules,
                             0, config.train.rng_impl)
  step = ts.jit_train_step(
      ts.make_train_step(plan.graphdef, tiny_task.loss_fn, tx, schedule, ema_decay=0.9,
                         rng_impl=config.train.rng_impl),
      plan.shardings, parallel.batch_sharding(mesh, config.sharding_rules), mesh)
  return plan, step


def _losses(mesh, config, state, num_steps=3):
  plan, step = _setup(mesh, config)
  state = jax.device_put(state, plan.shardings)  # same values, this mesh's layout
  it = tiny_task.make_data_iter(config, 0, 1)
  losses = []
  for _ in range(num_steps):
    batch = pipeline.to_global_batch(next(it), mesh, config.sharding_rules)
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return np.array(losses), state


@pytest.mark.slow
def test_losses_do_not_depend_on_the_mesh():
  config = tiny_task.tiny_config()
  one = parallel.make_mesh(_mesh_cfg(1, 1, 1), jax.devices()[:1])
  plan, _ = _setup(one, config)
  init = jax.device_get(plan.init())  # host copy: each run donates its device state
  ref, ref_state = _losses(one, config, init)
  assert ref[-1] < ref[0]  # it learns
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    mesh = parallel.make_mesh(_mesh_cfg(*shape))
    losses, state = _losses(mesh, config, init)
    np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=f'mesh {shape}')
    np.testing.assert_allclose(jax.device_get(state.params['up']['kernel']),
                               jax.device_get(ref_state.params['up']['kernel']),
                               rtol=1e-4, atol=1e-6, err_msg=f'mesh {shape}')


def test_full_fsdp_puts_an_eighth_of_the_state_on_each_device():
  config = tiny_task.tiny_config(**{'model.hidden_size': 256})
  mesh = parallel.make_mesh(_mesh_cfg(1, 8, 1))
  plan, _ = _setup(mesh, config)
  state = plan.init()  # created sharded: jit with out_shardings, no full copy anywhere
  assert state.params['up']['kernel'].sharding.spec == P('fsdp', 'tensor')
  assert state.opt_state[1][0].mu['up']['kernel'].sharding.spec == P('fsdp', 'tensor')
  trees = (state.params, state.ema_params, state.opt_state)
  total = sum(x.nbytes for x in jax.tree.leaves(trees))
  per_device = parallel.bytes_per_device(trees)
  assert len(per_device) == 8
  # Only the small replicated leaves (biases of 'mlp' and 'channels' axes, Adam's count) are
  # held in full on every device.
  for device, nbytes in per_device.items():
    assert total / 8 <= nbytes < 1.02 * total / 8, (device, nbytes, total)
