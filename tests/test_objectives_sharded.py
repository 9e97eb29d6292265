"""Both objectives with the real DiT: a (2, 2, 2) mesh gives the single-device loss."""

import jax
import numpy as np
import pytest

from mmgen_jax import config_schema
from mmgen_jax import modalities as modalities_lib
from mmgen_jax import parallel
from mmgen_jax import train
from mmgen_jax import train_state as ts
from mmgen_jax.data import pipeline


def _config(objective: str):
  c = config_schema.base_config()
  c.data.resolution = 8
  c.data.global_batch_size = 8
  c.model.patch_size, c.model.hidden_size, c.model.depth, c.model.num_heads = 2, 32, 2, 2
  c.train.rng_impl = 'rbg'
  if objective == 'mt_elbo':
    c.modalities = config_schema.scenes_modalities(with_label_modality=True)
    c.objective.name, c.objective.path, c.objective.prediction = 'mt_elbo', 'vp_cosine', 'eps'
  return c


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n, r = config.data.global_batch_size, config.data.resolution
  batch = {'label': rng.integers(0, config.data.num_classes, n).astype(np.int32)}
  for m in modalities_lib.from_config(config.modalities):
    batch[m.name] = (rng.uniform(-1, 1, (n, r, r, m.channels)).astype(np.float32) if m.is_image
                     else rng.integers(0, m.channels, n).astype(np.int32))
  return batch


def _losses(config, mesh, init, num_steps=2):
  parts = train.default_parts(config)
  schedule = ts.make_schedule(config.optim, 10)
  tx = ts.make_optimizer(config.optim, schedule)
  plan = ts.plan_train_state(parts.model_fn, tx, mesh, config.sharding_rules, 0,
                             config.train.rng_impl)
  step = ts.jit_train_step(
      ts.make_train_step(plan.graphdef, parts.loss_fn, tx, schedule, ema_decay=0.9,
                         rng_impl=config.train.rng_impl),
      plan.shardings, parallel.batch_sharding(mesh, config.sharding_rules), mesh)
  state = jax.device_put(init if init is not None else jax.device_get(plan.init()),
                         plan.shardings)
  host_init = jax.device_get(state)
  losses = []
  for i in range(num_steps):
    batch = pipeline.to_global_batch(_batch(config, i), mesh, config.sharding_rules)
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return np.array(losses), host_init


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['decoupled', 'mt_elbo'])
def test_train_step_loss_is_the_same_on_a_2x2x2_mesh(objective):
  config = _config(objective)
  one = jax.make_mesh((1, 1, 1), parallel.MESH_AXES, devices=jax.devices()[:1],
                      axis_types=(jax.sharding.AxisType.Auto,) * 3)
  ref, init = _losses(config, one, None)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  losses, _ = _losses(config, parallel.make_mesh(config.mesh), init)
  assert np.all(np.isfinite(ref))
  np.testing.assert_allclose(losses, ref, rtol=1e-5)
